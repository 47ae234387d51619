"""FLOPs of one training step per stage and section, counted by torch's FlopCounterMode, at any preset.

    python -m benchmarks.flops            # the table for the tiny and the paper preset (a few seconds, no memory)

The paper-size parts (the original's 1.3B Kosmos-2 decoder + CLIP ViT-L/14 + connector, AlignerNet 12+12 at 768, SD v1.5 U-Net / VAE /
CLIP-L text encoder) are built on the meta device and run on fake tensors: shapes flow, nothing is allocated
or computed, and FlopCounterMode counts the matmul / conv / attention FLOPs (2 per multiply-add) of each
forward section and of the backward. The sections mirror the stages' `training_step`s (see stage_throughput);
the image tokens enter the decoder by concatenation instead of `masked_scatter` (same FLOPs, no
data-dependent shapes; `memory_plan.mllm_states`). Optimizer and elementwise FLOPs are not counted (they are not matmuls).

This is what moves the cache speed-ups: a cache removes its section's forward FLOPs from every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common

# The paper preset's frozen parts, sized as in the memory plan.
from benchmarks.memory_plan import CLIP_L_TEXT, PAPER_VOCAB, SD15_UNET, SD15_VAE, VocabStub, mllm_states, px_zeros


@dataclass
class Shapes:
    """One step's inputs: `batch` sequences of `seq_len` tokens (image tokens included), `images` images in
    the batch (each `num_image_tokens` of the tokens), targets of `target_px` pixels for the VAE."""

    batch: int
    seq_len: int
    images: int
    target_px: int


# The paper-preset shapes assumed by the projection (per sample): a 2048-token interleaved document with 2 images;
# a 32-token caption; an instruction of 32 text tokens and one image, with a 512 px target.
# The tiny preset's mean batch shapes on the tiny world (padded length; measured by stage_throughput's batches).
TINY_SHAPES = {"mllm": Shapes(8, 80, 10, 32), "align": Shapes(16, 21, 0, 32), "instruct": Shapes(8, 22, 6, 32)}
PAPER_SHAPES = {"mllm": Shapes(1, 2048, 2, 512), "align": Shapes(1, 32, 0, 512), "instruct": Shapes(1, 32 + 66, 1, 512)}


def model_config(preset: str):
    """The ModelConfig of `preset` with every weight path cleared (random init, nothing read)."""
    from kosmos_g.config import load_config

    return load_config(["stage=mllm", f"model={preset}", "model.vision.weights_path=null",
                        "model.llm.tokenizer_path=null", "model.diffusion_path=null"]).model


def build_parts(preset: str, device: str = "meta", dtype: torch.dtype = torch.float32, tokenizer=None,
                clip_tokenizer=None, mllm_only: bool = False) -> SimpleNamespace:
    """Randomly initialised parts of `preset` (tiny or paper) on `device`: mllm, aligner, unet, vae, text_encoder.

    `tokenizer`: the MLLM's (its length sizes the LM's vocabulary); default a stub of the preset's vocabulary
    size. `clip_tokenizer`: a CLIP tokenizer whose vocabulary and special ids the CLIP text encoder takes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from kosmos_g.models.aligner import AlignerNet
    from kosmos_g.models.diffusion import build_tiny_unet, build_tiny_vae
    from kosmos_g.models.mllm import build_mllm

    cfg = model_config(preset)
    ids = {} if clip_tokenizer is None else dict(
        vocab_size=len(clip_tokenizer), bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)
    if mllm_only:  # e.g. the stage-1 MFU run: no U-Net/VAE/text encoder on the GPU
        with torch.device(device):
            mllm = build_mllm(cfg, tokenizer or VocabStub(PAPER_VOCAB if preset == "paper" else 1024))
        return SimpleNamespace(cfg=cfg, mllm=mllm.to(dtype=dtype).eval())
    with torch.device(device):
        if preset == "paper":
            mllm = build_mllm(cfg, tokenizer or VocabStub(PAPER_VOCAB))
            unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
            text = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT, **ids}))
        else:
            c = cfg.tiny_clip_text
            mllm = build_mllm(cfg, tokenizer or VocabStub(1024))
            unet, vae = build_tiny_unet(c.hidden_size), build_tiny_vae()
            text = CLIPTextModel(CLIPTextConfig(**{
                "vocab_size": 1024, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads, "intermediate_size": c.intermediate_size,
                "max_position_embeddings": cfg.clip_max_tokens, **ids}))
        aligner = AlignerNet(llm_dim=cfg.llm.hidden_size, clip_dim=unet.config.cross_attention_dim,
                             **asdict(cfg.aligner))
    parts = SimpleNamespace(cfg=cfg, mllm=mllm, aligner=aligner, unet=unet, vae=vae, text_encoder=text)
    for m in (mllm, aligner, unet, vae, text):
        m.to(dtype=dtype).eval()
    return parts


