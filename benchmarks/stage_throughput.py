"""Training-step throughput of each stage, with a breakdown, and what the feature caches buy.

    python -m benchmarks.stage_throughput [--threads 1] [--steps 20] [--stages mllm align instruct] [--trace DIR]

Each stage is built as `train.py` builds it (tiny preset, tiny world) and trained by a bare loop that does what
Lightning's automatic optimisation does per step: `training_step`, `backward`, gradient clipping (2.0), AdamW and
LR-scheduler step, `zero_grad`. Lightning's own per-step bookkeeping (logging, callbacks) is not in it; the
tables are the model's cost. Every section is a timed `torch.profiler.record_function` range:

  data wait       next(batch) from the stage's DataModule in-process (`data.num_workers=0`, the tiny preset)
  MLLM forward    ViT + connector + decoder (stage 1: with logits; stages 2/3: `encode`, the last hidden states)
  CLIP text       the frozen CLIP text encoder making stage 2's targets  (or: cached targets)
  VAE encode      the frozen VAE encoding stage 3's target images        (or: cached latents)
  aligner         AlignerNet M (and N in stage 2)
  U-Net           the frozen U-Net's epsilon prediction (stage 3)
  backward        loss.backward(), all of it (through the U-Net into the condition in stage 3)
  optimizer       clip + AdamW + scheduler + zero_grad
  other           the rest of training_step (loss arithmetic, CFG-dropout null condition, logging dicts)

Caches (kosmos_g/data/cache.py) are built here over the same shards: VAE posterior moments for stage 3, CLIP-text
hidden states for stage 2. Their variant reads the cached value in `featurize` (as a cache-aware stage would) and
the step uses it instead of calling the frozen encoder (`latents_from_moments` draws a fresh posterior sample).
Live and cached steps alternate on the same batches. The last line is the cached/live step speed-up.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import common

GOAL_INSTRUCT_CACHE = 1.5
COLUMNS = ("data wait", "MLLM forward", "CLIP text", "cached targets", "VAE encode", "cached latents", "aligner",
           "U-Net", "backward", "optimizer")


class WithCache:
    """Wrap a stage's featurize/collate: each sample also carries its cached value as `field`."""

    def __init__(self, featurize, collate, caches: dict, field: str):
        self.featurize, self.inner_collate, self.caches, self.field = featurize, collate, caches, field

    def __call__(self, sample, rng):
        from kosmos_g.data.shards import BadSample

        features = self.featurize(sample, rng)
        value = self.caches[sample.kind].get(sample.key)
        if value is None:
            raise BadSample("not_cached", sample.key)
        features[self.field] = value
        return features

    def collate(self, features: list[dict]) -> dict:
        batch = self.inner_collate(features)
        batch[self.field] = torch.stack([f[self.field] for f in features])
        return batch


def build_caches(cfg, stage: str, workdir: Path) -> dict:
    """kind -> FeatureCache over this stage's shards: VAE moments (instruct) or CLIP-text targets (align)."""
    from kosmos_g.data.cache import ClipTextTargets, VaeMoments, open_cache, write_cache
    from kosmos_g.run import RunPaths

    sd = RunPaths.create(cfg.runs_dir, cfg.run_name, stage).assets / "sd"
    if stage == "instruct":
        compute, cache_type = VaeMoments(str(sd), cfg.data.vae_image_size), "vae-latents"
    else:
        compute, cache_type = ClipTextTargets(str(sd), cfg.model.clip_max_tokens), "clip-text"
    caches = {}
    for kind, weight in cfg.data.mixture[stage].items():
        if weight <= 0:
            continue
        out = workdir / "cache" / f"{stage}-{kind}"
        if open_cache(out) is None:
            write_cache(str(Path(cfg.data.root) / kind), kind, str(out), compute, cache_type,
                        {"model": str(sd), **compute.meta})
        caches[kind] = open_cache(out)
    return caches


