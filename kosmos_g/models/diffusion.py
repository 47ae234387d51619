"""The frozen latent-diffusion image decoder: Stable Diffusion v1.5's U-Net and VAE, via diffusers.

Kosmos-G never trains these: stage 3 back-propagates the epsilon-prediction loss *through* the
frozen U-Net into its `encoder_hidden_states` (the aligner's output), so the wrapper's job is to

    pixels [-1, 1] --vae.encode--> latents (x scaling_factor) --add_noise--> noisy, noise, t
    predict_noise(noisy, t, condition [B, 77, d]) -> eps          (loss = MSE(eps, noise), in the stage)
    latents --/ scaling_factor--> vae.decode -> images [0, 1]

Everything loads from a local Stable Diffusion v1.5-layout folder (`unet/`, `vae/`, `scheduler/`),
the paper preset from a real one and the tiny preset from one `save_tiny_sd_folder` writes, so both
take exactly the same code path. Half precision is internal: the tensors the wrapper returns are
float32, so the noise arithmetic and the loss stay in full precision.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from torch import nn

SUBFOLDERS = ("unet", "vae", "scheduler")

# The noise schedule of Stable Diffusion v1.5 (its scheduler/scheduler_config.json).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="epsilon",
                      clip_sample=False, steps_offset=1)


def _check_sd_folder(path: Optional[str]) -> None:
    """Raise FileNotFoundError, saying what to put where, unless `path` has every needed subfolder."""
    hint = ("model.diffusion_path must be a local Stable Diffusion v1.5-layout folder with "
            f"{', '.join(s + '/' for s in SUBFOLDERS)} subfolders (e.g. a `save_pretrained` of "
            "runwayml/stable-diffusion-v1-5 copied there; nothing is ever downloaded), or None for the "
            "tiny preset's random components")
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"Stable Diffusion folder not found: {path!r}. {hint}.")
    missing = [s for s in SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(f"Stable Diffusion folder {path!r} lacks subfolder(s) "
                                f"{', '.join(s + '/' for s in missing)}. {hint}.")


class FrozenDiffusion(nn.Module):
    """U-Net + VAE (frozen, always in eval mode) and the DDPM noise scheduler used for training."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, noise_scheduler: DDPMScheduler,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        # Cast only when needed: diffusers warns on a no-op `.to(dtype)` of a loaded model.
        self.unet = unet if unet.dtype == dtype else unet.to(dtype)
        self.vae = vae if vae.dtype == dtype else vae.to(dtype)
        self.noise_scheduler = noise_scheduler  # not a Module: holds no trainable state
        self.lock()

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "FrozenDiffusion":
        """Load `unet/`, `vae/` and `scheduler/` from the local SD v1.5-layout folder `path`.

        Other subfolders (`text_encoder/`, `tokenizer/`, ...) are ignored. `dtype=torch.float16` keeps
        the frozen weights in half precision, as the paper does in stage 3.
        """
        _check_sd_folder(path)
        # low_cpu_mem_usage needs `accelerate`; ask for it only where it is installed (no warning otherwise).
        kw = dict(torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=is_accelerate_available())
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        # SD v1.5 ships a PNDM sampler config; its betas are what training noise needs, so read them as DDPM.
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, noise_scheduler, dtype=dtype)

    def save_pretrained(self, path: str) -> None:
        """Write `unet/`, `vae/`, `scheduler/` into `path` (SD v1.5 layout); other subfolders are kept."""
        os.makedirs(path, exist_ok=True)
        self.unet.save_pretrained(os.path.join(path, "unet"))
        self.vae.save_pretrained(os.path.join(path, "vae"))
        self.noise_scheduler.save_pretrained(os.path.join(path, "scheduler"))

    # -- freezing --------------------------------------------------------------------------------------

    def lock(self) -> "FrozenDiffusion":
        """No gradients into the U-Net/VAE weights and eval mode (no dropout), kept under `.train()`; called by
        `__init__`, and by stage 3 to say so where it sets what trains."""
        for module in (self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()
        return self

    def train(self, mode: bool = True) -> "FrozenDiffusion":
        # Lightning calls .train() on the whole model each epoch; the frozen nets must stay in eval.
        super().train(mode)
        self.unet.eval()
        self.vae.eval()
        return self

    # -- properties the stages need ----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the frozen weights (float32, float16 or bfloat16)."""
        return self.unet.dtype

    @property
    def scaling_factor(self) -> float:
        """VAE latent scale, read from the VAE config (0.18215 for SD v1.5)."""
        return float(self.vae.config.scaling_factor)

    @property
    def cross_attention_dim(self) -> int:
        """Width of the condition the U-Net attends to (768 for SD v1.5): the aligner's output width."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    # -- pixels <-> latents ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = True,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> float32 latents [B, 4, H/f, W/f] scaled by `scaling_factor`.

        `sample=True` draws from the VAE posterior (as SD training does); False takes its mode.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        lo, hi = pixels.min().item(), pixels.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"encode_images expects pixels in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "normalise with x * 2 - 1 from [0, 1] (or x / 127.5 - 1 from uint8)")
        dist = self.vae.encode(pixels.to(self.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents.float() * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images [B, 3, H, W] in [0, 1]."""
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- training noise ----------------------------------------------------------------------------

    def add_noise(self, latents: torch.Tensor, generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward diffusion at a uniform random timestep per sample: returns (noisy, noise, timesteps).

        `generator` must live on `latents.device`. noisy and noise are float32, timesteps int64 [B].
        """
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy, noise, timesteps

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                      encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The U-Net's epsilon prediction (float32); gradients flow into `encoder_hidden_states` only."""
        if encoder_hidden_states.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != the U-Net's "
                             f"cross_attention_dim {self.cross_attention_dim}; the aligner's clip_dim must match")
        eps = self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states.to(self.dtype)).sample
        return eps.float()


