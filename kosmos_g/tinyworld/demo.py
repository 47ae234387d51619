"""`make demo`: the whole Kosmos-G recipe on the tiny world, offline, on a laptop CPU.

    python -m kosmos_g.tinyworld.demo [--run-name demo] [--runs-dir runs] [--quick]

Steps (each reuses what an earlier run of the demo already finished):
  1. tiny world shards (every sample kind)
  2. stage=mllm      multimodal LM on text / captions / interleaved documents
  3. stage=align     AlignerNet onto the CLIP-text space
Prints where the TensorBoard logs and exports are, and how the losses moved.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kosmos_g.run import read_scalars
from kosmos_g.train import main as train

# Step counts sized for <= 20 minutes on 2 CPU cores; --quick is the tests' mini version.
STEPS = {"mllm": 300, "align": 300}
QUICK_STEPS = {"mllm": 8, "align": 8}


def _fall(logdir: Path, tag: str) -> str:
    values = [v for _, v in read_scalars(logdir).get(tag, [])]
    if len(values) < 2:
        return f"{tag}: not logged"
    head = sum(values[:3]) / len(values[:3])
    tail = sum(values[-3:]) / len(values[-3:])
    return f"{tag}: {head:.4f} -> {tail:.4f} ({100 * (1 - tail / head):+.0f}% fall)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="demo")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--quick", action="store_true", help="a mini run (small world, few steps) for tests")
    args = parser.parse_args(argv)
    steps = QUICK_STEPS if args.quick else STEPS
    common = [f"run_name={args.run_name}", f"runs_dir={args.runs_dir}", "model=tiny", "data=tiny",
              "trainer=cpu", "trainer.log_every_n_steps=5"]
    if args.quick:
        common += ["data.tiny_world_samples=200", "trainer.log_every_n_steps=1"]
    root = Path(args.runs_dir) / args.run_name
    timings = {}
    for stage in ("mllm", "align"):
        t0 = time.perf_counter()
        print(f"\n=== stage={stage} ({steps[stage]} steps) ===", flush=True)
        train([f"stage={stage}", f"trainer.max_steps={steps[stage]}",
               f"trainer.checkpoint_every_n_steps={max(1, steps[stage] // 2)}", *common])
        timings[stage] = time.perf_counter() - t0

    summary = {
        "mllm": _fall(root / "mllm" / "tensorboard", "train/loss"),
        "align": _fall(root / "align" / "tensorboard", "align/target_mse"),
    }
    print("\n=== demo summary ===")
    for stage, line in summary.items():
        print(f"  {stage:<6} {line}   ({timings[stage]:.0f} s)")
    print(f"  exports:     {root}/<stage>/export\n  tensorboard: tensorboard --logdir {root}")
    return summary


if __name__ == "__main__":
    main()
