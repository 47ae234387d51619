"""CLIP ViT weights for the MLLM's vision tower (transformers' `Kosmos2VisionModel`).

Kosmos-G starts its vision tower from OpenAI CLIP ViT-L/14 (224 px, QuickGELU) and keeps all 257 tokens
after the final LayerNorm, L2-normalised, with no projection head (`MultimodalLM.image_features`). This file
only brings weights into the tower, strictly, from the layouts CLIP is distributed in:

    load_vision_weights(mllm.vision_model, "ViT-L-14-sd.pt")          # open_clip / OpenAI state dict
    load_vision_weights(mllm.vision_model, "clip-vit-large-patch14/")  # transformers CLIPModel / CLIPVisionModel

The tower's names are Kosmos-2's (`model.embeddings.*`, `model.encoder.layers.*`, `model.post_layernorm.*`),
which are those of transformers' CLIP vision model under `model.`; the open_clip mapping is the one of
transformers' Kosmos-2 conversion script (q/k/v split from `in_proj`, `ln_post` -> `post_layernorm`).
"""

from __future__ import annotations

import os
import warnings
import zipfile

import torch
from safetensors.torch import load_file
from torch import nn

_WEIGHTS_HINT = (
    "Set model.vision.weights_path to a local CLIP ViT-L/14 checkpoint: an open_clip / OpenAI state dict such as "
    "`ViT-L-14-sd.pt` or `open_clip_pytorch_model.bin` (keys `visual.conv1.weight`, "
    "`visual.transformer.resblocks.*`, ...), OpenAI's TorchScript `ViT-L-14.pt`, or a transformers CLIP "
    "folder such as a copy of openai/clip-vit-large-patch14 (its `model.safetensors`); or set it to null "
    "for a randomly initialised tower (tiny preset only)."
)
_HF_PATCH_EMBED = "embeddings.patch_embedding.weight"
_OPENCLIP_PATCH_EMBED = "visual.conv1.weight"


def load_vision_weights(vision_model: nn.Module, path: str) -> None:
    """Load a CLIP image tower into `vision_model` (a `Kosmos2VisionModel`), strictly.

    Keys of the file outside the image tower (the text tower, `logit_scale`, CLIP's projection) are
    ignored; a tower key that maps to nothing, a missing weight or a wrong shape is an error naming it.
    """
    if os.path.isdir(path):  # a transformers CLIP folder
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision tower weights not found: {path!r} (model.vision.weights_path). {_WEIGHTS_HINT}")
    state_dict = read_state_dict(path)
    if any(k.endswith(_HF_PATCH_EMBED) for k in state_dict):
        mapped, unmatched = hf_clip_to_kosmos2(state_dict)
    elif any(k.endswith(_OPENCLIP_PATCH_EMBED) for k in state_dict):
        mapped, unmatched = open_clip_to_kosmos2(state_dict)
    else:
        raise ValueError(f"{path!r} (model.vision.weights_path) holds no CLIP image tower (no key ending in "
                         f"{_HF_PATCH_EMBED!r} or {_OPENCLIP_PATCH_EMBED!r}; first keys: {list(state_dict)[:5]}). "
                         f"{_WEIGHTS_HINT}")
    expected = vision_model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(unmatched + [k for k in mapped if k not in expected])
    wrong = [f"{k} {list(v.shape)} (the tower has {list(expected[k].shape)})"
             for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path!r} (model.vision.weights_path) does not match the configured vision tower "
                         f"(model.vision sizes): missing {_few(missing)}, unmatched {_few(unexpected)}, "
                         f"wrong shapes {_few(wrong)}. {_WEIGHTS_HINT}")
    vision_model.load_state_dict(mapped, strict=True)


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{'...' if len(keys) > n else ''}"


def hf_clip_to_kosmos2(state_dict: dict) -> tuple[dict, list[str]]:
    """A transformers `CLIPModel` / `CLIPVisionModel` state dict -> (Kosmos-2 vision tower keys, unmatched keys).

    The tower layouts are the same; only the prefix changes (`vision_model.` or none -> `model.`).
    """
    prefix = next(k for k in state_dict if k.endswith(_HF_PATCH_EMBED))[:-len(_HF_PATCH_EMBED)]
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and not key.endswith("position_ids"):  # position_ids: an old saved buffer
            out["model." + key[len(prefix):]] = value
    return out, []  # every tower key is kept: a stray one shows up as unexpected in `load_vision_weights`


def open_clip_to_kosmos2(state_dict: dict) -> tuple[dict, list[str]]:
    """An open_clip / OpenAI CLIP state dict's `visual.*` tower -> (Kosmos-2 vision tower keys, unmatched keys).

    Attention as fused `attn.in_proj_{weight,bias}` (open_clip, OpenAI) or split `{attn,ts_attn}.{q,k,v,out}_proj`
    (the original Kosmos-G code's tower). `visual.proj` (CLIP's image projection) is not part of the tower.
    """
    prefix = next(k for k in state_dict if k.endswith(_OPENCLIP_PATCH_EMBED))[:-len("conv1.weight")]
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k != prefix + "proj"}
    names = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
             "positional_embedding": "embeddings.position_embedding.weight"}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            names[f"{ours}.{p}"] = f"{theirs}.{p}"
    layer = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj", "ts_attn.out_proj": "self_attn.out_proj"}
    layer.update({f"{a}.{q}_proj": f"self_attn.{q}_proj" for a in ("attn", "ts_attn") for q in "qkv"})
    out, unmatched = {}, []
    for key, value in sd.items():
        if key in names:
            out["model." + names[key]] = value
            continue
        parts = key.split(".")  # transformer.resblocks.<i>.<module...>.<weight|bias>
        if parts[:2] != ["transformer", "resblocks"] or len(parts) < 5:
            unmatched.append(prefix + key)
            continue
        i, module, param = parts[2], ".".join(parts[3:-1]), parts[-1]
        ours = f"model.encoder.layers.{i}."
        if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
            for q, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{ours}self_attn.{q}_proj.{param[len('in_proj_'):]}"] = chunk
        elif module in layer:
            out[f"{ours}{layer[module]}.{param}"] = value
        else:
            unmatched.append(prefix + key)
    return out, unmatched


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors / torch file (unwrapping `state_dict`, stripping `module.`), or from
    OpenAI's TorchScript CLIP archive. Torch files are read with `weights_only=True`: no pickled code runs."""
    if path.endswith(".safetensors"):
        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_torchscript = any(n.endswith("constants.pkl") for n in archive.namelist())
        if is_torchscript:
            # OpenAI distributes CLIP as a TorchScript archive, which torch.load(weights_only) refuses.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still loads
                return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # a truncated file, or a pickle with more than tensors
        raise ValueError(f"{path!r} (model.vision.weights_path) could not be read as a state dict: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} (model.vision.weights_path) holds a {type(sd).__name__}, not a state dict. "
                         f"{_WEIGHTS_HINT}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