class Instrument:
    """Times the parts of one stage's step as sections of `self.sections` (swapped per variant), and switches
    the frozen encoder of a cache variant for the cached value of the current batch."""

    def __init__(self, stage: str, module, sections: common.Sections):
        self.stage, self.module, self.sections = stage, module, sections
        self.cached, self.batch = False, None
        wrap = self.wrap
        if stage == "mllm":
            wrap(module.mllm, "forward", "MLLM forward")
        else:
            wrap(module.mllm, "encode", "MLLM forward")
            wrap(module.aligner, "encode", "aligner")
        if stage == "align":
            wrap(module.aligner, "reconstruct", "aligner")
            self._swap(module.text_encoder, "forward", "CLIP text", "cached targets",
                       lambda *a, **k: SimpleNamespace(last_hidden_state=self.batch["clip_target"]))
        if stage == "instruct":
            from kosmos_g.data.cache import latents_from_moments

            d = module.diffusion
            wrap(d, "predict_noise", "U-Net")
            self._swap(d, "encode_images", "VAE encode", "cached latents",
                       lambda *a, **k: latents_from_moments(self.batch["target_moments"], d.scaling_factor))

    def wrap(self, obj, attr: str, name: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.sections(name):
                return original(*args, **kwargs)

        setattr(obj, attr, timed)

    def _swap(self, obj, attr: str, live_name: str, cached_name: str, cached_fn) -> None:
        original = getattr(obj, attr)

        def either(*args, **kwargs):
            with self.sections(cached_name if self.cached else live_name):
                return (cached_fn if self.cached else original)(*args, **kwargs)

        setattr(obj, attr, either)


def make_step(module, cfg):
    """One optimisation step as Lightning's automatic optimisation does it (clip by norm, AdamW, LR schedule)."""
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    params = [p for g in opt.param_groups for p in g["params"]]
    clip = cfg.stage.optim.grad_clip

    def step(batch: dict, sections: common.Sections) -> None:
        with sections("step"):
            loss = module.training_step(batch, 0)
            with sections("backward"):
                loss.backward()
            with sections("optimizer"):
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
    return step


def run_stage(stage: str, workdir: Path, steps: int, warmup: int, trace: Path | None, device=None) -> dict:
    device = torch.device(device or "cpu")
    cfg, module, data = common.build_stage(stage, workdir)
    variants = {"live": False}
    if stage in ("align", "instruct"):
        caches = build_caches(cfg, stage, workdir)
        wrapped = WithCache(data.featurize, data.collate, caches,
                            "target_moments" if stage == "instruct" else "clip_target")
        data.featurize, data.collate = wrapped, wrapped.collate
        variants["cached"] = True
    module.to(device).train()
    record = {name: common.Sections(device) for name in variants}
    probe = Instrument(stage, module, record["live"])
    step = make_step(module, cfg)
    it = iter(data.train_dataloader())
    data_wait = common.Sections(device)
    per_step = {name: common.Timings(["step"]) for name in variants}
    samples = tokens = 0
    shapes = {"padded_len": 0.0, "images": 0.0}  # mean per batch (the FLOP count's tiny shapes come from these)
    for i in range(warmup + steps):
        timed = i >= warmup
        with data_wait("data wait"):
            batch = next(it)
        batch.pop("skipped", None)
        if not timed:
            data_wait.reset()
        batch = common.to_device(batch, device)
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]
        for name in order:
            probe.cached, probe.batch = variants[name], batch
            if not timed:  # warm-up: timed into a throw-away record
                probe.sections = common.Sections(device)
                step(batch, probe.sections)
                continue
            probe.sections = record[name]
            before = dict(record[name].totals), dict(record[name].cpu)
            step(batch, record[name])
            per_step[name].add("step", record[name].totals["step"] - before[0].get("step", 0.0),
                               record[name].cpu["step"] - before[1].get("step", 0.0))
        if timed:
            samples += len(batch["input_ids"])
            tokens += int(batch["attention_mask"].sum())
            shapes["padded_len"] += batch["input_ids"].shape[1] / steps
            shapes["images"] += batch["pixel_values"].shape[0] / steps

    # Always: the top ops of 3 live steps (into the JSON); the chrome trace itself only with --trace.
    profile = profile_steps(stage, step, it, probe, common.Sections(device), trace, device)
    return {"cfg": cfg, "record": record, "data_wait": data_wait, "per_step": per_step, "samples": samples,
            "shapes": shapes,
            "tokens": tokens, "steps": steps, "batch_size": cfg.stage.batch_size, "profile": profile}


def profile_steps(stage, step, it, probe, sections, trace: Path | None, device, n: int = 3) -> list:
    """torch.profiler over `n` live steps: the top ops by self CPU time (and a chrome trace into `trace`)."""
    from torch.profiler import ProfilerActivity, profile

    probe.cached, probe.sections = False, sections
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            batch = next(it)
            batch.pop("skipped", None)
            batch = common.to_device(batch, device)
            probe.batch = batch
            step(batch, sections)
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"{stage}.json"))
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n, "calls": e.count} for e in rows]


