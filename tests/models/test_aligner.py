"""AlignerNet is the original Kosmos-G aligner: its keys, its size, and its function checked against pip torchscale.

The reference is independent code: pip `torchscale==0.3.0` (a test-only dependency, installed with --no-deps by
`make venv`), configured as the original `unilm/models/aligner.py` configures the vendored torchscale
(`EncoderDecoderConfig` defaults: sub-LN, pre-LN, GELU, no embedding scale; xPos off), with the original
attribute names, so its state dict has exactly the original checkpoint's keys (without the `aligner.` prefix).
"""

import math
import warnings
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kosmos_g.config import ConfigError, load_config
from kosmos_g.models.aligner import AlignerDecoderLayer, AlignerEncoderLayer, AlignerNet

with warnings.catch_warnings():  # torchscale imports timm.models.layers, deprecated in timm 1.x
    warnings.simplefilter("ignore", FutureWarning)
    from torchscale.architecture.config import EncoderDecoderConfig
    from torchscale.architecture.decoder import Decoder
    from torchscale.architecture.encoder import Encoder
    from torchscale.component.embedding import PositionalEmbedding


def original_keys(llm: int, w: int = 768, ffn: int = 3072, enc: int = 12, dec: int = 12, rows: int = 32768,
                  queries: int = 77) -> dict[str, tuple]:
    """The `aligner.*` keys and shapes of an original stage-2 checkpoint, prefix stripped, `clip_encoder.*` left out.

    Derived by reading microsoft/unilm 421c251 `kosmos-g/unilm/models/aligner.py` (`Aligner.__init__`) and the
    vendored `kosmos-g/torchscale/torchscale/architecture/{encoder,decoder}.py`, `component/{multihead_attention,
    feedforward_network}.py` with `EncoderDecoderConfig()` defaults (subln=True: `inner_attn_ln` in
    self-attention only, `ffn_layernorm`; normalize_before: a final `layer_norm`; multiway, MoE, relative
    positions, xPos (sope) off: no other parameters or buffers; vocab_size -1: no output projection but the
    one passed in; `checkpoint_activations` uses fairscale's checkpoint_wrapper, which patches `forward` and adds
    no key prefix). Final checkpoints hold only M's keys (`Aligner_encoder`): encoder_proj, encoder_query, encoder.
    """
    def linear(name, n_in, n_out):
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    def norm(name, n):
        return {f"{name}.weight": (n,), f"{name}.bias": (n,)}

    def attention(name, subln):
        keys = {k: v for p in "qkv" for k, v in linear(f"{name}.{p}_proj", w, w).items()}
        keys.update(linear(f"{name}.out_proj", w, w))
        return {**keys, **norm(f"{name}.inner_attn_ln", w)} if subln else keys

    def ffn_keys(name):
        return {**linear(f"{name}.fc1", w, ffn), **linear(f"{name}.fc2", ffn, w), **norm(f"{name}.ffn_layernorm", ffn)}

    def encoder_layer(p):
        return {**attention(f"{p}.self_attn", True), **norm(f"{p}.self_attn_layer_norm", w), **ffn_keys(f"{p}.ffn"),
                **norm(f"{p}.final_layer_norm", w)}

    def decoder_layer(p):
        return {**encoder_layer(p), **attention(f"{p}.encoder_attn", False), **norm(f"{p}.encoder_attn_layer_norm", w)}

    keys = {**linear("encoder_proj.embed_tokens", llm, w), "encoder_proj.embed_positions.weight": (rows, w),
            **norm("encoder_proj.layer_norm", w), "encoder_query": (queries, w), **norm("encoder.layer_norm", w),
            "decoder_query": (rows, w), **norm("decoder.layer_norm", w),
            "decoder_proj.embed_positions.weight": (rows, w), **norm("decoder_proj.layer_norm", w),
            **linear("decoder_proj.output_projection", w, llm)}
    for i in range(enc):
        keys.update(encoder_layer(f"encoder_proj.layers.{i}"))
        keys.update(encoder_layer(f"decoder_proj.layers.{i}"))
    for i in range(dec):
        keys.update(decoder_layer(f"encoder.layers.{i}"))
        keys.update(decoder_layer(f"decoder.layers.{i}"))
    return keys


M_PREFIXES = ("encoder_proj.", "encoder_query", "encoder.")


def test_paper_size_keys_are_the_original_checkpoints_without_prefix():
    cfg = load_config(["model=paper"]).model
    with torch.device("meta"):
        aligner = AlignerNet(llm_dim=2048, clip_dim=768, **asdict(cfg.aligner))
    ours = {k: tuple(v.shape) for k, v in aligner.state_dict().items()}
    assert ours == original_keys(llm=2048)
    assert all(p.is_meta for p in aligner.parameters())


