"""Exact resume after SIGKILL, clean preemption on SIGTERM, and the numerical guard.

A training subprocess is paused at a chosen step (a patched callback hook waits there), then killed or
signalled; the resumed run must log the very losses of an uninterrupted run from that step on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kosmos_g.config import load_config
from kosmos_g.testing import read_scalars
from kosmos_g.callbacks import TrainingDiverged
from kosmos_g.testing import read_steps
from kosmos_g.train import main, run

# A subprocess running train.py's main() that stops at the start of step STEP: "kill" waits forever (the test
# SIGKILLs it), "signal" waits until the Preemption callback has seen a signal, then lets training go on.
PAUSED_TRAINING = """
import os, sys, time
from pathlib import Path
from kosmos_g import callbacks
STEP, MARK, MODE = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def pause(self, trainer, pl_module, batch, batch_idx):
    if trainer.global_step == STEP:
        MARK.write_text(str(os.getpid()))
        while MODE == "kill" or self.received is None:
            time.sleep(0.02)
callbacks.Preemption.on_train_batch_start = pause
from kosmos_g.train import main
main(sys.argv[4:])
"""


def start_paused(tmp_path: Path, step: int, mode: str, overrides: list[str]) -> tuple[subprocess.Popen, Path]:
    mark = tmp_path / f"paused-{mode}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own process group, so a signal can reach it and its DataLoader workers at once, as SLURM sends it
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_TRAINING, str(step), str(mark), mode, *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 150
    while not mark.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"training subprocess did not reach step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    return proc, mark


@pytest.fixture(autouse=True)
def world(tmp_path, tiny_world):
    """The tiny world's shards where the runs read them (data.root=<tmp_path>/data)."""
    shutil.copytree(tiny_world(200), tmp_path / "data")


def common_overrides(root: Path, run_name: str, max_steps: int) -> list[str]:
    return [f"runs_dir={root}", f"run_name={run_name}", f"data.root={root / 'data'}",
            f"trainer.max_steps={max_steps}", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
            "trainer.deterministic=true"]


def losses(root: Path, run_name: str, stage: str) -> dict[int, float]:
    return {s: r["loss"] for s, r in read_steps(root / run_name / stage / "steps.jsonl").items()}


@pytest.mark.slow
def test_sigkill_then_resume_auto_gives_the_uninterrupted_losses(tmp_path):
    align = ["stage=align", "init_from=none"]
    main([*align, *common_overrides(tmp_path, "whole", 6)])
    whole = losses(tmp_path, "whole", "align")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]

    cut = common_overrides(tmp_path, "cut", 6)
    # The same tiny tokenizers and CLIP text encoder (the tiny CLIP tokenizer's ids vary between processes).
    shutil.copytree(tmp_path / "whole" / "assets", tmp_path / "cut" / "assets")
    proc, _ = start_paused(tmp_path, 3, "kill", [*align, *cut])  # step 3's checkpoint is written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpts = tmp_path / "cut" / "align" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-3.ckpt"]  # no half-written .tmp
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["lr_schedulers"]
    # Adam state for exactly the trained weights (the aligner); the frozen MLLM / CLIP text encoder have none
    assert len(state["optimizer_states"][0]["state"]) == len(state["state_dict"]) > 0
    assert all(k.startswith("aligner.") for k in state["state_dict"])
    assert not (tmp_path / "cut" / "align" / "export").exists()

    main([*align, *cut])  # resume=auto
    resumed = losses(tmp_path, "cut", "align")
    assert [resumed[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]  # bit for bit
    lrs = {s: r["lr"] for s, r in read_steps(tmp_path / "cut" / "align" / "steps.jsonl").items()}
    assert lrs == {s: r["lr"] for s, r in read_steps(tmp_path / "whole" / "align" / "steps.jsonl").items()}
    assert json.loads((tmp_path / "cut" / "align" / "export" / "manifest.json").read_text())["step"] == 6


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path):
    """Stage instruct (random noise, timesteps and CFG drops) with a DataLoader worker, stopped between two
    checkpoint boundaries: the resume replays the data segment and the per-step seeds."""
    main(["stage=align", "init_from=none", *common_overrides(tmp_path, "a", 2)])
    instruct = ["stage=instruct", f"init_from={tmp_path / 'a'}", f"model.diffusion_path={tmp_path / 'a' / 'assets' / 'sd'}",
                "data.num_workers=1", "stage.sample_every_n_steps=0"]
    main([*instruct, *common_overrides(tmp_path, "whole", 8)])
    whole = losses(tmp_path, "whole", "instruct")

    cut = common_overrides(tmp_path, "cut", 8)
    proc, _ = start_paused(tmp_path, 4, "signal", [*instruct, *cut])
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader worker (which must ignore it)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: checkpoint at step 5" in out, out[-2000:]
    stage = tmp_path / "cut" / "instruct"
    assert torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    assert not (stage / "export").exists()  # an unfinished stage is not exported
    assert max(losses(tmp_path, "cut", "instruct")) == 5

    main([*instruct, *cut])  # resumes at step 5, between the boundaries 3 and 6
    resumed = losses(tmp_path, "cut", "instruct")
    assert [resumed[s] for s in range(1, 9)] == [whole[s] for s in range(1, 9)]


