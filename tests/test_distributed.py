"""A real distributed run on CPU: torchrun starts 2 processes (gloo) that train each stage for a few
steps under DDP, then under FSDP (full shard, activation checkpointing by the strategy, the frozen
U-Net / CLIP text encoder left out); their loss (averaged over ranks) matches a single process on the
same global batch. Lightning refuses FSDP on CPU by name; the project's FSDP strategy runs it there
with the same wrapping, sharding, gathering for the export and full-state checkpoints as on GPUs.

Same global batch: one caption shard, no shuffle buffer, captions only (no random featurizing), so
rank 0 reads samples 0, 2, 4... and rank 1 samples 1, 3, 5... (every 2nd sample of a shard smaller than
the reader count), i.e. batch size 2 on 2 ranks sees exactly the single process's batch of 4. Stage
instruct draws noise: here it is pinned to each sample (seeded by its caption) and the VAE takes the
posterior mode, so both runs add the same noise to the same sample wherever it lands.

That comparison needs the same samples on both sides, so it departs from the defaults (captions only, no
CFG dropout: one process draws its drops from one seed, two ranks from two). The second test runs every
stage with its defaults (cfg_dropout 0.1, the default mixture of every kind, validation and sample grids
on) under DDP and FSDP, with the data arranged so that rank 1 never sees an image (its mixture: text for
mllm, captions for instruct) and, at the first instruct step, rank 0 drops one condition more than rank 1:
before every stage ran the same sharded forwards on every rank, this died with gloo's "collective mismatch".

This file is also torchrun's worker script (`__main__` below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from kosmos_g.config import load_config
from kosmos_g.testing import read_steps

STEPS = 3
STAGES = ("mllm", "align", "instruct")
DISTRIBUTED = ("ddp", "fsdp")


@pytest.fixture(autouse=True)
def world(tmp_path, tiny_world):
    """The tiny world's shards where the runs read them (data.root=<tmp_path>/data)."""
    shutil.copytree(tiny_world(200), tmp_path / "data")


def stage_config(stage: str, root: Path, run_name: str, batch_size: int, extra: list[str] = ()):
    """The comparison's config: captions only, no shuffling, each stage starting from the single run's exports."""
    single = root / "single"
    if run_name != "single" and stage != "mllm":  # the same MLLM/aligner start and the same frozen SD parts
        extra = [f"init_from={single}", f"model.diffusion_path={single / 'assets' / 'sd'}", *extra]
    cfg = load_config([f"stage={stage}", f"runs_dir={root}", f"run_name={run_name}", f"data.root={root / 'data'}",
                       "data.shuffle_buffer=0", f"stage.batch_size={batch_size}",
                       f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "trainer.deterministic=true",
                       "stage.cfg_dropout=0.0", *extra])
    if stage == "align":
        # AlignerNet's N has no padding mask (as the original) and the official reconstruction loss averages
        # over the padded batch x 77/L, so it depends on the batch's padded length (half-batches pad less):
        # compare the target term only.
        cfg.stage.recon_weight = 0.0
    for s in cfg.data.mixture:  # one kind: the mixture draws no random kinds (override keys cannot do this)
        cfg.data.mixture[s] = {"caption": 1.0}
    return cfg


def pin_noise() -> dict:
    """Make stage instruct's noise a function of each sample; returns the originals (to restore)."""
    from kosmos_g.models.diffusion import FrozenDiffusion
    from kosmos_g.stages.instruct import ScoreDistillTuner

    originals = {"step": ScoreDistillTuner.training_step, "noise": FrozenDiffusion.add_noise,
                 "encode": FrozenDiffusion.encode_images}

    def training_step(self, batch, batch_idx):
        self.diffusion.sample_keys = [zlib.crc32(json.dumps(p, default=str).encode()) for p in batch["prompts"]]
        return originals["step"](self, batch, batch_idx)

    def add_noise(self, latents, generator=None):
        noise, steps = [], []
        for key in self.sample_keys:
            g = torch.Generator().manual_seed(key)
            noise.append(torch.randn(latents.shape[1:], generator=g))
            steps.append(torch.randint(0, self.num_train_timesteps, (), generator=g))
        noise, steps = torch.stack(noise).to(latents.device), torch.stack(steps).to(latents.device)
        return self.noise_scheduler.add_noise(latents.float(), noise, steps), noise, steps

    def encode_images(self, pixels, sample=True, generator=None):
        return originals["encode"](self, pixels, sample=False)

    ScoreDistillTuner.training_step, FrozenDiffusion.add_noise = training_step, add_noise
    FrozenDiffusion.encode_images = encode_images
    return originals