def test_paper_size_parameter_counts():
    """M has the paper's ≈225M parameters (exactly the original's); N adds 251M used in stage 2 only."""
    cfg = load_config(["model=paper"]).model
    with torch.device("meta"):
        aligner = AlignerNet(llm_dim=cfg.llm.hidden_size, clip_dim=768, **asdict(cfg.aligner))
    keys = original_keys(llm=cfg.llm.hidden_size)
    m_expected = sum(math.prod(s) for k, s in keys.items() if k.startswith(M_PREFIXES))
    n_expected = sum(math.prod(s) for k, s in keys.items() if not k.startswith(M_PREFIXES))
    m = sum(p.numel() for p in aligner.m_parameters())
    n = sum(p.numel() for p in aligner.n_parameters())
    assert (m, n) == (m_expected, n_expected) == (225_461_760, 250_569_728)
    assert abs(m - 225e6) / 225e6 < 0.01  # the paper: "AlignerNet ... 225M"
    assert m + n == sum(p.numel() for p in aligner.parameters())


# ---------------------------------------------------------------------------------------------
# the reference: pip torchscale configured as the original


LLM, W, HEADS, FFN, ENC, DEC, ROWS, QUERIES = 48, 32, 4, 64, 2, 3, 64, 7


class Reference(nn.Module):
    """`unilm/models/aligner.py`'s Aligner (without clip_encoder) on pip torchscale, at reduced sizes."""

    def __init__(self):
        super().__init__()
        cfg = EncoderDecoderConfig(encoder_embed_dim=W, encoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN,
                                   encoder_layers=ENC, decoder_embed_dim=W, decoder_attention_heads=HEADS,
                                   decoder_ffn_embed_dim=FFN, decoder_layers=DEC)
        assert cfg.subln and not cfg.xpos_rel_pos and cfg.no_scale_embedding and cfg.layernorm_eps == 1e-5
        self.encoder_proj = Encoder(cfg, embed_tokens=nn.Linear(LLM, W), embed_positions=PositionalEmbedding(ROWS, W),
                                    is_encoder_decoder=True)
        self.encoder_query = nn.Parameter(torch.randn(QUERIES, W))
        self.encoder = Decoder(cfg, is_encoder_decoder=True)
        self.decoder_query = nn.Parameter(torch.randn(ROWS, W))
        self.decoder = Decoder(cfg, is_encoder_decoder=True)
        self.decoder_proj = Encoder(cfg, embed_positions=PositionalEmbedding(ROWS, W),
                                    output_projection=nn.Linear(W, LLM))
        self.causal = True

    def set_causal(self, causal: bool) -> None:
        """pip torchscale's Decoder always adds a causal mask to self-attention (the vendored one takes
        `causal_mask=False`, which the original aligner passes, and then builds none). Non-causal path: a
        forward pre-hook on each query-decoder self-attention drops the `attn_mask` argument, which is only
        that causal mask (no padding mask is passed there), so every query sees every other."""
        self.causal = causal

    def hooks(self):
        def drop_causal_mask(module, args, kwargs):
            return args, ({**kwargs, "attn_mask": None} if not self.causal else kwargs)

        for decoder in (self.encoder, self.decoder):
            for layer in decoder.layers:
                layer.self_attn.register_forward_pre_hook(drop_causal_mask, with_kwargs=True)

    def forward(self, states, padding_mask):
        """Aligner.forward's M and N, batch-first (pip torchscale's layout; the vendored one is time-first)."""
        B, L, _ = states.shape
        memory = self.encoder_proj(src_tokens=states, encoder_padding_mask=padding_mask)
        # prev_output_tokens only gives pip's Decoder the sequence length (no embed_tokens/positions here)
        m = self.encoder(prev_output_tokens=torch.zeros(B, QUERIES, dtype=torch.long), features_only=True,
                         token_embeddings=self.encoder_query.unsqueeze(0).expand(B, -1, -1), encoder_out=memory)[0]
        x = self.decoder(prev_output_tokens=torch.zeros(B, L, dtype=torch.long), features_only=True,
                         token_embeddings=self.decoder_query[:L].unsqueeze(0).expand(B, -1, -1),
                         encoder_out={"encoder_out": m, "encoder_padding_mask": None})[0]
        n = self.decoder_proj(src_tokens=None, token_embeddings=x)["encoder_out"]
        return m, n


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = Reference()
    ref.hooks()
    with torch.no_grad():  # random values everywhere, LayerNorm gains and biases included
        for p in ref.parameters():
            p.normal_(0, 0.5)
    ours = AlignerNet(llm_dim=LLM, clip_dim=W, num_heads=HEADS, ffn_size=FFN, encoder_layers=ENC,
                      decoder_layers=DEC, num_queries=QUERIES, max_source_positions=ROWS)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the prefix-strip rule: same names, nothing left over
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
        original_keys(llm=LLM, w=W, ffn=FFN, enc=ENC, dec=DEC, rows=ROWS, queries=QUERIES)
    return ref.eval(), ours.eval()


