"""The run-level callbacks `train.py` hands the Trainer: training health, step-wise seeding, the numerical
guard, preemption, and a per-step loss log. Stage-independent: the stages' own toolkit is `kosmos_g.stages.common`."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch

from kosmos_g.scale import is_sharded


class TrainingHealth(L.Callback):
    """Logs what a researcher watches besides the losses: grad norm, throughput, skipped samples.

    Learning rate comes from Lightning's `LearningRateMonitor`. Grad norm is measured before clipping.
    Not Lightning's `ThroughputMonitor`: it reports only after a window of batches (100 by default) and logs under
    its own names through the logger; these are per-step rates, logged from the first step.
    """

    def __init__(self, count_fn=None):
        self.count_fn = count_fn or self.count
        self.skipped: Counter = Counter()
        self._t0 = None

    @staticmethod
    def count(batch: dict) -> dict:
        """Samples, and tokens (real, not padding) when the batch has text."""
        out = {"samples": len(batch["input_ids"])}
        if "attention_mask" in batch:
            out["tokens"] = int(batch["attention_mask"].sum())
        return out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.skipped.update(batch.pop("skipped", {}) or {})
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % trainer.log_every_n_steps == 0:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None and p.grad.numel()]
            if grads:
                squares = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
                if is_sharded(trainer):  # FSDP: each rank holds a shard of the gradient
                    torch.distributed.all_reduce(squares)
                pl_module.log("train/grad_norm", squares.sqrt())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        for name, n in self.count_fn(batch).items():
            pl_module.log(f"throughput/{name}_per_sec", float(n) / elapsed)
        pl_module.log("data/skipped_total", float(sum(self.skipped.values())))
        for reason, n in self.skipped.items():
            pl_module.log(f"data/skipped_{reason}", float(n))

    def state_dict(self):
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict):
        self.skipped = Counter(state_dict.get("skipped", {}))


def _all_reduce(values: list[float], trainer, op: str = "sum") -> list[float]:
    """`values` reduced over all ranks (as is with one process). One small collective."""
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def step_seed(seed: int, rank: int, step: int | str) -> int:
    """The seed of one (micro-)step on one rank: a hash of (seed, rank, step), so no two collide."""
    return int.from_bytes(hashlib.sha256(f"{seed}-{rank}-{step}".encode()).digest()[:8], "little") >> 1


class StepSeed(L.Callback):
    """Re-seed torch / random / numpy before every step from (seed, global rank, step).

    The randomness of a step (noise and timesteps in stage instruct, classifier-free-guidance drops,
    dropout) is then a function of the step alone: a resumed run draws what the uninterrupted one drew,
    without saving RNG states, and every rank draws different noise (one seed on all ranks would give
    all GPUs the same timesteps). Data order has its own seeds (kosmos_g.data.datamodule). With gradient
    accumulation each micro-batch of a step gets its own seed (checkpoints fall on step boundaries, so
    `batch_idx % accumulate` is the micro-batch's index in its step, also after a resume).
    """

    def __init__(self, seed: int, accumulate: int = 1):
        self.seed, self.accumulate = seed, accumulate

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        micro = batch_idx % self.accumulate
        step = trainer.global_step if not micro else f"{trainer.global_step}.{micro}"  # micro 0: as without it
        s = step_seed(self.seed, trainer.global_rank, step)
        torch.manual_seed(s)  # all devices
        random.seed(s)
        np.random.seed(s % 2**32)


class TrainingDiverged(RuntimeError):
    """`trainer.max_bad_steps` steps in a row had a non-finite loss or gradient."""


class NumericalGuard(L.Callback):
    """A non-finite loss or gradient skips the update (gradients dropped), is counted and logged;
    `max_bad_steps` in a row stop the run with `TrainingDiverged`.

    All ranks take the same decision (one all-reduce), so replicas never drift apart. With fp16's
    gradient scaler, inf/nan gradients at a finite loss are the scaler's business (it skips the step and
    lowers the scale), so only a non-finite loss counts there. The learning-rate schedule still advances.
    """

    def __init__(self, max_bad_steps: int, checkpoint_dir: Path | None = None):
        self.max_bad_steps, self.checkpoint_dir = max_bad_steps, checkpoint_dir
        self.bad_in_row = self.bad_total = 0
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss):
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = trainer.strategy.root_device
        loss_bad = ~torch.isfinite(self._loss).all() if self._loss is not None else torch.tensor(False)
        grads_bad = torch.tensor(False, device=device)
        if params and getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = torch.stack([n.float() for n in torch._foreach_norm([p.grad for p in params])])
            grads_bad = ~torch.isfinite(norms).all()
        # [loss bad, any bad] as one tensor, one sync, one collective
        flags = torch.stack([loss_bad.to(device), loss_bad.to(device) | grads_bad]).float()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_was_bad, bad = (bool(x) for x in flags.tolist())
        loss_value = float(self._loss.float()) if self._loss is not None else float("nan")
        self._loss = None
        if not bad:
            self.bad_in_row = 0
            pl_module.log("train/bad_steps_total", float(self.bad_total))
            return
        for p in params:  # no gradient: AdamW leaves these parameters and their moments untouched
            p.grad = None
        self.bad_in_row += 1
        self.bad_total += 1
        pl_module.log("train/bad_steps_total", float(self.bad_total))
        if trainer.is_global_zero:
            what = "loss" if loss_was_bad else "gradient"
            print(f"[guard] step {trainer.global_step + 1}: non-finite {what} (loss={loss_value}); update skipped "
                  f"({self.bad_in_row} in a row, {self.bad_total} in all; the run stops at {self.max_bad_steps} in a row)",
                  flush=True)
        if self.bad_in_row >= self.max_bad_steps:
            where = f" The last checkpoint is in {self.checkpoint_dir}." if self.checkpoint_dir else ""
            raise TrainingDiverged(
                f"stopped at step {trainer.global_step + 1}: {self.bad_in_row} steps in a row had a non-finite loss or "
                f"gradient (trainer.max_bad_steps={self.max_bad_steps}); the weights are those of the last good step."
                f"{where} Usual fixes: a lower stage.optim.lr or longer warmup_steps, stage.optim.grad_clip > 0, "
                "precision=bf16-mixed instead of 16-mixed, or look for broken samples in the data.")

    def state_dict(self):
        return {"bad_total": self.bad_total, "bad_in_row": self.bad_in_row}

    def load_state_dict(self, state_dict):
        self.bad_total = int(state_dict.get("bad_total", 0))
        self.bad_in_row = int(state_dict.get("bad_in_row", 0))


class Preemption(L.Callback):
    """On one of `signals` (SLURM's SIGUSR1 warning, SIGTERM from a scheduler or torchrun), finish the
    running step, write `checkpoint` (atomically) and stop; `stopped_at` then holds the step.

    The signal handler only sets a flag: the checkpoint is written between steps, on all ranks at the
    same step (the flag is all-reduced), since saving is a collective under DDP/FSDP.
    """

    def __init__(self, signals: list[str], checkpoint: Path):
        self.signals = [getattr(signal, s) for s in signals]
        self.checkpoint = Path(checkpoint)
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        self.received = signum

    def on_train_start(self, trainer, pl_module):
        # After Lightning's own signal set-up, which these replace for the duration of training.
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if _all_reduce([float(self.received is not None)], trainer, "max")[0] == 0:
            return
        trainer.save_checkpoint(self.checkpoint)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            print(f"[train] {name}: checkpoint at step {trainer.global_step} written to {self.checkpoint}; stopping. "
                  "Run the same command again to continue (resume=auto).", flush=True)

    def teardown(self, trainer, pl_module, stage):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StepLog(L.Callback):
    """One JSON line per step in `path` (rank 0): step, loss averaged over ranks, learning rate.

    Appended across launches, so a resumed stage continues the same file (a step written twice was
    recomputed after a crash; the last line of a step wins). Cheap to read in tests and scripts.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._loss, self._step = 0.0, None

    def on_train_start(self, trainer, pl_module):
        self._loss, self._step = 0.0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning hands over each micro-batch's loss divided by the accumulation: their sum is the step's mean.
        self._loss += float(loss.detach().float()) if torch.is_tensor(loss) else float("nan")
        if trainer.global_step == self._step:
            return  # accumulating: the optimizer step is not done yet
        value = _all_reduce([self._loss], trainer)[0] / max(trainer.world_size, 1)
        self._loss, self._step = 0.0, trainer.global_step
        if trainer.is_global_zero:
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": value, "lr": lr}) + "\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Which stage wrote a checkpoint, so resuming another stage from it is a clear error.
        cfg = getattr(pl_module, "cfg", None)
        if cfg is not None:
            checkpoint["kosmos_g"] = {"stage": cfg.stage.name, "model": cfg.model.name}
