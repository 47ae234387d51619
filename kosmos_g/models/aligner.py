"""AlignerNet: from the MLLM's output states to the CLIP-text space a frozen SD U-Net understands.

Read top to bottom, as in the original code (microsoft/unilm kosmos-g `Aligner`):

    M (`encode`):  s [B, L, d_llm] -> Linear -> +pos -> encoder -> decoder(77 queries attend) -> [B, 77, d]
    N (`reconstruct`): M(s) -> decoder(queries[:L] attend) -> +pos -> encoder -> Linear -> [B, L, d_llm]

d is the CLIP text width (768 for SD v1.5). M's output is used as the U-Net's `encoder_hidden_states`;
N exists only to keep M from discarding information during alignment (stage 2) and is not used after.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _encoder(width: int, heads: int, ffn: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)


def _decoder(width: int, heads: int, ffn: int, layers: int, dropout: float) -> nn.TransformerDecoder:
    # Non-causal: the queries see each other and the whole source (no tgt_mask is ever passed).
    layer = nn.TransformerDecoderLayer(width, heads, ffn, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))


class AlignerNet(ModelMixin, ConfigMixin):
    """M (`encode`) and N (`reconstruct`). Saved and loaded with `save_pretrained`/`from_pretrained`."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, llm_dim: int, clip_dim: int = 768, num_heads: int = 12, ffn_size: int = 3072,
                 encoder_layers: int = 12, decoder_layers: int = 12, num_queries: int = 77,
                 max_source_positions: int = 32768, dropout: float = 0.0):
        super().__init__()
        w = clip_dim
        # M
        self.in_proj = nn.Linear(llm_dim, w)
        self.in_pos = nn.Embedding(max_source_positions, w)
        self.m_encoder = _encoder(w, num_heads, ffn_size, encoder_layers, dropout)
        self.m_queries = nn.Parameter(torch.randn(num_queries, w) * 0.02)
        self.m_decoder = _decoder(w, num_heads, ffn_size, decoder_layers, dropout)
        # N
        self.n_queries = nn.Parameter(torch.randn(max_source_positions, w) * 0.02)
        self.n_decoder = _decoder(w, num_heads, ffn_size, decoder_layers, dropout)
        self.out_pos = nn.Embedding(max_source_positions, w)
        self.n_encoder = _encoder(w, num_heads, ffn_size, encoder_layers, dropout)
        self.out_proj = nn.Linear(w, llm_dim)

    def m_parameters(self):
        """Parameters of M (the part stage 3 keeps training)."""
        for name, p in self.named_parameters():
            if name.startswith(("in_proj", "in_pos", "m_")):
                yield p

    def encode(self, states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """M: MLLM states [B, L, d_llm] (padding_mask True at pads) -> CLIP-text-like [B, 77, d]."""
        pos = torch.arange(states.shape[1], device=states.device)
        x = self.in_proj(states) + self.in_pos(pos)
        x = self.m_encoder(x, src_key_padding_mask=padding_mask)
        queries = self.m_queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        return self.m_decoder(queries, x, memory_key_padding_mask=padding_mask)

    def reconstruct(self, condition: torch.Tensor, length: int, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """N: M's output [B, 77, d] -> reconstructed MLLM states [B, length, d_llm] (padding_mask True at pads,
        so a caption's reconstruction never depends on how much its batch was padded)."""
        queries = self.n_queries[:length].unsqueeze(0).expand(condition.shape[0], -1, -1)
        x = self.n_decoder(queries, condition)
        x = x + self.out_pos(torch.arange(length, device=x.device))
        return self.out_proj(self.n_encoder(x, src_key_padding_mask=padding_mask))

    @classmethod
    def from_config_sizes(cls, cfg, llm_dim: int, clip_dim: int) -> "AlignerNet":
        """Build from an `AlignerConfig`; widths come from the models it connects."""
        return cls(llm_dim=llm_dim, clip_dim=clip_dim, num_heads=cfg.num_heads, ffn_size=cfg.ffn_size,
                   encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                   num_queries=cfg.num_queries, max_source_positions=cfg.max_source_positions,
                   dropout=cfg.dropout)
