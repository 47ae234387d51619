"""Inference: a diffusers pipeline from an interleaved text-and-image prompt to images.

    pipe = KosmosGPipeline.from_pretrained("runs/<run>/instruct/export")   # a local folder, offline
    pipe.use_scheduler("dpm++")                                          # the paper's sampler
    image = pipe("a <i> on the beach", images=[dog]).images[0]
    image = pipe(["a", dog, "wearing", hat, "on the beach"], generator=torch.Generator().manual_seed(0)).images[0]

The U-Net condition is `condition(mllm, aligner, batch)` = M(MLLM(prompt)) (`models/kosmos_g.py`, shared with
stage 3) of shape [B, 77, d_clip], the very tensor SD v1.5 gets from its CLIP text encoder. So after
`encode_prompt`, sampling is exactly `StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...)`
(the tests check this to float tolerance), and ControlNet / LoRA pipelines for SD v1.5 accept the same embeddings.

Classifier-free guidance: the negative condition defaults to the null prompt `<s>` alone, the same null
condition stage 3 trains with (`condition` of `processor.null_prompt()`); a negative prompt is `<s>` + its
tokens, as in the original.

Scheduler: the pipeline samples with the scheduler it holds, as every diffusers pipeline does (the stage-3
export saves DPM-Solver++, the paper's sampler; any other is one call away, `pipe.use_scheduler("ddim")`).
DPM-Solver++ is also the default of the CLI (`python -m kosmos_g.generate`). It is not forced at construction because
`from_pretrained` also constructs: a saved or passed-in scheduler would be silently replaced.

Folder layout (`save_pretrained`): `model_index.json`, `mllm/`, `processor/`, `aligner/`, `unet/`, `vae/`,
`scheduler/`. diffusers saves and loads only components derived from its known base classes; the processor
(tokenizer + image settings) is a plain class, so this pipeline writes and reads `processor/` itself and
`model_index.json` lists it as `[null, null]`.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel,
                       UniPCMultistepScheduler)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor

from kosmos_g.lora import UNetLoraLoaderMixin
from kosmos_g.models.aligner import AlignerNet
from kosmos_g.models.kosmos_g import condition
from kosmos_g.models.mllm import MultimodalLM
from kosmos_g.processor import KosmosGProcessor, PromptError

Prompt = Union[str, list]  # "text with <i>" (+ images=[...]) or [str | PIL.Image, ...]; a list of such lists is a batch

COMPONENTS = ("mllm", "processor", "aligner", "unet", "vae", "scheduler")

# Name -> (scheduler class, overrides on top of the current scheduler's config). "dpm++" is the paper's sampler.
SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def _as_batch(prompt: Prompt, images: Optional[list] = None) -> list[list]:
    """Normalise a prompt (or a batch of list prompts) into a list of segment lists [str | PIL.Image, ...]."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        if images:
            raise PromptError("images= goes with one string prompt containing <i>; a batch of list prompts "
                              "carries its images inline")
        return [KosmosGProcessor.split_prompt(list(p)) for p in prompt]
    if not isinstance(prompt, (str, list, tuple)):
        raise PromptError(f"prompt must be a str (with <i> placeholders) or a list of str and PIL images, "
                          f"got {type(prompt).__name__}")
    return [KosmosGProcessor.split_prompt(prompt if isinstance(prompt, str) else list(prompt), images)]


