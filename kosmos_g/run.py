"""Run directories, stage exports and the handoff between stages.

    runs/<run_name>/
      assets/                 tokenizers and tiny stand-ins for pretrained parts (tiny preset)
      data/                   generated tiny shards (tiny preset)
      <stage>/                one per stage: mllm, align, instruct
        config.yaml           the fully resolved config of the last launch
        checkpoints/          Lightning checkpoints (last.ckpt, step-*.ckpt), written atomically
        tensorboard/          event files
        steps.jsonl           loss and learning rate of every step (appended across launches)
        export/               what the next stage loads; manifest.json says what it is

Exports are self-contained: the align export holds the MLLM it was aligned to, so `stage=instruct`
needs only it; its manifest points to the Stable Diffusion folder (CLIP text encoder, tokenizer, U-Net, VAE)
it was trained against, which `init_from` reuses (`adopt_export_assets`). A folder only becomes `export/`
once completely written (write to a temp folder, then rename), so a crash never leaves a half-written export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lightning.pytorch.plugins.io import TorchCheckpointIO

from kosmos_g.config import ConfigError

MANIFEST = "manifest.json"
# The stage whose export each stage starts from under `init_from=auto`.
PREDECESSOR = {"mllm": None, "align": "mllm", "instruct": "align"}


@dataclass(frozen=True)
class RunPaths:
    root: Path
    stage: str

    @classmethod
    def create(cls, runs_dir: str, run_name: str, stage: str) -> "RunPaths":
        return cls(Path(runs_dir) / run_name, stage)

    @property
    def stage_dir(self) -> Path:
        return self.root / self.stage

    @property
    def checkpoints(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def export(self) -> Path:
        return self.stage_dir / "export"

    @property
    def assets(self) -> Path:
        return self.root / "assets"


def launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, SLURM, Lightning's own); 0 alone. Read before
    the Trainer exists, to let one process write the run folder. Not Lightning's `rank_zero_only.rank`: before
    the strategy sets it, it reads LOCAL_RANK before the node rank, so every node's first process would be 0."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    # Lightning's subprocess launcher sets NODE_RANK / LOCAL_RANK for the processes it starts.
    return int(env.get("NODE_RANK", 0)) * 10_000 + int(env.get("LOCAL_RANK", 0))


def config_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_export(export_dir: Path, stage: str, step: int, cfg_hash: str,
                 parts: dict[str, Callable[[Path], None]], assets: dict | None = None) -> Path:
    """Write each part with its writer into a temp folder, add the manifest, then swap it in.

    `parts` maps a subfolder name to its writer; the name "." writes into the export folder itself.
    `assets` (manifest key "assets") points to the pretrained folders the stage trained against.
    """
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, write in parts.items():
        write(tmp / name)
    manifest = {"stage": stage, "step": step, "config_hash": cfg_hash, "parts": sorted(os.listdir(tmp)),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"assets": assets} if assets else {})}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    old = export_dir.with_name(export_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if export_dir.exists():
        export_dir.rename(old)
    tmp.rename(export_dir)
    shutil.rmtree(old, ignore_errors=True)
    return export_dir


def copy_part(src: Path) -> Callable[[Path], None]:
    """A writer that copies an exported part (hard links where possible, so it costs no space)."""
    def write(dst: Path) -> None:
        def link(s, d):
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
        shutil.copytree(src, dst, copy_function=link)
    return write


def read_manifest(export_dir: Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{export_dir} is not a stage export: {MANIFEST} is missing "
                          "(exports are written by train.py at the end of each stage)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is corrupt ({e}); re-run the stage that wrote it") from e


def resolve_init(init_from: str, stage: str, paths: RunPaths, run_name: str) -> Path | None:
    """The export this stage starts from, or None for a fresh start. Errors say what to run first."""
    needed = PREDECESSOR[stage]
    if init_from == "none":
        if stage == "instruct":
            raise ConfigError("stage=instruct cannot start from scratch (init_from=none): it tunes an aligned "
                              f"MLLM. Run `python train.py stage=mllm run_name={run_name}` and then "
                              f"`python train.py stage=align run_name={run_name}` first, or pass "
                              "init_from=<an align export folder>.")
        return None
    if needed is None:
        if init_from != "auto":
            raise ConfigError(f"stage=mllm has no predecessor; init_from must be auto or none, got {init_from!r}")
        return None
    if init_from == "auto":
        export = paths.root / needed / "export"
        if not (export / MANIFEST).is_file():
            order = " -> ".join(("mllm", "align", "instruct"))
            first = f"`python train.py stage={needed} run_name={run_name}`"
            extra = " or init_from=none to align a freshly initialised MLLM" if stage == "align" else ""
            raise ConfigError(f"stage={stage} starts from the {needed!r} stage's export, and {export} does not "
                              f"exist. Stage order is {order}. Run {first} first, or pass "
                              f"init_from=<export folder>{extra}.")
        return export
    export = Path(init_from)
    if not (export / MANIFEST).is_file() and (export / needed / "export" / MANIFEST).is_file():
        export = export / needed / "export"  # a run folder was given
    got = read_manifest(export)["stage"]
    # stage=instruct may also continue an instruct export (e.g. the converted final weights: fine-tuning)
    if got != needed and not (stage == "instruct" and got == "instruct"):
        raise ConfigError(f"init_from={init_from} is a {got!r} export, but stage={stage} needs a {needed!r} export"
                          + (" (or an 'instruct' one, to fine-tune it)" if stage == "instruct" else ""))
    return export


def diffusion_record(diffusion_path: str | None, assets: Path) -> dict:
    """What an align/instruct export records about the Stable Diffusion folder it trained against: the folder
    (the run's tiny `assets/sd` when `model.diffusion_path` is null) and a fingerprint of its CLIP text parts."""
    from kosmos_g.assets import fingerprint, random_sd_size

    folder = Path(diffusion_path) if diffusion_path else Path(assets) / "sd"
    return {"diffusion_path": str(folder.resolve()), "clip_text_fingerprint": fingerprint(folder),
            "random_tiny_sd": random_sd_size(folder) is not None}


def adopt_export_assets(diffusion_path: str | None, init_export: Path | None, stage: str) -> str | None:
    """The SD folder this stage must use: the one `init_export` was trained against (its manifest's "assets").

    With `model.diffusion_path` null the stage reuses that folder (not this run's own tiny assets); a set
    `model.diffusion_path` must hold the same CLIP text encoder and tokenizer. A mismatch is an error naming both.
    """
    if init_export is None or stage == "mllm":
        return diffusion_path
    record = read_manifest(init_export).get("assets")
    if not record:  # an export written before exports recorded their assets
        return diffusion_path
    from kosmos_g.assets import fingerprint

    recorded = Path(record["diffusion_path"])
    folder = Path(diffusion_path) if diffusion_path else recorded
    if not folder.is_dir():
        key = "model.diffusion_path" if diffusion_path else f"the SD folder {init_export} was trained against,"
        raise ConfigError(f"{key} {folder} is missing. Set model.diffusion_path to that folder (or a copy of it: "
                          f"CLIP text fingerprint {record['clip_text_fingerprint']}).")
    got = fingerprint(folder)
    if got != record["clip_text_fingerprint"]:
        raise ConfigError(
            f"init_from={init_export} was trained against the CLIP text encoder/tokenizer in {recorded} "
            f"(fingerprint {record['clip_text_fingerprint']}), but this run would use {folder} (fingerprint {got}). "
            f"Set model.diffusion_path={recorded} (or leave it null to reuse it), or train the earlier stages "
            "against this folder.")
    return str(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temp file, then rename: a crash never leaves a half-written file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def move_aside(checkpoints: Path) -> Path | None:
    """`resume=none`: rename a non-empty checkpoints folder to checkpoints.<time> (never deleted); returns it."""
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return None
    aside = checkpoints.with_name(f"checkpoints.{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two launches in one second must not collide
        aside = checkpoints.with_name(f"checkpoints.{time.strftime('%Y%m%d-%H%M%S')}.{n}")
        n += 1
    checkpoints.rename(aside)
    return aside


def read_checkpoint(ckpt: Path) -> dict:
    """The parts of a Lightning checkpoint train.py checks before resuming: global_step, the writing stage,
    and the shapes of its weights. Opened with `weights_only=True` (no arbitrary pickled objects can
    run) and memory-mapped (the weights are not read). A file that fails here is never handed to Lightning."""
    import torch

    try:
        ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        return {"global_step": int(ckpt_dict["global_step"]), "stage": (ckpt_dict.get("kosmos_g") or {}).get("stage"),
                "shapes": {k: tuple(v.shape) for k, v in ckpt_dict.get("state_dict", {}).items()}}
    except Exception as e:
        raise ConfigError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {str(e)[:300]}); move or delete "
                          "it, or pass resume=<another .ckpt> or resume=none (old checkpoints are kept aside)") from e


def check_checkpoint_fits(ckpt: Path, info: dict, stage: str, module) -> None:
    """A checkpoint of another stage or of other model sizes is an error naming both, not a silent partial load."""
    if info["stage"] is not None and info["stage"] != stage:
        raise ConfigError(f"checkpoint {ckpt} was written by stage={info['stage']}, not stage={stage}; pass "
                          "resume=none to start this stage over, or resume=<a checkpoint of this stage>")
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, shape in info["shapes"].items():
        if key in own and own[key] != shape:
            raise ConfigError(f"checkpoint {ckpt} does not fit the model: {key} has shape {list(shape)} there and "
                              f"{list(own[key])} here (model sizes changed since it was written?). Use the config "
                              "it was trained with, or resume=none to start over (old checkpoints are kept aside).")
