"""The authors' released Kosmos-G checkpoints (fairseq `.pt`), read safely and renamed to this project's weights.

    ckpt = load_fairseq_checkpoint("checkpoint_final.pt")      # weights_only + allowlist + mmap; no fairseq needed
    conv = convert_state_dict(ckpt.model)                       # -> parts "mllm", "aligner", "unet", "vae"
    conv.kind                                                   # "stage1" | "stage2" | "final", from the keys

Safety: the file is unpickled with `torch.load(weights_only=True)`, which builds only tensors and the
containers `_safe_globals()` lists; a pickle that names anything else (e.g. `os.system`) is refused before any
of it runs (the training code's own classes excepted: they become inert stand-ins, see `INERT_MODULES`).
`mmap=True` leaves tensors on disk until touched: `last_optimizer_state` (several GB) is never read.

Names (SPEC.md "Checkpoints", from microsoft/unilm 421c251 `kosmos-g/`): the MLLM goes to transformers'
Kosmos-2 names (`Kosmos2ForConditionalGeneration`, as HF's own Kosmos-2 converter renames checkpoints of
the same codebase), the aligner keeps the original names without `aligner.`, the frozen SD U-Net and VAE
were diffusers modules already (`diffusion_unet.unet.*`, `vae.vae.*`). Keys dropped on purpose are listed in
`DROPPED` with the reason; any other key that no rule matches is an error (or a warning when allowed).
"""

from __future__ import annotations

import argparse
import collections
import re
import typing
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

PAPER_HEAD_DIM = 64  # text 2048/32 heads, vision 1024/16 heads (kosmosg_xl, open_clip ViT-L-14 head_width)


class OfficialCheckpointError(ValueError):
    """A file that cannot be converted; the message names the file and what is wrong with it (one line)."""


def _safe_globals() -> list:
    """What a fairseq checkpoint's pickle may name besides tensors: plain containers, `argparse.Namespace`
    (`args`), numpy scalars/arrays (meters in `extra_state`) and omegaconf containers (a re-saved `cfg`)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    core = np._core.multiarray
    safe = [collections.OrderedDict, collections.defaultdict, argparse.Namespace, dict, list, set, tuple, int,
            float, bool, str, bytes, typing.Any, np.ndarray, np.dtype, DictConfig, ListConfig, ContainerMetadata,
            Metadata, AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode]
    safe += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")]
    # numpy 1.x wrote these under `numpy.core`, numpy 2 under `numpy._core`: accept both spellings.
    for fn in (core.scalar, core._reconstruct):
        safe += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return safe


# Objects of the training code's own classes (fairseq config enums, meters) may sit in `cfg` / `extra_state`.
# Those modules are not installed here, so such a name is bound to an inert stand-in that only stores what the
# pickle hands it; nothing of the named module is imported or run. Any other unknown name is refused.
INERT_MODULES = ("fairseq", "fairseq_cli", "unilm", "torchscale", "infinibatch")


def _standin(name: str) -> type:
    class Unpickled:
        __slots__ = ("args", "state")

        def __new__(cls, *args):
            obj = object.__new__(cls)
            obj.args, obj.state = args, None
            return obj

        def __setstate__(self, state):
            self.state = state

        def __repr__(self):
            return f"<{name} (unpickled as data) {self.args!r}>"
    Unpickled.__qualname__ = f"Unpickled[{name}]"
    return Unpickled


@dataclass
class FairseqCheckpoint:
    path: Path
    model: dict  # the state dict, tensors memory-mapped
    cfg: object = None  # fairseq's config (dict, Namespace or omegaconf), for architecture values
    num_updates: int = 0


def load_torch_file(path, what: str) -> dict:
    """`torch.load` a checkpoint safely; any failure becomes one OfficialCheckpointError line naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file (pass the path of the downloaded {what})")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise OfficialCheckpointError(f"{path}: the file is empty (an interrupted download? fetch the {what} again)")
    zipped = head == b"PK\x03\x04"  # torch >= 1.6 format; older torch wrote a bare pickle (0x80 = protocol)
    if zipped and not zipfile.is_zipfile(path):
        raise OfficialCheckpointError(f"{path}: truncated (its zip directory is missing); fetch the {what} again")
    if not zipped and head[:1] != b"\x80":
        raise OfficialCheckpointError(f"{path}: not a torch checkpoint (it starts with {head!r}: an HTML error page "
                                      f"or another format?); fetch the {what} again")
    standins: list = []
    while True:
        try:
            with torch.serialization.safe_globals(_safe_globals() + standins):
                # mmap needs the zip format; a legacy file is read into memory by the same safe unpickler.
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
            break
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way, in one line
            msg = " ".join(str(e).split())
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            name = found.group(1) if found else None
            if name and name.split(".")[0] in INERT_MODULES and len(standins) < 64:
                standins.append((_standin(name), name))  # the training code's own class: read as inert data
                continue
            corrupt = any(s in msg for s in ("Unsupported operand", "EOF", "truncated", "invalid load key"))
            if name or ("Weights only load failed" in msg and not corrupt):
                named = f"names {name}" if name else f"holds an object it may not build ({msg[-120:]})"
                raise OfficialCheckpointError(
                    f"{path}: refused, its pickle {named}, outside the allowlist of tensors and plain "
                    f"containers; nothing in it was run. The released {what} needs nothing else: fetch it again "
                    "from the official link") from None
            raise OfficialCheckpointError(f"{path}: truncated or corrupt, it cannot be read as a torch checkpoint "
                                          f"({type(e).__name__}: {msg[:160]}); fetch the {what} again") from None
    if not isinstance(obj, dict):
        raise OfficialCheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict; pass the {what}")
    return obj


