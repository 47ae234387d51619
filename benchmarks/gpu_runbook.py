"""GPU run book: the inference overhead (tiny and paper preset), stage throughput, and the stage-1 MFU.

    python -m benchmarks.gpu_runbook [--peak-tflops 989] [--mfu-batch 2] [--skip inference throughput mfu]
    python -m benchmarks.gpu_runbook --smoke-cpu      # the same code paths at tiny sizes on CPU (a check)

Without a CUDA device it prints why and exits 0 (nothing measured, nothing written but the skip note).
With one, in order:
  1. `inference_overhead` on the GPU: the tiny preset, then the paper preset from random weights (SD v1.5
     U-Net/VAE/CLIP-L text in float16, the 1.3B MLLM + AlignerNet), 20 and 50 steps. Goal ratio <= 1.05.
  2. `stage_throughput` on the GPU (tiny preset): per-stage samples/s with the breakdown, cache speed-ups;
     then (2b) the paper-size stage-3 step (random weights, 512 px targets, `ScoreDistillTuner` itself) with
     the live VAE encode vs cached VAE moments, alternating: the cache goal (>= 1.5x) at the paper's sizes.
  3. Stage-1 MFU: the paper-size MultimodalLM trained as stage 1 does (AdamW, fp32 master weights under bf16
     autocast, as Lightning's `bf16-mixed`) on synthetic 2048-token interleaved sequences. FLOPs of one step are
     counted by FlopCounterMode (matmul/conv/attention, forward + backward), the step is timed over
     `--mfu-steps` steps, and MFU = (FLOPs / step time) / the device's dense bf16 peak (table below, or
     `--peak-tflops`). Unknown device and no --peak-tflops: the achieved TFLOP/s is reported without MFU.
Results: benchmarks/results/gpu_*.json. The last line is the MFU.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks import common

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; matched in this order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A6000", 155.0), ("L4", 121.0))


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def synthetic_mllm_batch(mllm, batch: int, seq_len: int, images: int, device) -> dict:
    """`batch` sequences of `seq_len` tokens, each with `images` image blocks (N + 1 `<image>`, `</image>`; the
    N after the first are the slots), as the stage-1 collate makes them (labels -100 on <s> and image tokens)."""
    n, size = mllm.config.num_image_tokens, mllm.config.vision_config.image_size
    vocab, image_id = mllm.config.text_config.vocab_size, mllm.config.image_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, min(vocab, image_id) - 1, (batch, seq_len), generator=g)
    ids[:, 0] = 0  # <s>
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    gap = (seq_len - 1) // max(images, 1)
    for k in range(images):
        start = 1 + k * gap
        ids[:, start:start + n + 1] = image_id
        ids[:, start + n + 1] = image_id + 1  # </image>
        mask[:, start + 1:start + 1 + n] = True
    assert torch.equal(mllm.placeholder_mask(ids), mask)
    labels = ids.masked_fill((ids == image_id) | (ids == image_id + 1), -100)
    labels[:, 0] = -100
    return common.to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_mask": mask,
                             "labels": labels, "pixel_values": torch.randn(batch * images, 3, size, size, generator=g),
                             "kinds": ["interleaved"] * batch}, device)


def mfu(preset: str, device: torch.device, batch: int, seq_len: int, images: int, steps: int,
        peak: float | None) -> dict:
    """Stage-1 step of the `preset` MLLM: counted FLOPs, median step time, achieved TFLOP/s and MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.flops import build_parts
    from benchmarks.stage_throughput import make_step
    from kosmos_g.config import load_config
    from kosmos_g.stages.mllm import MultimodalLMModule

    cfg = load_config(["stage=mllm", f"model={preset}", "model.vision.weights_path=null",
                       "model.llm.tokenizer_path=null", "model.diffusion_path=null"])
    mllm = build_parts(preset, device=str(device), mllm_only=True).mllm
    module = MultimodalLMModule(mllm, cfg).to(device).train()
    module.log_dict = lambda *a, **k: None
    step = make_step(module, cfg)
    data = synthetic_mllm_batch(mllm, batch, seq_len, images, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    sections = common.Sections(device)

    def run():
        with autocast:
            step(dict(data), sections)

    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
    for _ in range(2):
        run()
    times = [common.clock(run, device)[0] for _ in range(steps)]
    step_s = common.median(times)
    achieved = flops / step_s
    out = {"preset": preset, "batch": batch, "seq_len": seq_len, "images_per_seq": images, "steps": steps,
           "flops_per_step": flops, "step_s": step_s, "times_s": times, "achieved_tflops": achieved / 1e12,
           "tokens_per_s": batch * seq_len / step_s, "peak_tflops": peak,
           "mfu": achieved / (peak * 1e12) if peak else None,
           "params": sum(p.numel() for p in mllm.parameters()),
           "trainable": sum(p.numel() for p in mllm.parameters() if p.requires_grad)}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def stage3_cache(preset: str, device: torch.device, batch: int, steps: int) -> dict:
    """Stage-3 step of `preset`-size parts (random weights), live VAE encode vs cached moments, alternating.

    The tuner is the real `ScoreDistillTuner`; the batch is tiny-world subject instructions (one image each)
    with targets at the preset's VAE size. Trainable parts in fp32 under bf16 autocast on a GPU, frozen U-Net/VAE
    in bf16 (`model.diffusion_dtype=bfloat16`)."""
    import random

    from diffusers import DDPMScheduler

    from benchmarks.flops import build_parts
    from benchmarks.stage_throughput import Instrument, make_step
    from kosmos_g.config import load_config
    from kosmos_g.models.diffusion import SD15_SCHEDULER, FrozenDiffusion
    from kosmos_g.models.tokenizers import train_mllm_tokenizer
    from kosmos_g.processor import KosmosGProcessor
    from kosmos_g.stages.instruct import InstructFeatures, ScoreDistillTuner
    from kosmos_g.tinyworld import world

    cuda = device.type == "cuda"
    cfg = load_config(["stage=instruct", f"model={preset}", "model.vision.weights_path=null",
                       "model.llm.tokenizer_path=null", "model.diffusion_path=null"])
    px = 512 if preset == "paper" else 32
    samples = world.subject_samples(4 * batch, seed=0)
    tokenizer = train_mllm_tokenizer([s.text for s in samples] * 4, vocab_size=1024)
    processor = KosmosGProcessor.from_config(tokenizer, cfg.model)
    parts = build_parts(preset, device=str(device), tokenizer=tokenizer)
    dtype = torch.bfloat16 if cuda else torch.float32
    diffusion = FrozenDiffusion(parts.unet, parts.vae, DDPMScheduler(**SD15_SCHEDULER), dtype=dtype)
    module = ScoreDistillTuner(parts.mllm, processor, parts.aligner, diffusion, cfg).to(device).train()
    module.log_dict = lambda *a, **k: None
    features = InstructFeatures(processor, px, cfg.data.max_text_tokens, cfg.data.entity_drop_prob)
    rng = random.Random(0)
    data = common.to_device(features.collate([features(s, rng) for s in samples[:batch]]), device)
    with torch.no_grad():
        data["target_moments"] = diffusion.vae.encode(data["target_pixels"].to(dtype)).latent_dist.parameters.float()
    sections = common.Sections(device)
    probe = Instrument("instruct", module, sections)
    probe.batch = data
    step = make_step(module, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def run(cached: bool):
        def go():
            probe.cached = cached
            with autocast:
                step(dict(data), sections)
        return go

    times = common.interleaved({"live": run(False), "cached": run(True)}, reps=steps, warmup=2, device=device)
    clock = common.headline_clock(device)
    return {"preset": preset, "batch": batch, "target_px": px, "seq_len": int(data["input_ids"].shape[1]),
            "step_ms": {k: times.median(k, clock) * 1e3 for k in ("live", "cached")},
            "speedup": times.ratio("live", "cached", clock), **times.as_dict()}


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--smoke-cpu", action="store_true", help="run every part at tiny sizes on CPU (a code-path check)")
    p.add_argument("--skip", nargs="*", default=[], choices=("inference", "throughput", "stage3", "mfu"))
    p.add_argument("--stage3-batch", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (TFLOP/s)")
    p.add_argument("--mfu-batch", type=int, default=2)
    p.add_argument("--mfu-seq-len", type=int, default=2048)
    p.add_argument("--mfu-images", type=int, default=2, help="images per sequence (64 tokens each)")
    p.add_argument("--mfu-steps", type=int, default=10)
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        msg = "gpu_runbook: no CUDA device here (torch.cuda.is_available() is False): skipped, nothing measured."
        common.write_json("gpu_runbook", {"skipped": True, "reason": msg, "machine": common.machine()}, args.out)
        print(msg)
        print("RATIO stage-1 MFU: skipped (no GPU)")
        return 0

    smoke = args.smoke_cpu and not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    info = common.machine()
    print(f"# gpu_runbook on {info['gpu'] or 'CPU (smoke check)'}: {common.machine_line(info)}", flush=True)
    tag = "smoke" if smoke else "gpu"
    out = {"machine": info, "smoke": smoke}
    t0 = time.perf_counter()
    if "inference" not in args.skip:
        from benchmarks import inference_overhead

        presets = ["tiny", "tiny-random"] if smoke else ["tiny", "paper"]
        extra = ["--reps", "2", "--steps", "3"] if smoke else []
        out["inference"] = {}
        for preset in presets:
            print(f"\n## 1. inference_overhead --preset {preset} --device {device.type}", flush=True)
            res = inference_overhead.main(["--device", device.type, "--preset", preset, *extra,
                                           "--out", str(common.RESULTS / f"{tag}_inference_overhead_{preset}.json")])
            out["inference"][preset] = {str(n): r.ratio("kosmos_g", "sd", common.headline_clock(device))
                                        for n, r in res.items() if n != "condition"}
    if "throughput" not in args.skip:
        from benchmarks import stage_throughput

        print(f"\n## 2. stage_throughput --device {device.type}", flush=True)
        res = stage_throughput.main(["--device", device.type, *(["--steps", "3"] if smoke else []),
                                     "--out", str(common.RESULTS / f"{tag}_stage_throughput.json")])
        clock = common.headline_clock(device)
        out["throughput"] = {st: {v: s["samples_per_s"] for v, s in r["summary"][clock].items()} for st, r in res.items()}
    if "stage3" not in args.skip:
        preset = "tiny" if smoke else "paper"
        print(f"\n## 2b. stage-3 step at {preset} size: live VAE encode vs cached latents", flush=True)
        r = out["stage3_cache"] = stage3_cache(preset, device, args.stage3_batch, 3 if smoke else 10)
        print(common.table(["preset", "batch", "target px", "live ms", "cached ms", "speed-up"],
                           [[preset, r["batch"], r["target_px"], r["step_ms"]["live"], r["step_ms"]["cached"],
                             r["speedup"]]]))
    if "mfu" not in args.skip:
        preset = "tiny" if smoke else "paper"
        peak = args.peak_tflops or (peak_tflops(info["gpu"]) if info["gpu"] else None)
        seq_len = 64 if smoke else args.mfu_seq_len
        images = 1 if smoke else args.mfu_images
        print(f"\n## 3. stage-1 MFU: {preset} MLLM, batch {args.mfu_batch} x {seq_len} tokens, bf16 autocast", flush=True)
        out["mfu"] = mfu(preset, device, args.mfu_batch, seq_len, images, 3 if smoke else args.mfu_steps, peak)
    out["seconds"] = time.perf_counter() - t0
    path = common.write_json(f"{tag}_runbook", out, args.out)
    print(f"\nwrote {path}")
    if "mfu" in out:
        m = out["mfu"]
        print(common.table(["preset", "tokens/step", "TFLOP/step", "step s", "tokens/s", "achieved TFLOP/s", "peak"],
                           [[m["preset"], m["batch"] * m["seq_len"], m["flops_per_step"] / 1e12, m["step_s"],
                             m["tokens_per_s"], m["achieved_tflops"], m["peak_tflops"] or "unknown"]]))
        verdict = f"{m['mfu']:.3f}" if m["mfu"] is not None else "n/a (unknown peak: pass --peak-tflops)"
        print(f"RATIO stage-1 MFU (achieved / dense bf16 peak): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
