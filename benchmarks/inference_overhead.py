"""Inference overhead: KosmosGPipeline vs diffusers' StableDiffusionPipeline on the same U-Net/VAE/sampler.

    python -m benchmarks.inference_overhead [--threads 1] [--batch 2] [--steps 20 50]

Both pipelines share the very same U-Net and VAE objects and run the same sampler (DPM-Solver++, the paper's,
one instance each from the same config), the same number of steps, the same batch, classifier-free guidance
6.0 and the same seeds. The only difference is the condition:

  Kosmos-G  "a <image> at the top right on a dotted background" -> MLLM (ViT + connector + decoder) -> AlignerNet M
  SD        "a green cross at the top right on a dotted background" -> CLIP text encoder (same width, 77 tokens)

and both also encode the empty negative prompt, as each pipeline does for guidance. The parts are the tiny
preset's, built as `train.py` builds them: the instruct stage's `pipeline()` over the tiny world, and SD's
text encoder + tokenizer from the same tiny SD folder (`kosmos_g.assets._write_tiny_sd`).

Timing: warm-up, then the two pipelines alternate (A B B A ...) and medians are compared. The last line is the
ratio Kosmos-G / SD per step count (goal <= 1.05). A second table times the condition alone, which is all the
difference there is.
"""

from __future__ import annotations

import sys
from pathlib import Path
import tempfile

import torch

from benchmarks import common

GOAL = 1.05


def prompts(batch: int) -> tuple[list[list], list[str]]:
    """`batch` tiny-world subject prompts: interleaved (the entity word replaced by its image) and as text."""
    from kosmos_g.data.format import Entity, SubjectImage
    from kosmos_g.tinyworld import world

    ours, theirs = [], []
    for sample in world.subject_samples(64, seed=0):
        if not any(isinstance(s, Entity) for s in sample.segments):
            continue
        ours.append([s.image if isinstance(s, SubjectImage) else s for s in sample.segments if not isinstance(s, Entity)])
        theirs.append(" ".join(sample.text.split()))
        if len(ours) == batch:
            return ours, theirs
    raise RuntimeError("the tiny world gave too few subject samples with an entity word")


