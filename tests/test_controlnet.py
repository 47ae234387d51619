"""KosmosGControlNetPipeline: a zero ControlNet changes nothing, a trained-looking one does; the canny pre-processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw

from kosmos_g.controlnet import KosmosGControlNetPipeline, canny
from kosmos_g.testing import build_tiny_pipeline

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0, image_size=SIZE).use_scheduler("dpm++")


def square(size: int = SIZE) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill="white")
    return im


def zero_controlnet(unet) -> ControlNetModel:
    # from_unet copies the U-Net's encoder and zero-initialises the output convolutions, as ControlNet training
    # starts; the conditioning embedding downsamples by the VAE's factor (4 here: 3 blocks).
    torch.manual_seed(0)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))


def sample(pipe, **kw):
    args = dict(num_inference_steps=STEPS, guidance_scale=4.0, output_type="np", generator=torch.Generator().manual_seed(3))
    return pipe(["a", square(40), "on the beach"], **{**args, **kw}).images


def test_zero_controlnet_gives_the_plain_image_and_a_nonzero_one_changes_it(pipe):
    plain = sample(pipe, num_images_per_prompt=2)
    controlled = KosmosGControlNetPipeline.from_kosmos_g(pipe, zero_controlnet(pipe.unet))
    assert controlled.unet is pipe.unet  # shares the models
    same = sample(controlled, control_image=canny(square()), num_images_per_prompt=2)
    assert same.shape == plain.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(same, plain, atol=1e-5)

    changed_net = zero_controlnet(pipe.unet)
    with torch.no_grad():  # what training does to the zero convolutions: make them non-zero
        for conv in [*changed_net.controlnet_down_blocks, changed_net.controlnet_mid_block,
                     changed_net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.3)
    controlled = KosmosGControlNetPipeline.from_kosmos_g(pipe, changed_net)
    changed = sample(controlled, control_image=canny(square()), num_images_per_prompt=2)
    assert np.abs(changed - plain).max() > 1e-2
    # ... and the control image matters: another one gives other images.
    other = sample(controlled, control_image=canny(square().rotate(45)), num_images_per_prompt=2)
    assert np.abs(other - changed).max() > 1e-3
    # controlnet_conditioning_scale 0 switches it off.
    np.testing.assert_allclose(sample(controlled, control_image=canny(square()), num_images_per_prompt=2,
                                      controlnet_conditioning_scale=0.0), plain, atol=1e-5)


def test_canny_finds_the_edges_of_a_square():
    edges = np.asarray(canny(square(64)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[..., 0] > 0
    assert on[16, 16:48].any() and not on[32, 32] and not on[0, 0]  # the border, not the inside or the background
    with pytest.raises(ValueError, match="canny thresholds"):
        canny(square(), 200, 100)


def test_controlnet_for_another_unet_is_refused(pipe):
    other = build_tiny_pipeline(seed=0, image_size=SIZE, cross_attention_dim=32).unet
    with pytest.raises(ValueError, match="cross_attention_dim"):
        KosmosGControlNetPipeline.from_kosmos_g(pipe, zero_controlnet(other))
