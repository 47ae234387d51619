"""Kosmos-G: a multimodal LLM, an AlignerNet and a frozen Stable Diffusion U-Net/VAE, composed.

    x (text and images) --MLLM--> s [B, L, d_llm] --M (AlignerNet.encode)--> c [B, 77, d_clip]
    c is the U-Net's `encoder_hidden_states`, the very tensor SD v1.5 gets from its CLIP text encoder

`condition` is that composition, the one forward both sides share: stage 3 trains through it
(`stages/instruct.py`) and `KosmosGPipeline` samples from it (`pipeline.py`). Each part carries its own
open_clip-style switch for what trains: `MultimodalLM.lock_vision()` / `.lock()`, `AlignerNet.lock_reconstruction()`,
`FrozenDiffusion.lock()`.
"""

from __future__ import annotations

import torch


def condition(mllm, aligner, batch: dict) -> torch.Tensor:
    """THE U-Net condition: M(MLLM(prompt)) -> [B, num_queries (77), d_clip].

    `batch` is `KosmosGProcessor.collate(...)` output (input_ids, attention_mask, image_mask, pixel_values) on
    the models' device. Stage 3 trains through this same function, and its null condition for classifier-free
    guidance is this function applied to `processor.null_prompt()`, which the pipeline uses as the default
    negative. A batch without images (pixel_values with 0 rows) takes the MLLM's text-only path.
    """
    pixel_values = batch.get("pixel_values")
    has_images = pixel_values is not None and pixel_values.numel() > 0
    states = mllm.encode(batch["input_ids"], batch["attention_mask"],
                         pixel_values=pixel_values if has_images else None,
                         image_mask=batch.get("image_mask") if has_images else None)
    return aligner.encode(states.to(aligner.dtype), padding_mask=batch["attention_mask"] == 0)
