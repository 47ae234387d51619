"""Stage 2, `stage=align`: AlignerNet learns to map the frozen MLLM's states to the U-Net's CLIP-text space.

Text only. For a batch of captions, with s = MLLM(`<s> caption`) [B, L, d_llm] right-padded to L (pads masked in M)
and t = CLIPText(captions) [B, 77, d_clip]:

    loss = target_weight * MSE(M(s), t) + recon_weight * recon

    recon (stage.recon_weighting=official, the default; the original code's `rec_loss`)
          = MSE(N(M(s)), s) over all B x L x d_llm entries, pad positions included, * 77 / L
    recon (per_sample) = mean over captions of [MSE over the caption's real tokens * 77 / its length]

MSE is F.mse_loss's plain mean. The original sums the two terms unweighted (the default weights, 1 and 1).
Only AlignerNet (M and N) trains; the MLLM and the CLIP text encoder are frozen and kept in eval mode.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmos_g.assets import corpus, load_text_encoder, stage_diffusion_folder
from kosmos_g.config import TrainConfig
from kosmos_g.data.cache import FeatureCache
from kosmos_g.data.datamodule import KosmosGDataModule, resume_settings
from kosmos_g.data.format import Sample
from kosmos_g.data.shards import BadSample
from kosmos_g.models.aligner import AlignerNet
from kosmos_g.processor import KosmosGProcessor
from kosmos_g.stages.base import StageModule, checked_cache, encode_or_skip
from kosmos_g.stages.common import load_mllm, save_part


class AlignFeatures:
    """Sample -> the caption as MLLM tokens (`<s> c`, no `</s>`, as in the original) and as CLIP token ids padded to 77."""

    def __init__(self, processor: KosmosGProcessor, clip_tokenizer, clip_max_tokens: int, max_text_tokens: int,
                 cache: FeatureCache | None = None):
        self.processor, self.clip_tokenizer = processor, clip_tokenizer
        self.clip_max_tokens, self.max_text_tokens = clip_max_tokens, max_text_tokens
        self.cache = cache  # precomputed CLIP-text targets by sample key (data.clip_text_cache)

    def __call__(self, sample: Sample, rng: random.Random) -> dict:
        text = sample.text.strip()
        clip_ids = self.clip_tokenizer(text).input_ids
        if len(clip_ids) > self.clip_max_tokens:  # the paper keeps captions of <= 75 CLIP tokens
            raise BadSample("too_long", f"{len(clip_ids)} CLIP tokens")
        encoded = encode_or_skip(self.processor, [text], self.max_text_tokens, unit="MLLM tokens")
        pad = self.clip_tokenizer.pad_token_id
        return {"encoded": encoded,
                "clip_input_ids": torch.tensor(clip_ids + [pad] * (self.clip_max_tokens - len(clip_ids))),
                "clip_target": self.cache.get(sample.key) if self.cache is not None else None}

    def collate(self, features: list[dict]) -> dict:
        batch = self.processor.collate([f["encoded"] for f in features])
        batch["clip_input_ids"] = torch.stack([f["clip_input_ids"] for f in features])
        if all(f["clip_target"] is not None for f in features):  # a fully cached batch skips the encoder
            batch["clip_target"] = torch.stack([f["clip_target"] for f in features])
        return batch


def reconstruction_loss(recon: torch.Tensor, states: torch.Tensor, attention_mask: torch.Tensor, num_queries: int,
                        weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain MSE, weighted reconstruction loss) of N's output against the MLLM states (module docstring)."""
    if weighting == "official":
        mse = F.mse_loss(recon, states)                                   # every position, pads included
        return mse, mse * num_queries / states.shape[1]
    mask = attention_mask.float()
    lengths = mask.sum(1)
    per_caption = (((recon - states) ** 2).mean(-1) * mask).sum(1) / lengths  # real tokens only
    return per_caption.mean(), (per_caption * num_queries / lengths).mean()


class AlignerModule(StageModule):
    eval_parts = ("text_encoder",)  # frozen, never in train mode (the locked MLLM keeps itself in eval)

    def __init__(self, mllm, text_encoder, aligner: AlignerNet, cfg: TrainConfig, export_sources: dict):
        super().__init__(cfg)
        self.mllm = mllm.lock()                                        # frozen: its states are M's input
        self.text_encoder = text_encoder.requires_grad_(False).eval()  # frozen: its states are M's target
        self.aligner = aligner.train()                                 # the only trainable part (M and N)
        self.aligner.set_activation_checkpointing(cfg.trainer.activation_checkpointing)
        self.export_sources = export_sources

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        attention_mask = batch["attention_mask"]
        with torch.no_grad():
            s = self.mllm.encode(batch["input_ids"], attention_mask)                    # [B, L, d_llm]
            if "clip_target" in batch:
                target = batch["clip_target"].float()
            else:
                target = self.text_encoder(batch["clip_input_ids"]).last_hidden_state.float()  # [B, 77, d_clip]

        padding = attention_mask == 0
        condition = self.aligner.encode(s, padding_mask=padding)                         # M(s): [B, 77, d_clip]
        target_mse = F.mse_loss(condition.float(), target)

        recon = self.aligner.reconstruct(condition, s.shape[1])                          # N(M(s)): [B, L, d_llm]
        recon_mse, recon_loss = reconstruction_loss(recon.float(), s.float(), attention_mask,
                                                    self.cfg.model.aligner.num_queries, self.cfg.stage.recon_weighting)

        loss = self.cfg.stage.target_weight * target_mse + self.cfg.stage.recon_weight * recon_loss
        cosine = F.cosine_similarity(condition.detach(), target, dim=-1).mean()
        self.log_dict({"train/loss": loss, "align/target_mse": target_mse, "align/recon_mse": recon_mse,
                       "align/recon_loss": recon_loss, "align/cosine": cosine}, prog_bar=True)
        return loss

    def export_parts(self) -> dict:
        """What stage 3 needs: the MLLM it was aligned to, its processor, and the aligner."""
        return {**self.export_sources, "aligner": save_part(self.aligner)}


def build(cfg: TrainConfig, assets: Path, init_export: Path | None, resume_step: int | None = None):
    """The AlignerModule and its DataModule for this config; `init_export` is the mllm export (or None).
    `resume_step`: the optimizer step train.py starts the data stream at (`resume_settings`)."""
    texts = lambda: corpus(cfg.data)  # noqa: E731 (only read when a tiny tokenizer must be trained)
    mllm, processor, export_sources = load_mllm(cfg, assets, init_export, texts)
    sd = stage_diffusion_folder(cfg, assets)
    text_encoder, clip_tokenizer = load_text_encoder(sd, cfg.model.diffusion_dtype)
    # The widths come from the models it connects, everything else from model.aligner.
    aligner = AlignerNet(llm_dim=mllm.config.hidden_size, clip_dim=text_encoder.config.hidden_size,
                         **asdict(cfg.model.aligner))
    cache = checked_cache(cfg.data.clip_text_cache, "data.clip_text_cache", "clip-text",
                          "set data.clip_text_cache=null", type="clip-text", max_tokens=cfg.model.clip_max_tokens,
                          hidden_size=text_encoder.config.hidden_size)
    features = AlignFeatures(processor, clip_tokenizer, cfg.model.clip_max_tokens, cfg.data.max_text_tokens, cache)
    module = AlignerModule(mllm, text_encoder, aligner, cfg, export_sources)
    data = KosmosGDataModule(cfg.data, "align", cfg.stage.batch_size, features, features.collate, cfg.seed,
                             **resume_settings(cfg, resume_step))
    return module, data
