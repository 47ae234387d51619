"""The stage toolkit: which parameters train, the optimiser recipe, and loading / saving parts.

The run-level callbacks (seeding, numerical guard, preemption, logging) are `kosmos_g.callbacks`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from transformers import get_polynomial_decay_schedule_with_warmup

from kosmos_g.assets import mllm_tokenizer
from kosmos_g.config import ConfigError, OptimConfig, TrainConfig
from kosmos_g.models.mllm import MultimodalLM, build_mllm
from kosmos_g.processor import KosmosGProcessor
from kosmos_g.run import copy_part

_NO_DECAY = ("bias", "norm", "embed", "pos", "queries", "latent_query")


# Wrappers FSDP and activation checkpointing insert into parameter names (state dicts do not have them).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name as the module's state_dict spells it, whatever FSDP / checkpoint wrappers sit around it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the parameters that train (as in the state dict, also when the module is FSDP-wrapped)."""
    return [clean_name(n) for n, p in module.named_parameters() if p.requires_grad]


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
    return {k: v for k, v in state_dict.items() if clean_name(k) in keep}