def load_fairseq_checkpoint(path) -> FairseqCheckpoint:
    """The `model` state dict (memory-mapped) and `cfg` of a fairseq checkpoint; the optimizer state is dropped."""
    obj = load_torch_file(path, "Kosmos-G checkpoint (checkpoint_stage1.pt / checkpoint_stage2.pt / checkpoint_final.pt)")
    obj.pop("last_optimizer_state", None)  # never touched: mmap keeps it on disk, and now nothing refers to it
    model = obj.get("model")
    if not isinstance(model, dict) or not model:
        keys = ", ".join(map(str, list(obj)[:8])) or "nothing"
        raise OfficialCheckpointError(f"{path}: has no `model` state dict (top-level keys: {keys}); pass a fairseq "
                                      "training checkpoint such as checkpoint_final.pt")
    history = obj.get("optimizer_history") or [{}]
    updates = history[-1].get("num_updates", 0) if isinstance(history[-1], dict) else 0
    return FairseqCheckpoint(Path(path), model, obj.get("cfg") or obj.get("args"), int(updates or 0))


def load_open_clip_visual(path) -> dict:
    """The `visual.*` weights of an open_clip state dict such as ViT-L-14-sd.pt (maybe under `state_dict`,
    keys maybe prefixed `module.`), with the prefix `img_model.visual.` the Kosmos-G checkpoints use."""
    obj = load_torch_file(path, "open_clip ViT-L-14 state dict (ViT-L-14-sd.pt)")
    sd = obj.get("state_dict", obj)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
    visual = {"img_model." + k: v for k, v in sd.items() if k.startswith("visual.")}
    if not visual:
        raise OfficialCheckpointError(f"{path}: no `visual.*` weights; pass the open_clip ViT-L-14 state dict")
    return visual


def arch_value(cfg, name: str, default=None):
    """A fairseq architecture value (e.g. decoder_attention_heads) from `cfg["model"]` or an `args` Namespace."""
    for source in (cfg.get("model") if isinstance(cfg, Mapping) else getattr(cfg, "model", None), cfg):
        value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
        if value is not None:
            return value
    return default


# -- key renaming ------------------------------------------------------------------------------------

_TEXT_LAYER = (r"self_attn\.(?:q|k|v|out)_proj|self_attn\.inner_attn_ln|self_attn_layer_norm|ffn\.fc1|ffn\.fc2|"
               r"ffn\.ffn_layernorm|final_layer_norm")
