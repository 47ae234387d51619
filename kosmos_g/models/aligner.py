"""AlignerNet: from the MLLM's output states to the CLIP-text space a frozen SD U-Net understands.

The original Kosmos-G `Aligner` (microsoft/unilm 421c251, `kosmos-g/unilm/models/aligner.py`, built from
torchscale's Encoder/Decoder with `EncoderDecoderConfig` defaults), written out here layer by layer with the
same parameter names, so an original checkpoint loads by stripping its `aligner.` prefix:

    M (`encode`):      s [B, L, d_llm] -> encoder_proj: Linear -> + positions 2..L+1 -> pads zeroed -> encoder
                       layers (padding mask) -> LN  ==> memory [B, L, d]
                       encoder_query [77, d] -> encoder: decoder layers (self-attention among the queries,
                       cross-attention to the memory with the padding mask) -> LN  ==> [B, 77, d]
    N (`reconstruct`): decoder_query[:L] -> decoder: decoder layers cross-attending to M's output -> LN
                       -> decoder_proj: + positions 2..L+1 -> encoder layers -> LN -> Linear  ==> [B, L, d_llm]

Every layer is pre-LN with MAGNETO's sub-LN (an extra LayerNorm on the attention heads' output before
`out_proj` in self-attention, and on the FFN's hidden activations before `fc2`; cross-attention has none),
exact GELU, biases everywhere, LayerNorm eps 1e-5, no embedding scale. Query decoders are not causal.
d is the CLIP text width (768 for SD v1.5); the paper size is 12 heads, FFN 3072, 12 + 12 layers.

Padding: M masks pads exactly where the original does (zeroed input rows, self-attention keys, the query
decoder's cross-attention keys), so M's output does not depend on how much a caption was padded. N, as in
the original, has no mask at all: its L queries (pads included) attend to each other and all L positions
are reconstructed, so N's output for a caption depends on its batch's padded length L.

M's output is the U-Net's `encoder_hidden_states`; N only serves the stage-2 reconstruction loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

LN_EPS = 1e-5
FIRST_POSITION = 2  # fairseq's convention: position rows 0 and 1 are never used


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections; `subln` adds `inner_attn_ln` on the heads'
    concatenated output (torchscale gives it to self-attention only)."""

    def __init__(self, width: int, heads: int, subln: bool):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.inner_attn_ln = nn.LayerNorm(width, eps=LN_EPS) if subln else None

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if memory is None else memory
        (B, T, C), S = x.shape, kv.shape[1]
        q = self.q_proj(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k_proj(kv).view(B, S, self.heads, -1).transpose(1, 2)
        v = self.v_proj(kv).view(B, S, self.heads, -1).transpose(1, 2)
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # attention dropout is 0 in the original
        y = y.transpose(1, 2).reshape(B, T, C)
        if self.inner_attn_ln is not None:
            y = self.inner_attn_ln(y)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """fc1 -> GELU -> sub-LN (`ffn_layernorm`) -> fc2."""

    def __init__(self, width: int, ffn_size: int):
        super().__init__()
        self.fc1 = nn.Linear(width, ffn_size)
        self.ffn_layernorm = nn.LayerNorm(ffn_size, eps=LN_EPS)
        self.fc2 = nn.Linear(ffn_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)  # exact GELU in fp32, as the original
        return self.fc2(self.ffn_layernorm(h))


class AlignerEncoderLayer(nn.Module):
    """Pre-LN self-attention (padded keys masked) and FFN, each a residual branch."""

    def __init__(self, width: int, heads: int, ffn_size: int, dropout: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.self_attn = Attention(width, heads, subln=True)
        self.final_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.ffn = FeedForward(width, ffn_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), key_padding_mask=padding_mask))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


