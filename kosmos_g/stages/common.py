"""What every stage shares: the optimiser recipe, freezing, and the callbacks that log training health."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from torch import nn
from transformers import get_polynomial_decay_schedule_with_warmup

from kosmos_g.assets import mllm_tokenizer
from kosmos_g.config import ConfigError, OptimConfig, TrainConfig
from kosmos_g.models.mllm import MultimodalLM, build_mllm
from kosmos_g.processor import KosmosGProcessor
from kosmos_g.run import copy_part

_NO_DECAY = ("bias", "norm", "embed", "pos", "queries", "latents")


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode. Frozen modules never reach the optimiser, so they get no Adam state."""
    module.requires_grad_(False)
    return module.eval()


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def configure_adamw(module: nn.Module, cfg: OptimConfig, max_steps: int) -> dict:
    """AdamW over trainable parameters only, warm-up then polynomial decay (the paper's recipe).

    No weight decay on biases, norms, embeddings and learned queries: decaying them only shrinks
    them toward zero without regularising anything.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name.lower() for k in _NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = get_polynomial_decay_schedule_with_warmup(opt, cfg.warmup_steps, max(max_steps, cfg.warmup_steps + 1),
                                                      lr_end=cfg.end_lr, power=cfg.decay_power)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def save_part(model) -> Callable[[Path], None]:
    """An export writer: the part's own `save_pretrained` format."""
    return lambda path: model.save_pretrained(path)


def load_mllm(cfg: TrainConfig, assets: Path, init_export: Path | None, texts: Callable[[], Iterable[str]]):
    """The MLLM and its processor: from an earlier stage's export, or freshly built from config.

    Returns (mllm, processor, export writers for both) so a stage that keeps the MLLM frozen can pass it on.
    """
    if init_export is None:
        tokenizer = mllm_tokenizer(cfg.model, assets, texts)
        mllm = build_mllm(cfg.model, tokenizer)
        processor = KosmosGProcessor(tokenizer, cfg.model.vision.num_image_tokens, cfg.model.vision.img_size,
                                     cfg.model.llm.max_positions)
        return mllm, processor, {"mllm": save_part(mllm), "processor": save_part(processor)}
    mllm = MultimodalLM.from_pretrained(init_export / "mllm")
    got, want = mllm.config.hidden_size, cfg.model.llm.hidden_size
    if got != want:
        raise ConfigError(f"the MLLM in {init_export} has hidden size {got}, but model.llm.hidden_size={want} "
                          f"(model={cfg.model.name}); use the model preset the earlier stage was trained with")
    processor = KosmosGProcessor.from_pretrained(init_export / "processor")
    return mllm, processor, {"mllm": copy_part(init_export / "mllm"), "processor": copy_part(init_export / "processor")}


def trainable_state_dict(module: nn.Module, state_dict: dict) -> dict:
    """Keep only trainable weights in checkpoints: frozen parts are reloaded from their exports."""
    keep = set(trainable_names(module))
    return {k: v for k, v in state_dict.items() if k in keep}


class TrainingHealth(L.Callback):
    """Logs what a researcher watches besides the losses: grad norm, throughput, skipped samples.

    Learning rate comes from Lightning's `LearningRateMonitor`. Grad norm is measured before clipping.
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
            norms = grad_norm(pl_module, norm_type=2)
            if "grad_2.0_norm_total" in norms:
                pl_module.log("train/grad_norm", norms["grad_2.0_norm_total"])

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
