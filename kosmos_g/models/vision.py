"""The vision encoder: a CLIP ViT (timm) whose every output token feeds the resampler.

Kosmos-G uses CLIP ViT-L/14 at 224 px with OpenAI weights and keeps *all* 257 tokens (CLS + 16x16
patches) after the final LayerNorm, L2-normalised; there is no CLIP projection head. Only the last
transformer block and the final LayerNorm are trained (stages 1 and 3):

    encoder = VisionEncoder.from_config("vit_large_patch14_clip_quickgelu_224", 224, "ViT-L-14.pt")
    encoder.lock(unlocked_last_blocks=1, unlock_final_norm=True)
    tokens = encoder(pixel_values)  # [B, 257, 1024], each token of unit L2 norm

OpenAI's CLIP uses QuickGELU, so the timm name for its weights is the `_quickgelu_` variant; the plain
`vit_large_patch14_clip_224` uses exact GELU and would run OpenAI weights with the wrong activation.
"""

from __future__ import annotations

import os
import warnings
import zipfile

import timm
import torch
import torch.nn.functional as F
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

PAPER_MODEL_NAME = "vit_large_patch14_clip_quickgelu_224"
"""timm name of CLIP ViT-L/14 with OpenAI's QuickGELU (the paper's vision encoder)."""

TINY_VIT_KWARGS = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
"""Sizes of the random tiny-preset ViT (same timm family as the paper's), used with img_size=32."""

_WEIGHTS_HINT = (
    "Set model.vision.weights_path to a local CLIP ViT-L/14 checkpoint: an open_clip state dict such as "
    "`open_clip_pytorch_model.bin` (keys `visual.conv1.weight`, `visual.transformer.resblocks.*`, ...), "
    "OpenAI's TorchScript `ViT-L-14.pt`, or a transformers CLIP folder such as a copy of "
    "openai/clip-vit-large-patch14 (its `model.safetensors`); or set it to null to "
    "build a randomly initialised encoder (tiny preset only)."
)


