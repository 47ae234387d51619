"""`python train.py stage=<mllm|align|instruct> [key=value ...]`: train one stage and export it.

    python train.py stage=align model=tiny trainer.max_steps=20
    python train.py --cfg job            # print the composed config
    python train.py --help               # config groups and options

Each stage starts from the previous stage's export (`init_from=auto`), continues its own last
checkpoint (`resume=auto`) and ends by writing `runs/<run_name>/<stage>/export/`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kosmos_g.config import CONFIG_DIR, ConfigError, TrainConfig, load_config, register_configs, to_train_config

# Nothing is ever downloaded at run time: weights come from local paths only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _build_stage(cfg: TrainConfig, paths, init_export: Path | None):
    if cfg.stage.name == "align":
        from kosmos_g.stages.align import build
    elif cfg.stage.name == "mllm":
        from kosmos_g.stages.mllm import build
    else:
        from kosmos_g.stages.instruct import build
    return build(cfg, paths.assets, init_export)


def resolve_resume(resume: str, paths) -> Path | None:
    """The checkpoint to continue from; `resume=none` moves old checkpoints aside (never deletes them)."""
    last = paths.checkpoints / "last.ckpt"
    if resume == "auto":
        return last if last.is_file() else None
    if resume == "none":
        if paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
            aside = paths.checkpoints.with_name(f"checkpoints.{time.strftime('%Y%m%d-%H%M%S')}")
            paths.checkpoints.rename(aside)
            print(f"[train] resume=none: moved the old checkpoints to {aside}")
        return None
    ckpt = Path(resume)
    if not ckpt.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file; use resume=auto, resume=none or a .ckpt path")
    return ckpt


def _checkpoint_step(ckpt: Path) -> int:
    import torch

    try:  # mmap: only the few bytes of the step are read, not the weights
        return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as e:
        raise ConfigError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); delete or move it, or "
                          "pass resume=<another .ckpt> / resume=none (old checkpoints are kept aside)") from e


def run(cfg: TrainConfig) -> Path:
    """Train `cfg.stage` and write its export; returns the export folder."""
    # Imported here so `--help`, `--cfg job` and config errors answer in a second.
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from kosmos_g.run import AtomicCheckpointIO, RunPaths, config_hash, resolve_init, write_export
    from kosmos_g.stages.common import TrainingHealth

    stage = cfg.stage.name
    paths = RunPaths.create(cfg.runs_dir, cfg.run_name, stage)
    init_export = resolve_init(cfg.init_from, stage, paths, cfg.run_name)
    ckpt = resolve_resume(cfg.resume, paths)
    start_step = _checkpoint_step(ckpt) if ckpt else 0
    if cfg.data.generate_tiny_world:  # opt-in (data=tiny): the only place the core touches the tiny world
        from kosmos_g.tinyworld.data import write_world_shards
        write_world_shards(cfg.data.root, seed=cfg.seed, samples=cfg.data.tiny_world_samples,
                           size=cfg.data.vae_image_size)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = _build_stage(cfg, paths, init_export)
    datamodule.start_step = start_step

    paths.stage_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.structured(cfg)
    (paths.stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, max_steps=t.max_steps, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, gradient_clip_val=cfg.stage.optim.grad_clip or None,
        logger=TensorBoardLogger(str(paths.stage_dir), name="tensorboard", version="", default_hp_metric=False),
        callbacks=[
            ModelCheckpoint(dirpath=paths.checkpoints, filename="step-{step}", every_n_train_steps=t.checkpoint_every_n_steps,
                            save_top_k=-1, save_last=True, auto_insert_metric_name=False),
            LearningRateMonitor(logging_interval="step"),
            TrainingHealth(),
        ],
        plugins=[AtomicCheckpointIO()], enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(paths.stage_dir),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    trainer.save_checkpoint(paths.checkpoints / "last.ckpt", weights_only=False)  # the end state, always

    export = paths.export
    if trainer.is_global_zero:
        write_export(export, stage, trainer.global_step, config_hash(OmegaConf.to_container(resolved)),
                     module.export_parts())
        print(f"[train] stage={stage} done at step {trainer.global_step}\n"
              f"  export:      {export}\n  checkpoints: {paths.checkpoints}\n"
              f"  tensorboard: tensorboard --logdir {paths.root}")
    return export


def _fail(e: ConfigError) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") for a in argv):
        return _hydra_main(argv)  # --help, --cfg job, --multirun ...: Hydra's own command line
    try:
        cfg = load_config(argv)
        run(cfg)
    except ConfigError as e:
        _fail(e)


def _hydra_main(argv: list[str]) -> None:
    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def task(cfg: DictConfig) -> None:
        try:
            run(to_train_config(cfg))
        except ConfigError as e:
            _fail(e)

    saved = sys.argv
    sys.argv = [saved[0]] + argv
    try:
        task()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
