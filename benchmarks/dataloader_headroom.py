"""Data loader headroom: how much faster the DataModule makes batches than the training step eats them.

    python -m benchmarks.dataloader_headroom [--threads 1] [--workers 0 1 2] [--batches 30]

Per stage (tiny preset, tiny world):
  loader    samples/s of `DataModule.train_dataloader()` alone, with 0, 1 and 2 workers: the batches are
            drawn and dropped. The first batch (worker start-up) is timed apart and left out of the rate.
  step      samples/s the training step consumes: forward + backward + optimizer on pre-fetched batches
            (stage_throughput's step, no data wait).
  headroom  loader / step. Below 1 the GPU (here: the CPU) waits for data; the goal is >= 3x with 2 workers,
            so that a slower disk, larger images or a busy host still leave the step fed.

Then the per-sample decoding cost of each sample kind: reading it from the tar, decoding it into a `Sample`
(`shards.decode_sample`: PNG/JPEG decode, JSON), and each stage's `featurize` (tokenize, image transforms).

Rates are wall-clock (the loader's work is in other processes), so they depend on how many cores are free:
on a shared 2-core machine, 2 workers and the step compete for the same cores (the "fed by 2 workers" row
shows it). The second view does not depend on the machine's load: CPU seconds per sample of the loader
(0 workers, one process) and of the step (one thread), whose ratio is the headroom each worker gives when it
has a core of its own (inter-process transfer not included; the 1-worker row shows that on an idle machine).
Decoding costs are process CPU time too.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.stage_throughput import make_step

KIND_STAGES = {"mllm": ("text", "caption", "interleaved"), "align": ("caption",), "instruct": ("caption", "subject", "edit")}
GOAL = 3.0


def loader_rate(data, workers: int, batches: int) -> dict:
    """samples/s of the DataModule alone with `workers` DataLoader workers (first batch timed apart)."""
    data.cfg.num_workers = workers
    t0 = time.perf_counter()
    it = iter(data.train_dataloader())
    first = next(it)
    startup = time.perf_counter() - t0
    n, t1, c1 = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        n += len(next(it)["input_ids"])
    elapsed, cpu = time.perf_counter() - t1, time.process_time() - c1
    del it, first  # shuts the workers down
    # With 0 workers the process CPU time is the loader's own cost; with workers, only the main side's (receiving).
    return {"workers": workers, "samples_per_s": n / elapsed, "first_batch_s": startup, "samples": n,
            "main_cpu_us_per_sample": cpu / n * 1e6}


def step_rate(module, cfg, data, steps: int, warmup: int = 3, workers: int | None = None) -> dict:
    """samples/s of the training step: on pre-fetched batches, or (workers given) fed live by the loader."""
    module.train()
    step = make_step(module, cfg)
    sections = common.Sections()
    if workers is None:
        batches = common.batches(data, warmup + steps)
        source = iter(batches)
    else:
        data.cfg.num_workers = workers
        source = iter(data.train_dataloader())
    n = 0
    for i in range(warmup + steps):
        if i == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        batch = next(source)
        batch.pop("skipped", None)
        step(batch, sections)
        if i >= warmup:
            n += len(batch["input_ids"])
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    del source
    return {"samples_per_s": n / elapsed, "steps": steps, "main_cpu_us_per_sample": cpu / n * 1e6}


def decode_costs(cfg, featurizers: dict, collates: dict, batch_sizes: dict, n: int = 200) -> dict:
    """Per kind: mean microseconds per sample to read (tar), decode (Sample) and featurize (per stage); per
    stage: to collate its featurized samples into batches."""
    from collections import Counter

    from kosmos_g.data.shards import decode_sample, shard_urls, tar_samples

    out, features = {}, {stage: [] for stage in featurizers}
    for kind in ("text", "caption", "interleaved", "subject", "edit"):
        urls = shard_urls(str(Path(cfg.data.root) / kind))
        raws, t0 = [], time.process_time()
        for raw in tar_samples([{"url": u} for u in urls], Counter()):
            raws.append(raw)
            if len(raws) == n:
                break
        read = (time.process_time() - t0) / len(raws)
        t0 = time.process_time()
        samples = [decode_sample(raw, kind) for raw in raws]
        row = {"read_us": read * 1e6, "decode_us": (time.process_time() - t0) / len(raws) * 1e6, "samples": len(raws)}
        for stage, featurize in featurizers.items():
            if kind in KIND_STAGES[stage]:
                rng = random.Random(0)
                t0 = time.process_time()
                done = [featurize(s, rng) for s in samples]
                row[f"featurize_{stage}_us"] = (time.process_time() - t0) / len(samples) * 1e6
                features[stage] += done
        out[kind] = row
    for stage, feats in features.items():  # the kinds of a stage interleaved, as the mixture delivers them
        random.Random(0).shuffle(feats)
        b = batch_sizes[stage]
        t0 = time.process_time()
        for i in range(0, len(feats) - b + 1, b):
            collates[stage](feats[i:i + b])
        out[f"collate_{stage}"] = {"us_per_sample": (time.process_time() - t0) / (len(feats) // b * b) * 1e6}
    # The image transforms inside featurize, per image: CLIP crop for the ViT, VAE target crop (instruct).
    from kosmos_g.data.datamodule import vae_image_transform
    from kosmos_g.processor import clip_image_transform

    image = samples[0].target or samples[0].images[0]
    for name, transform in (("clip_transform", clip_image_transform(cfg.model.vision.img_size)),
                            ("vae_transform", vae_image_transform(cfg.data.vae_image_size))):
        t0 = time.process_time()
        for _ in range(n):
            transform(image)
        out[name] = {"us_per_image": (time.process_time() - t0) / n * 1e6}
    # For comparison, what the CLIP crop costs without the transform pipeline when the image already has the
    # ViT's size (the tiny world's case): array -> float tensor -> normalise.
    import numpy as np

    from kosmos_g.processor import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    t0 = time.process_time()
    for _ in range(n):
        (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    out["clip_direct"] = {"us_per_image": (time.process_time() - t0) / n * 1e6}
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=60, help="timed batches per loader setting (default 60)")
    p.add_argument("--steps", type=int, default=15, help="timed training steps per stage (default 15)")
    p.add_argument("--stages", nargs="+", default=list(common.STAGES), choices=common.STAGES)
    args = p.parse_args(argv)
    common.quiet()
    common.set_threads(args.threads)
    info = common.machine()
    results, featurizers, collates, batch_sizes = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for stage in args.stages:
            cfg, module, data = common.build_stage(stage, workdir)
            featurizers[stage], collates[stage], batch_sizes[stage] = data.featurize, data.collate, cfg.stage.batch_size
            loaders = [loader_rate(data, w, args.batches) for w in args.workers]
            step = step_rate(module, cfg, data, args.steps)
            fed = step_rate(module, cfg, data, args.steps, workers=max(args.workers))
            loader_cpu = next((x["main_cpu_us_per_sample"] for x in loaders if x["workers"] == 0), None)
            results[stage] = {"batch_size": cfg.stage.batch_size, "loader": loaders, "step": step,
                              "step_fed_by_loader": {"workers": max(args.workers), **fed},
                              "headroom": {str(x["workers"]): x["samples_per_s"] / step["samples_per_s"]
                                           for x in loaders},
                              # per worker with a core of its own: step CPU per sample / loader CPU per sample
                              "headroom_per_free_core": step["main_cpu_us_per_sample"] / loader_cpu if loader_cpu else None}
        costs = decode_costs(cfg, featurizers, collates, batch_sizes)

    w_max = str(max(args.workers))
    print(f"# dataloader_headroom: tiny preset, wall clock, {common.machine_line(info)}")
    rows = []
    for stage, r in results.items():
        for x in r["loader"]:
            rows.append([stage, f"loader, {x['workers']} worker(s)", x["samples_per_s"], x["first_batch_s"],
                         r["headroom"][str(x["workers"])]])
        rows.append([stage, "training step (pre-fetched batches)", r["step"]["samples_per_s"], "-", 1.0])
        f = r["step_fed_by_loader"]
        rows.append([stage, f"training step fed by {f['workers']} worker(s)", f["samples_per_s"], "-",
                     f["samples_per_s"] / r["step"]["samples_per_s"]])
    print(common.table(["stage", "what", "samples/s", "first batch s", "x step rate"], rows))
    print("\nCPU cost per sample, one process (us): loader = 0-worker DataModule, step = forward + backward + AdamW")
    print(common.table(["stage", "loader", "step", "headroom per free core", f"x {max(args.workers)} free cores"], [
        [stage, r["loader"][0]["main_cpu_us_per_sample"] if r["loader"][0]["workers"] == 0 else "-",
         r["step"]["main_cpu_us_per_sample"], r["headroom_per_free_core"] or "-",
         (r["headroom_per_free_core"] or 0) * max(args.workers)] for stage, r in results.items()]))
    print("\ndecoding cost per sample kind (us per sample, one process):")
    stages = [s for s in args.stages]
    print(common.table(["kind", "read (tar)", "decode (Sample)", *[f"featurize {s}" for s in stages]],
                       [[k, c["read_us"], c["decode_us"], *[c.get(f"featurize_{s}_us", "-") for s in stages]]
                        for k, c in costs.items() if "read_us" in c]))
    print("collate, us per sample: " + ", ".join(f"{s} {costs[f'collate_{s}']['us_per_sample']:.0f}" for s in stages))
    print(f"image transforms, us per image: CLIP crop {costs['clip_transform']['us_per_image']:.0f}, "
          f"VAE target crop {costs['vae_transform']['us_per_image']:.0f}; "
          f"same-size CLIP crop without the transform pipeline {costs['clip_direct']['us_per_image']:.0f}")
    worst = min(r["headroom"][w_max] for r in results.values())
    path = common.write_json("dataloader_headroom", {"machine": info, "threads": args.threads, "goal": GOAL,
                                                     "results": results, "decode_costs": costs,
                                                     "min_headroom": worst}, args.out)
    print(f"\nwrote {path}")
    cores = min((r["headroom_per_free_core"] or 0) * int(w_max) for r in results.values())
    print(f"RATIO loader/step headroom with {w_max} worker(s), measured (wall): "
          + ", ".join(f"{s} {r['headroom'][w_max]:.1f}x" for s, r in results.items())
          + f" (goal >= {GOAL}x: {'met' if worst >= GOAL else 'NOT met'}); by CPU cost on {w_max} free cores: "
          + ", ".join(f"{s} {(r['headroom_per_free_core'] or 0) * int(w_max):.1f}x" for s, r in results.items())
          + f" ({'met' if cores >= GOAL else 'NOT met'})")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
