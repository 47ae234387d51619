"""Independent references for the released Kosmos-G model (not this project's code), and fake checkpoints.

- Text decoder: pip `torchscale==0.3.0` `Decoder` configured as the original (sub-LN, no xPos, tied output
  projection, sqrt(d) scale) with fairseq's sinusoidal positions rewritten below from fairseq's module; image
  features overwrite the token embeddings before the scaling, as unilm/models/gpt.py LMDecoder does.
- Vision tower and connector: open_clip is not installed (and the original vendors a modified copy), so they
  are built from torch primitives following unilm/models/vl/clip.py + the vendored open_clip model.py (pre-LN
  blocks, nn.MultiheadAttention, QuickGELU, ln_post on every token, L2 norm) and unilm/models/connector.py
  (latent queries attend over concat(dense(tokens), queries); nn.MultiheadAttention for fairseq's).
- `fairseq_checkpoint(...)`: the original key names at reduced sizes, pickled the way fairseq saves
  (`model`, `cfg`, `args`, `optimizer_history`, `extra_state`, `last_optimizer_state`; fp16 weights).
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
try:
    from torchscale.architecture.config import DecoderConfig, EncoderDecoderConfig
    from torchscale.architecture.decoder import Decoder
    from torchscale.architecture.encoder import Encoder
    from torchscale.component.embedding import PositionalEmbedding
except ImportError as e:  # a test-only dependency that `make venv` installs with --no-deps
    raise ImportError(f"{e}: the reference needs `pip install --no-deps torchscale==0.3.0 fairscale==0.4.0` "
                      "(the Makefile's venv recipe does it)") from e

VOCAB = 64007  # the original vocabulary, so the real tokenizer files fit the fake checkpoints
PAD = 1
IMAGE, IMAGE_END = 64003, 64004
SIZES = dict(dim=64, heads=4, ffn=128, layers=2, v_width=128, v_layers=2, v_mlp=256, patch=14, image=28, queries=4,
             a_dim=32, a_heads=2, a_ffn=64, a_layers=1)


class FairseqSinusoidal(nn.Module):
    """fairseq.modules.SinusoidalPositionalEmbedding (kosmos-g/fairseq at 421c251), without incremental state:
    sin half | cos half, positions counted over non-pad tokens from padding_idx + 1, pads get the zero row."""

    def __init__(self, dim: int, padding_idx: int = PAD):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.register_buffer("_float_tensor", torch.FloatTensor(1))

    def forward(self, tokens, incremental_state=None, **_):
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
        table = torch.arange(self.padding_idx + 1 + tokens.size(1), dtype=torch.float)[:, None] * freq[None]
        table = torch.cat([torch.sin(table), torch.cos(table)], dim=1)
        table[self.padding_idx] = 0
        mask = tokens.ne(self.padding_idx).int()
        return table[(torch.cumsum(mask, dim=1) * mask).long() + self.padding_idx]


def text_decoder(s=SIZES) -> Decoder:
    cfg = DecoderConfig(decoder_embed_dim=s["dim"], decoder_attention_heads=s["heads"], decoder_ffn_embed_dim=s["ffn"],
                        decoder_layers=s["layers"], subln=True, vocab_size=VOCAB, no_scale_embedding=False,
                        xpos_rel_pos=False, dropout=0.0, attention_dropout=0.0)
    embed = nn.Embedding(VOCAB, s["dim"], padding_idx=PAD)
    head = nn.Linear(s["dim"], VOCAB, bias=False)
    head.weight = embed.weight
    return Decoder(cfg, embed_tokens=embed, embed_positions=FairseqSinusoidal(s["dim"]), output_projection=head)


def text_forward(decoder: Decoder, tokens, image_features=None, image_mask=None) -> torch.Tensor:
    """The MLLM condition: final layer_norm output at every position (right padding with id 1)."""
    embeds = decoder.embed_tokens(tokens)
    if image_features is not None:
        embeds = embeds.clone()
        embeds[image_mask] = image_features.reshape(-1, embeds.size(-1))  # before the sqrt(d) scaling
    features, _ = decoder(tokens, self_attn_padding_mask=tokens.eq(PAD), token_embeddings=embeds, features_only=True)
    return features


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first, packed in_proj: open_clip's names
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=QuickGELU(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Visual(nn.Module):
    """VisualTransformer4Seq2Seq + ClipVisualOnly.forward: all tokens after ln_post, L2-normalised; [B, T, C]."""

    def __init__(self, s=SIZES):
        super().__init__()
        w, grid = s["v_width"], s["image"] // s["patch"]
        self.conv1 = nn.Conv2d(3, w, kernel_size=s["patch"], stride=s["patch"], bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block(w, w // 64, s["v_mlp"]) for _ in range(s["v_layers"]))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.size(0), 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x)
        return F.normalize(self.ln_post(x), dim=-1).permute(1, 0, 2)


class Connector(nn.Module):
    """XConnector: latent queries attend over concat(dense(image tokens), latent queries); nothing else."""

    def __init__(self, s=SIZES):
        super().__init__()
        self.dense = nn.Linear(s["v_width"], s["dim"])
        self.latent_query = nn.Parameter(torch.randn(s["queries"], s["dim"]))
        self.x_attn = nn.MultiheadAttention(s["dim"], s["heads"])

    def forward(self, tokens):
        x = self.dense(tokens).transpose(0, 1)
        queries = self.latent_query[:, None].expand(-1, x.size(1), -1)
        kv = torch.cat([x, queries])
        return self.x_attn(queries, kv, kv, need_weights=False)[0].transpose(0, 1)


def aligner(s=SIZES, stage2: bool = False, llm_dim: int = SIZES["dim"]) -> dict:
    """Original aligner names (unilm/models/aligner.py) at reduced sizes, random values."""
    cfg = EncoderDecoderConfig(encoder_embed_dim=s["a_dim"], encoder_attention_heads=s["a_heads"],
                               encoder_ffn_embed_dim=s["a_ffn"], encoder_layers=s["a_layers"],
                               decoder_embed_dim=s["a_dim"], decoder_attention_heads=s["a_heads"],
                               decoder_ffn_embed_dim=s["a_ffn"], decoder_layers=s["a_layers"])
    parts = {"encoder_proj": Encoder(cfg, embed_tokens=nn.Linear(llm_dim, s["a_dim"]), is_encoder_decoder=True,
                                     embed_positions=PositionalEmbedding(128, s["a_dim"])),
             "encoder": Decoder(cfg, is_encoder_decoder=True)}
    sd = {"encoder_query": torch.randn(77, s["a_dim"])}
    if stage2:
        parts["decoder"] = Decoder(cfg, is_encoder_decoder=True)
        parts["decoder_proj"] = Encoder(cfg, embed_positions=PositionalEmbedding(128, s["a_dim"]),
                                        output_projection=nn.Linear(s["a_dim"], llm_dim))
        sd["decoder_query"] = torch.randn(128, s["a_dim"])
    for name, module in parts.items():
        sd.update({f"{name}.{k}": v.detach() + 0.02 * torch.randn_like(v) for k, v in module.state_dict().items()})
    return {"aligner." + k: v for k, v in sd.items()}


def reference_mllm(seed: int = 0, s=SIZES):
    """(decoder, visual, connector) with random weights (LayerNorms too), rounded to fp16 values so that an
    fp16 checkpoint of them converts exactly."""
    torch.manual_seed(seed)
    modules = text_decoder(s), Visual(s), Connector(s)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p)).copy_(p.half().float())
    return tuple(m.eval() for m in modules)


def _split_attention(sd: dict, prefix: str, new: str) -> dict:
    """nn.MultiheadAttention's packed in_proj -> separate q/k/v_proj (what the original's create_model does)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix + "in_proj_"):
            for name, chunk in zip("qkv", value.chunk(3)):
                out[f"{new}{name}_proj.{key.rsplit('_', 1)[1]}"] = chunk
        elif key.startswith(prefix):
            out[new + key[len(prefix):]] = value
        else:
            out[key] = value
    return out


