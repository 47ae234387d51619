"""FrozenDiffusion: loading from an SD v1.5-layout folder, freezing, latents, noise, SD compatibility."""

import os

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from kosmos_g.models.diffusion import (SD15_SCHEDULER, FrozenDiffusion, build_tiny_diffusion,
                                       save_tiny_sd_folder)
from kosmos_g.models.tokenizers import train_clip_tokenizer

DIM = 64  # cross-attention width of the tiny U-Net (768 for SD v1.5)
SIZE = 32  # image size in pixels -> 8x8 latents


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")), DIM, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def diffusion(sd_folder):
    return FrozenDiffusion.from_pretrained(sd_folder)


def _unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, DIM, generator=g)
    with torch.no_grad():
        return model.predict_noise(noisy, torch.tensor([10, 900]), cond)


def test_round_trip_reproduces_the_saved_unet(sd_folder, diffusion):
    same_seed, other_seed = build_tiny_diffusion(DIM, SIZE, seed=0), build_tiny_diffusion(DIM, SIZE, seed=1)
    out = _unet_out(diffusion)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, _unet_out(same_seed))
    assert not torch.allclose(out, _unet_out(other_seed))  # the comparison can fail
    # The schedule is SD v1.5's.
    cfg = diffusion.noise_scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.prediction_type) == (
        1000, 0.00085, 0.012, "scaled_linear", "epsilon")
    assert sorted(os.listdir(sd_folder)) == ["scheduler", "unet", "vae"]


def test_sd15_pndm_scheduler_config_loads_as_ddpm(tmp_path):
    # Real SD v1.5 ships a PNDMScheduler config; training noise must still use its betas.
    (tmp_path / "text_encoder").mkdir()  # written separately by the caller; saving must keep it
    path = save_tiny_sd_folder(str(tmp_path), DIM, image_size=SIZE)
    assert (tmp_path / "text_encoder").is_dir()
    pndm = PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("clip_sample",)},
                         skip_prk_steps=True, set_alpha_to_one=False)
    pndm.save_pretrained(os.path.join(path, "scheduler"))
    loaded = FrozenDiffusion.from_pretrained(path).noise_scheduler
    torch.testing.assert_close(loaded.alphas_cumprod, pndm.alphas_cumprod)


def test_latents_use_the_configured_scaling_factor(tmp_path):
    m = FrozenDiffusion.from_pretrained(
        save_tiny_sd_folder(str(tmp_path), DIM, image_size=SIZE, vae_kwargs={"scaling_factor": 0.5}))
    assert m.scaling_factor == 0.5
    pixels = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    latents = m.encode_images(pixels, sample=False)
    assert latents.shape == (2, 4, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        raw = m.vae.encode(pixels).latent_dist.mode()
        torch.testing.assert_close(latents, raw * 0.5)
        images = m.decode_latents(latents)
        torch.testing.assert_close(images, (m.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1))
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
    # Sampling the posterior differs from its mode but is reproducible with a generator.
    s1 = m.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    s2 = m.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, latents)


def test_encode_rejects_pixels_outside_minus_one_one(diffusion):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        diffusion.encode_images(torch.rand(1, 3, SIZE, SIZE) * 255)


def test_add_noise_follows_the_schedule(diffusion):
    latents = torch.randn(64, 4, 8, 8)
    noisy, noise, t = diffusion.add_noise(latents, generator=torch.Generator().manual_seed(0))
    again = diffusion.add_noise(latents, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, again[0])
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 32
    a = diffusion.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise)


def test_frozen_weights_only_the_condition_learns(sd_folder):
    m = FrozenDiffusion.from_pretrained(sd_folder)
    m.lock()
    assert not any(p.requires_grad for p in m.parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cond = torch.randn(2, 77, DIM, requires_grad=True)
    opt = torch.optim.SGD([cond], lr=10.0)
    noisy, noise, t = m.add_noise(m.encode_images(torch.rand(2, 3, SIZE, SIZE) * 2 - 1))
    loss = torch.nn.functional.mse_loss(m.predict_noise(noisy, t, cond), noise)
    loss.backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    cond_before = cond.detach().clone()
    opt.step()
    assert not torch.equal(cond.detach(), cond_before)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_mode_keeps_frozen_nets_in_eval(diffusion):
    parent = torch.nn.ModuleDict({"diffusion": diffusion, "head": torch.nn.Linear(2, 2)})
    parent.train()  # what Lightning does at the start of each epoch
    assert diffusion.training and parent["head"].training
    assert not diffusion.unet.training and not diffusion.vae.training
    assert not any(m.training for m in diffusion.unet.modules())


def test_condition_width_mismatch_is_a_clear_error(diffusion):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        diffusion.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, DIM + 1))


def test_missing_folder_errors_name_path_key_and_fix(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        FrozenDiffusion.from_pretrained(missing)
    assert missing in str(err.value) and "model.diffusion_path" in str(err.value)
    assert "v1.5" in str(err.value) and "local" in str(err.value)
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="vae/, scheduler/"):
        FrozenDiffusion.from_pretrained(str(partial))


def test_fp16_option_casts_frozen_weights(sd_folder):
    m = FrozenDiffusion.from_pretrained(sd_folder, dtype=torch.float16)
    assert m.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in m.parameters())
    noisy, noise, _ = m.add_noise(torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert noisy.dtype == noise.dtype == torch.float32  # the noise arithmetic stays in full precision


def test_assembles_into_a_stable_diffusion_pipeline(sd_folder, diffusion):
    """The loaded parts drop into diffusers' SD pipeline: the layout really is SD-compatible."""
    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(["a photo of a dog", "a cat wearing a hat"] * 4, vocab_size=300)
    tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=DIM, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        vae=diffusion.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=diffusion.unet,
        scheduler=diffusion.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt_embeds=torch.randn(1, 77, DIM), num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