class VisionEncoder(nn.Module):
    """A timm CLIP ViT returning all tokens after the final norm, L2-normalised: [B, T, width]."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"VisionEncoder wraps a timm VisionTransformer, got {type(vit).__name__}; "
                            f"use a timm ViT name such as {PAPER_MODEL_NAME!r}")
        self.vit = vit
        # Names of submodules kept in eval mode by `train()`; filled by `lock()`.
        self._frozen_modules: list[str] = []

    @classmethod
    def from_config(cls, model_name: str, img_size: int, weights_path: str | None = None,
                    **timm_kwargs) -> "VisionEncoder":
        """Build `model_name` from timm at `img_size` px, with weights from a local file or random.

        weights_path: an open_clip / OpenAI CLIP state dict (or OpenAI's TorchScript archive), or a
            transformers CLIP checkpoint (a folder with `model.safetensors`, or the file itself); timm's
            own converter (`checkpoint_filter_fn`) maps it to the timm layout. None builds a random
            encoder. Nothing is ever downloaded.
        timm_kwargs: model sizes passed to `timm.create_model` (e.g. TINY_VIT_KWARGS).
        """
        if model_name not in timm.list_models():
            raise ValueError(f"model.vision.model_name {model_name!r} is not a timm model; use "
                             f"{PAPER_MODEL_NAME!r} (OpenAI CLIP ViT-L/14) or another name from "
                             "timm.list_models('*clip*')")
        if weights_path is not None and os.path.isdir(weights_path):  # a transformers CLIP folder
            weights_path = os.path.join(weights_path, "model.safetensors")
        if weights_path is not None and not os.path.isfile(weights_path):
            raise FileNotFoundError(f"vision encoder weights not found: {weights_path!r} "
                                    f"(model.vision.weights_path). {_WEIGHTS_HINT}")
        # num_classes=0 drops CLIP's projection head: the resampler reads the 1024-wide tokens.
        vit = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size, **timm_kwargs)
        encoder = cls(vit)
        if weights_path is not None:
            encoder.load_clip_weights(weights_path)
        return encoder

    def load_clip_weights(self, path: str) -> None:
        """Load an open_clip / OpenAI CLIP checkpoint's visual tower through timm's converter.

        Loaded strictly: timm's `pretrained=True` path loads non-strictly once the head is dropped, so a
        file in another layout would silently leave random weights; here it is an error instead.
        """
        state_dict = _read_checkpoint(path)
        if any(k.endswith(_HF_PATCH_EMBED) for k in state_dict):  # transformers layout
            try:
                state_dict = hf_clip_to_open_clip(state_dict)
            except KeyError as e:
                raise ValueError(f"{path!r} (model.vision.weights_path) looks like a transformers CLIP checkpoint "
                                 f"but has no {e.args[0]!r}. {_WEIGHTS_HINT}") from None
        state_dict = checkpoint_filter_fn(state_dict, self.vit)  # OpenAI/open_clip keys -> timm keys
        # CLIP's `visual.proj` becomes `head.*`, which this encoder does not have (num_classes=0).
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        result = self.vit.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path!r} (model.vision.weights_path) does not match {self.vit.default_cfg['architecture']}: "
                f"missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
                f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}. "
                f"{_WEIGHTS_HINT}")

    @property
    def width(self) -> int:
        """Feature size of each output token (1024 for ViT-L/14)."""
        return self.vit.embed_dim

    @property
    def num_tokens(self) -> int:
        """Tokens per image: prefix (CLS) + patches; 257 for ViT-L/14 at 224 px. Needs no forward."""
        return self.vit.num_prefix_tokens + self.vit.patch_embed.num_patches

    @property
    def img_size(self) -> int:
        """Input side length in pixels the encoder expects."""
        return self.vit.patch_embed.img_size[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] (CLIP-normalised, H = W = img_size) -> tokens [B, T, width]."""
        expected = (3, self.img_size, self.img_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"VisionEncoder expects pixel_values of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(pixel_values.shape)}; resize and normalise images with "
                             f"kosmos_g.processor.clip_image_transform({self.img_size})")
        # forward_features ends with the final LayerNorm applied to every token (CLS and patches).
        # No torch.no_grad for the frozen blocks is needed: autograd records nothing until the first
        # unlocked parameter, so frozen blocks keep no activations anyway.
        tokens = self.vit.forward_features(pixel_values)
        return F.normalize(tokens, dim=-1)

    # --- freezing -------------------------------------------------------------------------------

    def lock(self, unlocked_last_blocks: int = 1, unlock_final_norm: bool = True) -> None:
        """Freeze everything except the last `unlocked_last_blocks` blocks and (optionally) the final norm.

        The paper's setting is the default; `lock(0, False)` freezes the whole encoder. Frozen parts
        stay in eval mode even under `.train()`, so their dropout / drop-path stay off.
        """
        depth = len(self.vit.blocks)
        if not 0 <= unlocked_last_blocks <= depth:
            raise ValueError(f"unlocked_last_blocks must be in [0, {depth}] (the encoder has {depth} blocks), "
                             f"got {unlocked_last_blocks}")
        unlocked = {f"blocks.{i}" for i in range(depth - unlocked_last_blocks, depth)}
        if unlock_final_norm:
            unlocked.add("norm")
        self._frozen_modules = []
        for name, module in self._top_level_modules():
            trainable = name in unlocked
            module.requires_grad_(trainable)
            if not trainable:
                self._frozen_modules.append(name)
        # Parameters owned directly by the ViT (cls_token, pos_embed) belong to the frozen input stem.
        for param in self.vit.parameters(recurse=False):
            param.requires_grad_(False)
        self.train(self.training)  # put the newly frozen modules into eval mode now

    def unlock(self) -> None:
        """Make the whole encoder trainable again (undoes `lock`)."""
        self.vit.requires_grad_(True)
        self._frozen_modules = []
        self.train(self.training)

    def trainable_parameter_names(self) -> list[str]:
        """Names (as in `named_parameters()`) of the parameters that require grad."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        for name in self._frozen_modules:
            self.vit.get_submodule(name).eval()
        return self

    def _top_level_modules(self):
        """The ViT's children, with `blocks` split into its blocks: the units that are frozen or not."""
        for name, module in self.vit.named_children():
            if name == "blocks":
                for i, block in enumerate(module):
                    yield f"blocks.{i}", block
            else:
                yield name, module

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (the paper trains with activation checkpointing)."""
        self.vit.set_grad_checkpointing(enable)


_HF_PATCH_EMBED = "embeddings.patch_embedding.weight"


def hf_clip_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CLIPModel` / `CLIPVisionModel` state dict's vision tower in open_clip's `visual.*`
    layout, which timm's converter reads. Why not a direct transformers -> timm map: timm already owns the
    open_clip -> timm one, so only the transformers -> open_clip renaming (and q/k/v fusion) lives here."""
    # CLIPModel keys start with `vision_model.`; a saved CLIPVisionModel may have none.
    prefix = next(k for k in state_dict if k.endswith(_HF_PATCH_EMBED))[:-len(_HF_PATCH_EMBED)]
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {"visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["embeddings.class_embedding"],
           "visual.positional_embedding": sd["embeddings.position_embedding.weight"]}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = sd[f"{theirs}.{p}"]
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in layers:
        theirs, ours = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            for o, t in names.items():
                out[f"{ours}{o}.{p}"] = sd[f"{theirs}{t}.{p}"]
            out[f"{ours}attn.in_proj_{p}"] = torch.cat([sd[f"{theirs}self_attn.{q}_proj.{p}"] for q in "qkv"])
    if "visual_projection.weight" in state_dict:   # CLIPModel only; dropped later (num_classes=0)
        out["visual.proj"] = state_dict["visual_projection.weight"].t()
    return out


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a torch/safetensors file, or from OpenAI's TorchScript CLIP archive."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_torchscript = any(n.endswith("constants.pkl") for n in archive.namelist())
        if is_torchscript:
            # OpenAI distributes CLIP as a TorchScript archive, which torch.load(weights_only) refuses.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still loads
                return torch.jit.load(path, map_location="cpu").state_dict()
    return timm_load_state_dict(path)