def build_pipelines(workdir: Path, device: torch.device):
    """(KosmosGPipeline, StableDiffusionPipeline) over the same tiny-preset U-Net, VAE and sampler config."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from kosmos_g.assets import load_text_encoder
    from kosmos_g.run import RunPaths

    cfg, module, _ = common.build_stage("instruct", workdir)
    module.eval()
    ours = module.pipeline().use_scheduler("dpm++").to(device)
    text_encoder, tokenizer = load_text_encoder(RunPaths.create(cfg.runs_dir, cfg.run_name, "instruct").assets / "sd")
    theirs = StableDiffusionPipeline(
        vae=ours.vae, text_encoder=text_encoder.to(device).eval(), tokenizer=tokenizer, unet=ours.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(ours.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    if text_encoder.config.hidden_size != ours.unet.config.cross_attention_dim:
        raise RuntimeError("the SD text encoder's width differs from the U-Net's cross-attention width")
    return ours, theirs


def build_random_pipelines(preset: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The same pair from randomly initialised parts of `preset` built on `device` (no weights, no world):
    the paper preset's SD v1.5 U-Net/VAE/CLIP-L text encoder and 1.3B MLLM + AlignerNet, for a GPU run."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from benchmarks.flops import build_parts
    from kosmos_g.models.diffusion import SD15_SCHEDULER
    from kosmos_g.models.tokenizers import train_clip_tokenizer, train_mllm_tokenizer
    from kosmos_g.pipeline import KosmosGPipeline
    from kosmos_g.processor import KosmosGProcessor

    texts = prompts(8)[1] * 8  # enough for the tiny tokenizers; the vocabulary size barely matters for timing
    tokenizer = train_mllm_tokenizer(texts, vocab_size=1024)
    clip_tokenizer = train_clip_tokenizer(texts, vocab_size=1024)
    parts = build_parts(preset, device=str(device), dtype=dtype, tokenizer=tokenizer, clip_tokenizer=clip_tokenizer)
    clip_tokenizer.model_max_length = parts.cfg.clip_max_tokens
    scheduler = DPMSolverMultistepScheduler.from_config(DDPMScheduler(**SD15_SCHEDULER).config,
                                                        algorithm_type="dpmsolver++")
    ours = KosmosGPipeline(mllm=parts.mllm, processor=KosmosGProcessor.from_config(tokenizer, parts.cfg),
                           aligner=parts.aligner, unet=parts.unet, vae=parts.vae, scheduler=scheduler)
    theirs = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=clip_tokenizer, unet=parts.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def measure(ours, theirs, our_prompts, their_prompts, steps: list[int], reps: dict[int, int], device,
            guidance: float = 6.0) -> dict:
    def gen(seed):
        return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(our_prompts))]

    # The condition alone, the only work the pipelines do differently: the prompt plus the empty negative
    # (encode_prompt), and the empty negative by itself (the same for every call: a candidate for caching).
    cond = common.interleaved({
        "kosmos_g": lambda: ours.encode_prompt(our_prompts, do_classifier_free_guidance=True, device=device),
        "sd": lambda: theirs.encode_prompt(their_prompts, device, 1, True),
        "kosmos_g_negative": lambda: ours._condition([[""]], device),
        "sd_negative": lambda: theirs.encode_prompt([""], device, 1, False),
    }, reps=30, warmup=3, device=device)
    results = {"condition": cond}
    for n in steps:
        results[n] = common.interleaved({
            "kosmos_g": lambda: ours(our_prompts, num_inference_steps=n, guidance_scale=guidance, output_type="np",
                                     generator=gen(0)),
            "sd": lambda: theirs(their_prompts, num_inference_steps=n, guidance_scale=guidance, output_type="np",
                                 generator=gen(0)),
        }, reps=reps[n], warmup=2, device=device)
    return results


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=2, help="prompts per call (default 2)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--reps", type=int, default=None, help="timed calls per pipeline (default 21 at <=20 steps, 11 above)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=("tiny", "paper", "tiny-random"), default="tiny",
                   help="tiny: the tiny preset's stage-built parts; paper: random paper-size parts (GPU); "
                        "tiny-random: the paper path at tiny sizes (a CPU check of that path)")
    p.add_argument("--dtype", default=None, help="weights dtype for paper/tiny-random (default float16 on GPU)")
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    device = torch.device(args.device)
    if args.preset == "paper" and device.type != "cuda":
        raise SystemExit("--preset paper builds SD v1.5 and a 1.3B MLLM: run it with --device cuda "
                         "(python -m benchmarks.gpu_runbook does)")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    info = common.machine()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        if args.preset == "tiny":
            ours, theirs = build_pipelines(workdir, device)
        else:
            ours, theirs = build_random_pipelines(args.preset.split("-")[0], device, dtype)
        our_prompts, their_prompts = prompts(args.batch)
        reps = {n: args.reps or (21 if n <= 20 else 11) for n in args.steps}
        res = measure(ours, theirs, our_prompts, their_prompts, args.steps, reps, device)

    clock = common.headline_clock(device)
    other = "wall" if clock == "cpu" else "cpu"
    c = res["condition"]
    print(f"# inference_overhead: {args.preset} preset, batch {args.batch}, CFG 6.0, DPM-Solver++, "
          f"{common.machine_line(info)}")
    print(f"# headline clock: {clock} time (see BENCHMARKS.md); medians")
    print("\ncondition only, median of 30 (ms):")
    print(common.table(["pipeline", "prompt + empty negative (cpu)", "(wall)", "empty negative alone (cpu)", "(wall)"], [
        ["Kosmos-G (MLLM + AlignerNet M)", c.median("kosmos_g", "cpu") * 1e3, c.median("kosmos_g") * 1e3,
         c.median("kosmos_g_negative", "cpu") * 1e3, c.median("kosmos_g_negative") * 1e3],
        ["SD (CLIP text encoder)", c.median("sd", "cpu") * 1e3, c.median("sd") * 1e3,
         c.median("sd_negative", "cpu") * 1e3, c.median("sd_negative") * 1e3]]))
    print("\nwhole call (condition + denoising + VAE decode), ms:")
    rows, ratios = [], {}
    for n in args.steps:
        t = res[n]
        ratios[n] = t.ratio("kosmos_g", "sd", clock)
        rows.append([n, len(t.wall["sd"]), t.median("kosmos_g", clock) * 1e3, t.median("sd", clock) * 1e3,
                     ratios[n], t.paired_ratio("kosmos_g", "sd", clock), t.ratio("kosmos_g", "sd", other)])
    print(common.table(["steps", "reps", f"Kosmos-G ({clock})", f"SD ({clock})", f"ratio ({clock})",
                        f"paired ratio ({clock})", f"ratio ({other})"], rows))
    met = all(r <= GOAL for r in ratios.values())
    name = "inference_overhead" + ("" if args.preset == "tiny" and device.type == "cpu" else f"_{args.preset}_{device.type}")
    path = common.write_json(name, {
        "machine": info, "threads": args.threads, "batch": args.batch, "device": str(device), "goal": GOAL,
        "preset": args.preset,
        "headline_clock": clock,
        "prompts": {"kosmos_g": [[s if isinstance(s, str) else "<image>" for s in p] for p in our_prompts],
                    "sd": their_prompts},
        "condition": {k: {"cpu_ms": c.median(k, "cpu") * 1e3, "wall_ms": c.median(k) * 1e3} for k in c.wall},
        "results": {str(n): {"ratio": ratios[n], "paired_ratio": res[n].paired_ratio("kosmos_g", "sd", clock),
                             f"ratio_{other}": res[n].ratio("kosmos_g", "sd", other),
                             "median_ms": {k: {"cpu": res[n].median(k, "cpu") * 1e3, "wall": res[n].median(k) * 1e3}
                                           for k in ("kosmos_g", "sd")},
                             **res[n].as_dict()} for n in args.steps},
        "goal_met": met,
    }, args.out)
    print(f"\nwrote {path}")
    print(f"RATIO Kosmos-G / SD ({clock} time): " + ", ".join(f"{n} steps {ratios[n]:.3f}" for n in args.steps)
          + f"  (goal <= {GOAL}: {'met' if met else 'NOT met'})")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