def losses(root: Path, run_name: str, stage: str) -> list[float]:
    steps = read_steps(root / run_name / stage / "steps.jsonl")
    return [steps[i]["loss"] for i in range(1, STEPS + 1)]


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_cpu_processes_match_one_process(tmp_path, monkeypatch):
    from kosmos_g.models.diffusion import FrozenDiffusion
    from kosmos_g.stages.instruct import ScoreDistillTuner
    from kosmos_g.train import run

    # 1. one process, global batch 4: every stage in order (the DDP runs start from these exports)
    originals = pin_noise()
    try:
        for stage in STAGES:
            run(stage_config(stage, tmp_path, "single", batch_size=4))
    finally:
        ScoreDistillTuner.training_step = originals["step"]
        FrozenDiffusion.add_noise, FrozenDiffusion.encode_images = originals["noise"], originals["encode"]

    # 2. torchrun: 2 processes x batch 2, gloo, trainer.strategy=ddp; the same tiny tokenizers (whose
    # training is not reproducible across processes) and SD stand-ins as the single run
    for name in DISTRIBUTED:
        shutil.copytree(tmp_path / "single" / "assets", tmp_path / name / "assets")
    torchrun(tmp_path, "compare")

    for name in DISTRIBUTED:
        for stage in STAGES:
            single, multi = losses(tmp_path, "single", stage), losses(tmp_path, name, stage)
            assert all(torch.isfinite(torch.tensor(single + multi))), (name, stage, single, multi)
            # mllm averages its loss over each rank's tokens, so 2 ranks weigh the two half-batches equally where
            # one process weighs them by token count (captions differ by a few tokens): ~3e-4 apart. Others: 1e-7.
            tol = 2e-3 if stage == "mllm" else 1e-5
            assert torch.allclose(torch.tensor(multi), torch.tensor(single), rtol=tol, atol=0), (name, stage, single, multi)
            manifest = json.loads((tmp_path / name / stage / "export" / "manifest.json").read_text())
            assert manifest["step"] == (STEPS + 1 if name == "fsdp" and stage == "align" else STEPS)

    # FSDP: checkpoints hold the full trainable weights under their plain names; the exports whole tensors
    state = torch.load(tmp_path / "fsdp" / "instruct" / "checkpoints" / "last.ckpt", weights_only=True)
    single_state = torch.load(tmp_path / "single" / "instruct" / "checkpoints" / "last.ckpt", weights_only=True)
    assert {k: v.shape for k, v in state["state_dict"].items()} == {k: v.shape for k, v in single_state["state_dict"].items()}
    # Adam state only for trainable weights. One process has it only for those that got a gradient; FSDP gives
    # the unused weights of a used unit zero gradients.
    assert len(single_state["optimizer_states"][0]["state"]) <= len(state["optimizer_states"][0]["state"]) \
        <= len(state["state_dict"])
    single_aligner = safetensors(tmp_path / "single" / "instruct" / "export" / "aligner")
    fsdp_aligner = safetensors(tmp_path / "fsdp" / "instruct" / "export" / "aligner")
    assert {k: v.shape for k, v in fsdp_aligner.items()} == {k: v.shape for k, v in single_aligner.items()}
    # the resumed FSDP align run (one more step) continued from the full-state checkpoint
    assert sorted(read_steps(tmp_path / "fsdp" / "align" / "steps.jsonl")) == list(range(1, STEPS + 2))


def torchrun(root: Path, mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(root),
           mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "[worker] rank 1 of 2" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_every_stage_runs_its_defaults_under_ddp_and_fsdp_with_uneven_ranks(tmp_path):
    from kosmos_g.eval.metrics import save_tiny_clip, save_tiny_dino
    from kosmos_g.testing import read_scalars

    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"{DREAMBENCH} not present (validation needs DreamBench)")
    save_tiny_clip(tmp_path / "clip")
    save_tiny_dino(tmp_path / "dino.safetensors")
    torchrun(tmp_path, "defaults")

    seen = [json.loads(line) for f in sorted(tmp_path.glob("seen-*.jsonl")) for line in f.read_text().splitlines()]
    for name in DISTRIBUTED:
        for stage in STAGES:
            steps = read_steps(tmp_path / name / stage / "steps.jsonl")
            assert sorted(steps) == list(range(1, STEPS + 1)), (name, stage)
            assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps.values()), (name, stage, steps)
            assert (tmp_path / name / stage / "export" / "manifest.json").is_file()
        # the arrangement really happened: rank 1 image-free, rank 0 with images; uneven CFG drops
        for stage in ("mllm", "instruct"):
            images = {r: [e["images"] for e in seen if (e["run"], e["stage"], e["rank"]) == (name, stage, r)]
                      for r in (0, 1)}
            assert images[1] and not any(images[1]) and any(images[0]), (name, stage, images)
        drops = {r: [e["dropped"] for e in seen if (e["run"], e["stage"], e["rank"]) == (name, "instruct", r)]
                 for r in (0, 1)}
        assert drops[0][0] != drops[1][0], drops
        # validation and the sample grid ran (every rank generated; rank 0 logged)
        scalars = read_scalars(tmp_path / name / "instruct" / "tensorboard")
        assert "val/DINO" in scalars and "val/CLIP-I" in scalars, sorted(scalars)


def safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next(folder.glob("*.safetensors")))


def worker(root: Path, mode: str) -> None:
    """One torchrun process: the three stages under DDP, then FSDP (2 ranks x batch 2) on the CPU."""
    torch.set_num_threads(1)
    print(f"[worker] rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}", flush=True)
    from kosmos_g.train import release_process_group, run

    cpu2 = ["trainer.accelerator=cpu", "trainer.devices=2"]
    fsdp = ["trainer.strategy=fsdp", "trainer.activation_checkpointing=true", *cpu2]
    if mode == "compare":
        pin_noise()
        for stage in STAGES:
            run(stage_config(stage, root, "ddp", batch_size=2, extra=["trainer.strategy=ddp", *cpu2]))
        for stage in STAGES:
            run(stage_config(stage, root, "fsdp", batch_size=2, extra=fsdp))
        run(stage_config("align", root, "fsdp", batch_size=2, extra=[*fsdp, f"trainer.max_steps={STEPS + 1}"]))
    else:
        record_what_each_rank_sees(root)
        for name, extra in (("ddp", ["trainer.strategy=ddp", *cpu2]), ("fsdp", fsdp)):
            for stage in STAGES:
                run(default_config(stage, root, name, extra))
    release_process_group()
    # Every file is written by now. About one exit in ten then aborted in a C++ destructor ("terminate called
    # without an active exception", after both ranks had finished and released the process group), which
    # torchrun reports as a failure: skip the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


DREAMBENCH = Path(__file__).parents[1].parent / "shared" / "dreambench"
IMAGE_FREE = {"mllm": "text", "instruct": "caption"}  # rank 1's only kind: batches without any image


def default_config(stage: str, root: Path, run_name: str, extra: list[str]):
    """The stage's defaults, except that rank 1 reads only image-free samples; instruct validates and logs
    sample grids every 2 steps (tiny CLIP/DINO written by the test)."""
    overrides = [f"stage={stage}", f"runs_dir={root}", f"run_name={run_name}", f"data.root={root / 'data'}",
                 f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
                 "stage.batch_size=2", *extra]
    if stage == "instruct":
        overrides += ["stage.sample_every_n_steps=2", "eval.every_n_steps=2", f"eval.dreambench_root={DREAMBENCH}",
                      f"eval.clip_path={root / 'clip'}", f"eval.dino_path={root / 'dino.safetensors'}",
                      "eval.subjects=1", "eval.prompts=1", "eval.steps=2"]
    cfg = load_config(overrides)
    if os.environ["RANK"] == "1" and stage in IMAGE_FREE:
        cfg.data.mixture[stage] = {IMAGE_FREE[stage]: 1.0}
    return cfg


def record_what_each_rank_sees(root: Path) -> None:
    """Log (run, stage, rank, images, dropped) per step to seen-<rank>.jsonl, and make rank 0 drop its first
    condition at the first instruct step (on top of the p=0.1 draws), so the ranks' drop counts differ."""
    from kosmos_g.stages.instruct import ScoreDistillTuner
    from kosmos_g.stages.mllm import MultimodalLMModule

    rank = int(os.environ["RANK"])
    out = root / f"seen-{rank}.jsonl"

    def note(module, batch, **extra):
        entry = {"run": module.cfg.run_name, "stage": module.cfg.stage.name, "rank": rank,
                 "images": int(batch["pixel_values"].shape[0]), **extra}
        with out.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    mllm_step, instruct_step, drop_mask = (MultimodalLMModule.training_step, ScoreDistillTuner.training_step,
                                           ScoreDistillTuner.cfg_drop_mask)

    def mllm_training_step(self, batch, batch_idx):
        note(self, batch)
        return mllm_step(self, batch, batch_idx)

    def cfg_drop_mask(self, batch_size):
        drop = drop_mask(self, batch_size)
        if rank == 0 and self.global_step == 0:
            drop[0] = True
        self.last_dropped = int(drop.sum())
        return drop

    def instruct_training_step(self, batch, batch_idx):
        loss = instruct_step(self, batch, batch_idx)
        note(self, batch, dropped=self.last_dropped)
        return loss

    MultimodalLMModule.training_step, ScoreDistillTuner.training_step = mllm_training_step, instruct_training_step
    ScoreDistillTuner.cfg_drop_mask = cfg_drop_mask


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
