"""Evaluate exported pipelines as the paper does: DreamBench (DINO, CLIP-I, CLIP-T) and COCO FID.

    python -m kosmos_g.evaluate dreambench --pipeline runs/tiny/instruct/export --data ../shared/dreambench \\
        --out eval/ --clip weights/clip-vit-base-patch32 --dino weights/dino_deitsmall16_pretrain.pth
    python -m kosmos_g.evaluate coco --pipeline runs/tiny/instruct/export --captions captions_val2014.json \\
        --images val2014/ --num 30000 --inception weights/ --out eval/

Each run adds (or, for the same --name, replaces) one row of `<out>/dreambench.csv|md` or
`<out>/coco.csv|md`, so running again with another --pipeline and the same --out builds the
paper's comparison table. Also written: per-subject scores (`dreambench_subjects.csv`), the
generated images (`images/<name>/`, reused by a rerun instead of regenerated), grids
(`grids/<name>/`) and TensorBoard scalars (`tensorboard/<name>/`). The protocols themselves are
in `kosmos_g.eval.protocols`; weights come only from the local paths given (nothing is downloaded).

The defaults are the paper's settings (the original scripts sample_kosmosg_dreambench.py and
sample_kosmosg_coco.py): DreamBench 4 images per prompt, DPM-Solver++ 100 steps, guidance 7.5, DINO
and CLIP-I against each subject's input photo (`--all-photos`: against all its photos, DreamBooth's
protocol); COCO 30k captions, DDIM 250 steps, guidance 3, FID at 256 px. Each table's header says
which sampler settings and which protocol its rows used.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / diffusers are imported: never download

import torch  # noqa: E402

from kosmos_g.eval import report  # noqa: E402
from kosmos_g.eval.dreambench import PROMPTS_FILE, DreamBenchError, load_dreambench  # noqa: E402
from kosmos_g.eval.metrics import DINO_MODEL_NAME, TINY_DINO_KWARGS, build_fid, load_clip, load_dino  # noqa: E402
from kosmos_g.eval.protocols import (FID_IMAGE_SIZE, PAPER_COCO, PAPER_DREAMBENCH, EvaluationError,  # noqa: E402
                                     Generation, ImageCache, coco_settings, dreambench_cases, dreambench_settings,
                                     evaluate_fid, fid_from_clip, load_coco_captions, real_image_scores,
                                     run_dreambench, save_grid)

REAL_ROW = "real images"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What DINO / CLIP-I compare each generated image with (the table's `against` column).
AGAINST = {
    "input photo": "the input photo of its subject (the original Kosmos-G evaluation, sample_kosmosg_dreambench.py)",
    "all photos": "every photo of its subject, averaged (DreamBooth's protocol, `--all-photos`)",
}
DREAMBENCH_NOTE = (
    "CLIP-T: image-text cosine against the prompt with the class noun (\"a backpack in the jungle\"); all "
    "scores averaged over images. *real images*: real photos scored as the generated images are, never against "
    "themselves: each other photo against the input photo, or (all photos) each photo against the other photos "
    "of its subject, DreamBooth's upper bound, the protocol of the paper's real-images row (0.774 / 0.885).")


# ---------------------------------------------------------------------------------------------
# Arguments and the checks that turn a wrong path into one clear line


def _existing(path: str, flag: str, kind: str, what: str, inside: Optional[str] = None) -> Path:
    p = Path(path).expanduser()
    ok = (p / inside).is_file() if inside else (p.is_file() if kind == "file" else p.is_dir())
    if not ok:
        missing = f"no {inside} in {p}" if inside and p.is_dir() else f"{kind} {p} not found"
        raise EvaluationError(f"{flag} {path}: {missing}; pass {what} (nothing is downloaded)")
    return p


def clip_folder(path: str, flag: str = "--clip") -> Path:
    return _existing(path, flag, "folder", "a local transformers CLIPModel folder (config.json, weights, "
                     "tokenizer and preprocessor files; the paper: openai/clip-vit-base-patch32 saved with "
                     "save_pretrained)", inside="config.json")


def dino_file(path: str, flag: str = "--dino") -> Path:
    return _existing(path, flag, "file", "the DINO ViT-S/16 weight file (dino_deitsmall16_pretrain.pth or "
                     "timm's model.safetensors)")


def inception_file(path: str) -> Path:
    """--inception: the weight file itself, or a folder holding torch-fidelity's file."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = [p / INCEPTION_FILE] if (p / INCEPTION_FILE).is_file() else sorted(p.glob("*inception*.pth"))
        if len(candidates) == 1:
            return candidates[0]
        raise EvaluationError(f"--inception {path}: no {INCEPTION_FILE} in that folder; pass the FID Inception "
                              "weight file or its folder (nothing is downloaded)")
    return _existing(path, "--inception", "file", f"the FID Inception weights ({INCEPTION_FILE}) or their folder")


