"""Tiny random models for tests and docs, built from the tiny preset in about a second on CPU, and a reader of
what a training run logs (`read_steps`, `read_scalars`, also used by the demo).

Nothing in training or inference imports this module. The tiny U-Net/VAE themselves live in
`kosmos_g.models.diffusion` (the tiny preset trains them); the tiny tokenizers in `kosmos_g.models.tokenizers`.

    pipe = build_tiny_pipeline(seed=0)                 # a random KosmosGPipeline (tiny MLLM, aligner, U-Net, VAE)
    pipe.save_pretrained(folder)                       # then loaded back as users load a real export
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

TINY_TEXTS = ["a photo of a red dog on the beach", "a blue cat wearing a green hat", "a yellow square"]
"""The corpus the tiny tokenizers are trained on when a caller gives none."""

LORA_RANK, LORA_ALPHA = 4, 8  # alpha / rank = 2: a loader that ignored alpha would be off by 2x
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_aligner(llm_dim: int = 64, clip_dim: int = 64, max_source_positions: int = 256):
    """A random 1+1-layer AlignerNet (4 heads, FFN 128) mapping `llm_dim` MLLM states to `clip_dim` tokens."""
    from kosmos_g.models.aligner import AlignerNet

    return AlignerNet(llm_dim=llm_dim, clip_dim=clip_dim, num_heads=4, ffn_size=128, encoder_layers=1,
                      decoder_layers=1, max_source_positions=max_source_positions)


def build_tiny_pipeline(seed: int = 0, image_size: int = 32, cross_attention_dim: int = 64,
                        texts: Optional[list[str]] = None):
    """A random tiny KosmosGPipeline (tiny preset MLLM, 1+1-layer aligner, tiny U-Net/VAE), fixed by `seed`."""
    from kosmos_g.config import load_config
    from kosmos_g.models.diffusion import build_tiny_diffusion
    from kosmos_g.models.mllm import build_mllm
    from kosmos_g.models.tokenizers import train_mllm_tokenizer
    from kosmos_g.pipeline import KosmosGPipeline
    from kosmos_g.processor import KosmosGProcessor

    model_cfg = load_config(["model=tiny"]).model
    tokenizer = train_mllm_tokenizer(texts or TINY_TEXTS * 4, vocab_size=300)
    processor = KosmosGProcessor.from_config(tokenizer, model_cfg)
    diffusion = build_tiny_diffusion(cross_attention_dim, image_size=image_size, seed=seed)
    torch.manual_seed(seed)
    mllm = build_mllm(model_cfg, tokenizer).eval()
    aligner = tiny_aligner(model_cfg.llm.hidden_size, cross_attention_dim, model_cfg.llm.max_positions + 2).eval()
    pipe = KosmosGPipeline(mllm=mllm, processor=processor, aligner=aligner, unet=diffusion.unet, vae=diffusion.vae,
                           scheduler=diffusion.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_random_lora(unet, folder: Path, seed: int = 1) -> str:
    """What a LoRA training script saves (peft adapter -> diffusers keys -> safetensors), with random, non-zero
    B (rank LORA_RANK, alpha LORA_ALPHA, on LORA_TARGETS); returns the .safetensors path. `unet` is not changed."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from kosmos_g.pipeline import KosmosGPipeline

    torch.manual_seed(seed)
    trained = copy.deepcopy(unet)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                        init_lora_weights=False)
    trained.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
    KosmosGPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    return str(Path(folder) / "pytorch_lora_weights.safetensors")


def write_tiny_sd(folder: Path, texts: list[str], image_size: int = 32, seed: int = 0) -> Path:
    """A tiny Stable Diffusion-layout folder (tokenizer, text_encoder, unet, vae, scheduler) standing in for a
    real or trained one: random weights, but without the tiny-random record (`assets.random_sd_size` is None)."""
    from kosmos_g.assets import RANDOM_SD_RECORD, _write_tiny_sd
    from kosmos_g.config import load_config

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True)
    _write_tiny_sd(folder, load_config(["model=tiny"]).model, lambda: iter(texts * 3), image_size)
    (folder / RANDOM_SD_RECORD).unlink()
    return folder


def read_steps(path: Path) -> dict[int, dict]:
    """`<stage>/steps.jsonl` (written by `kosmos_g.callbacks.StepLog`) as {step: record}; the last record of a
    step wins."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a TensorBoard log folder: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
