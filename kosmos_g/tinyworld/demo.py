"""`make demo`: the whole Kosmos-G recipe in the tiny world, offline, on a laptop CPU (<= 20 minutes on 2 cores).

    python -m kosmos_g.tinyworld.demo [--run-name demo] [--runs-dir runs] [--seed 0] [--quick] [--train-teachers]

  1. world      shards of every sample kind (train split)             runs/<name>/data/
  2. teachers   tiny CLIP, VAE, text-conditioned U-Net, attribute oracle   runs/<name>/teachers/
                (copied from the shipped set, kosmos_g/tinyworld/shipped_teachers; --train-teachers trains them)
                (stand-ins for CLIP ViT-L/14 and SD v1.5, saved in their formats and loaded like them)
  3. stage=mllm  4. stage=align  5. stage=instruct                   runs/<name>/<stage>/
  6. evaluate   held-out prompts: one subject, two subjects, edits -> tables + grid
                                                                     runs/<name>/demo_results.md, demo_grid.png
  7. app examples  held-out subjects and edits for `python -m kosmos_g.app`  runs/<name>/app_examples.json
A second run reuses every finished step (shards, teachers, stage checkpoints).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from kosmos_g.config import available_cpus, load_config
from kosmos_g.models.aligner import AlignerNet
from kosmos_g.pipeline import KosmosGPipeline
from kosmos_g.stages.common import load_mllm
from kosmos_g.stages.instruct import instruction
from kosmos_g.testing import read_scalars
from kosmos_g.tinyworld.data import write_world_shards
from kosmos_g.tinyworld.evaluate import (NOVEL, STEPS, TASKS, WorldScorer, kosmos_generator, save_comparison_grid,
                                         table, teacher_generator, test_examples)
from kosmos_g.tinyworld.oracle import to_tensor
from kosmos_g.tinyworld.teachers import is_complete, teacher_settings, train_teachers
from kosmos_g.tinyworld.world import edit_examples
from kosmos_g.train import main as train

# The teachers for budget "default", seed 0, 32 px, trained once and committed (6.7 MB of safetensors) by
#   python -m kosmos_g.tinyworld.teachers --out kosmos_g/tinyworld/shipped_teachers
# They stand in for weights a real user downloads; training them was most of a cold demo.
SHIPPED_TEACHERS = Path(__file__).resolve().parent / "shipped_teachers"
TRAINED, SOURCE = "trained (ours)", "source image, unchanged (reference)"
# Per stage: steps, batch size and any other overrides; the learning rates are the tiny recipe's
# (configs/recipe/tiny/<stage>.yaml). --quick is the tests' mini version. Stage 1 runs 1,200 steps: after 600 the
# MLLM named the colour of a held-out close-up ("<img> a close-up of a ...") 100% of the time but its shape 25%
# (chance 20), after 1,200 75%. Stage 3 takes batches of 16, not the recipe's 8 (1.5x the stage's time): at 8 the
# one-subject prompts put the object where the text says 44.5% of the time (seed 0), at 16 80.5% (8 for 4,000
# steps: 79.5%; 8 without the edit samples: 82.5%): position is learnt late, and the edits slow it down.
FULL = dict(samples=3000, teachers="default", test=200, stages={
    "mllm": (1200, 32, []), "align": (1000, 16, []), "instruct": (2000, 16, [])})
QUICK = dict(samples=150, teachers="quick", test=8, stages={"mllm": (4, 4, []), "align": (4, 4, []),
                                                             "instruct": (4, 4, [])})


def _fall(logdir: Path, tag: str) -> str:
    values = [v for _, v in read_scalars(logdir).get(tag, [])]
    if len(values) < 2:
        return f"{tag}: not logged"
    head, tail = sum(values[:3]) / len(values[:3]), sum(values[-3:]) / len(values[-3:])
    return f"{tag} {head:.4f} -> {tail:.4f} ({100 * (1 - tail / head):+.0f}%)"


def vision_overrides(clip: Path) -> list[str]:
    """Start the MLLM's ViT from the teacher CLIP's image tower, as Kosmos-G starts from CLIP ViT-L/14's:
    tower sizes matching it, and its transformers checkpoint as `model.vision.weights_path`."""
    v = json.loads((clip / "config.json").read_text())["vision_config"]
    return [f"model.vision.weights_path={clip}", f"model.vision.img_size={v['image_size']}",
            f"model.vision.patch_size={v['patch_size']}", f"model.vision.hidden_size={v['hidden_size']}",
            f"model.vision.num_layers={v['num_hidden_layers']}", f"model.vision.num_heads={v['num_attention_heads']}",
            f"model.vision.ffn_dim={v['intermediate_size']}"]


def initial_pipeline(overrides: list[str], trained: KosmosGPipeline) -> KosmosGPipeline:
    """The trained pipeline's decoder with the MLLM + aligner as training initialised them (same seed)."""
    cfg = load_config(["stage=instruct", *overrides])
    L.seed_everything(cfg.seed, verbose=False)
    assets = Path(cfg.runs_dir) / cfg.run_name / "assets"
    mllm, processor, _ = load_mllm(cfg, assets, None, lambda: iter(()))  # the tokenizer is cached by now
    aligner = AlignerNet(llm_dim=mllm.config.hidden_size, clip_dim=trained.unet.config.cross_attention_dim,
                         **asdict(cfg.model.aligner))
    return KosmosGPipeline(mllm=mllm.eval(), processor=processor, aligner=aligner.eval(), unet=trained.unet,
                           vae=trained.vae, scheduler=trained.scheduler)


