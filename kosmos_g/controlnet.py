"""ControlNet with a Kosmos-G condition: diffusers' `StableDiffusionControlNetPipeline` fed `encode_prompt`'s embeddings.

    controlnet = ControlNetModel.from_pretrained("controlnets/canny")              # any SD v1.5 ControlNet, local
    pipe = KosmosGControlNetPipeline.from_kosmos_g(KosmosGPipeline.from_pretrained(export), controlnet)
    image = pipe("a <i> on the beach", control_image=edges, images=[dog]).images[0]

The condition M(MLLM(prompt)) stands where SD v1.5 has its CLIP text states, so a ControlNet trained for SD v1.5
takes it unchanged; sampling is diffusers' own ControlNet pipeline, step for step. `canny` is the usual
pre-processor (OpenCV), as in the original Kosmos-G app's Canny tab.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from kosmos_g.pipeline import KosmosGPipeline, Prompt


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges as a white-on-black RGB control image, the input of SD v1.5 canny ControlNets."""
    import cv2  # the app extra (opencv-python-headless); only this pre-processor needs it

    if not 0 <= low_threshold <= high_threshold <= 255:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high <= 255, got {low_threshold}, {high_threshold}")
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


class KosmosGControlNetPipeline(KosmosGPipeline):
    """KosmosGPipeline + a ControlNet: the same condition, sampled by StableDiffusionControlNetPipeline."""

    model_cpu_offload_seq = "mllm->aligner->controlnet->unet->vae"

    def __init__(self, mllm, processor, aligner, unet, vae, scheduler, controlnet: ControlNetModel):
        super().__init__(mllm=mllm, processor=processor, aligner=aligner, unet=unet, vae=vae, scheduler=scheduler)
        if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
            raise ValueError(f"the ControlNet's cross_attention_dim is {controlnet.config.cross_attention_dim} but "
                             f"the U-Net's is {unet.config.cross_attention_dim}; use a ControlNet made for this U-Net "
                             "(SD v1.5 ControlNets for SD v1.5)")
        self.register_modules(controlnet=controlnet)

    @classmethod
    def from_kosmos_g(cls, pipe: KosmosGPipeline, controlnet: ControlNetModel) -> "KosmosGControlNetPipeline":
        """Share a loaded KosmosGPipeline's models (no copy) and add `controlnet`."""
        parts = {k: v for k, v in pipe.components.items() if k != "controlnet"}
        if (controlnet.device, controlnet.dtype) != (pipe.unet.device, pipe.unet.dtype):
            controlnet = controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
        out = cls(**parts, controlnet=controlnet)
        out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return out

    def stable_diffusion(self) -> StableDiffusionControlNetPipeline:
        """diffusers' ControlNet pipeline over the same U-Net, VAE, scheduler and ControlNet (no text encoder)."""
        sd = StableDiffusionControlNetPipeline(vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet,
                                               controlnet=self.controlnet, scheduler=self.scheduler,
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
        sd.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return sd

    @torch.no_grad()
    def __call__(self, prompt: Prompt, control_image: Union[Image.Image, torch.Tensor, list], images: Optional[list] = None,
                 negative_prompt: Optional[Prompt] = None, num_inference_steps: int = 20, guidance_scale: float = 6.0,
                 num_images_per_prompt: int = 1, generator: Optional[Union[torch.Generator, list]] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 controlnet_conditioning_scale: float = 1.0, output_type: str = "pil",
                 latents: Optional[torch.Tensor] = None, eta: float = 0.0, return_dict: bool = True):
        """Generate as `KosmosGPipeline.__call__`, guided by `control_image` (e.g. `canny(photo)`), resized to
        height x width (default: the U-Net's native size)."""
        if control_image is None:
            raise ValueError("a ControlNet pipeline needs control_image= (e.g. canny(photo)); "
                             "use KosmosGPipeline for generation without one")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        do_cfg = guidance_scale > 1
        embeds, negative = self.encode_prompt(prompt, images, negative_prompt, num_images_per_prompt, do_cfg,
                                              self._execution_device)
        return self.stable_diffusion()(
            prompt_embeds=embeds, negative_prompt_embeds=negative, image=control_image, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            latents=latents, eta=eta, output_type=output_type, return_dict=return_dict,
            controlnet_conditioning_scale=controlnet_conditioning_scale)