# -- tiny random components (tiny preset and tests) ----------------------------------------------------


def build_tiny_unet(cross_attention_dim: int, sample_size: int = 8,
                    block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                    attention_head_dim: int = 8, norm_num_groups: int = 8) -> UNet2DConditionModel:
    """A small SD-style U-Net (cross-attention in the first down/last up block) on 4-channel latents.

    The defaults (~0.6M parameters) train at a few steps per second on CPU.
    """
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def build_tiny_vae(sample_size: int = 32, block_out_channels: Sequence[int] = (16, 32, 32),
                   norm_num_groups: int = 8, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A small KL autoencoder with 4 latent channels; downsamples by 2**(len(block_out_channels)-1) (x4)."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size,
        block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        scaling_factor=scaling_factor,
    )


def build_tiny_diffusion(cross_attention_dim: int, image_size: int = 32, seed: int = 0,
                         unet_kwargs: Optional[dict] = None, vae_kwargs: Optional[dict] = None,
                         ) -> FrozenDiffusion:
    """Random tiny U-Net + VAE for `image_size`-px images and an SD v1.5 DDPM schedule, from `seed`."""
    torch.manual_seed(seed)
    vae = build_tiny_vae(sample_size=image_size, **(vae_kwargs or {}))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by the VAE's downsampling factor {factor}")
    unet = build_tiny_unet(cross_attention_dim, sample_size=image_size // factor, **(unet_kwargs or {}))
    return FrozenDiffusion(unet, vae, DDPMScheduler(**SD15_SCHEDULER))


def save_tiny_sd_folder(path: str, cross_attention_dim: int, image_size: int = 32, seed: int = 0,
                        unet_kwargs: Optional[dict] = None, vae_kwargs: Optional[dict] = None) -> str:
    """Write `build_tiny_diffusion(...)` as `unet/`, `vae/`, `scheduler/` into `path`; return `path`.

    `FrozenDiffusion.from_pretrained(path)` then loads it exactly as it loads real SD v1.5.
    Leaves any other subfolder (`text_encoder/`, `tokenizer/`) in place.
    """
    build_tiny_diffusion(cross_attention_dim, image_size, seed, unet_kwargs, vae_kwargs).save_pretrained(path)
    return path