def short(op: str) -> str:
    """A profiler op name, short enough for a table."""
    if "DataLoader" in op:
        return "DataLoader.__next__"
    op = op.replace("aten::", "").replace("_scaled_dot_product_flash_attention_for_cpu", "sdpa")
    return op.split("#")[-1]


def summarise(res: dict, clock: str) -> dict:
    """Per variant: rates, step time and the per-section milliseconds per step on `clock`."""
    steps, out = res["steps"], {}
    wait = res["data_wait"].get(clock).get("data wait", 0.0) / steps
    for name, rec in res["record"].items():
        totals = rec.get(clock)
        step_s = common.median(getattr(res["per_step"][name], clock)["step"])
        mean_step = totals["step"] / steps
        parts = {k: totals.get(k, 0.0) / steps for k in COLUMNS if k != "data wait" and k in totals}
        parts["other"] = mean_step - sum(parts.values())
        out[name] = {"step_ms_median": step_s * 1e3, "step_ms_mean": mean_step * 1e3, "data_wait_ms": wait * 1e3,
                     "samples_per_s": res["batch_size"] / step_s, "tokens_per_s": res["tokens"] / steps / step_s,
                     "samples_per_s_with_data_wait": res["batch_size"] / (step_s + wait),
                     "breakdown_ms": {k: v * 1e3 for k, v in parts.items()}}
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=20, help="timed steps per stage and variant (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stages", nargs="+", default=list(common.STAGES), choices=common.STAGES)
    p.add_argument("--trace", type=Path, default=None, help="write the profiled steps' chrome traces into this folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run book passes cuda)")
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    info = common.machine()
    clock = common.headline_clock(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for stage in args.stages:
            res = run_stage(stage, workdir, args.steps, args.warmup, args.trace, args.device)
            results[stage] = {"summary": {c: summarise(res, c) for c in ("cpu", "wall")},
                              "batch_size": res["batch_size"], "steps": res["steps"], "profile": res["profile"],
                              "mean_batch_shapes": res["shapes"],
                              "step_s": {n: t.as_dict() for n, t in res["per_step"].items()}}

    print(f"# stage_throughput: tiny preset, {args.steps} steps per stage and variant, {common.machine_line(info)}")
    print(f"# clock: {clock} time (see BENCHMARKS.md); step = median, sections = mean ms per step")
    rows = []
    for stage, r in results.items():
        for name, s in r["summary"][clock].items():
            b = s["breakdown_ms"]
            rows.append([stage, name, r["batch_size"], s["samples_per_s"], s["tokens_per_s"], s["step_ms_median"],
                         s["data_wait_ms"], *[b.get(c, "") if c in b else "-" for c in COLUMNS[1:]], b["other"]])
    print(common.table(["stage", "variant", "batch", "samples/s", "tokens/s", "step ms", "data wait ms",
                        *COLUMNS[1:], "other"], rows))
    print("\ntorch.profiler, 3 live steps: top ops by self CPU time (ms per step; a section name = Python time in it)")
    print(common.table(["stage", "top ops"], [
        [stage, ", ".join(f"{short(o['op'])} {o['self_cpu_ms_per_step']:.1f}" for o in r["profile"][:6])]
        for stage, r in results.items()]))
    speedups = {}
    for stage in ("align", "instruct"):
        if stage in results:
            sm = results[stage]["summary"]
            speedups[stage] = {c: sm[c]["live"]["step_ms_median"] / sm[c]["cached"]["step_ms_median"]
                               for c in ("cpu", "wall")}
    path = common.write_json("stage_throughput", {
        "machine": info, "threads": args.threads, "headline_clock": clock, "results": results,
        "cache_speedup": speedups, "goal_instruct_cache": GOAL_INSTRUCT_CACHE}, args.out)
    print(f"\nwrote {path}")
    if speedups:
        other = "wall" if clock == "cpu" else "cpu"
        parts = [f"{st} {sp[clock]:.2f}x ({other} {sp[other]:.2f}x)" for st, sp in speedups.items()]
        verdict = ""
        if "instruct" in speedups:
            met = speedups["instruct"][clock] >= GOAL_INSTRUCT_CACHE
            verdict = f"  (instruct goal >= {GOAL_INSTRUCT_CACHE}x: {'met' if met else 'NOT met'})"
        print(f"RATIO cached/live step speed-up ({clock} time): " + ", ".join(parts) + verdict)
    else:
        s = results[args.stages[0]]["summary"][clock]["live"]
        print(f"RATIO {args.stages[0]} samples/s: {s['samples_per_s']:.1f}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
