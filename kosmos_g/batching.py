"""The global batch of a launch: from `stage.global_batch_size` to a per-device micro-batch and gradient
accumulation for the world size (`TrainConfig.__post_init__` calls `derive_batch`)."""

from __future__ import annotations

import os

from kosmos_g.config import ConfigError, TrainConfig, TrainerConfig, _check


def world_size(t: TrainerConfig) -> int:
    """Processes of the launch: trainer.devices x trainer.num_nodes; `auto` reads the launcher's WORLD_SIZE,
    else counts this node's GPUs (1 on a CPU)."""
    if isinstance(t.devices, (list, tuple)) or (isinstance(t.devices, str) and "," in t.devices):
        per_node = len(t.devices if isinstance(t.devices, (list, tuple)) else t.devices.strip(",").split(","))
    elif str(t.devices) in ("auto", "-1"):
        if "WORLD_SIZE" in os.environ:
            return int(os.environ["WORLD_SIZE"])
        import torch

        per_node = (torch.cuda.device_count() if t.accelerator in ("gpu", "cuda", "auto") else 0) or 1
    else:
        per_node = int(t.devices)
    return per_node * t.num_nodes


def derive_batch(cfg: TrainConfig) -> None:
    """From `stage.global_batch_size`: this device's micro-batch and the gradient accumulation (in place).

    The per-device share (global / world size) must be whole; it is split into the fewest micro-batches of
    at most `stage.batch_size`. Stage mllm counts tokens: rows of `stage.pack_length` (else
    `data.max_text_tokens`) tokens each.
    """
    s, world = cfg.stage, world_size(cfg.trainer)
    rows, unit = s.global_batch_size, "samples"
    _check(s.pack_length is None or (s.name == "mllm" and s.pack_length >= cfg.data.max_text_tokens),
           f"stage.pack_length={s.pack_length} packs stage-1 documents: it needs stage=mllm and at least "
           f"data.max_text_tokens ({cfg.data.max_text_tokens}) tokens, the longest document kept")
    if s.global_batch_size is None:
        s.accumulate_grad_batches = 1
        return
    if s.name == "mllm":
        row = s.pack_length or cfg.data.max_text_tokens
        _check(s.global_batch_size % row == 0,
               f"stage.global_batch_size={s.global_batch_size} tokens is not a whole number of "
               f"{row}-token rows (stage.pack_length, else data.max_text_tokens); use a multiple of {row}")
        rows, unit = s.global_batch_size // row, f"rows of {row} tokens"
    if rows % world:
        per_row = (s.pack_length or cfg.data.max_text_tokens) if s.name == "mllm" else 1
        near = sorted({max(1, rows // world) * world, (rows // world + 1) * world})
        raise ConfigError(
            f"stage.global_batch_size={s.global_batch_size} ({rows} {unit}) does not split evenly over {world} "
            f"devices (trainer.devices x trainer.num_nodes); set stage.global_batch_size to "
            f"{' or '.join(str(n * per_row) for n in near)}, or use another device count")
    share = rows // world
    accumulate = -(-share // s.batch_size)
    while share % accumulate:
        accumulate += 1
    s.batch_size, s.accumulate_grad_batches = share // accumulate, accumulate


def batch_summary(cfg: TrainConfig) -> str:
    """One line for start-up: how the global batch is made on this launch."""
    s, world = cfg.stage, world_size(cfg.trainer)
    per_step = s.batch_size * s.accumulate_grad_batches * world
    unit = (f" rows x {s.pack_length or cfg.data.max_text_tokens} tokens" if s.name == "mllm" and s.global_batch_size
            else "")
    return (f"batch: global {per_step}{unit} per step = {world} device(s) x micro-batch {s.batch_size} x "
            f"accumulation {s.accumulate_grad_batches}")