class KosmosGPipeline(DiffusionPipeline, StableDiffusionMixin, UNetLoraLoaderMixin):
    """Kosmos-G text-and-image-to-image: MLLM + AlignerNet M as the condition of a frozen SD v1.5 U-Net."""

    model_cpu_offload_seq = "mllm->aligner->unet->vae"
    # Optional only so that `save_pretrained` can hand the (plain-class) processor to diffusers as absent
    # and write it itself; see the module docstring. It is always present at run time.
    _optional_components = ["processor"]

    def __init__(self, mllm: MultimodalLM, processor: KosmosGProcessor, aligner: AlignerNet,
                 unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: SchedulerMixin):
        super().__init__()
        width = aligner.config.clip_dim
        if width != unet.config.cross_attention_dim:
            raise ValueError(f"the aligner outputs width {width} but the U-Net's cross_attention_dim is "
                             f"{unet.config.cross_attention_dim}; build the aligner with clip_dim equal to it")
        self.register_modules(mllm=mllm, processor=processor, aligner=aligner, unet=unet, vae=vae,
                              scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- saving and loading ---------------------------------------------------------------------------

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Write the whole pipeline folder (see the module docstring for its layout)."""
        entry = self.config["processor"]
        self.register_to_config(processor=(None, None))  # diffusers would warn that it cannot save it
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_to_config(processor=entry)
        self.processor.save_pretrained(Path(save_directory) / "processor")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "KosmosGPipeline":
        """Load a folder written by `save_pretrained` (e.g. the stage-3 export). Local folders only: never
        downloads. Other kwargs (`dtype`, components to replace, ...) go to diffusers."""
        path = Path(pretrained_model_name_or_path).expanduser()
        if not (path / "model_index.json").is_file():
            what = "does not exist" if not path.exists() else "has no model_index.json"
            raise FileNotFoundError(f"pipeline folder {str(path)!r} {what}; pass a folder written by "
                                    "KosmosGPipeline.save_pretrained (the stage-3 export)")
        try:
            json.loads((path / "model_index.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'model_index.json'} is not valid JSON ({e}); re-export the pipeline") from e
        missing = [f"{name}/" for name in COMPONENTS if kwargs.get(name) is None and not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"pipeline folder {str(path)!r} lacks {', '.join(missing)}: an incomplete "
                                    "export; re-run KosmosGPipeline.save_pretrained, or pass those components")
        if kwargs.get("processor") is None:
            kwargs["processor"] = KosmosGProcessor.from_pretrained(path / "processor")
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # else diffusers warns without accelerate
        return super().from_pretrained(str(path), **kwargs)

    # -- sampler --------------------------------------------------------------------------------------

    def use_scheduler(self, name: str = "dpm++", **overrides) -> "KosmosGPipeline":
        """Swap the sampler, keeping the noise schedule: `name` in SCHEDULERS, built `from_config` of the
        current scheduler's config (+ `overrides`). Returns the pipeline, so calls chain."""
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        scheduler_cls, defaults = SCHEDULERS[name]
        self.register_modules(scheduler=scheduler_cls.from_config(self.scheduler.config, **{**defaults, **overrides}))
        return self

    # -- condition ------------------------------------------------------------------------------------

    def _condition(self, prompts: list[list], device: torch.device) -> torch.Tensor:
        batch = self.processor.collate([self.processor(p) for p in prompts])
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.mllm.dtype)
        return condition(self.mllm, self.aligner, batch).to(self.unet.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompt: Prompt, images: Optional[list] = None, negative_prompt: Optional[Prompt] = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      device: Optional[torch.device] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prompt_embeds, negative_prompt_embeds), each [B * num_images_per_prompt, 77, d_clip] in the
        U-Net's dtype: what SD v1.5 pipelines accept as `prompt_embeds=` / `negative_prompt_embeds=`.

        `negative_prompt`: None (the null prompt `<s>`, as in training), one prompt for all, or a batch of list
        prompts, one per prompt. negative_prompt_embeds is None without classifier-free guidance.
        """
        device = device or self._execution_device
        prompts = _as_batch(prompt, images)
        prompt_embeds = self._condition(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        negatives = [[]] if negative_prompt is None else _as_batch(negative_prompt)  # [] = `<s>` alone
        if len(negatives) not in (1, len(prompts)):
            raise PromptError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; "
                              "give one negative prompt, or one per prompt")
        negative_embeds = self._condition(negatives, device)  # one shared negative is encoded once
        negative_embeds = negative_embeds.expand(len(prompts), -1, -1) if len(negatives) == 1 else negative_embeds
        return prompt_embeds, negative_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    # -- sampling (the steps of diffusers' StableDiffusionPipeline, from embeddings) -------------------

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator=None, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} images; pass one per image or a single one")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator, eta: float) -> dict:
        """`eta` (DDIM only) and `generator` for the schedulers whose `step` takes them, as SD does."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    @torch.no_grad()
    def __call__(self, prompt: Prompt, images: Optional[list] = None, negative_prompt: Optional[Prompt] = None,
                 num_inference_steps: int = 20, guidance_scale: float = 6.0, num_images_per_prompt: int = 1,
                 generator: Optional[Union[torch.Generator, list]] = None, height: Optional[int] = None,
                 width: Optional[int] = None, output_type: str = "pil", latents: Optional[torch.Tensor] = None,
                 eta: float = 0.0, return_dict: bool = True):
        """Generate images. `prompt`: "text with <i>" plus `images=[...]`, or [str | PIL.Image, ...], or a list
        of such lists (a batch). Returns `ImagePipelineOutput(images=...)` (PIL list, np array or tensor in
        [0, 1] for output_type "pil" / "np" / "pt"; scaled latents for "latent")."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        device = self._execution_device
        # As in SD: guidance needs > 1 (at 1 the unconditional pass changes nothing).
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

        # 1. The condition, once per call.
        prompt_embeds, negative_embeds = self.encode_prompt(prompt, images, negative_prompt, num_images_per_prompt,
                                                            do_cfg, device)
        embeds = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds

        # 2. Timesteps and initial noise.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        latents = self.prepare_latents(prompt_embeds.shape[0], height, width, prompt_embeds.dtype, device,
                                       generator, latents)
        step_kwargs = self._step_kwargs(generator, eta)

        # 3. Denoise.
        for t in self.progress_bar(timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

        # 4. Decode.
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
