"""Per-GPU memory of the paper preset under FSDP full shard, per stage, from the model definitions.

    python -m benchmarks.memory_plan                 # 64 x A100-80G, trainer=a100_fsdp (a few seconds, no GPU)
    python -m benchmarks.memory_plan --gpus 256 --gpu-gib 32 --trainer v100_fsdp

Every network is built on the meta device at the paper's sizes (MLLM: the original's 24 x 2048 Kosmos-2
decoder + CLIP ViT-L/14 + connector, via kosmos_g.models.mllm.build_mllm; AlignerNet 12+12 at 768; SD v1.5 U-Net, VAE
and CLIP-L text encoder from diffusers / transformers config dicts), with each stage's trainable set
(the stages' own `lock_vision` / `m_parameters`). Per GPU, with N GPUs and `trainer.fsdp_*` of the preset:

  params    trainable parameters, fp32 shard (= AdamW's master weights): 4 B x trainable / N
  grads     fp32 gradient shard: 4 B x trainable / N
  AdamW     exp_avg + exp_avg_sq, fp32 shard: 8 B x trainable / N       (master + moments = 12 B / param)
  frozen    frozen parameters FSDP shards (4 B / N) + those it leaves out, replicated (U-Net/VAE/CLIP-text
            in model.diffusion_dtype)
  gathered  what is all-gathered for compute, in the half type: the root unit (embeddings, tied LM head, connector,
            ViT stem, aligner tables) + 2 wrapped layers (limit_all_gathers: current + prefetched), and the
            unsharded fp32 gradients of the root + 1 layer during backward
  acts      activations kept for backward, MEASURED by running one training step's forward on fake
            tensors (shapes only) and summing every tensor autograd saves (saved_tensors_hooks), parameters
            excluded; attention is counted as flash attention stores it (q, k, v, out, log-sum-exp). With
            activation checkpointing a checkpointed layer keeps only its input, plus, at the peak, one
            layer's full activations while it is recomputed.
Not counted: the CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, transient buffers (the
frozen VAE's no-grad encode at 512 px peaks at a few GiB but before the activations exist).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

GiB = 2**30
RESULTS = Path(__file__).resolve().parent / "results"
# SD v1.5: diffusers' UNet2DConditionModel defaults with these; its VAE and CLIP ViT-L/14 text encoder.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77)
PAPER_VOCAB = 64007  # the original tokenizer: fairseq's 4 + 63,997 pieces + <mask> + 5 Kosmos-G specials
# Per-GPU micro-batches: the paper's global batches over 64 GPUs (stage 1: 1.2M tokens = ~586 x 2048).
STAGE_SHAPES = {"mllm": dict(batch=9, seq=2048, images=2), "align": dict(batch=56, seq=80, images=0),
                "instruct": dict(batch=16, seq=128, images=1, px=512)}


class VocabStub:
    """What `build_mllm` reads of a tokenizer (its length and the original's special-id layout), without a file."""

    bos_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, size: int = PAPER_VOCAB):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def get_vocab(self) -> dict[str, int]:
        from kosmos_g.models.tokenizers import ADDED_SPECIAL_TOKENS, BASE_SPECIAL_TOKENS, MASK

        added = [MASK] + ADDED_SPECIAL_TOKENS  # the last ids, as in the paper's vocabulary
        return {**dict(zip(BASE_SPECIAL_TOKENS, range(4))), **dict(zip(added, range(self.size - len(added), self.size)))}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.get_vocab().get(token, self.unk_token_id)


def mllm_states(mllm, stage: str, ids: torch.Tensor, mask: torch.Tensor, px: torch.Tensor | None) -> torch.Tensor:
    """The MLLM of a training step on fake tensors: logits (stage mllm) or the final states. Image latents enter
    by concatenation in front of the text (same work as `MultimodalLM.embed`'s masked_scatter, without its
    data-dependent count); without images the ViT + connector run on one dummy image, as in `embed`."""
    embeds = mllm.get_input_embeddings()(ids)
    if px is not None:
        embeds = torch.cat([mllm.image_features(px).reshape(len(ids), -1, embeds.shape[-1]), embeds], dim=1)
    else:
        dummy = px_zeros(mllm, 1, embeds.device, embeds.dtype)
        embeds = embeds + 0 * mllm.image_features(dummy).sum()
    if stage == "mllm":
        return mllm.text_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    return mllm.text_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state