def save_app_examples(root: Path, n: int = 4) -> Path:
    """Held-out subject prompts and edits for the web app's examples: PNGs + app_examples.json in `root`."""
    folder = root / "app_examples"
    folder.mkdir(parents=True, exist_ok=True)
    generate, edit = [], []
    for i, example in enumerate(test_examples(n, seed=1)):
        segments = instruction(example.sample, random.Random(i), entity_drop_prob=1.0)
        images = [seg for seg in segments if not isinstance(seg, str)]
        names = [f"app_examples/subject_{i}_{k}.png" for k in range(len(images))]
        for im, name in zip(images, names):
            im.save(root / name)
        text = " ".join(seg.strip() if isinstance(seg, str) else "<i>" for seg in segments)
        generate.append({"prompt": text, "images": names})
    for i, example in enumerate(edit_examples(2, seed=1, split="test")):
        *_, source, text = example.sample.segments  # [input caption,] source image, instruction
        source.save(folder / f"edit_{i}.png")
        edit.append({"image": f"app_examples/edit_{i}.png", "instruction": text})
    path = root / "app_examples.json"  # kosmos_g.app.EXAMPLES_FILE
    path.write_text(json.dumps({"generate": generate, "edit": edit}, indent=2))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="demo")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--quick", action="store_true", help="a mini run (small world, few steps) for tests")
    parser.add_argument("--seed", type=int, default=0,
                        help="the stages' seed (initialisation, data order, noise); the world and teachers stay seed 0")
    parser.add_argument("--train-teachers", action="store_true",
                        help="train the teachers here instead of copying the shipped ones (~9 min on 2 cores; "
                             "a run folder that already holds a matching set keeps it)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the tables: {task: {pipeline: {"all": scores, "novel pairs": scores}}}."""
    args = build_parser().parse_args(argv)
    plan = QUICK if args.quick else FULL
    root = Path(args.runs_dir) / args.run_name
    # Tiny models gain little from a second thread and lose a lot when another process wants the core.
    torch.set_num_threads(1)
    timings, t_all = {}, time.perf_counter()

    def step(name, fn):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    step("world", lambda: write_world_shards(root / "data", seed=0, samples=plan["samples"], size=32))

    def teachers_step():
        out, settings = root / "teachers", teacher_settings(plan["teachers"], seed=0, size=32)
        if not args.train_teachers and is_complete(SHIPPED_TEACHERS, settings) and not is_complete(out, settings):
            shutil.rmtree(out, ignore_errors=True)  # e.g. teachers of older settings: replaced, not retrained
            shutil.copytree(SHIPPED_TEACHERS, out)  # train_teachers then finds them finished
        return train_teachers(out, seed=0, size=32, budget=plan["teachers"])

    teachers = step("teachers", teachers_step)
    # One DataLoader worker prepares the next batch on the second core (the tiny default is none): the same
    # batches in the same order (one worker reads every shard, see kosmos_g.data.datamodule), so the same losses.
    workers = 1 if available_cpus() > 1 else 0
    common = [f"run_name={args.run_name}", f"runs_dir={args.runs_dir}", "model=tiny", "data=tiny", "trainer=cpu",
              f"seed={args.seed}", f"data.num_workers={workers}",
              f"model.diffusion_path={teachers / 'sd'}",
              f"trainer.log_every_n_steps={1 if args.quick else 5}", *vision_overrides(teachers / "clip")]
    for stage, (n, batch, extra) in plan["stages"].items():
        step(f"stage={stage}", lambda: train([f"stage={stage}", f"trainer.max_steps={n}", f"stage.batch_size={batch}",
                                              *extra, f"trainer.checkpoint_every_n_steps={max(1, n // 2)}",
                                              f"stage.sample_every_n_steps={max(1, n // 4)}", *common]))

    def evaluate():
        trained = KosmosGPipeline.from_pretrained(root / "instruct" / "export")
        generators = {TRAINED: kosmos_generator(trained),
                      "initial MLLM + aligner": kosmos_generator(initial_pipeline(common, trained)),
                      "teacher U-Net + true caption (upper bound)": teacher_generator(teachers / "sd")}
        scorer = WorldScorer(teachers, root / "assets")
        tables, examples, grid = {}, {}, []
        for task in TASKS:
            examples[task] = test_examples(plan["test"], task=task)
            images = {name: gen(examples[task], 0) for name, gen in generators.items()}
            if task == "edits":   # a reference: handing back the source keeps everything and edits nothing
                images[SOURCE] = to_tensor([e.sample.segments[-2] for e in examples[task]])
            tables[task] = {name: scorer(imgs, examples[task], task) for name, imgs in images.items()}
            grid.append((examples[task], {k: v for k, v in images.items() if k != SOURCE}))
        save_comparison_grid(grid, root / "demo_grid.png")
        return tables, examples

    rows, examples = step("evaluate", evaluate)
    losses = {"mllm": _fall(root / "mllm" / "tensorboard", "train/loss"),
              "align": _fall(root / "align" / "tensorboard", "align/target_mse"),
              "instruct": _fall(root / "instruct" / "tensorboard", "train/loss")}
    total = time.perf_counter() - t_all
    notes = {"one subject": "Shape and colour must come from the subject image, position and background from the "
                            "text.",
             "two subjects": "Each object is read at its stated place: first / second = that object's shape and "
                             "colour both right there; all objects = both objects right; shape / colour: per object.",
             "edits": "edited = the edited attribute right; kept = the other three as in the source (kept <attribute>: "
                      "that one, among the edits that leave it alone). The teacher "
                      "row gets the TRUE caption of the edited scene (an upper bound; it never sees the source)."}
    report = "\n".join([
        f"# Tiny-world demo ({plan['test']} held-out prompts per table, {STEPS} DPM-Solver++ steps, guidance 4)", "",
        "Accuracies (%) by the attribute oracle; each table repeats its rows on the examples whose target shows "
        f"a novel (held-out) (shape, colour) pair (\"{NOVEL}: ...\").", "",
        *[line for task in TASKS for line in (f"## {task}", "", table(task, rows[task], examples[task]), "",
                                              notes[task], "")],
        "Losses (first -> last logged): " + "; ".join(f"{k}: {v}" for k, v in losses.items()), "",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total / 60:.1f} min", "",
        f"Grid, 4 rows per table (prompt images | trained | initial | teacher | truth): {root / 'demo_grid.png'}"])
    (root / "demo_results.md").write_text(report + "\n")
    print("\n" + report)
    save_app_examples(root)
    print(f"\nexports: {root}/<stage>/export   tensorboard: tensorboard --logdir {root}")
    app = "" if root == Path("runs/demo") else f" --pipeline {root / 'instruct' / 'export'}"
    extras = "" if importlib.util.find_spec("gradio") else "make venv (the web app's packages), then "
    print(f"try it in the browser: {extras}python -m kosmos_g.app{app}")
    return rows


if __name__ == "__main__":
    main()