_VIS = "vision_model.model."
# (original-name regex, part, target-name template), first match wins. Only names the original code makes
# are matched, so anything unexpected (another architecture's checkpoint) surfaces as unmatched.
RULES = [
    (rf"gpt_model\.decoder\.(embed_tokens\.weight|layer_norm\.(?:weight|bias)|layers\.\d+\.(?:{_TEXT_LAYER})\."
     r"(?:weight|bias))", "mllm", r"text_model.model.\1"),
    (r"gpt_model\.decoder\.output_projection\.weight", "mllm", "text_model.lm_head.weight"),  # tied, checked
    (r"img_connector\.(dense\.(?:weight|bias)|latent_query|x_attn\.(?:q|k|v|out)_proj\.(?:weight|bias))", "mllm",
     r"image_to_text_projection.\1"),
    (r"img_model\.visual\.class_embedding", "mllm", _VIS + "embeddings.class_embedding"),
    (r"img_model\.visual\.positional_embedding", "mllm", _VIS + "embeddings.position_embedding.weight"),
    (r"img_model\.visual\.conv1\.weight", "mllm", _VIS + "embeddings.patch_embedding.weight"),
    (r"img_model\.visual\.ln_pre\.(weight|bias)", "mllm", _VIS + r"pre_layrnorm.\1"),  # sic, HF's name
    (r"img_model\.visual\.ln_post\.(weight|bias)", "mllm", _VIS + r"post_layernorm.\1"),
    (r"img_model\.visual\.transformer\.resblocks\.(\d+)\.(?:ts_attn|attn)\.((?:q|k|v|out)_proj\.(?:weight|bias))",
     "mllm", _VIS + r"encoder.layers.\1.self_attn.\2"),
    (r"img_model\.visual\.transformer\.resblocks\.(\d+)\.ln_(1|2)\.(weight|bias)", "mllm",
     _VIS + r"encoder.layers.\1.layer_norm\2.\3"),
    (r"img_model\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", "mllm",
     _VIS + r"encoder.layers.\1.mlp.fc1.\2"),
    (r"img_model\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", "mllm",
     _VIS + r"encoder.layers.\1.mlp.fc2.\2"),
    (r"aligner\.((?:encoder_proj|encoder|decoder|decoder_proj)\..+|encoder_query|decoder_query)", "aligner", r"\1"),
    (r"diffusion_unet\.unet\.(.+)", "unet", r"\1"),
    (r"vae\.vae\.(.+)", "vae", r"\1"),
]
_RULES = [(re.compile(p), part, target) for p, part, target in RULES]

# Keys dropped by name, with the reason (reported, never an error).
DROPPED = {
    r"gpt_model\.decoder\.embed_positions\._float_tensor": "fairseq's device/dtype marker of the sinusoidal table",
    r"gpt_model\.decoder\.self_attn_sope\.scale": "xPos buffer; the decoder's forward never applies it",
    r"aligner\.clip_encoder\..+": "SD's frozen CLIP text encoder (the stage-2 target), not a Kosmos-G weight",
    r"img_model\.visual\.proj": "open_clip's image projection; the original vision tower has none",
}
_DROPPED = [(re.compile(p), why) for p, why in DROPPED.items()]
# open_clip's packed nn.MultiheadAttention; the original copies it into ts_attn.{q,k,v}_proj and uses only those.
_PACKED = re.compile(r"(img_model\.visual\.transformer\.resblocks\.\d+)\.attn\.in_proj_(weight|bias)")
_PACKED_DEAD = re.compile(r"img_model\.visual\.transformer\.resblocks\.\d+\.attn\..+")


def checkpoint_kind(keys) -> str:
    """stage1 (no aligner), stage2 (aligner with its reconstruction half N and the CLIP text encoder) or final."""
    keys = list(keys)
    if not any(k.startswith("gpt_model.decoder.") for k in keys):
        raise OfficialCheckpointError("not a Kosmos-G checkpoint: no gpt_model.decoder.* weights (first keys: "
                                      f"{', '.join(keys[:4])})")
    if not any(k.startswith("aligner.") for k in keys):
        return "stage1"
    if any(k.startswith(("aligner.decoder_query", "aligner.clip_encoder.")) for k in keys):
        return "stage2"
    return "final"


@dataclass
class Conversion:
    kind: str
    parts: dict = field(default_factory=dict)  # part -> {target name: tensor}
    dropped: dict = field(default_factory=dict)  # original name -> reason
    unmatched: list = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{part} {len(sd)} tensors" for part, sd in self.parts.items())
        return (f"{self.kind} checkpoint: {counts}; dropped {len(self.dropped)} known keys"
                + (f"; {len(self.unmatched)} UNMATCHED" if self.unmatched else ""))


def rename(key: str) -> tuple[str, str] | None:
    """(part, target name) for an original key, or None when no rule matches."""
    for pattern, part, target in _RULES:
        if pattern.fullmatch(key):
            return part, pattern.sub(target, key)
    return None


def _drop_reason(key: str, keys: set) -> str | None:
    for pattern, why in _DROPPED:
        if pattern.fullmatch(key):
            return why
    if _PACKED_DEAD.fullmatch(key) and key.split(".attn.")[0] + ".ts_attn.q_proj.weight" in keys:
        return "open_clip's nn.MultiheadAttention, superseded by ts_attn (the original forward uses only ts_attn)"
    return None


