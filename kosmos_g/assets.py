"""Where the pretrained parts come from: local folders for the paper preset, tiny stand-ins otherwise.

The tiny stand-ins are written once into `runs/<run>/assets/` in the very formats the real ones
use (a tokenizer folder; a Stable Diffusion-layout folder with `tokenizer/` and `text_encoder/`),
and are then loaded through the same `from_pretrained` calls. Nothing is ever downloaded.
`prepare_assets` writes what a stage needs before the stage's `build` loads it (`stage_diffusion_folder`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from filelock import FileLock
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from kosmos_g.config import SAMPLE_KINDS, TINY_WORLD_COMMAND, ConfigError, DataConfig, ModelConfig, TrainConfig
from kosmos_g.data.shards import read_shards
from kosmos_g.models.diffusion import save_tiny_sd_folder
from kosmos_g.models.tokenizers import (SPM_MODEL, add_kosmos_specials, check_special_layout, official_tokenizer,
                                        train_clip_tokenizer, train_mllm_tokenizer)

SD_TEXT_PARTS = ("tokenizer", "text_encoder")  # what stage align reads (its CLIP-text targets)
SD_IMAGE_PARTS = ("unet", "vae", "scheduler")  # what stage instruct and generation read
STAGE_SD_PARTS = {"mllm": (), "align": SD_TEXT_PARTS, "instruct": SD_IMAGE_PARTS}


def prepare_assets(cfg: TrainConfig, paths, init_export: Path | None) -> None:
    """Write the tiny stand-in assets `cfg.stage` will load (`paths`: the run's `RunPaths`), once per run.

    Several processes of one launch would otherwise write them at once: the first writes them under a
    lock, the others find them done. The paper preset (local paths only) writes nothing and takes no lock
    (on a shared file system)."""
    check_tiny_world(cfg.data)
    tokenizer = init_export is None and not cfg.model.llm.tokenizer_path
    sd_parts = STAGE_SD_PARTS[cfg.stage.name] if not cfg.model.diffusion_path else ()
    if not (tokenizer or sd_parts):
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    with FileLock(paths.root / ".prepare.lock"):
        if tokenizer:
            mllm_tokenizer(cfg.model, paths.assets, lambda: corpus(cfg.data))
        if sd_parts:
            stage_diffusion_folder(cfg, paths.assets)


def check_tiny_world(data: DataConfig) -> None:
    """`data=tiny` without shards in `data.root`: one error naming the folder and the command that writes them."""
    root = Path(data.root)
    if data.name != "tiny" or any(data.shards.values()) or any((root / kind).is_dir() for kind in SAMPLE_KINDS):
        return
    raise ConfigError(f"data=tiny: no tiny-world shards in {root}. Write them first: "
                      f"`{TINY_WORLD_COMMAND.format(root=root)}` (or point data.root at existing shards)")


def stage_diffusion_folder(cfg: TrainConfig, assets: Path) -> Path:
    """The SD folder `cfg.stage` trains against, holding the parts it reads (`diffusion_folder`)."""
    return diffusion_folder(cfg.model, assets, lambda: corpus(cfg.data), parts=STAGE_SD_PARTS[cfg.stage.name],
                            image_size=cfg.data.vae_image_size)


def _require_dir(path: str, key: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}={path}: folder not found. Put {what} there (nothing is downloaded), "
                          f"or fix {key}.")
    return p


def mllm_tokenizer(model: ModelConfig, assets: Path, texts: Callable[[], Iterable[str]]):
    """The MLLM tokenizer: `model.llm.tokenizer_path`, or one trained on the tiny corpus (cached).

    The path holds the original `sentencepiece.bpe.model` (the paper's ids, see `official_tokenizer`) or a
    tokenizer folder written by `save_pretrained` (e.g. an export's `processor/`)."""
    if model.llm.tokenizer_path:
        path = _require_dir(model.llm.tokenizer_path, "model.llm.tokenizer_path",
                            f"the original Kosmos-G {SPM_MODEL} (and dict.txt), or a saved MLLM tokenizer folder")
        if (path / SPM_MODEL).is_file() and not (path / "tokenizer_config.json").is_file():
            return official_tokenizer(path)
        try:
            return check_special_layout(add_kosmos_specials(AutoTokenizer.from_pretrained(path)))
        except ValueError as e:
            raise ConfigError(f"model.llm.tokenizer_path={path}: {e}") from None
    folder = assets / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        _write_atomically(folder, lambda tmp: train_mllm_tokenizer(texts()).save_pretrained(tmp))
    return AutoTokenizer.from_pretrained(folder)


RANDOM_SD_RECORD = "tiny_random.json"
"""Written into the tiny random SD folder: the image size it was built for (and that its weights are random)."""


def diffusion_folder(model: ModelConfig, assets: Path, texts: Callable[[], Iterable[str]],
                     parts: tuple[str, ...] = SD_TEXT_PARTS, image_size: int = 32) -> Path:
    """A Stable Diffusion-layout folder holding at least `parts`: `model.diffusion_path`, or random tiny
    parts (for `image_size`-px images) written once into `assets/sd`. `make demo` trains real tiny ones.
    A tiny folder built for another size is an error, never a silent mismatch."""
    if model.diffusion_path:
        path = _require_dir(model.diffusion_path, "model.diffusion_path",
                            "a local Stable Diffusion v1.5 folder (text_encoder/, tokenizer/, unet/, vae/, scheduler/)")
        missing = [p for p in parts if not (path / p).is_dir()]
        if missing:
            raise ConfigError(f"model.diffusion_path={path} lacks {missing}: expected the Stable Diffusion v1.5 "
                              "layout (text_encoder/, tokenizer/, unet/, vae/, scheduler/)")
        return path
    folder = assets / "sd"
    built = random_sd_size(folder)
    if built is not None and built != image_size:
        raise ConfigError(
            f"{folder} holds random tiny U-Net/VAE/CLIP-text built for {built}-px images, but this run trains at "
            f"data.vae_image_size={image_size}. Set data.vae_image_size={built} (or model.vae_image_size={built}), "
            f"use another run_name, or delete {folder} to rebuild it (exports trained against it then no longer "
            "match it).")
    if not all((folder / p).is_dir() for p in parts):
        _write_atomically(folder, lambda tmp: _write_tiny_sd(tmp, model, texts, image_size))
    return folder


def random_sd_size(folder: Path) -> int | None:
    """The image size a tiny random SD folder was built for; None for any other folder."""
    record = Path(folder) / RANDOM_SD_RECORD
    return json.loads(record.read_text())["image_size"] if record.is_file() else None


def _write_tiny_sd(folder: Path, model: ModelConfig, texts: Callable[[], Iterable[str]], image_size: int) -> None:
    tokenizer = train_clip_tokenizer(texts())
    tokenizer.model_max_length = model.clip_max_tokens
    tokenizer.save_pretrained(folder / "tokenizer")
    c = model.tiny_clip_text
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=model.clip_max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # Not save_pretrained: once a process group exists it writes weights on rank 0 only, and the shared assets
    # are written by whichever process holds the lock (`prepare_assets`).
    text_encoder.config.save_pretrained(folder / "text_encoder")
    save_file(text_encoder.state_dict(), folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    save_tiny_sd_folder(str(folder), cross_attention_dim=c.hidden_size, image_size=image_size)
    (folder / RANDOM_SD_RECORD).write_text(json.dumps(
        {"image_size": image_size, "weights": "random (model.diffusion_path=null): generated images are noise"}))


def fingerprint(folder: Path, parts: tuple[str, ...] = SD_TEXT_PARTS) -> str:
    """A short hash of `parts` of a folder (names, sizes, contents; files over 64 MB by size and their first
    and last MB), so an export can tell whether a folder is the one it was trained against."""
    h = hashlib.sha256()
    for part in parts:
        for f in sorted(p for p in (Path(folder) / part).rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(folder)}:{size}".encode())
            with open(f, "rb") as fh:
                if size <= 64 << 20:
                    h.update(fh.read())
                else:
                    h.update(fh.read(1 << 20))
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def corpus(data: DataConfig, limit: int = 5000) -> Iterator[str]:
    """Texts to train the tiny tokenizers on: up to `limit` documents from the configured shards."""
    n = 0
    for kind in SAMPLE_KINDS:
        spec = data.shards.get(kind) or str(Path(data.root) / kind)
        if not Path(spec).exists() and "{" not in spec:
            continue
        for sample in read_shards(spec, kind):
            if n >= limit:
                return
            n += 1
            yield sample.text
    if n == 0:
        raise ConfigError(f"no shards under data.root={data.root} to build the tiny tokenizers from; "
                          "write shards (docs/data-format.md) or set model.llm.tokenizer_path / model.diffusion_path")

def load_text_encoder(folder: Path, dtype: str = "float32") -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The frozen CLIP text encoder of an SD folder (it gives stage 2 its targets)."""
    return (CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                          dtype=getattr(torch, dtype)),
            CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True))


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