class AlignerDecoderLayer(nn.Module):
    """Pre-LN self-attention among the queries (no mask: not causal), cross-attention to the memory (its
    padded keys masked), FFN."""

    def __init__(self, width: int, heads: int, ffn_size: int, dropout: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.self_attn = Attention(width, heads, subln=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.encoder_attn = Attention(width, heads, subln=False)
        self.final_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.ffn = FeedForward(width, ffn_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
        x = x + self.dropout(self.encoder_attn(self.encoder_attn_layer_norm(x), memory, memory_padding_mask))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


class Encoder(nn.Module):
    """torchscale's Encoder as the aligner uses it: optional input Linear (`embed_tokens`), learned positions
    from row 2, padded rows zeroed, layers, final LN, optional output Linear (`output_projection`)."""

    def __init__(self, width: int, heads: int, ffn_size: int, layers: int, max_positions: int, dropout: float,
                 in_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        self.embed_tokens = nn.Linear(in_dim, width) if in_dim else None
        self.embed_positions = nn.Embedding(max_positions, width)
        self.layers = nn.ModuleList(AlignerEncoderLayer(width, heads, ffn_size, dropout) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.output_projection = nn.Linear(width, out_dim) if out_dim else None
        self.dropout = nn.Dropout(dropout)
        self.gradient_checkpointing = False  # switched by ModelMixin.enable_gradient_checkpointing

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        positions = torch.arange(FIRST_POSITION, FIRST_POSITION + x.shape[1], device=x.device)
        x = self.dropout(x + self.embed_positions(positions))
        if padding_mask is not None:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(layer, x, padding_mask)
            else:
                x = layer(x, padding_mask)
        x = self.layer_norm(x)
        return x if self.output_projection is None else self.output_projection(x)


class Decoder(nn.Module):
    """torchscale's Decoder as the aligner uses it: given query embeddings (no positions, no causal mask),
    layers attending to `memory`, final LN."""

    def __init__(self, width: int, heads: int, ffn_size: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(AlignerDecoderLayer(width, heads, ffn_size, dropout) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.gradient_checkpointing = False

    def forward(self, queries: torch.Tensor, memory: torch.Tensor,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(queries)
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(layer, x, memory, memory_padding_mask)
            else:
                x = layer(x, memory, memory_padding_mask)
        return self.layer_norm(x)


def _magneto_init(module: nn.Module, gain: float, skip_cross_attention: bool = False) -> None:
    """torchscale's sub-LN initialisation: scale fc1, fc2, out_proj and v_proj weights and biases by `gain`."""
    for name, p in module.named_parameters():
        if skip_cross_attention and "encoder_attn" in name:
            continue
        if any(k in name for k in ("fc1", "fc2", "out_proj", "v_proj")):
            p.data.mul_(gain)


class AlignerNet(ModelMixin, ConfigMixin):
    """M (`encode`) and N (`reconstruct`). Saved and loaded with `save_pretrained`/`from_pretrained`; its
    state-dict keys are the original checkpoint's `aligner.*` keys without the prefix (and without the
    frozen `clip_encoder.*`)."""

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, llm_dim: int, clip_dim: int = 768, num_heads: int = 12, ffn_size: int = 3072,
                 encoder_layers: int = 12, decoder_layers: int = 12, num_queries: int = 77,
                 max_source_positions: int = 32768, dropout: float = 0.0, query_init_std: float = 1.0):
        super().__init__()
        if clip_dim % num_heads:
            raise ValueError(f"AlignerNet: clip_dim {clip_dim} must be divisible by num_heads {num_heads}")
        w, enc, dec = clip_dim, encoder_layers, decoder_layers
        # M
        self.encoder_proj = Encoder(w, num_heads, ffn_size, enc, max_source_positions, dropout, in_dim=llm_dim)
        self.encoder_query = nn.Parameter(torch.randn(num_queries, w) * query_init_std)
        self.encoder = Decoder(w, num_heads, ffn_size, dec, dropout)
        # N
        self.decoder_query = nn.Parameter(torch.randn(max_source_positions, w) * query_init_std)
        self.decoder = Decoder(w, num_heads, ffn_size, dec, dropout)
        self.decoder_proj = Encoder(w, num_heads, ffn_size, enc, max_source_positions, dropout, out_dim=llm_dim)
        # The original's gains (encoder_proj and the decoders are built with is_encoder_decoder=True).
        _magneto_init(self.encoder_proj, math.sqrt(math.log(3 * dec) * math.log(2 * enc) / 3))
        _magneto_init(self.decoder_proj, math.sqrt(math.log(2 * enc)))
        for decoder in (self.encoder, self.decoder):
            _magneto_init(decoder, math.sqrt(math.log(3 * dec)), skip_cross_attention=True)

    # --- the two halves -------------------------------------------------------------------------

    def m_parameters(self):
        """Parameters of M (the part stage 3 keeps training)."""
        for part in (self.encoder_proj, self.encoder):
            yield from part.parameters()
        yield self.encoder_query

    def n_parameters(self):
        """Parameters of N (trained in stage 2 only)."""
        for part in (self.decoder, self.decoder_proj):
            yield from part.parameters()
        yield self.decoder_query

    def lock_reconstruction(self) -> None:
        """Freeze N (stage 3: N is not in the graph; only M trains). Not saved: call again after loading."""
        for p in self.n_parameters():
            p.requires_grad_(False)

    def set_activation_checkpointing(self, enable: bool) -> None:
        """Recompute every encoder/decoder layer in backward (less memory, ~30% more compute)."""
        self.enable_gradient_checkpointing() if enable else self.disable_gradient_checkpointing()

    def _check_length(self, length: int) -> None:
        rows = self.config.max_source_positions
        if length + FIRST_POSITION > rows:
            raise ValueError(f"AlignerNet: a sequence of {length} states needs position rows up to "
                             f"{length + FIRST_POSITION - 1}, but max_source_positions is {rows}; shorten the "
                             f"prompt or build the aligner with max_source_positions >= {length + FIRST_POSITION}")

    # --- forward --------------------------------------------------------------------------------

    def encode(self, states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """M: MLLM states [B, L, d_llm] (padding_mask [B, L], True at pads) -> CLIP-text-like [B, 77, d]."""
        self._check_length(states.shape[1])
        memory = self.encoder_proj(states, padding_mask)
        queries = self.encoder_query.unsqueeze(0).expand(states.shape[0], -1, -1)
        return self.encoder(queries, memory, padding_mask)

    def reconstruct(self, condition: torch.Tensor, length: int,
                    padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """N: M's output [B, 77, d] -> reconstructed MLLM states [B, length, d_llm].

        `padding_mask` is accepted for the callers' convenience but does not enter N: the original applies no
        mask here (see the module docstring), so every one of the `length` positions is reconstructed and the
        result depends on `length`. A loss that should ignore pads has to mask them itself.
        """
        self._check_length(length)
        if padding_mask is not None and padding_mask.shape != (condition.shape[0], length):
            raise ValueError(f"AlignerNet.reconstruct: padding_mask has shape {tuple(padding_mask.shape)}, "
                             f"expected {(condition.shape[0], length)}")
        queries = self.decoder_query[:length].unsqueeze(0).expand(condition.shape[0], -1, -1)
        return self.decoder_proj(self.decoder(queries, condition))
