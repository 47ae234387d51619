"""`python train.py stage=<mllm|align|instruct> [key=value ...]`: train one stage and export it.

    python train.py stage=align model=tiny trainer.max_steps=20
    python train.py --cfg job            # print the composed config
    python train.py --help               # config groups and options

Each stage starts from the previous stage's export (`init_from=auto`), continues its own last
checkpoint (`resume=auto`) and ends by writing `runs/<run_name>/<stage>/export/`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kosmos_g.batching import batch_summary
from kosmos_g.config import CONFIG_DIR, ConfigError, TrainConfig, load_config, register_configs, to_train_config
from kosmos_g.overrides import quote_braces

# Nothing is ever downloaded at run time: weights come from local paths only (export HF_HUB_OFFLINE=0
# to allow the Hub on purpose). tests/test_bad_input.py fails if a training run opens any connection.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _build_stage(cfg: TrainConfig, paths, init_export: Path | None, resume_step: int):
    if cfg.stage.name == "align":
        from kosmos_g.stages.align import build
    elif cfg.stage.name == "mllm":
        from kosmos_g.stages.mllm import build
    else:
        from kosmos_g.stages.instruct import build
    return build(cfg, paths.assets, init_export, resume_step)


def resolve_resume(resume: str, paths) -> Path | None:
    """The checkpoint to continue from (no side effects: `resume=none` moves old ones aside later, in `run`)."""
    last = paths.checkpoints / "last.ckpt"
    if resume == "auto":
        return last if last.is_file() else None
    if resume == "none":
        return None
    ckpt = Path(resume)
    if not ckpt.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file; use resume=auto, resume=none or a .ckpt path")
    return ckpt


def run(cfg: TrainConfig) -> Path | None:
    """Train `cfg.stage` and write its export; returns the export folder, or None when preempted.

    Everything that can be checked is checked before the run folder is touched (config, strategy, stage
    order, checkpoint, model, data), so a launch that fails leaves checkpoints and exports as they were.
    """
    # Imported here so `--help`, `--cfg job` and config errors answer in a second.
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from kosmos_g.assets import prepare_assets
    from kosmos_g.callbacks import NumericalGuard, Preemption, StepLog, StepSeed, TrainingHealth
    from kosmos_g.run import (AtomicCheckpointIO, RunPaths, adopt_export_assets, check_checkpoint_fits, config_hash,
                              diffusion_record, launch_rank, move_aside, read_checkpoint, resolve_init, write_export)
    from kosmos_g.scale import build_strategy, full_weights, gradient_clipping, prepare_module

    stage, t = cfg.stage.name, cfg.trainer
    strategy = build_strategy(t)
    paths = RunPaths.create(cfg.runs_dir, cfg.run_name, stage)
    init_export = resolve_init(cfg.init_from, stage, paths, cfg.run_name)
    # The CLIP text space the earlier stages were trained against, not this run's own tiny assets.
    adopted = adopt_export_assets(cfg.model.diffusion_path, init_export, stage)
    if adopted != cfg.model.diffusion_path and launch_rank() == 0:
        print(f"[train] model.diffusion_path={adopted}: the SD folder {init_export} was trained against")
    cfg.model.diffusion_path = adopted
    ckpt = resolve_resume(cfg.resume, paths)
    ckpt_info = read_checkpoint(ckpt) if ckpt else None  # weights_only=True: a bad or unsafe file stops here
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # tiny assets are random: make them reproducible
    prepare_assets(cfg, paths, init_export)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = _build_stage(cfg, paths, init_export, ckpt_info["global_step"] if ckpt else 0)
    assets = diffusion_record(cfg.model.diffusion_path, paths.assets) if stage != "mllm" else None
    if assets and assets["random_tiny_sd"] and stage == "instruct":
        print(f"[train] warning: the U-Net and VAE in {assets['diffusion_path']} are RANDOM (the tiny stand-in "
              "built when model.diffusion_path is null): this stage trains against noise and its images will be "
              "noise. Point model.diffusion_path at trained ones (after `make demo`: runs/demo/teachers/sd).",
              file=sys.stderr)
    if ckpt:
        check_checkpoint_fits(ckpt, ckpt_info, stage, module)
    datamodule.check_sources()  # an empty or unreadable dataset is refused before anything is written
    accumulate = cfg.stage.accumulate_grad_batches
    prepare_module(module, t)

    # From here on the run folder changes (first process only; the others wait in Trainer.fit).
    resolved = OmegaConf.structured(cfg)
    if launch_rank() == 0:
        if cfg.resume == "none" and (aside := move_aside(paths.checkpoints)):
            print(f"[train] resume=none: moved the old checkpoints to {aside}")
        paths.stage_dir.mkdir(parents=True, exist_ok=True)
        print(f"[train] stage={stage} {batch_summary(cfg)}")
        (paths.stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    preemption = Preemption(t.preempt_signals, paths.checkpoints / "last.ckpt")
    clip_val, clip_callbacks = gradient_clipping(strategy, cfg.stage.optim.grad_clip)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, gradient_clip_val=clip_val, accumulate_grad_batches=accumulate,
        logger=TensorBoardLogger(str(paths.stage_dir), name="tensorboard", version="", default_hp_metric=False),
        callbacks=[
            StepSeed(cfg.seed, accumulate),
            ModelCheckpoint(dirpath=paths.checkpoints, filename="step-{step}", every_n_train_steps=t.checkpoint_every_n_steps,
                            save_top_k=-1, save_last=True, auto_insert_metric_name=False),
            LearningRateMonitor(logging_interval="step"),
            TrainingHealth(),
            NumericalGuard(t.max_bad_steps, paths.checkpoints),
            *clip_callbacks,  # FSDP: after the guard and the grad-norm logging
            StepLog(paths.stage_dir / "steps.jsonl"),
            preemption,
        ],
        plugins=[AtomicCheckpointIO()], enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(paths.stage_dir),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    if preemption.stopped_at is not None:
        return None  # the checkpoint is written; no export for an unfinished stage
    trainer.save_checkpoint(paths.checkpoints / "last.ckpt", weights_only=False)  # the end state, always

    export = paths.export
    with full_weights(trainer):  # FSDP: rank 0 sees whole weights while it writes the export
        if trainer.is_global_zero:
            write_export(export, stage, trainer.global_step, config_hash(OmegaConf.to_container(resolved)),
                         module.export_parts(), assets)
    if trainer.is_global_zero:
        print(f"[train] stage={stage} done at step {trainer.global_step}\n"
              f"  export:      {export}\n  checkpoints: {paths.checkpoints}\n"
              f"  tensorboard: tensorboard --logdir {paths.root}")
    return export


def _fail(e: ConfigError) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = _cfg_job_overrides(argv)
    if job is not None:  # --cfg job: the validated config, with what start-up derives from it
        try:
            cfg = load_config(job)
        except ConfigError as e:
            _fail(e)
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)) + f"# {batch_summary(cfg)}")
        return
    if any(a.startswith("-") for a in argv):
        return _hydra_main(argv)  # --help, --cfg job, --multirun ...: Hydra's own command line
    try:
        cfg = load_config(argv)
        _run_or_exit(cfg)
    except ConfigError as e:
        _fail(e)


def _cfg_job_overrides(argv: list[str]) -> list[str] | None:
    """The overrides of a `--cfg job` (or `-c job`) command line, else None (other flags go to Hydra)."""
    for i, a in enumerate(argv[:-1]):
        if a in ("--cfg", "-c") and argv[i + 1] == "job":
            rest = argv[:i] + argv[i + 2:]
            return rest if not any(r.startswith("-") for r in rest) else None
    return None


def _run_or_exit(cfg: TrainConfig) -> None:
    from kosmos_g.callbacks import TrainingDiverged

    try:
        run(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        release_process_group()


def release_process_group() -> None:
    """Under torchrun, close the process group Lightning opened, as PyTorch asks, rather than leave it to
    interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _hydra_main(argv: list[str]) -> None:
    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def task(cfg: DictConfig) -> None:
        try:
            _run_or_exit(to_train_config(cfg))
        except ConfigError as e:
            _fail(e)

    saved = sys.argv
    sys.argv = [saved[0]] + quote_braces(argv)
    try:
        task()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
