"""Generate images from an interleaved prompt with a saved Kosmos-G pipeline (e.g. the stage-3 export).

    python -m kosmos_g.generate --pipeline runs/<run>/instruct/export \\
        --prompt "a <i> on the beach" --image subject.jpg --out out/ --seed 0 --num-images 4

Each `<i>` in the prompt takes the next `--image`, in order. Writes `out/000.png`, `out/001.png`, ... and
`out/grid.png`. Samples with DPM-Solver++ by default (the paper's sampler), whatever scheduler the folder saved.
Input mistakes (a missing image, more `<i>` than images, a missing or unreadable pipeline folder) exit with
status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from kosmos_g.pipeline import SCHEDULERS, KosmosGPipeline
from kosmos_g.processor import KosmosGProcessor, PromptError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """A mistake in the command line or its files; reported as one line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kosmos_g.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="folder written by KosmosGPipeline.save_pretrained "
                   "(the stage-3 export)")
    p.add_argument("--prompt", required=True, help='text with one <i> per --image, e.g. "a <i> on the beach"')
    p.add_argument("--image", action="append", default=[], help="image file for the next <i> (repeatable)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: the empty prompt, "
                   "as in training)")
    p.add_argument("--out", default="out", help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=50, help="sampling steps (default: 50, the original app's)")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (<= 1 disables)")
    p.add_argument("--num-images", type=_positive_int, default=4)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm++")
    p.add_argument("--height", type=int, default=None, help="default: the U-Net's native size")
    p.add_argument("--width", type=int, default=None, help="default: the U-Net's native size")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype (auto: float16 on GPU, float32 on CPU)")
    return p.parse_args(argv)


def load_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"image file not found: {path} (given with --image)")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"cannot read image {path}: {e}") from e
    return images


def load_pipeline(path: str, device: torch.device, dtype: torch.dtype) -> KosmosGPipeline:
    if not (Path(path) / "model_index.json").is_file():
        what = "not found" if not Path(path).exists() else "has no model_index.json"
        raise UsageError(f"pipeline folder {path} {what}; pass --pipeline a folder written by "
                         "KosmosGPipeline.save_pretrained (the stage-3 export)")
    try:
        pipe = KosmosGPipeline.from_pretrained(path, dtype=dtype)
    except Exception as e:  # any failure here means the folder is incomplete or corrupt
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UsageError(f"cannot load the pipeline from {path}: {reason}") from e
    return pipe.to(device)


def image_grid(images: list[Image.Image]) -> Image.Image:
    """The images in a near-square grid, row by row (empty cells stay white)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def run(args: argparse.Namespace) -> list[Path]:
    """Generate and write the images; returns the written paths (the grid last)."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a folder (it is created if missing)")
    images = load_images(args.image)
    KosmosGProcessor.split_prompt(args.prompt, images)  # fail on a <i>/image mismatch before loading models
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.pipeline, device, dtype).use_scheduler(args.scheduler)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 1 or value % pipe.vae_scale_factor):
            raise UsageError(f"--{name} must be a positive multiple of {pipe.vae_scale_factor} (the VAE's "
                             f"downsampling factor), got {value}")
    out = pipe(args.prompt, images=images, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
               guidance_scale=args.guidance, num_images_per_prompt=args.num_images, height=args.height,
               width=args.width, generator=torch.Generator().manual_seed(args.seed)).images  # CPU: same on any device
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(out):
        paths.append(folder / f"{i:03d}.png")
        im.save(paths[-1])
    paths.append(folder / "grid.png")
    image_grid(out).save(paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = run(args)
    except (UsageError, PromptError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths) - 1} image(s) and {paths[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