def pipeline_folder(path: str) -> Path:
    return _existing(path, "--pipeline", "folder", "a folder written by KosmosGPipeline.save_pretrained "
                     "(a stage-3 export)", inside="model_index.json")


def default_name(pipeline: str) -> str:
    """The table row's name: the export's folder name, or `<run>/<stage>` for runs/<run>/<stage>/export."""
    p = Path(pipeline).expanduser().resolve()
    return f"{p.parent.parent.name}/{p.parent.name}" if p.name == "export" else p.name


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "pipeline"


def load_pipeline(path: str, device: str, dtype: str):
    """`KosmosGPipeline.from_pretrained(path)` on `device` (tests replace this with a stand-in)."""
    folder = pipeline_folder(path)
    from kosmos_g.pipeline import KosmosGPipeline  # the heavy import only once arguments are checked

    kwargs = {} if dtype == "float32" else {"torch_dtype": DTYPES[dtype]}
    return KosmosGPipeline.from_pretrained(folder, **kwargs).to(device)


def _dino(path: Path, args):
    return load_dino(path, args.dino_model, **(TINY_DINO_KWARGS if args.tiny_dino else {}))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common(parser: argparse.ArgumentParser, paper: Generation) -> None:
    """Flags both commands share; the sampler defaults are the paper's for the benchmark (`paper`)."""
    parser.add_argument("--pipeline", required=True, help="exported pipeline folder (model_index.json)")
    parser.add_argument("--name", help="row name in the tables (default: <run>/<stage> of an export folder)")
    parser.add_argument("--out", required=True, help="output folder; shared by runs to build one table")
    parser.add_argument("--steps", type=positive, default=paper.steps,
                        help=f"sampling steps (default {paper.steps}, the paper's)")
    parser.add_argument("--guidance", type=float, default=paper.guidance,
                        help=f"classifier-free guidance scale (default {paper.guidance:g}, the paper's)")
    parser.add_argument("--scheduler", default=paper.scheduler,
                        help=f"sampler, a KosmosGPipeline.use_scheduler name (dpm++, ddim, ...; default "
                        f"{paper.scheduler}, the paper's); 'keep': the one saved in the export")
    parser.add_argument("--height", type=positive, default=None, help="image height (default: the U-Net's native size)")
    parser.add_argument("--width", type=positive, default=None, help="image width (default: the U-Net's native size)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; every case gets a fixed seed from it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="pipeline dtype (metrics run in fp32)")
    parser.add_argument("--batch-size", type=positive, default=32, help="images per metric forward pass")
    parser.add_argument("--dino-model", default=DINO_MODEL_NAME, help="timm architecture of the DINO weights")
    parser.add_argument("--tiny-dino", action="store_true",
                        help="the DINO file is a tiny stand-in written by metrics.save_tiny_dino")
    parser.add_argument("--step", type=int, default=0, help="TensorBoard step of the scalars (e.g. training step)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kosmos_g.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="protocol", required=True)
    db = sub.add_parser("dreambench", help="DINO, CLIP-I, CLIP-T on DreamBench (30 subjects x 25 prompts)")
    _common(db, PAPER_DREAMBENCH)
    db.add_argument("--data", required=True, help=f"DreamBench folder (subject folders + {PROMPTS_FILE})")
    db.add_argument("--subjects", help="comma-separated subset of subjects (default: all 30)")
    db.add_argument("--prompts", type=positive, help="first N prompts per subject (default: all 25)")
    db.add_argument("--images-per-prompt", type=positive, default=PAPER_DREAMBENCH.images_per_prompt,
                    help=f"images per prompt (default {PAPER_DREAMBENCH.images_per_prompt}, the paper's)")
    db.add_argument("--all-photos", action="store_true",
                    help="score DINO / CLIP-I against all photos of each subject (DreamBooth's protocol) instead "
                    "of its input photo (the original Kosmos-G evaluation)")
    db.add_argument("--clip", required=True, help="local CLIPModel folder (CLIP-I, CLIP-T; paper: ViT-B/32)")
    db.add_argument("--dino", required=True, help="local DINO ViT-S/16 weight file")
    db.add_argument("--no-real", action="store_true", help="skip the 'real images' upper-bound row")

    coco = sub.add_parser("coco", help="FID of images generated from COCO captions")
    _common(coco, PAPER_COCO)
    coco.add_argument("--captions", required=True, help="captions_val2014.json (or a list of {caption, file_name})")
    coco.add_argument("--images", required=True, help="folder of the captioned real images (val2014/)")
    coco.add_argument("--num", type=positive, default=30000, help="number of captions / images (30000 in the paper)")
    coco.add_argument("--size", type=positive, default=FID_IMAGE_SIZE, help="resolution both sets are resized to")
    features = coco.add_mutually_exclusive_group(required=True)
    features.add_argument("--inception", help=f"FID Inception weights ({INCEPTION_FILE}) or their folder")
    features.add_argument("--fid-features", help="FID on another extractor's features (tiny world): a CLIPModel "
                          "folder (its image tower) or a DINO file; values are not comparable to the paper's")
    return parser


# ---------------------------------------------------------------------------------------------
# The two commands


def _generation(args, images_per_prompt: int = 1) -> Generation:
    return Generation(steps=args.steps, guidance=args.guidance, images_per_prompt=images_per_prompt,
                      seed=args.seed, negative_prompt=args.negative_prompt,
                      scheduler=None if args.scheduler == "keep" else args.scheduler, height=args.height,
                      width=args.width)


def _settings(args, gen: Generation) -> dict:
    return {"pipeline": str(args.pipeline), "scheduler": gen.scheduler or "saved", "steps": gen.steps,
            "guidance": gen.guidance, "seed": gen.seed}


def run_dreambench_command(args) -> dict:
    clip_path, dino_path = clip_folder(args.clip), dino_file(args.dino)
    _existing(args.data, "--data", "folder", f"the DreamBench folder (subject folders and {PROMPTS_FILE})",
              inside=PROMPTS_FILE)
    bench = load_dreambench(args.data)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    cases = dreambench_cases(bench, subjects, args.prompts, all_photos=args.all_photos)
    against = "all photos" if args.all_photos else "input photo"
    name = args.name or default_name(args.pipeline)
    out, key = Path(args.out), slug(name)
    gen = _generation(args, args.images_per_prompt)
    image_dir = out / "images" / key / "dreambench"
    ImageCache.check(image_dir, dreambench_settings(gen))  # before loading anything: images of other settings?
    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    clip, dino = load_clip(clip_path), _dino(dino_path, args)

    result = run_dreambench(pipe, cases, clip, dino, gen, image_dir=image_dir,
                            grid_dir=out / "grids" / key / "dreambench", device=args.device,
                            batch_size=args.batch_size, progress=not args.quiet)
    n_subjects = len(result.per_subject)
    prompts = len(cases) // max(n_subjects, 1)
    rows, subject_rows = [], []
    if not args.no_real:
        real, real_subjects = real_image_scores(cases, clip, dino, args.device, progress=not args.quiet)
        rows.append({"name": REAL_ROW, "DINO": real["DINO"], "CLIP-I": real["CLIP-I"], "CLIP-T": None,
                     "against": against, "images": real["images"], "subjects": len(real_subjects)})
        subject_rows += [{"name": REAL_ROW, "subject": s, **v} for s, v in real_subjects.items()]
        report.log_scalars(out / "tensorboard" / slug(REAL_ROW),
                           {"dreambench/DINO": real["DINO"], "dreambench/CLIP-I": real["CLIP-I"]}, args.step)
    rows.append({"name": name, **{k: result.scores[k] for k in ("DINO", "CLIP-I", "CLIP-T")}, "against": against,
                 "images": result.scores["images"],
                 "subjects": n_subjects, "prompts": prompts, "images_per_prompt": gen.images_per_prompt,
                 **_settings(args, gen)})
    subject_rows += [{"name": name, "subject": s, **v} for s, v in result.per_subject.items()]

    table = report.upsert_rows(out / "dreambench.csv", rows)
    report.upsert_rows(out / "dreambench_subjects.csv", subject_rows, key=("name", "subject"))
    table = sorted(table, key=lambda r: r["name"] != REAL_ROW)  # the upper bound first, as in the paper
    for r in table:  # rows written before the column existed were all scored against all photos
        r["against"] = r.get("against") or "all photos"
    columns = ["name", "DINO", "CLIP-I", "CLIP-T", "against", "images", "subjects", "prompts", "images_per_prompt",
               "scheduler", "steps", "guidance", "seed"]
    md = report.markdown_table(table, columns, ["method"] + columns[1:])
    header = dreambench_header(table)
    report.write_markdown(out / "dreambench.md", "DreamBench (zero-shot subject-driven generation)", md,
                          [DREAMBENCH_NOTE], header=header)
    report.log_scalars(out / "tensorboard" / key, {f"dreambench/{k}": result.scores[k]
                                                   for k in ("DINO", "CLIP-I", "CLIP-T")}, args.step)
    print("\n".join(header + [md]))
    print(f"{result.generated} images generated, {result.reused} reused; tables in {out}")
    return {**result.scores, "generated": result.generated, "reused": result.reused}


def _described(settings: tuple) -> str:
    scheduler, steps, guidance, *per_prompt = settings
    return f"{scheduler}, {steps} steps, guidance {guidance}" + (f", {per_prompt[0]} images per prompt"
                                                                  if per_prompt else "")


def sampling_header(table: list[dict], paper: Generation, per_prompt: bool = False) -> str:
    """One line saying how the table's images were sampled, and whether that is the paper's setting."""
    fields = ("scheduler", "steps", "guidance") + (("images_per_prompt",) if per_prompt else ())
    used = sorted({tuple(r.get(f, "") for f in fields) for r in table if r.get("steps")})
    want = (paper.scheduler, str(paper.steps), f"{paper.guidance:g}") + \
        ((str(paper.images_per_prompt),) if per_prompt else ())
    if used == [want]:
        return f"Sampling: {_described(want)} (the paper's settings)."
    if len(used) == 1:
        return f"Sampling: {_described(used[0])}; the paper's: {_described(want)}."
    return f"Sampling: per row (columns {', '.join(fields)}); the paper's: {_described(want)}."


def dreambench_header(table: list[dict]) -> list[str]:
    """The protocol (what DINO / CLIP-I score against) and the sampling of the table's rows."""
    protocols = [a for a in AGAINST if any(r.get("against") == a for r in table)]
    if len(protocols) == 1:
        scored = f"DINO / CLIP-I: each generated image against {AGAINST[protocols[0]]}."
    else:
        scored = "DINO / CLIP-I: rows differ in what each generated image is scored against (column `against`): " + \
            "; ".join(f"{a}: {AGAINST[a]}" for a in protocols) + "."
    return [scored, sampling_header([r for r in table if r["name"] != REAL_ROW], PAPER_DREAMBENCH, per_prompt=True)]


def _fid(args):
    """(FID metric, an id of its feature extractor for the real-statistics cache, a table label)."""
    if args.inception:
        file = inception_file(args.inception)
        try:
            return build_fid(inception_path=file), f"inception:{file.resolve()}", "inception"
        except ImportError as err:
            raise EvaluationError(str(err)) from None
    p = Path(args.fid_features).expanduser()
    if p.is_dir():
        folder = clip_folder(args.fid_features, "--fid-features")
        return fid_from_clip(load_clip(folder)), f"clip:{folder.resolve()}", f"clip:{folder.name}"
    file = dino_file(args.fid_features, "--fid-features")
    dino = _dino(file, args)
    size = dino.patch_embed.img_size[0]
    cfg = dino.pretrained_cfg
    return (build_fid(feature_extractor=dino, image_size=size, mean=cfg["mean"], std=cfg["std"]),
            f"dino:{file.resolve()}", f"dino:{file.name}")


def run_coco_command(args) -> dict:
    fid, features_id, label = _fid(args)
    cases = load_coco_captions(args.captions, args.images, args.num, args.seed)
    name = args.name or default_name(args.pipeline)
    out, key = Path(args.out), slug(name)
    gen = _generation(args)
    image_dir = out / "images" / key / "coco"
    ImageCache.check(image_dir, coco_settings(gen))
    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    scores = evaluate_fid(pipe, cases, fid, gen, image_dir=image_dir, size=args.size, device=args.device,
                          batch_size=args.batch_size, real_stats_dir=out / "fid_real", features_id=features_id,
                          progress=not args.quiet)
    save_grid([image_dir / f"{c.key}.png" for c in cases[:16]], out / "grids" / key / "coco.png")
    row = {"name": name, "FID": scores["FID"], "images": scores["images"], "features": label, "size": args.size,
           **_settings(args, gen)}
    table = report.upsert_rows(out / "coco.csv", [row])
    columns = ["name", "FID", "images", "features", "size", "scheduler", "steps", "guidance", "seed"]
    md = report.markdown_table(table, columns, ["method"] + columns[1:], digits=2)
    report.write_markdown(out / "coco.md", "COCO FID (zero-shot text-to-image)", md, [
        f"FID between images generated from {scores['images']} captions and the captioned real images, both "
        f"resized (shorter side, bicubic) and centre-cropped to {args.size} px. Only rows with features "
        "'inception' compare with the paper."], header=[sampling_header(table, PAPER_COCO)])
    report.log_scalars(out / "tensorboard" / key, {"coco/FID": scores["FID"]}, args.step)
    print(sampling_header(table, PAPER_COCO) + "\n" + md)
    print(f"{scores['generated']} images generated, {scores['reused']} reused; tables in {out}")
    return scores


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    bars = _weight_loading_bars(enable=not args.quiet)
    try:
        (run_dreambench_command if args.protocol == "dreambench" else run_coco_command)(args)
    except (EvaluationError, DreamBenchError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    finally:
        _weight_loading_bars(bars)
    return 0


def _weight_loading_bars(enable: bool) -> bool:
    """Switch transformers' and diffusers' loading bars; returns the previous state (to restore it)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.is_progress_bar_enabled()
    for lib in (transformers_logging, diffusers_logging):
        lib.enable_progress_bar() if enable else lib.disable_progress_bar()
    return before


if __name__ == "__main__":
    sys.exit(main())