def original_state_dict(decoder, visual, connector, vision: bool = True) -> dict:
    """The modules' weights under the names the original KosmosGmodel's state_dict() has."""
    sd = {"gpt_model.decoder." + k: v for k, v in decoder.state_dict().items()}
    sd["gpt_model.decoder.self_attn_sope.scale"] = torch.rand(SIZES["dim"] // SIZES["heads"] // 2)
    conn = {"img_connector." + k: v for k, v in connector.state_dict().items()}
    sd.update(_split_attention(conn, "img_connector.x_attn.", "img_connector.x_attn."))
    if vision:
        vis = {"img_model.visual." + k: v for k, v in visual.state_dict().items()}
        for i in range(len(visual.transformer.resblocks)):
            b = f"img_model.visual.transformer.resblocks.{i}."
            vis = _split_attention(vis, b + "attn.", b + "ts_attn.")
        sd.update(vis)
    return sd


def open_clip_file(visual) -> dict:
    """ViT-L-14-sd.pt's layout: a whole CLIP state dict (text tower too, and `visual.proj`), keys `module.`-prefixed,
    under `state_dict`."""
    sd = {"module.visual." + k: v for k, v in visual.state_dict().items()}
    sd["module.visual.proj"] = torch.randn(SIZES["v_width"], 16)
    sd["module.token_embedding.weight"] = torch.randn(10, 16)
    sd["module.logit_scale"] = torch.tensor(4.6)
    return {"epoch": 32, "name": "ViT-L-14", "state_dict": sd}


def fairseq_checkpoint(model: dict, heads: int = SIZES["heads"]) -> dict:
    """A dict laid out as fairseq's checkpoint_utils.save_state writes it, weights in fp16."""
    return {
        "args": None,
        "cfg": {"common": {"fp16": True, "memory_efficient_fp16": True},
                "model": argparse.Namespace(arch="kosmosg_xl", decoder_attention_heads=heads, subln=True,
                                            sope_rel_pos=True, latent_query_num=SIZES["queries"]),
                "task": {"_name": "kosmosg", "tokens_per_sample": 2048},
                "checkpoint": OmegaConf.create({"save_dir": "/path/to/save-dir", "keep_last": [1, 2], "x": None})},
        "model": OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in model.items()),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "KosmosGLoss", "optimizer_name": "MemoryEfficientFP16Optimizer",
                               "lr_scheduler_state": {"best": np.float64(1.25)}, "num_updates": 1234}],
        "task_state": {},
        "extra_state": {"metrics": OrderedDict(train=OrderedDict(loss=np.float32(2.5))), "previous_best": np.float64(3.0),
                        "train_iterator": {"epoch": 1, "iterations_in_epoch": 77, "shuffle": True}},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.randn(1000), "exp_avg_sq": torch.rand(1000)}},
                                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.98), "params": [0]}]},
    }


def prompt_batch(s=SIZES):
    """Two prompts `<s> text <image> [slots] </image> text`, right-padded with id 1, one image each."""
    q = s["queries"]
    rows = [[0, 300, 301, IMAGE] + [IMAGE] * q + [IMAGE_END, 302, 303, 304],
            [0, 400, IMAGE] + [IMAGE] * q + [IMAGE_END, 401]]
    length = max(map(len, rows))
    tokens = torch.tensor([r + [PAD] * (length - len(r)) for r in rows])
    slots = torch.zeros_like(tokens, dtype=torch.bool)
    for i, r in enumerate(rows):
        start = r.index(IMAGE) + 1
        slots[i, start:start + q] = True
    torch.manual_seed(1)
    return tokens, slots, torch.randn(2, 3, s["image"], s["image"])
