"""The vision encoder (timm CLIP ViT) and the perceiver resampler."""

from __future__ import annotations

import pytest
import torch
import transformers

from kosmos_g.models.resampler import Resampler
from kosmos_g.models.vision import PAPER_MODEL_NAME, TINY_VIT_KWARGS, VisionEncoder

TINY_IMG = 32


def tiny_encoder(**kwargs) -> VisionEncoder:
    return VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, None, **TINY_VIT_KWARGS, **kwargs)


def openclip_state_dict(width: int, layers: int, patch: int, grid: int, embed_dim: int = 16) -> dict:
    """Random weights in open_clip's CLIP layout (`visual.*` image tower plus a few text-tower keys)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "visual.class_embedding": rand(width),
        "visual.positional_embedding": rand(grid * grid + 1, width),
        "visual.conv1.weight": rand(width, 3, patch, patch),  # OpenAI's patch conv has no bias
        "visual.ln_pre.weight": rand(width), "visual.ln_pre.bias": rand(width),
        "visual.ln_post.weight": rand(width), "visual.ln_post.bias": rand(width),
        "visual.proj": rand(width, embed_dim),
        # The text tower and logit scale are in the same file and must be ignored.
        "token_embedding.weight": rand(10, embed_dim), "logit_scale": torch.tensor(4.6),
        "transformer.resblocks.0.attn.in_proj_weight": rand(3 * embed_dim, embed_dim),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": rand(width), p + "ln_1.bias": rand(width),
            p + "attn.in_proj_weight": rand(3 * width, width), p + "attn.in_proj_bias": rand(3 * width),
            p + "attn.out_proj.weight": rand(width, width), p + "attn.out_proj.bias": rand(width),
            p + "ln_2.weight": rand(width), p + "ln_2.bias": rand(width),
            p + "mlp.c_fc.weight": rand(4 * width, width), p + "mlp.c_fc.bias": rand(4 * width),
            p + "mlp.c_proj.weight": rand(width, 4 * width), p + "mlp.c_proj.bias": rand(width),
        })
    return sd


def test_tiny_output_shape_and_unit_norm():
    encoder = tiny_encoder().eval()
    assert encoder.width == TINY_VIT_KWARGS["embed_dim"]
    assert encoder.num_tokens == (TINY_IMG // TINY_VIT_KWARGS["patch_size"]) ** 2 + 1 == 17
    tokens = encoder(torch.randn(2, 3, TINY_IMG, TINY_IMG))
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 17))


def test_output_is_final_norm_of_every_token_then_l2():
    # All tokens (not only CLS) go through the final LayerNorm before the L2 normalisation.
    encoder = tiny_encoder().eval()
    with torch.no_grad():
        encoder.vit.norm.bias.fill_(3.0)  # a bias shift that survives only if norm is applied last
        x = torch.randn(1, 3, TINY_IMG, TINY_IMG)
        vit = encoder.vit
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks:
            h = block(h)
        expected = torch.nn.functional.normalize(vit.norm(h), dim=-1)
        torch.testing.assert_close(encoder(x), expected)


def test_bad_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="clip_image_transform"):
        tiny_encoder()(torch.randn(1, 3, 48, 48))


def test_lock_trains_only_last_block_and_final_norm():
    encoder = tiny_encoder()
    encoder.lock()
    assert encoder.trainable_parameter_names() == [
        "vit.blocks.1.norm1.weight", "vit.blocks.1.norm1.bias",
        "vit.blocks.1.attn.qkv.weight", "vit.blocks.1.attn.qkv.bias",
        "vit.blocks.1.attn.proj.weight", "vit.blocks.1.attn.proj.bias",
        "vit.blocks.1.norm2.weight", "vit.blocks.1.norm2.bias",
        "vit.blocks.1.mlp.fc1.weight", "vit.blocks.1.mlp.fc1.bias",
        "vit.blocks.1.mlp.fc2.weight", "vit.blocks.1.mlp.fc2.bias",
        "vit.norm.weight", "vit.norm.bias",
    ]
    # Gradients flow to exactly those parameters.
    encoder(torch.randn(2, 3, TINY_IMG, TINY_IMG)).sum().backward()
    with_grad = sorted(n for n, p in encoder.named_parameters() if p.grad is not None)
    assert with_grad == sorted(encoder.trainable_parameter_names())

    encoder.lock(unlocked_last_blocks=0, unlock_final_norm=False)
    assert encoder.trainable_parameter_names() == []
    encoder.unlock()
    assert len(encoder.trainable_parameter_names()) == len(list(encoder.parameters()))
    with pytest.raises(ValueError, match="unlocked_last_blocks"):
        encoder.lock(unlocked_last_blocks=3)


def test_frozen_parts_stay_in_eval_mode_after_train():
    encoder = tiny_encoder()
    encoder.lock()
    encoder.train()
    vit = encoder.vit
    assert encoder.training and vit.blocks[1].training and vit.norm.training
    for frozen in (vit.patch_embed, vit.pos_drop, vit.norm_pre, vit.blocks[0]):
        assert not frozen.training and not any(m.training for m in frozen.modules())
    encoder.eval()
    assert not vit.blocks[1].training
    encoder.unlock()
    encoder.train()
    assert vit.blocks[0].training


def test_loads_openclip_state_dict_through_timm(tmp_path):
    width, patch = TINY_VIT_KWARGS["embed_dim"], TINY_VIT_KWARGS["patch_size"]
    sd = openclip_state_dict(width, TINY_VIT_KWARGS["depth"], patch, TINY_IMG // patch)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    encoder = VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, str(path), **TINY_VIT_KWARGS)
    vit = encoder.vit
    torch.testing.assert_close(vit.patch_embed.proj.weight, sd["visual.conv1.weight"])
    torch.testing.assert_close(vit.cls_token.flatten(), sd["visual.class_embedding"])
    torch.testing.assert_close(vit.pos_embed[0], sd["visual.positional_embedding"])
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight,
                               sd["visual.transformer.resblocks.1.attn.in_proj_weight"])
    torch.testing.assert_close(vit.blocks[0].mlp.fc2.bias, sd["visual.transformer.resblocks.0.mlp.c_proj.bias"])
    torch.testing.assert_close(vit.norm_pre.weight, sd["visual.ln_pre.weight"])
    torch.testing.assert_close(vit.norm.weight, sd["visual.ln_post.weight"])
    torch.testing.assert_close(vit.norm.bias, sd["visual.ln_post.bias"])


def test_loads_openai_torchscript_archive(tmp_path):
    # OpenAI ships CLIP as a TorchScript archive (ViT-L-14.pt) with the same `visual.*` keys.
    width, patch = TINY_VIT_KWARGS["embed_dim"], TINY_VIT_KWARGS["patch_size"]
    sd = openclip_state_dict(width, TINY_VIT_KWARGS["depth"], patch, TINY_IMG // patch)

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    holder = Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        module = holder
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value.half()))  # OpenAI's file is fp16
    path = tmp_path / "ViT-L-14.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated but is how OpenAI's file is read
        torch.jit.script(holder).save(str(path))
    encoder = VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, str(path), **TINY_VIT_KWARGS)
    torch.testing.assert_close(encoder.vit.blocks[0].attn.qkv.weight,
                               sd["visual.transformer.resblocks.0.attn.in_proj_weight"].half().float())


@pytest.mark.parametrize("tower", ["CLIPModel", "CLIPVisionModel"])
def test_loads_transformers_clip_folder(tmp_path, tower):
    # The layout of openai/clip-vit-large-patch14 on the Hub (and of the tiny world's teacher CLIP).
    vision = transformers.CLIPVisionConfig(
        image_size=TINY_IMG, patch_size=TINY_VIT_KWARGS["patch_size"], hidden_size=TINY_VIT_KWARGS["embed_dim"],
        num_hidden_layers=TINY_VIT_KWARGS["depth"], num_attention_heads=TINY_VIT_KWARGS["num_heads"],
        intermediate_size=int(TINY_VIT_KWARGS["embed_dim"] * TINY_VIT_KWARGS["mlp_ratio"]))
    torch.manual_seed(0)
    if tower == "CLIPModel":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = transformers.CLIPVisionModel(vision)
    model.save_pretrained(tmp_path)
    encoder = VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, str(tmp_path), **TINY_VIT_KWARGS).eval()
    tower = model.vision_model if tower == "CLIPModel" else model
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():  # timm's final norm is applied to every token; transformers' to CLS only
        expected = tower.eval().post_layernorm(tower(pixel_values=x).last_hidden_state)
        torch.testing.assert_close(encoder.vit.forward_features(x), expected)


def test_wrong_checkpoint_layout_is_an_error(tmp_path):
    path = tmp_path / "not_clip.bin"
    torch.save({"conv1.weight": torch.zeros(32, 3, 8, 8)}, path)
    with pytest.raises(ValueError, match=r"does not match .*missing \['cls_token'"):
        VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, str(path), **TINY_VIT_KWARGS)
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(32, 3, 8, 8)}, path)
    with pytest.raises(ValueError, match="transformers CLIP checkpoint but has no 'embeddings.class_embedding'"):
        VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, str(path), **TINY_VIT_KWARGS)


def test_missing_weights_file_names_path_key_and_fix(tmp_path):
    missing = str(tmp_path / "nope" / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError) as err:
        VisionEncoder.from_config(PAPER_MODEL_NAME, 224, missing)
    message = str(err.value)
    assert missing in message and "model.vision.weights_path" in message
    assert "open_clip_pytorch_model.bin" in message and "ViT-L-14.pt" in message


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="timm.list_models"):
        VisionEncoder.from_config("vit_large_patch14_clip_244", 224, None)


def test_resampler_shapes_and_gradients():
    resampler = Resampler(vision_width=32, llm_width=48, num_latents=5, num_heads=4)
    tokens = torch.randn(3, 17, 32)
    out = resampler(tokens)
    assert out.shape == (3, 5, 48)
    out.square().mean().backward()
    for name in ("latents", "proj.weight", "proj.bias"):
        grad = resampler.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Each image is resampled independently of the others in the batch.
    torch.testing.assert_close(resampler(tokens[1:2]), out[1:2])
    with pytest.raises(ValueError, match="vision_width"):
        resampler(torch.randn(3, 17, 31))
    with pytest.raises(ValueError, match="divisible"):
        Resampler(32, 48, num_heads=5)


def test_resampler_reads_the_image():
    # Different images give different outputs (the latents attend to the image tokens).
    resampler = Resampler(vision_width=32, llm_width=48, num_latents=5, num_heads=4).eval()
    a, b = resampler(torch.randn(1, 17, 32)), resampler(torch.randn(1, 17, 32))
    assert not torch.allclose(a, b)


def test_paper_sizes_on_meta_device():
    with torch.device("meta"):
        encoder = VisionEncoder.from_config(PAPER_MODEL_NAME, 224, None)
        resampler = Resampler(encoder.width, 2048, num_latents=64)
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 300e6 < n_params < 306e6  # CLIP ViT-L/14 image tower without the projection: ~303M
    assert encoder.width == 1024 and encoder.num_tokens == 257
    assert resampler.latents.shape == (64, 2048) and resampler.proj.weight.shape == (2048, 1024)
    assert resampler.attn.num_heads == 32
    encoder.lock()
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert 12e6 < trainable < 13e6  # one ViT-L block (~12.6M) + the final norm


def test_clip_folder_without_weights_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        VisionEncoder.from_config(PAPER_MODEL_NAME, TINY_IMG, str(tmp_path), **TINY_VIT_KWARGS)
    assert str(tmp_path / "model.safetensors") in str(err.value) and "transformers CLIP folder" in str(err.value)
