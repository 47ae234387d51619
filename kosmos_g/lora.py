"""U-Net LoRA for Kosmos-G pipelines, the diffusers way.

    pipe.load_lora_weights("loras/style.safetensors", adapter_name="style")   # a local file or folder
    pipe.set_adapters("style", adapter_weights=0.7)                          # scale; 0 = off
    pipe.fuse_lora(lora_scale=0.7); pipe.unfuse_lora()                       # optional: merge for speed
    pipe.unload_lora_weights()                                               # the original U-Net again

SD v1.5 LoRAs hold U-Net layers (and often CLIP text-encoder layers). Kosmos-G keeps SD's U-Net but replaces
the text encoder by MLLM + AlignerNet, so only the U-Net part applies; text-encoder keys are dropped with a
warning. Every format `StableDiffusionLoraLoaderMixin.lora_state_dict` reads (diffusers, kohya, ...) loads.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import logging

logger = logging.get_logger(__name__)


class UNetLoraLoaderMixin(StableDiffusionLoraLoaderMixin):
    """`load_lora_weights` into `self.unet` only; `set_adapters`, `fuse_lora`, `unload_lora_weights`, ...
    come from diffusers' `LoraBaseMixin` and act on the U-Net."""

    _lora_loadable_modules = ["unet"]

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, dict],
                          adapter_name: Optional[str] = None, **kwargs) -> None:
        """Load LoRA weights (a local `.safetensors` file, a folder with `weight_name=`, or a state dict) into
        the U-Net as adapter `adapter_name`. Never downloads."""
        kwargs.setdefault("local_files_only", True)
        if isinstance(pretrained_model_name_or_path_or_dict, (str, os.PathLike)):
            path = os.fspath(pretrained_model_name_or_path_or_dict)
            if os.path.isfile(path):  # diffusers takes a folder + weight_name; accept a file path too
                kwargs.setdefault("weight_name", os.path.basename(path))
                path = os.path.dirname(path) or "."
            elif not os.path.isdir(path):
                raise FileNotFoundError(f"LoRA weights {path!r} not found; pass a local .safetensors file or "
                                        "a folder holding pytorch_lora_weights.safetensors")
            pretrained_model_name_or_path_or_dict = path
        elif isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        # The metadata holds the adapter's LoraConfig (alpha, rank pattern): without it alpha falls back to r.
        state_dict, network_alphas, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict,
                                                                    return_lora_metadata=True, **kwargs)
        if not state_dict or not all("lora" in k for k in state_dict):
            raise ValueError("not a LoRA checkpoint: every parameter name must contain 'lora' (diffusers or "
                             "kohya format, as written by diffusers' LoRA training scripts)")
        dropped = [k for k in state_dict if k.startswith(f"{self.text_encoder_name}.")]
        if dropped:
            logger.warning(f"ignoring {len(dropped)} text-encoder LoRA tensors: Kosmos-G conditions the U-Net "
                           "through its MLLM and aligner, not a CLIP text encoder")
            state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
            network_alphas = {k: v for k, v in (network_alphas or {}).items()
                              if not k.startswith(f"{self.text_encoder_name}.")} or None
        if not any(k.startswith(f"{self.unet_name}.") for k in state_dict):
            raise ValueError("the LoRA checkpoint has no U-Net layers; nothing to load into Kosmos-G")
        self.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=self.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=self)

    # SD's defaults name the text encoder too, which this pipeline does not have.
    def fuse_lora(self, components: Optional[list[str]] = None, lora_scale: float = 1.0, **kwargs) -> None:
        """Merge the active adapters, times `lora_scale`, into the U-Net's weights (faster sampling)."""
        super().fuse_lora(components=components or ["unet"], lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components: Optional[list[str]] = None, **kwargs) -> None:
        """Undo `fuse_lora`."""
        super().unfuse_lora(components=components or ["unet"], **kwargs)