def batch():
    """Three captions of 9, 6 and 4 states, right-padded to 9; pads carry garbage (the MLLM's pad outputs)."""
    torch.manual_seed(1)
    states = torch.randn(3, 9, LLM)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:], padding[2, 4:] = True, True
    return states, padding


def test_m_and_n_equal_pip_torchscale_with_padding(pair):
    ref, ours = pair
    states, padding = batch()
    with torch.no_grad():
        ref.set_causal(False)
        m_ref, n_ref = ref(states, padding)
        ref.set_causal(True)
        m_causal, _ = ref(states, padding)
        m = ours.encode(states, padding)
        n = ours.reconstruct(m, states.shape[1], padding)
    assert m.shape == (3, QUERIES, W) and n.shape == (3, 9, LLM)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(n, n_ref, rtol=0, atol=1e-5)
    assert (m_causal - m_ref).abs().max() > 1e-2  # the causal mask matters: the comparison is not vacuous


def test_m_ignores_padding_and_n_depends_on_the_padded_length(pair):
    """As in the original: M masks pads (a caption alone or padded in a batch gives the same condition),
    N has no mask (its output for the same caption changes with the batch's padded length)."""
    _, ours = pair
    states, padding = batch()
    with torch.no_grad():
        m = ours.encode(states, padding)
        alone = ours.encode(states[2:, :4])
        garbage = ours.encode(torch.where(padding[..., None], torch.randn_like(states), states), padding)
        n_batch = ours.reconstruct(m[2:], 9)[:, :4]
        n_alone = ours.reconstruct(alone, 4)
    torch.testing.assert_close(m[2:], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(garbage, m, rtol=0, atol=1e-5)
    assert (n_batch - n_alone).abs().max() > 1e-3


def test_save_pretrained_writes_the_original_keys(pair, tmp_path):
    ref, ours = pair
    ours.save_pretrained(tmp_path / "aligner")
    saved = load_file(tmp_path / "aligner" / "diffusion_pytorch_model.safetensors")
    assert sorted(saved) == sorted(ref.state_dict())
    loaded = AlignerNet.from_pretrained(tmp_path / "aligner").eval()
    states, padding = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(states, padding), ours.encode(states, padding), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# training switches


def tiny(**kw):
    torch.manual_seed(0)
    return AlignerNet(llm_dim=LLM, clip_dim=W, num_heads=HEADS, ffn_size=FFN, encoder_layers=ENC,
                      decoder_layers=DEC, num_queries=QUERIES, max_source_positions=ROWS, **kw)


def test_lock_reconstruction_freezes_exactly_n():
    aligner = tiny()
    aligner.lock_reconstruction()
    names = {id(p): n for n, p in aligner.named_parameters()}
    trainable = sorted(names[id(p)] for p in aligner.parameters() if p.requires_grad)
    assert trainable == sorted(names[id(p)] for p in aligner.m_parameters())
    assert trainable and all(n.startswith(M_PREFIXES) for n in trainable)
    assert not any(p.requires_grad for p in aligner.n_parameters())


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    states, padding = batch()

    def grads(aligner):
        m = aligner.encode(states, padding)
        (m.square().mean() + aligner.reconstruct(m, states.shape[1]).square().mean()).backward()
        return {n: p.grad.clone() for n, p in aligner.named_parameters() if p.grad is not None}

    plain = grads(tiny().train())
    aligner = tiny().train()
    aligner.set_activation_checkpointing(True)
    assert aligner.is_gradient_checkpointing
    calls = []
    for cls in (AlignerEncoderLayer, AlignerDecoderLayer):
        monkeypatch.setattr(cls, "forward", lambda self, *a, f=cls.forward: calls.append(1) or f(self, *a))
    ckpt = grads(aligner)
    assert len(calls) == 2 * 2 * (ENC + DEC)  # every layer of M and N ran twice: forward and recomputation
    assert sorted(ckpt) == sorted(plain) and len(plain) == len(list(aligner.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)
    aligner.set_activation_checkpointing(False)
    assert not aligner.is_gradient_checkpointing


def test_too_long_a_sequence_is_one_clear_error():
    aligner = tiny()
    with pytest.raises(ValueError, match=r"max_source_positions is 64.*>= 65"):
        aligner.encode(torch.randn(1, ROWS - 1, LLM))
    with pytest.raises(ValueError, match="padding_mask has shape"):
        aligner.reconstruct(torch.randn(2, QUERIES, W), 5, torch.zeros(2, 6, dtype=torch.bool))


def test_position_table_too_short_for_the_llm_context_is_a_config_error():
    with pytest.raises(ConfigError, match=r"max_source_positions \(256\) must be at least .* \(258\)"):
        load_config(["model=tiny", "model.aligner.max_source_positions=256"])
