"""`StageModule`: the hooks the three stages share, and the feature and cache checks they repeat.

One shallow base: a stage subclasses it, sets what trains in its `__init__` (each model's own `lock_*`), writes
its `training_step` and says what its export holds (`export_parts`).
"""

from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import torch

from kosmos_g.config import ConfigError, TrainConfig
from kosmos_g.data.cache import FeatureCache, open_cache
from kosmos_g.data.shards import BadSample
from kosmos_g.processor import Encoded, KosmosGProcessor, PromptError
from kosmos_g.stages.common import configure_adamw, trainable_state_dict


class StageModule(L.LightningModule):
    """One training stage: AdamW over what trains, checkpoints of what trains, an export of named parts."""

    eval_parts: tuple[str, ...] = ()
    """Frozen children kept in eval mode (no dropout) when Lightning switches the module to training."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.strict_loading = False  # checkpoints hold the trainable weights only; frozen ones come from exports

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.eval_parts:
            getattr(self, name).eval()
        return self

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg.stage.optim, self.cfg.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])

    def export_parts(self) -> dict[str, Callable]:
        """{subfolder of the export ("." for the folder itself): a writer `fn(path)`}."""
        raise NotImplementedError


def means_by_kind(prefix: str, losses: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{`prefix` + kind: the mean of `losses` over the entries of that kind} (0 where there are none), to log;
    `weights[kind]` has the shape of `losses`: 1 on the kind's tokens or samples, 0 elsewhere."""
    return {f"{prefix}{kind}": (losses.where(w > 0, 0) * w).sum() / w.sum().clamp(min=1) for kind, w in weights.items()}


def encode_or_skip(processor: KosmosGProcessor, segments: list, max_tokens: int, unit: str = "tokens") -> Encoded:
    """The processor's encoding of a prompt, or a `too_long` BadSample (skipped and counted, as any bad sample)
    when it does not fit the context or has more than `max_tokens` (data.max_text_tokens) tokens."""
    try:
        encoded = processor(segments)
    except PromptError as e:
        raise BadSample("too_long", str(e)) from None
    if len(encoded.input_ids) > max_tokens:
        raise BadSample("too_long", f"{len(encoded.input_ids)} {unit}")
    return encoded


def checked_cache(folder: Optional[str], key: str, command: str, instead: str, **expected) -> Optional[FeatureCache]:
    """The finished feature cache in `folder` (config key `key`) whose metadata matches `expected`, or None when
    no folder is set. A folder that is not a finished `python -m kosmos_g.data.cache <command>` output, or one
    built for other settings, is a ConfigError naming the key, the build command and `instead` (the other fix)."""
    if not folder:
        return None
    cache = open_cache(folder)
    if cache is None:
        raise ConfigError(f"{key}={folder} is not a finished cache folder; build it with "
                          f"`python -m kosmos_g.data.cache {command} ...` or {instead}")
    try:
        cache.check(**expected)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e
    return cache