def _unpack_attention(sd: dict) -> dict:
    """Split packed `attn.in_proj_{weight,bias}` (open_clip) into `attn.{q,k,v}_proj.*` where no ts_attn exists."""
    out = {}
    for key, value in sd.items():
        m = _PACKED.fullmatch(key)
        if m and m.group(1) + ".ts_attn.q_proj.weight" not in sd:
            for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{m.group(1)}.attn.{name}_proj.{m.group(2)}"] = chunk
        else:
            out[key] = value
    return out


def convert_state_dict(sd: dict, dtype: torch.dtype | None = torch.float32, allow_unmatched: bool = False,
                       source: str = "checkpoint", progress: bool | None = None) -> Conversion:
    """Rename an original state dict into parts; tensors cast to `dtype` (None keeps them, e.g. fp16)."""
    sd = {k.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", ""): v
          for k, v in sd.items()}
    conv = Conversion(kind=checkpoint_kind(sd))
    keys = set(sd)
    sd = _unpack_attention(sd)
    if progress is None:  # a bar for the multi-GB released files; sizes come from shapes, nothing is read
        progress = sum(v.numel() * v.element_size() for v in sd.values()) > 2**30
    for key in tqdm(sorted(sd), desc=f"converting {Path(source).name}", unit="tensor", disable=not progress):
        why = _drop_reason(key, keys)
        if why is not None:
            conv.dropped[key] = why
            continue
        hit = rename(key)
        if hit is None:
            conv.unmatched.append(key)
            continue
        part, target = hit
        value = sd[key]
        cast = dtype is not None and value.is_floating_point()
        conv.parts.setdefault(part, {})[target] = value.to(dtype) if cast else value
    mllm = conv.parts.get("mllm", {})
    tied, embed = mllm.get("text_model.lm_head.weight"), mllm.get("text_model.model.embed_tokens.weight")
    if embed is not None:
        if tied is not None and tied.data_ptr() != embed.data_ptr() and not torch.equal(tied, embed):
            raise OfficialCheckpointError(f"{source}: gpt_model.decoder.output_projection.weight differs from "
                                          "embed_tokens.weight, but the original ties them; not a Kosmos-G checkpoint")
        mllm["text_model.lm_head.weight"] = embed  # the tie, stated explicitly (one storage)
    if conv.unmatched and not allow_unmatched:
        shown = ", ".join(conv.unmatched[:6]) + (" ..." if len(conv.unmatched) > 6 else "")
        raise OfficialCheckpointError(f"{source}: {len(conv.unmatched)} keys match no known Kosmos-G weight ({shown}); "
                                      "pass --allow-unmatched to convert anyway and skip them")
    return conv


# -- the converted MLLM's architecture ---------------------------------------------------------------

def kosmos2_config(mllm: dict, text_heads: int | None = None, max_positions: int = 2048,
                   vision_heads: int | None = None):
    """transformers' Kosmos2Config for converted MLLM weights, sizes read from the tensor shapes. Head
    counts are not in the shapes: `text_heads` (fairseq cfg's decoder_attention_heads) or width / 64."""
    from transformers import Kosmos2Config

    def shape(name):
        if name not in mllm:
            hint = ("; a checkpoint without the vision tower takes it from --vit ViT-L-14-sd.pt" if name.startswith(_VIS)
                    else " (an incomplete or different checkpoint)")
            raise OfficialCheckpointError(f"the checkpoint has no weight for {name}{hint}")
        return tuple(mllm[name].shape)

    vocab, width = shape("text_model.model.embed_tokens.weight")
    layers = 1 + max(int(k.split(".")[3]) for k in mllm if k.startswith("text_model.model.layers."))
    ffn = shape("text_model.model.layers.0.ffn.fc1.weight")[0]
    v_width, _, patch, _ = shape(_VIS + "embeddings.patch_embedding.weight")
    n_pos = shape(_VIS + "embeddings.position_embedding.weight")[0]
    v_layers = 1 + max(int(k.split(".")[4]) for k in mllm if k.startswith(_VIS + "encoder.layers."))
    queries = shape("image_to_text_projection.latent_query")[0]
    grid = round((n_pos - 1) ** 0.5)
    return Kosmos2Config(
        text_config=dict(vocab_size=vocab, embed_dim=width, layers=layers, ffn_dim=ffn,
                         attention_heads=text_heads or width // PAPER_HEAD_DIM, max_position_embeddings=max_positions,
                         activation_function="gelu", scale_embedding=True, layer_norm_eps=1e-5, dropout=0.1,
                         attention_dropout=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=v_width, intermediate_size=shape(_VIS + "encoder.layers.0.mlp.fc1.weight")[0],
                           num_hidden_layers=v_layers, num_attention_heads=vision_heads or v_width // PAPER_HEAD_DIM,
                           image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu"),
        latent_query_num=queries)
