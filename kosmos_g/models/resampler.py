"""The connector: from a variable number of vision tokens to a fixed number of LLM embeddings.

As in Kosmos-1/Kosmos-G (the original `XConnector`), the image tokens are projected to the LLM width
and `num_latents` learned queries cross-attend to concat(projected image tokens, latents), so each
latent can also read the others. This module wraps that attention in a pre-norm residual block and
adds a feed-forward after it (as in Flamingo's perceiver resampler):

    x = proj(tokens)                        [B, T, D]
    h = latents + attn(norm(latents), norm(concat(x, latents)))
    h = h + ffn(norm(h))                    [B, num_latents, D]

The output replaces the `<image_pad>` embeddings in the LLM input.
"""

from __future__ import annotations

import torch
from torch import nn


class Resampler(nn.Module):
    """Linear d_vision -> d_llm, then one perceiver cross-attention block: [B, T, d_vision] -> [B, N, d_llm]."""

    def __init__(self, vision_width: int, llm_width: int, num_latents: int = 64, num_heads: int | None = None,
                 ffn_mult: int = 4):
        """num_heads defaults to llm_width // 64 (64-wide heads: 32 heads at 2048, as in the paper's MLLM)."""
        super().__init__()
        num_heads = num_heads or max(1, llm_width // 64)
        if llm_width % num_heads:
            raise ValueError(f"Resampler llm_width ({llm_width}) must be divisible by num_heads ({num_heads})")
        if num_latents < 1 or ffn_mult < 1:
            raise ValueError(f"Resampler needs num_latents >= 1 and ffn_mult >= 1, got {num_latents}, {ffn_mult}")
        self.vision_width, self.llm_width, self.num_latents = vision_width, llm_width, num_latents

        self.proj = nn.Linear(vision_width, llm_width)
        # Small init, like token embeddings: the output sits among them in the LLM's input, and a
        # pre-norm LLM never rescales its residual stream (hence also no final norm here).
        self.latents = nn.Parameter(torch.randn(num_latents, llm_width) * 0.02)
        self.norm_latents = nn.LayerNorm(llm_width)
        self.norm_media = nn.LayerNorm(llm_width)
        self.attn = nn.MultiheadAttention(llm_width, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(llm_width)
        self.ffn = nn.Sequential(
            nn.Linear(llm_width, ffn_mult * llm_width), nn.GELU(), nn.Linear(ffn_mult * llm_width, llm_width),
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens [B, T, vision_width] (the vision encoder's output) -> [B, num_latents, llm_width]."""
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != self.vision_width:
            raise ValueError(f"Resampler expects image tokens [B, T, {self.vision_width}], got "
                             f"{list(image_tokens.shape)}; the vision encoder width must equal vision_width")
        x = self.norm_media(self.proj(image_tokens))
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        q = self.norm_latents(latents)
        kv = torch.cat([x, q], dim=1)
        h = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return h + self.ffn(self.norm_ffn(h))
