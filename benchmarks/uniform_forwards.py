"""What FSDP-safe stages cost: every rank runs the same sharded forwards whatever its batch holds.

    python -m benchmarks.uniform_forwards [--threads 1] [--reps 20]

Two extra pieces of work per step, both needed so that FSDP's all-gathers line up on every rank:
  instruct  the null condition M(MLLM(`<s>`)) is computed at every step, as one more row of the batch's forward,
            also when no condition is dropped. "skip" is the step without that row: what a step that drops
            nothing cost before (the old code ran a separate null pass on 57% of steps at batch 8, p = 0.1).
  mllm      an image-free batch runs the ViT + connector on one blank image (output x 0). "skip" bypasses them.
Tiny preset, interleaved steps (training_step + backward + AdamW) on the same batches; the ratio
uniform / skip is the cost (BENCHMARKS.md: <= 1.03 is the goal at the tiny preset). The mllm ratio is the
worst case, a batch without any image: with the default mixture (text : caption : interleaved = 1 : 1 : 1)
a batch of 8 has no image with probability (1/3)^8 = 0.015%, so the expected cost per step is that ratio's
excess times 0.00015.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

GOAL = 1.03


def train_step(module, opt, batch) -> None:
    module.training_step(batch, 0).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def instruct_variants(workdir: Path, reps: int):
    from kosmos_g.stages import instruct

    _, module, data = common.build_stage("instruct", workdir)
    module.cfg.stage.sample_every_n_steps = 0
    batches = common.batches(data, reps)
    opt = module.configure_optimizers()["optimizer"]
    real = instruct.condition
    cached = {}

    def condition(mllm, aligner, batch):  # "skip": the batch's rows only; the null row's condition cached
        rows = {k: v[:-1] if k in ("input_ids", "attention_mask", "image_mask") else v for k, v in batch.items()}
        if "null" not in cached:
            with torch.no_grad():
                cached["null"] = real(mllm, aligner, batch)[-1:]
        return torch.cat([real(mllm, aligner, rows), cached["null"]])

    def step(batch, skip: bool):
        instruct.condition = condition if skip else real
        try:
            train_step(module, opt, batch)
        finally:
            instruct.condition = real
    return batches, step


def mllm_variants(workdir: Path, reps: int):
    _, module, data = common.build_stage("mllm", workdir)
    data.cfg.mixture["mllm"] = {"text": 1.0}  # image-free batches: the case that now runs the blank image
    batches = common.batches(data, reps)
    opt = module.configure_optimizers()["optimizer"]
    mllm = module.mllm
    real = mllm.image_features

    def step(batch, skip: bool):
        if skip:  # bypass the ViT + connector: zeros of the connector's output shape
            n, d = mllm.config.num_image_tokens, mllm.config.hidden_size
            mllm.image_features = lambda px: torch.zeros(px.shape[0], n, d)
        try:
            train_step(module, opt, batch)
        finally:
            mllm.image_features = real
    return batches, step


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--reps", type=int, default=20, help="timed steps per variant (default 20)")
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    info = common.machine()
    clock = common.headline_clock("cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for stage, make in (("instruct", instruct_variants), ("mllm", mllm_variants)):
            batches, step = make(workdir, args.reps + 2)
            it = {"uniform": iter(batches * 2), "skip": iter(batches * 2)}
            times = common.interleaved({name: (lambda name=name: step(next(it[name]), name == "skip"))
                                        for name in ("uniform", "skip")}, reps=args.reps)
            results[stage] = {"ratio": {c: times.paired_ratio("uniform", "skip", c) for c in ("cpu", "wall")},
                              "step_ms": {n: 1000 * times.median(n, clock) for n in ("uniform", "skip")},
                              "times": times.as_dict()}
    print(f"# uniform_forwards: tiny preset, {args.reps} steps per variant, {common.machine_line(info)}")
    print(common.table(["stage", "uniform ms", "skip ms", f"uniform/skip ({clock})"], [
        [s, r["step_ms"]["uniform"], r["step_ms"]["skip"], r["ratio"][clock]] for s, r in results.items()]))
    path = common.write_json("uniform_forwards", {"machine": info, "threads": args.threads, "headline_clock": clock,
                                                  "goal": GOAL, "results": results}, args.out)
    print(f"\nwrote {path}")
    from kosmos_g.config import DEFAULT_MIXTURE

    mix, batch = DEFAULT_MIXTURE["mllm"], common.tiny_config("mllm", Path(".")).stage.batch_size
    image_free = (mix["text"] / sum(mix.values())) ** batch  # only text documents carry no image
    expected = 1 + (results["mllm"]["ratio"][clock] - 1) * image_free
    results["mllm"]["expected_ratio_default_mixture"] = expected
    met = results["instruct"]["ratio"][clock] <= GOAL and expected <= GOAL
    print(f"RATIO uniform/skip step time ({clock}): instruct {results['instruct']['ratio'][clock]:.3f}, mllm "
          f"{results['mllm']['ratio'][clock]:.3f} on an image-free batch, {expected:.4f} expected over the default "
          f"mixture (image-free batches: {image_free:.3%})  (goal <= {GOAL}: {'met' if met else 'NOT met'})")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
