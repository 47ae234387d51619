"""Stage 1, `stage=mllm`: multimodal language modelling on text, image-caption pairs and interleaved documents.

Every document becomes `<s> text <image> [N connector outputs] </image> text` (no `</s>`, as in the original);
the loss is next-token cross-entropy on text tokens only (the processor's labels are -100 on `<s>`, image
tokens and padding). Trains all of the decoder, the connector, and the ViT's last block + final norm (the rest
of the ViT is frozen).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmos_g.assets import corpus
from kosmos_g.config import TrainConfig
from kosmos_g.data.datamodule import KosmosGDataModule, resume_settings
from kosmos_g.data.format import Sample
from kosmos_g.processor import Encoded, KosmosGProcessor
from kosmos_g.stages.base import StageModule, encode_or_skip, means_by_kind
from kosmos_g.stages.common import load_mllm, save_part


class MLLMFeatures:
    """Sample -> processor inputs: a caption pair is read as `<image> caption`, a document in its own order."""

    def __init__(self, processor: KosmosGProcessor, max_text_tokens: int):
        self.processor, self.max_text_tokens = processor, max_text_tokens

    def __call__(self, sample: Sample, rng: random.Random) -> dict:
        segments = [sample.target, sample.text] if sample.kind == "caption" else list(sample.segments)
        return {"encoded": encode_or_skip(self.processor, segments, self.max_text_tokens), "kind": sample.kind}

    @staticmethod
    def length(features: dict) -> int:
        """Tokens of one featurized document (what packing counts)."""
        return len(features["encoded"].input_ids)

    def collate(self, batch: list) -> dict:
        """A batch of documents, one per row; or of packed rows (lists of documents, `stage.pack_length`), whose
        documents are concatenated and told apart by `document_ids` (1, 2, ... in each row, 0 at padding)."""
        rows = [row if isinstance(row, list) else [row] for row in batch]
        out = self.processor.collate([Encoded(*(torch.cat([getattr(f["encoded"], k) for f in row])
                                                for k in ("input_ids", "image_mask", "loss_mask", "pixel_values")))
                                      for row in rows])
        kinds = sorted({f["kind"] for row in rows for f in row})
        document_ids = torch.zeros_like(out["input_ids"])
        kind_ids = torch.full_like(out["input_ids"], -1)
        for i, row in enumerate(rows):
            start = 0
            for d, f in enumerate(row, 1):
                end = start + self.length(f)
                document_ids[i, start:end], kind_ids[i, start:end] = d, kinds.index(f["kind"])
                start = end
        out["kinds"] = [f["kind"] for row in rows for f in row]
        out["kind_ids"], out["kind_names"] = kind_ids, kinds  # per token: the kind of its document
        if any(len(row) > 1 for row in rows):
            out["document_ids"] = document_ids
        return out


class MultimodalLMModule(StageModule):
    def __init__(self, mllm, cfg: TrainConfig, processor: KosmosGProcessor | None = None):
        super().__init__(cfg)
        self.processor = processor  # exported beside the MLLM for the later stages
        self.mllm = mllm
        self.mllm.requires_grad_(True)  # all of it trains but the ViT's first blocks (checkpoints skip those)
        self.mllm.lock_vision(cfg.model.vision.unlocked_last_blocks, cfg.model.vision.unlock_final_norm)
        self.mllm.set_activation_checkpointing(cfg.trainer.activation_checkpointing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.mllm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           batch["image_mask"], document_ids=batch.get("document_ids")).logits
        # Next-token loss per token, so it can also be reported per source kind.
        labels = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="none").view_as(labels)
        counted = (labels != -100).float()
        tokens = counted.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            # DDP averages the ranks' losses: weigh each rank by its share of all tokens, so N ranks
            # train exactly as one process on the whole batch would.
            tokens = self.all_gather(tokens).sum() / self.trainer.world_size
        loss = (token_loss * counted).sum() / tokens

        logs = {"train/loss": loss, "train/ppl": math.exp(min(loss.item(), 20.0))}
        logs |= means_by_kind("mllm/loss_", token_loss, {  # each target token counts for its document's kind
            kind: counted * (batch["kind_ids"][:, 1:] == k) for k, kind in enumerate(batch["kind_names"])})
        self.log_dict(logs, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def export_parts(self) -> dict:
        return {"mllm": save_part(self.mllm), "processor": save_part(self.processor)}


def build(cfg: TrainConfig, assets: Path, init_export: Path | None, resume_step: int | None = None):
    """A freshly initialised MLLM (stage 1 has no predecessor) and the text/caption/interleaved DataModule.
    `resume_step`: the optimizer step train.py starts the data stream at (`resume_settings`)."""
    mllm, processor, _ = load_mllm(cfg, assets, init_export, lambda: corpus(cfg.data))
    module = MultimodalLMModule(mllm, cfg, processor)
    features = MLLMFeatures(processor, cfg.data.max_text_tokens)
    data = KosmosGDataModule(cfg.data, "mllm", cfg.stage.batch_size, features, features.collate, cfg.seed,
                             pack_length=cfg.stage.pack_length, length=features.length,
                             **resume_settings(cfg, resume_step))
    return module, data