def px_zeros(mllm, n: int, device, dtype) -> torch.Tensor:
    size = mllm.config.vision_config.image_size
    return torch.zeros(n, 3, size, size, device=device, dtype=dtype)


def build_paper(dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    """The paper preset's networks on the meta device (nothing allocated or read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from kosmos_g.config import load_config
    from kosmos_g.models.aligner import AlignerNet
    from kosmos_g.models.mllm import build_mllm

    cfg = load_config(["stage=mllm", "model=paper", "model.vision.weights_path=null", "model.llm.tokenizer_path=null",
                       "model.diffusion_path=null"])
    with torch.device("meta"):
        mllm = build_mllm(cfg.model, VocabStub())
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        aligner = AlignerNet(llm_dim=cfg.model.llm.hidden_size, clip_dim=768, **asdict(cfg.model.aligner))
    for m in (mllm, aligner, unet, vae, text_encoder):
        m.to(dtype=dtype).eval()
    return SimpleNamespace(cfg=cfg, mllm=mllm, aligner=aligner, unet=unet, vae=vae, text_encoder=text_encoder)


def stage_module(parts, stage: str) -> nn.Module:
    """A stand-in for the stage's LightningModule: the same attribute names and the stage's trainable set."""
    root = nn.Module()
    root.mllm = parts.mllm
    for m in (parts.mllm, parts.aligner, parts.unet, parts.vae, parts.text_encoder):
        m.requires_grad_(False)
    v = parts.cfg.model.vision
    if stage in ("mllm", "instruct"):
        parts.mllm.requires_grad_(True)
        parts.mllm.lock_vision(v.unlocked_last_blocks, v.unlock_final_norm)
    if stage in ("align", "instruct"):
        root.aligner = parts.aligner
    if stage == "align":
        root.text_encoder = parts.text_encoder
        parts.aligner.requires_grad_(True)
    if stage == "instruct":
        root.diffusion = nn.Module()
        root.diffusion.unet, root.diffusion.vae = parts.unet, parts.vae
        for p in parts.aligner.m_parameters():
            p.requires_grad_(True)
    return root


# ---------------------------------------------------------------------------------------------
# activations: what autograd saves in one forward, on fake tensors


class _FlashAttention(torch.autograd.Function):
    """Shape-only attention that saves what flash attention saves (the math path would save L x L scores)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts what the forward keeps
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashAttention.apply(query, key, value)


class SavedTensors:
    """Bytes autograd saves, split by checkpoint unit (instances of `unit_classes`) and the rest."""

    def __init__(self, model: nn.Module, unit_classes: tuple):
        self.params = {id(p) for p in model.parameters()}
        self.seen: set[int] = set()
        self.current: list = [None]
        self.units: list[dict] = []  # per unit call: saved bytes, input bytes
        self.other = 0
        self.handles = []
        for m in model.modules():
            if unit_classes and isinstance(m, unit_classes):
                self.handles.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.units.append({"saved": 0, "input": x.numel() * x.element_size()})
        self.current.append(self.units[-1])

    def _leave(self, module, args, output):
        self.current.pop()

    def pack(self, t):
        base = t._base if t._base is not None else t
        if id(base) not in self.params and id(t) not in self.params and id(base) not in self.seen:
            self.seen.add(id(base))
            n = base.numel() * base.element_size()
            if self.current[-1] is None:
                self.other += n
            else:
                self.current[-1]["saved"] += n
        return t

    def result(self) -> dict:
        for h in self.handles:
            h.remove()
        units = [u for u in self.units if u["saved"]]
        full = self.other + sum(u["saved"] for u in units)
        ckpt = self.other + sum(u["input"] for u in units) + max((u["saved"] for u in units), default=0)
        return {"no_checkpointing": full, "checkpointing": ckpt, "checkpointed_units": len(units)}


def activations(parts, stage: str, shapes: dict, unit_classes: tuple) -> dict:
    """Saved activations of one `stage` step (forward of its training_step) at per-GPU `shapes`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = stage_module(parts, stage)
    cfg, mllm = parts.cfg.model, parts.mllm
    b, seq, n_img = shapes["batch"], shapes["seq"], shapes["images"]
    dtype, dev = torch.bfloat16, "meta"
    counter = SavedTensors(module, unit_classes)

    def states(grad: bool):
        """ViT + connector on the images, the decoder on [image latents | text]: logits (stage mllm) or states."""
        n_tok = cfg.vision.num_image_tokens
        with torch.set_grad_enabled(grad):
            ids = torch.full((b, seq - n_img * n_tok), 5, dtype=torch.long, device=dev)
            px = px_zeros(mllm, b * n_img, dev, dtype) if n_img else None
            return mllm_states(mllm, stage, ids, torch.ones(b, seq, dtype=torch.long, device=dev), px)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            if stage == "mllm":
                logits = states(True)[:, :-1]
                torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),  # as stages/mllm.py: fp32 loss
                                                  torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long,
                                                              device=dev), reduction="none")
            elif stage == "align":
                s = states(False)
                c = parts.aligner.encode(s)
                recon = parts.aligner.reconstruct(c, s.shape[1])
                ((recon.float() - s.float()) ** 2).mean()
            else:
                latent = shapes["px"] // 8
                c = parts.aligner.encode(states(True))
                noisy = torch.zeros(b, 4, latent, latent, device=dev, dtype=dtype)
                eps = parts.unet(noisy, torch.zeros(b, dtype=torch.long, device=dev), c).sample
                (eps.float() ** 2).mean()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return counter.result()


# ---------------------------------------------------------------------------------------------
# parameters, gradients, optimizer state under FSDP


def fsdp_units(module: nn.Module, wrap: tuple, ignored: list[nn.Module]) -> dict:
    """Parameter counts: trainable / frozen, sharded (FSDP-managed) / replicated (ignored), and the units."""
    ignored_params = {id(p) for m in ignored for p in m.parameters()}
    unit_sizes, in_unit = [], set()
    for m in module.modules():
        if isinstance(m, wrap) and not any(id(p) in ignored_params for p in m.parameters()):
            ps = [p for p in m.parameters() if id(p) not in in_unit]
            in_unit.update(id(p) for p in ps)
            unit_sizes.append(sum(p.numel() for p in ps))
    count = {"trainable": 0, "frozen_sharded": 0, "frozen_replicated": 0, "root": 0, "root_trainable": 0}
    replicated_bytes = 0
    for p in module.parameters():
        if id(p) in ignored_params:
            count["frozen_replicated"] += p.numel()
            replicated_bytes += p.numel() * p.element_size()
            continue
        count["trainable" if p.requires_grad else "frozen_sharded"] += p.numel()
        if id(p) not in in_unit:
            count["root"] += p.numel()
            count["root_trainable"] += p.numel() * p.requires_grad
    return {**count, "units": len(unit_sizes), "largest_unit": max(unit_sizes, default=0),
            "replicated_bytes": replicated_bytes}


def plan(gpus: int = 64, trainer: str = "a100_fsdp", shapes: dict | None = None, parts=None) -> dict:
    """The per-GPU memory of every stage (bytes), for `trainer` (a configs/trainer preset) on `gpus` GPUs."""
    from kosmos_g.config import load_config
    from kosmos_g.scale import ignored_modules, layer_classes

    t = load_config([f"trainer={trainer}"]).trainer
    shapes = {**STAGE_SHAPES, **(shapes or {})}
    parts = parts or build_paper()
    diffusion_dtype = getattr(torch, parts.cfg.model.diffusion_dtype)
    wrap = tuple(layer_classes(t.fsdp_wrap_layers, "trainer.fsdp_wrap_layers"))
    ckpt = tuple(layer_classes(t.checkpoint_layers, "trainer.checkpoint_layers")) if t.activation_checkpointing else ()
    half = 4 if "32" in t.precision else 2
    out = {}
    for stage in ("mllm", "align", "instruct"):
        acts = activations(parts, stage, shapes[stage], ckpt or tuple(wrap))
        module = stage_module(parts, stage)
        ignored = ignored_modules(module, t.fsdp_ignored_modules)
        for m in ignored:  # frozen and replicated in model.diffusion_dtype (text encoder and U-Net/VAE)
            m.to(diffusion_dtype)
        n = fsdp_units(module, wrap, ignored)
        for m in ignored:
            m.to(torch.bfloat16)
        shard = gpus if t.fsdp_sharding == "FULL_SHARD" else 1
        row = {
            "params": 4 * n["trainable"] / shard,
            "grads": 4 * n["trainable"] / (gpus if t.fsdp_sharding != "NO_SHARD" else 1),
            "adamw": 8 * n["trainable"] / (gpus if t.fsdp_sharding != "NO_SHARD" else 1),
            "frozen": 4 * n["frozen_sharded"] / shard + n["replicated_bytes"],
            "gathered": half * (n["root"] + 2 * n["largest_unit"]) + 4 * (n["root_trainable"] + n["largest_unit"]),
            "activations": acts["checkpointing" if ckpt else "no_checkpointing"],
        }
        row["total"] = sum(row.values())
        out[stage] = {"bytes": row, "counts": n, "activations_detail": acts, "shapes": shapes[stage]}
    return {"gpus": gpus, "trainer": trainer, "precision": t.precision, "sharding": t.fsdp_sharding,
            "activation_checkpointing": t.activation_checkpointing, "stages": out}


COLUMNS = ("params", "grads", "adamw", "frozen", "gathered", "activations", "total")
HEADERS = ("stage", "trainable / frozen params", "params fp32 shard", "grads fp32 shard", "AdamW m+v fp32 shard",
           "frozen params", "gathered for compute", "activations", "total", "activations without checkpointing")


def table(result: dict, gpu_gib: float) -> str:
    rows = []
    for stage, r in result["stages"].items():
        c, b = r["counts"], r["bytes"]
        frozen = c["frozen_sharded"] + c["frozen_replicated"]
        rows.append([stage, f"{c['trainable'] / 1e9:.2f}B / {frozen / 1e9:.2f}B",
                     *(f"{b[k] / GiB:.2f}" for k in COLUMNS[:-1]), f"**{b['total'] / GiB:.1f}** of {gpu_gib:g}",
                     f"{r['activations_detail']['no_checkpointing'] / GiB:.1f}"])
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU, for the table's last column")
    p.add_argument("--trainer", default="a100_fsdp", help="a configs/trainer preset (fsdp)")
    p.add_argument("--out", type=Path, default=RESULTS / "memory_plan.json")
    args = p.parse_args(argv)
    with contextlib.suppress(Exception):
        import diffusers
        import transformers
        transformers.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    result = plan(args.gpus, args.trainer)
    text = table(result, args.gpu_gib)
    print(f"Per-GPU memory (GiB), paper preset, {args.gpus} GPUs, trainer={args.trainer} "
          f"({result['precision']}, {result['sharding']}, activation checkpointing "
          f"{'on' if result['activation_checkpointing'] else 'off'}); per-GPU micro-batches "
          + ", ".join(f"{s} {v['batch']}x{v['seq']} tokens" for s, v in STAGE_SHAPES.items()) + ":\n")
    print(text)
    s3 = result["stages"]["instruct"]["counts"]
    print(f"\nThe frozen U-Net + VAE (model.diffusion_dtype) are replicated: {s3['replicated_bytes'] / GiB:.2f} GiB per "
          f"GPU in stage instruct. Sharding them would save {s3['replicated_bytes'] * (1 - 1 / args.gpus) / GiB:.2f} GiB "
          "but all-gather them in every forward and again in the backward (gradients flow through the U-Net).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "memory_plan", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "gpu_gib": args.gpu_gib, "shapes": STAGE_SHAPES, "table": text, **result},
                                   indent=2, default=str))
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
