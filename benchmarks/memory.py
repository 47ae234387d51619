"""Peak memory per stage on the tiny preset: host RSS, and CUDA memory when training on a GPU.

    python -m benchmarks.memory [--threads 1] [--steps 10] [--device cpu|cuda]

Peak RSS is a per-process high-water mark, so each stage runs in its own fresh process
(`python -m benchmarks.memory --child <stage>`): import everything, build the stage as `train.py` does, then
train `--steps` steps (stage_throughput's step: forward, backward, AdamW). A `generate` child builds the
instruct stage's pipeline and samples one batch (20 steps), and an `imports` child only imports the
libraries: the floor every process pays before any model exists.

Columns: RSS after the imports, after building (models + DataModule), after the steps, and the peak; the
parameter count and the bytes of weights + gradients + AdamW states the step keeps (what scales with the
model; activations come on top); with --device cuda, `torch.cuda.max_memory_allocated` over the steps.
The paper preset's per-GPU plan is `python -m benchmarks.memory_plan` (the scale issue's script).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common

CHILDREN = ("imports", "mllm", "align", "instruct", "generate")


def state_bytes(module) -> dict:
    """Parameters, and the bytes of weights (all), gradients and AdamW moments (trainable only)."""
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return {"params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "weights_mib": weights / 2**20, "grads_mib": grads / 2**20, "adam_mib": 2 * grads / 2**20}


def child(what: str, workdir: Path, steps: int, device: str) -> dict:
    """Runs in a fresh process; returns the measurements of one stage (or imports / generate)."""
    import lightning  # noqa: F401  (the imports every stage pays)
    import timm  # noqa: F401
    import torch

    import kosmos_g.pipeline  # noqa: F401
    from kosmos_g.stages import align, instruct, mllm  # noqa: F401

    out = {"what": what, "rss_imports_mib": common.rss_mib()}
    if what == "imports":
        out["peak_rss_mib"] = common.peak_rss_mib()
        return out
    cuda = torch.device(device).type == "cuda"
    if what == "generate":
        from benchmarks.inference_overhead import build_pipelines, prompts

        ours, _ = build_pipelines(workdir, torch.device(device))
        out["rss_built_mib"] = common.rss_mib()
        parts = [p for m in (ours.mllm, ours.aligner, ours.unet, ours.vae) for p in m.parameters()]
        out.update({"params": sum(p.numel() for p in parts),  # inference: weights only, nothing trains
                    "weights_mib": sum(p.numel() * p.element_size() for p in parts) / 2**20})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ours(prompts(2)[0], num_inference_steps=20, output_type="np", generator=torch.Generator().manual_seed(0))
    else:
        from benchmarks.stage_throughput import make_step

        cfg, module, data = common.build_stage(what, workdir)
        module.to(device).train()
        out["rss_built_mib"] = common.rss_mib()
        out.update(state_bytes(module))
        step = make_step(module, cfg)
        it = iter(data.train_dataloader())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            batch = next(it)
            batch.pop("skipped", None)
            step(common.to_device(batch, device), common.Sections())
    out["rss_after_mib"] = common.rss_mib()
    out["peak_rss_mib"] = common.peak_rss_mib()
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=CHILDREN, default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    if args.child:  # in the fresh process: one JSON line on stdout, last
        print("MEMORY " + json.dumps(child(args.child, args.workdir, args.steps, args.device)))
        return {}
    info = common.machine()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        # World, assets and the align export first, in this process: the children then only read them.
        common.build_stage("instruct", workdir)
        for what in CHILDREN:
            cmd = [sys.executable, "-m", "benchmarks.memory", "--child", what, "--workdir", str(workdir),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("MEMORY ")]
            if run.returncode or not lines:
                raise RuntimeError(f"memory child {what!r} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            results[what] = json.loads(lines[-1][len("MEMORY "):])

    base = results["imports"]["peak_rss_mib"]  # the floor: a process that only imported the libraries
    print(f"# memory: tiny preset, {args.steps} training steps per stage, {common.machine_line(info)}")
    headers = ["process", "RSS imports", "RSS built", "RSS after", "peak RSS", "peak - imports", "params",
               "trainable", "weights+grads+Adam MiB"]
    cuda = args.device.startswith("cuda")
    if cuda:
        headers.append("CUDA peak MiB")
    rows = []
    for what, r in results.items():
        states = r.get("weights_mib", 0) + r.get("grads_mib", 0) + r.get("adam_mib", 0) if "weights_mib" in r else "-"
        row = [what, r["rss_imports_mib"], r.get("rss_built_mib", "-"), r.get("rss_after_mib", "-"), r["peak_rss_mib"],
               r["peak_rss_mib"] - r["rss_imports_mib"], r.get("params", "-"), r.get("trainable", "-"), states]
        if cuda:
            row.append(r.get("cuda_peak_mib", "-"))
        rows.append(row)
    print("(MiB)")
    print(common.table(headers, rows))
    path = common.write_json("memory", {"machine": info, "threads": args.threads, "steps": args.steps,
                                        "device": args.device, "results": results}, args.out)
    print(f"\nwrote {path}")
    if (Path(__file__).parent / "memory_plan.py").is_file():
        print("paper preset per-GPU plan: python -m benchmarks.memory_plan")
    print("RATIO peak RSS / imports-only peak: " + ", ".join(
        f"{w} {results[w]['peak_rss_mib'] / base:.2f}x" for w in CHILDREN if w != "imports"))
    return results


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
    sys.exit(0)
