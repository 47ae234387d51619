"""KosmosGPipeline: same images as diffusers' SD pipeline from its embeddings, seeds, save/load, prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from kosmos_g.pipeline import KosmosGPipeline, condition
from kosmos_g.processor import PromptError
from kosmos_g.testing import build_tiny_pipeline, tiny_aligner

SIZE, DIM = 32, 64  # tiny U-Net: 32 px images (8x8 latents), cross-attention width 64
STEPS = 3


def noise_image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    """Tiny random parts: tiny-preset MLLM (with ViT + connector), 1+1-layer aligner, tiny U-Net/VAE."""
    return build_tiny_pipeline(seed=0, image_size=SIZE, cross_attention_dim=DIM)


@pytest.fixture
def dpm(pipe):
    return pipe.use_scheduler("dpm++")


def generate(pipe, prompt, seed=0, **kw):
    kw = {"num_inference_steps": STEPS, "output_type": "np", **kw}
    return pipe(prompt, generator=seeded(seed), **kw).images


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim"])
def test_same_image_as_stable_diffusion_pipeline_from_encode_prompt(pipe, scheduler):
    """Sampling is SD v1.5's: diffusers' own pipeline, given our embeddings, draws the same images."""
    pipe.use_scheduler(scheduler)
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet,
                                 scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    prompt = ["a red", noise_image(0), "on the beach"]
    embeds, negative = pipe.encode_prompt(prompt, num_images_per_prompt=2)
    ours = generate(pipe, prompt, seed=3, guidance_scale=6.0, num_images_per_prompt=2)
    theirs = sd(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS, guidance_scale=6.0,
                output_type="np", generator=seeded(3)).images
    assert ours.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # The comparison can fail: another negative condition gives other images.
    other = sd(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(negative), num_inference_steps=STEPS,
               guidance_scale=6.0, output_type="np", generator=seeded(3)).images
    assert np.abs(ours - other).max() > 1e-3


def test_fixed_seed_is_deterministic_and_seeds_differ(dpm):
    a, b, c = (generate(dpm, "a blue cat", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # Passing the same initial noise as `latents` reproduces the seeded run.
    noise = torch.randn(1, 4, SIZE // 4, SIZE // 4, generator=seeded(0))
    np.testing.assert_allclose(generate(dpm, "a blue cat", seed=5, latents=noise), a, atol=1e-6)


def test_condition_is_computed_once_per_call(dpm, monkeypatch):
    calls = []
    encode = dpm.mllm.encode
    monkeypatch.setattr(dpm.mllm, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    generate(dpm, "a blue cat", num_inference_steps=4, num_images_per_prompt=2)
    assert len(calls) == 2  # the prompt and the (shared) negative, not once per step or image


def test_save_pretrained_then_from_pretrained_reproduces_the_image(dpm, tmp_path):
    expected = generate(dpm, ["a", noise_image(1), "wearing a hat"], seed=2)
    dpm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "aligner", "mllm", "model_index.json", "processor", "scheduler", "unet", "vae"]
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "KosmosGPipeline" and index["mllm"] == ["kosmos_g.models.mllm", "MultimodalLM"]
    assert dpm.config["processor"] == ("kosmos_g.processor", "KosmosGProcessor")  # saving left it registered

    loaded = KosmosGPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    assert loaded.scheduler.config.algorithm_type == "dpmsolver++"
    assert loaded.processor.num_image_tokens == dpm.processor.num_image_tokens
    for name in ("mllm", "aligner", "unet", "vae"):  # every weight comes back bit for bit...
        saved, back = getattr(dpm, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), name
    # ...and the image to float32 rounding (loaded tensors may take other kernels: differences of ~1e-6 seen)
    np.testing.assert_allclose(generate(loaded, ["a", noise_image(1), "wearing a hat"], seed=2), expected, atol=1e-5)


def test_from_pretrained_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*save_pretrained"):
        KosmosGPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        KosmosGPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KosmosGPipeline"}))
    (tmp_path / "mllm").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks processor/, aligner/, unet/, vae/, scheduler/"):
        KosmosGPipeline.from_pretrained(tmp_path)


def test_interleaved_prompt_forms_agree_and_images_matter(dpm):
    dog, hat = noise_image(1), noise_image(2)
    as_list = generate(dpm, ["a", dog, "wearing", hat], seed=0)
    as_text = generate(dpm, "a <i> wearing <i>", images=[dog, hat], seed=0)
    np.testing.assert_array_equal(as_list, as_text)
    # the images (and their order) reach the condition, and through it the image (same seed: any change is theirs)
    red = Image.new("RGB", (40, 40), (250, 20, 20))
    cond, _ = dpm.encode_prompt("a <i> wearing <i>", images=[red, hat])
    cond_swapped, _ = dpm.encode_prompt("a <i> wearing <i>", images=[hat, red])
    assert (cond - cond_swapped).abs().max() > 1e-4
    swapped = generate(dpm, "a <i> wearing <i>", images=[hat, dog], seed=0)
    assert np.abs(as_list - swapped).max() > 1e-6
    with pytest.raises(PromptError, match=r"2 <i> placeholder\(s\) but 1 image"):
        dpm("a <i> wearing <i>", images=[dog])


def test_default_negative_is_the_null_prompt_condition(pipe):
    processor = pipe.processor
    empty = processor.null_prompt()
    assert empty.input_ids.tolist() == [processor.tokenizer.bos_token_id]  # `<s>` alone, as in the original
    with torch.no_grad():
        null = condition(pipe.mllm, pipe.aligner, processor.collate([empty]))
    embeds, negative = pipe.encode_prompt("a <i> on the beach", images=[noise_image(0)], num_images_per_prompt=3)
    assert embeds.shape == negative.shape == (3, 77, DIM)
    for row in negative:
        torch.testing.assert_close(row, null[0])
    torch.testing.assert_close(pipe.encode_prompt("a dog", negative_prompt="")[1], null)
    blurry = pipe.encode_prompt("a dog", negative_prompt="blurry")[1]
    assert not torch.allclose(blurry, null)  # a negative prompt is `<s>` + its tokens
    with torch.no_grad():
        expected = condition(pipe.mllm, pipe.aligner, processor.collate([processor("blurry")]))
    torch.testing.assert_close(blurry, expected)
    assert processor("blurry").input_ids.tolist() == [processor.tokenizer.bos_token_id] + processor.text_ids("blurry")
    assert pipe.encode_prompt("a dog", do_classifier_free_guidance=False)[1] is None


def test_batch_of_prompts_matches_prompts_one_by_one(pipe):
    """Right padding in a batch changes nothing: the masks hide pads from the MLLM and the aligner."""
    prompts = [["a red dog on the beach"], ["a", noise_image(3), "cat"]]
    embeds, negative = pipe.encode_prompt(prompts, negative_prompt=[["blurry"], []])
    assert embeds.shape == (2, 77, DIM)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(embeds[i], pipe.encode_prompt(p)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(negative[1], pipe.encode_prompt("a dog")[1][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(PromptError, match="negative prompts"):
        pipe.encode_prompt(prompts, negative_prompt=[["a"], ["b"], ["c"]])


def test_use_scheduler_keeps_the_noise_schedule(pipe):
    betas = pipe.scheduler.betas.clone()
    assert isinstance(pipe.use_scheduler("ddim").scheduler, DDIMScheduler)
    assert isinstance(pipe.use_scheduler("ddpm").scheduler, DDPMScheduler)
    dpm = pipe.use_scheduler().scheduler  # dpm++ is the default name
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    torch.testing.assert_close(dpm.betas, betas)
    assert pipe.config["scheduler"] == ("diffusers", "DPMSolverMultistepScheduler")  # what save_pretrained writes
    with pytest.raises(ValueError, match="unknown scheduler 'nope'.*dpm\\+\\+"):
        pipe.use_scheduler("nope")


def test_output_types_and_default_size(dpm):
    pil = dpm("a cat", num_inference_steps=2, num_images_per_prompt=2, generator=seeded(0)).images
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) for im in pil)
    pt = dpm("a cat", num_inference_steps=2, output_type="pt", generator=seeded(0)).images
    assert pt.shape == (1, 3, SIZE, SIZE) and pt.min() >= 0 and pt.max() <= 1
    np.testing.assert_allclose(pt[0].permute(1, 2, 0).numpy(), np.asarray(pil[0]) / 255, atol=1 / 255 + 1e-6)
    big = dpm("a cat", num_inference_steps=1, height=48, width=40, output_type="np", generator=seeded(0)).images
    assert big.shape == (1, 48, 40, 3)
    with pytest.raises(ValueError, match="multiples of 4"):
        dpm("a cat", num_inference_steps=1, height=30)


def test_aligner_width_must_match_the_unet(pipe):
    aligner = tiny_aligner(llm_dim=64, clip_dim=DIM + 8)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        KosmosGPipeline(mllm=pipe.mllm, processor=pipe.processor, aligner=aligner, unet=pipe.unet, vae=pipe.vae,
                        scheduler=pipe.scheduler)