def test_sigusr1_in_process_checkpoints_and_stops(tmp_path, monkeypatch):
    """SLURM's warning signal, delivered to this very process at step 2: checkpoint at the end of the step."""
    from kosmos_g.callbacks import StepSeed

    original = StepSeed.on_train_batch_start

    def signal_at_step_2(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(StepSeed, "on_train_batch_start", signal_at_step_2)
    previous = signal.getsignal(signal.SIGUSR1)
    assert run(load_config(["stage=align", "init_from=none", *common_overrides(tmp_path, "u", 6)])) is None
    stage = tmp_path / "u" / "align"
    assert torch.load(stage / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (stage / "export").exists()
    assert signal.getsignal(signal.SIGUSR1) == previous  # the handler is removed after training


# ---------------------------------------------------------------------------------------------
# numerical guard


def poison(monkeypatch, bad_steps, kind: str = "loss"):
    """Make AlignerModule's loss (or only its gradient) non-finite at `bad_steps` (trainer.global_step values,
    i.e. step number - 1)."""
    from kosmos_g.stages.align import AlignerModule

    original = AlignerModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_step in bad_steps:
            if kind == "loss":
                return loss * float("nan")
            # finite value, nan gradient: d sqrt(x)/dx at 0 is inf, times 0
            return loss + torch.sqrt((self.aligner.encoder_query * 0).sum())
        return loss

    monkeypatch.setattr(AlignerModule, "training_step", training_step)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_guard_skips_isolated_bad_steps(tmp_path, monkeypatch, kind):
    poison(monkeypatch, {1, 3}, kind)
    cfg = load_config(["stage=align", "init_from=none", *common_overrides(tmp_path, "g", 5)])
    run(cfg)
    stage = tmp_path / "g" / "align"
    state = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["callbacks"]["NumericalGuard"] == {"bad_total": 2, "bad_in_row": 0}
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())  # no nan reached the weights
    assert all(torch.isfinite(v).all() for s in state["optimizer_states"][0]["state"].values()
               for v in s.values() if torch.is_tensor(v))
    bad = read_scalars(stage / "tensorboard")["train/bad_steps_total"]
    assert [v for _, v in bad][-1] == 2


def test_guard_stops_after_max_bad_steps_in_a_row(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, set(range(2, 100)))  # from the 3rd step on (steps count from 1 in logs and messages)
    overrides = ["stage=align", "init_from=none", *common_overrides(tmp_path, "g", 20), "trainer.max_bad_steps=4"]
    with pytest.raises(TrainingDiverged, match=r"stopped at step 6: 4 steps in a row .*trainer.max_bad_steps=4"):
        run(load_config(overrides))
    with pytest.raises(SystemExit) as e:  # train.py: a clear message and exit status 3
        main(overrides)
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "error: stopped at step" in err and "stage.optim.lr" in err
    assert not (tmp_path / "g" / "align" / "export").exists()
    # the periodic checkpoint at step 3 is there to go back to (bad step 3 was skipped: finite weights)
    state = torch.load(tmp_path / "g" / "align" / "checkpoints" / "step-3.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