def _trainable(parts, stage: str) -> None:
    """requires_grad as each stage sets it (stages/*.py)."""
    for m in (parts.mllm, parts.aligner, parts.unet, parts.vae, parts.text_encoder):
        m.requires_grad_(False)
    if stage in ("mllm", "instruct"):
        parts.mllm.requires_grad_(True)
        parts.mllm.lock_vision(parts.cfg.vision.unlocked_last_blocks, parts.cfg.vision.unlock_final_norm)
    if stage == "align":
        parts.aligner.requires_grad_(True)
    if stage == "instruct":
        for p in parts.aligner.m_parameters():
            p.requires_grad_(True)


def step_flops(parts, stage: str, shapes: Shapes) -> dict[str, float]:
    """FLOPs per section of one `stage` training step on `shapes` (sections as in stage_throughput)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _trainable(parts, stage)
    cfg, mllm = parts.cfg, parts.mllm
    b, n_tok = shapes.batch, cfg.vision.num_image_tokens
    d = cfg.llm.hidden_size
    device = next(mllm.parameters()).device
    dtype = next(mllm.parameters()).dtype
    out: dict[str, float] = {}

    def count(name: str):
        counter = FlopCounterMode(display=False)

        @contextlib.contextmanager
        def run():
            with counter:
                yield
            out[name] = out.get(name, 0.0) + counter.get_total_flops()
        return run()

    def mllm_states_(grad: bool):
        """ViT + connector on the images, the decoder on [image tokens | text tokens]: hidden states or logits."""
        text_len = shapes.seq_len - (shapes.images * n_tok) // b
        with torch.set_grad_enabled(grad):
            ids = torch.full((b, text_len), 5, dtype=torch.long, device=device)
            px = px_zeros(mllm, shapes.images, device, dtype) if shapes.images else None
            mask = torch.ones(b, shapes.seq_len if shapes.images else text_len, dtype=torch.long, device=device)
            return mllm_states(mllm, stage, ids, mask, px)

    # Fake tensors: the parts may live on the meta device (transformers then skips its data-dependent mask checks).
    mode = FakeTensorMode(allow_non_fake_inputs=True) if device.type == "meta" else contextlib.nullcontext()
    with mode:
        if stage == "mllm":
            with count("MLLM forward"):
                logits = mllm_states_(True)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                         torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long,
                                                                     device=device))
        elif stage == "align":
            with count("MLLM forward"):
                s = mllm_states_(False)
            with count("CLIP text"), torch.no_grad():
                target = parts.text_encoder(torch.zeros(b, cfg.clip_max_tokens, dtype=torch.long,
                                                        device=device)).last_hidden_state
            with count("aligner"):
                c = parts.aligner.encode(s)
                recon = parts.aligner.reconstruct(c, s.shape[1])
                loss = ((c - target) ** 2).mean() + ((recon - s) ** 2).mean()
        else:
            with count("VAE encode"), torch.no_grad():
                px = torch.zeros(b, 3, shapes.target_px, shapes.target_px, device=device, dtype=dtype)
                latents = parts.vae.encode(px).latent_dist.mean
            with count("MLLM forward"):
                s = mllm_states_(True)
            with count("aligner"):
                c = parts.aligner.encode(s)
            with count("U-Net"):
                eps = parts.unet(latents, torch.zeros(b, dtype=torch.long, device=device), c.to(dtype)).sample
                loss = (eps.float() ** 2).mean()
        with count("backward"):
            loss.backward()
    for m in (parts.mllm, parts.aligner):
        m.zero_grad(set_to_none=True)
    return out


def cache_speedup(flops: dict[str, float], section: str) -> float:
    """Step FLOPs with / without `section` (what a cache of that section's output removes)."""
    total = sum(flops.values())
    return total / (total - flops.get(section, 0.0))


CACHED_SECTION = {"align": "CLIP text", "instruct": "VAE encode"}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    res = {}
    for preset, shapes in (("tiny", TINY_SHAPES), ("paper", PAPER_SHAPES)):
        parts = build_parts(preset)
        res[preset] = {st: step_flops(parts, st, shapes[st]) for st in common.STAGES}
    rows = []
    for preset, per_stage in res.items():
        for st, f in per_stage.items():
            total = sum(f.values())
            rows.append([preset, st, total / 1e9, ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in f.items()),
                         cache_speedup(f, CACHED_SECTION[st]) if st in CACHED_SECTION else "-"])
    print(common.table(["preset", "stage", "GFLOP/step", "share by section", "cache speed-up bound"], rows))
    path = common.write_json("flops", {"results": res, "tiny_shapes": {k: asdict(v) for k, v in TINY_SHAPES.items()},
                                       "paper_shapes": {k: asdict(v) for k, v in PAPER_SHAPES.items()}}, args.out)
    print(f"\nwrote {path}")
    f = res["paper"]["instruct"]
    print(f"RATIO paper-preset stage-3 FLOPs with / without VAE encode: {cache_speedup(f, 'VAE encode'):.2f}x")
    return res


if __name__ == "__main__":
    main()
