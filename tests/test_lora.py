"""U-Net LoRA on KosmosGPipeline: a random LoRA written with peft in the diffusers format, loaded, scaled, unloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from kosmos_g.testing import LORA_ALPHA as ALPHA
from kosmos_g.testing import LORA_RANK as RANK
from kosmos_g.testing import build_tiny_pipeline, write_random_lora


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def merged_unet(unet, path: str, scale: float):
    """The U-Net with W + scale * alpha / r * B @ A written into its weights by hand: the expected result."""
    out = copy.deepcopy(unet)
    tensors = load_file(path)
    modules = dict(out.named_modules())
    n = 0
    for key, a in tensors.items():
        if ".lora.down." not in key:  # diffusers' format: <module>.lora.down (A) / .lora.up (B)
            continue
        b = tensors[key.replace(".lora.down.", ".lora.up.")]
        module = modules[key.removeprefix("unet.").split(".lora.down.")[0]]
        module.weight.data += scale * ALPHA / RANK * (b.float() @ a.float())
        n += 1
    assert n > 0
    return out


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


def test_lora_scales_as_merged_weights_and_unloads_bit_for_bit(pipe, tmp_path):
    path = write_random_lora(pipe.unet, tmp_path)
    original = copy.deepcopy(pipe.unet)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(path, adapter_name="style")
    try:
        pipe.set_adapters("style", adapter_weights=0.0)
        torch.testing.assert_close(unet_output(pipe.unet), base, rtol=0, atol=0)  # scale 0: exactly no LoRA
        for scale in (0.5, 1.0):
            pipe.set_adapters("style", adapter_weights=scale)
            out = unet_output(pipe.unet)
            torch.testing.assert_close(out, unet_output(merged_unet(original, path, scale)), rtol=1e-4, atol=1e-5)
            assert (out - base).abs().max() > 1e-2  # the LoRA does change the output
    finally:
        pipe.unload_lora_weights()
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    torch.testing.assert_close(unet_output(pipe.unet), base, rtol=0, atol=0)  # bit for bit


def test_fused_lora_is_the_same_function(pipe, tmp_path):
    path = write_random_lora(pipe.unet, tmp_path)
    original = copy.deepcopy(pipe.unet)
    pipe.load_lora_weights(path, adapter_name="style")
    try:
        pipe.fuse_lora(lora_scale=0.5)  # merged into the weights for speed
        torch.testing.assert_close(unet_output(pipe.unet), unet_output(merged_unet(original, path, 0.5)),
                                   rtol=1e-4, atol=1e-5)
        pipe.unfuse_lora()
    finally:
        pipe.unload_lora_weights()
    # unfusing subtracted the delta again: the original up to rounding
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(original), rtol=1e-4, atol=1e-5)


def test_missing_lora_file_is_one_clear_error(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA weights .* not found"):
        pipe.load_lora_weights(tmp_path / "nope.safetensors")
