"""The paper's two evaluation protocols, run on any pipeline with `KosmosGPipeline`'s call.

    pipe(prompt, images=[PIL, ...], negative_prompt=None, num_inference_steps=20, guidance_scale=6.0,
         num_images_per_prompt=1, generator=torch.Generator().manual_seed(s), output_type="pil").images

DreamBench (subject-driven, zero-shot): every case is one subject, one prompt ("<i> in the jungle"
with the subject's input photo as `<i>`) and N generated images, scored by
- DINO / CLIP-I: each generated image's cosine to the input photo (the original evaluation,
  kosmos-g/sample_kosmosg_dreambench.py: `dino_score.update(images, real_image)`), or, with
  `all_photos=True`, its mean cosine to *all* photos of its subject (DreamBooth's protocol),
- CLIP-T: image-text cosine against the prompt with the class noun ("a backpack in the jungle"),
all averaged over images (`kosmos_g.eval.metrics`). The "real images" upper bound
(`real_image_scores`) scores real photos the same way in place of generated images, never a photo
against itself: each other photo against the input photo, or each photo against the *other* photos.

COCO: one image per caption, FID against the captioned real images, both resized (shorter side,
bicubic) and centre-cropped to 256 px as the paper does.

The paper's sampling settings (`PAPER_DREAMBENCH`, `PAPER_COCO`) are the command's defaults.

Generation is seeded per case (`case_seed`: from --seed and the case's name, so a case gets the
same noise whichever subset runs) and, given a folder, cached there (`ImageCache`): a rerun reuses
the images it finds instead of generating them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from kosmos_g.eval.dreambench import DreamBench
from kosmos_g.eval.metrics import (CLIPIScore, CLIPTScore, ClipFeatures, DINOScore, FID, ClipLike,
                                   build_fid, load_clip)

ImageLike = Union[str, Path, Image.Image]
FID_IMAGE_SIZE = 256  # the paper's COCO FID resolution
INPUT_PHOTOS = "kosmos-g"  # DreamBench inputs: `Subject.input_photo`, the original evaluation's photos


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message (one line) says what to change."""


# ---------------------------------------------------------------------------------------------
# Generation: seeds and the on-disk image cache


def case_seed(seed: int, key: str) -> int:
    """A fixed seed per case, independent of which other cases run (and of their order).

    32 bits: torch's CPU generator (mt19937) ignores the higher bits of a seed."""
    return zlib.crc32(f"{seed}:{key}".encode("utf-8"))


@dataclass(frozen=True)
class Generation:
    """How images are sampled; stored next to cached images so a changed setting is noticed."""

    steps: int = 20
    guidance: float = 6.0
    images_per_prompt: int = 1
    seed: int = 0
    negative_prompt: Optional[str] = None
    scheduler: Optional[str] = None
    """A `KosmosGPipeline.use_scheduler` name ("dpm++", "ddim", ...); None keeps the pipeline's own."""
    height: Optional[int] = None
    """Image height in pixels; None: the U-Net's native size."""
    width: Optional[int] = None
    """Image width in pixels; None: the U-Net's native size."""

    def prepare(self, pipe) -> None:
        """Switch the sampler (pipelines with `use_scheduler`) and silence the per-call progress bar."""
        if self.scheduler is not None and hasattr(pipe, "use_scheduler"):
            pipe.use_scheduler(self.scheduler)
        if hasattr(pipe, "set_progress_bar_config"):  # the protocols draw one bar for the whole run
            pipe.set_progress_bar_config(disable=True)

    def __call__(self, pipe, prompt: str, images: Sequence[Image.Image], key: str, n: Optional[int] = None):
        n = n or self.images_per_prompt
        size = {k: v for k, v in (("height", self.height), ("width", self.width)) if v is not None}
        out = pipe(prompt, images=list(images), negative_prompt=self.negative_prompt,
                   num_inference_steps=self.steps, guidance_scale=self.guidance, num_images_per_prompt=n, **size,
                   generator=torch.Generator().manual_seed(case_seed(self.seed, key)), output_type="pil")
        result = list(getattr(out, "images", out))
        if len(result) != n or not all(isinstance(i, Image.Image) for i in result):
            raise EvaluationError(f"the pipeline returned {len(result)} {type(result[0]).__name__ if result else ''} "
                                  f"images for {prompt!r}; expected {n} PIL images (output_type='pil')")
        return [i.convert("RGB") for i in result]


# The paper's settings, as the original scripts set them (kosmos-g/sample_kosmosg_dreambench.py: "dpms",
# diffusers' DPMSolverMultistepScheduler, i.e. DPM-Solver++; sample_kosmosg_coco.py: "ddim").
PAPER_DREAMBENCH = Generation(steps=100, guidance=7.5, images_per_prompt=4, scheduler="dpm++")
PAPER_COCO = Generation(steps=250, guidance=3.0, images_per_prompt=1, scheduler="ddim")


class ImageCache:
    """Generated images under `folder` (None: nothing saved, everything generated).

    `get(names, make)` returns the images `names` (relative .png paths) from disk when all exist,
    else calls `make()` and saves what it returns. `generation.json` records the settings the
    images were made with; asking for other settings in the same folder is an error, not a mix.
    """

    SETTINGS = "generation.json"

    def __init__(self, folder: Optional[Union[str, Path]], settings: dict[str, Any]):
        self.folder = Path(folder) if folder is not None else None
        self.generated = self.reused = 0
        if self.folder is not None and not self.check(self.folder, settings):
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / self.SETTINGS).write_text(json.dumps(settings, indent=1, sort_keys=True))

    @classmethod
    def check(cls, folder: Union[str, Path], settings: dict[str, Any]) -> bool:
        """True if `folder` holds images made with `settings`, False if none; other settings: an error."""
        file = Path(folder) / cls.SETTINGS
        if not file.is_file():
            return False
        old = json.loads(file.read_text())
        # A setting absent from an older folder counts as None (its default), e.g. height/width.
        changed = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                            for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        if changed:
            raise EvaluationError(f"{folder} holds images made with other settings ({changed}); "
                                  "pass another --name or --out, or delete that folder to regenerate")
        return True

    def get(self, names: Sequence[str], make: Callable[[], list[Image.Image]],
            load: bool = True) -> list[Image.Image]:
        """The images `names`: read back (or, `load=False`, only checked) when all exist, else made."""
        paths = [self.folder / n for n in names] if self.folder is not None else None
        if paths and all(p.is_file() for p in paths):
            self.reused += len(paths)
            return [Image.open(p).convert("RGB") for p in paths] if load else []
        images = make()
        self.generated += len(images)
        for image, path in zip(images, paths or []):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)  # a run killed mid-write leaves no truncated image to "reuse"
        return images


def load_image(image: ImageLike) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


def to_tensor(image: ImageLike) -> Tensor:
    """RGB uint8 [3, H, W]."""
    return TF.pil_to_tensor(load_image(image))


# ---------------------------------------------------------------------------------------------
# DreamBench


@dataclass(frozen=True)
class SubjectCase:
    """One subject-driven prompt. DreamBench builds them with `dreambench_cases`; the tiny world's
    subject examples fit too (reference = the subject crop, real_images = the target render)."""

    subject: str
    """Groups cases for per-subject scores and names the output folder."""
    index: int
    """The prompt's position in its list (names the output files)."""
    prompt: str
    """The interleaved input, `<i>` standing for `reference`: '<i> in the jungle'."""
    text: str
    """What CLIP-T scores against: 'a backpack in the jungle'."""
    reference: ImageLike
    real_images: tuple[ImageLike, ...] = field(hash=False)
    """What DINO and CLIP-I compare every generated image with: the input photo (the original
    evaluation's default) or all photos of the subject."""
    photos: tuple[ImageLike, ...] = field(default=(), hash=False)
    """Every photo of the subject, for the real-images row (empty: `real_images`)."""

    @property
    def all_photos(self) -> tuple[ImageLike, ...]:
        return self.photos or self.real_images

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.index:02d}"


def dreambench_cases(bench: DreamBench, subjects: Optional[Sequence[str]] = None, prompts: Optional[int] = None,
                     all_photos: bool = False) -> list[SubjectCase]:
    """The benchmark's cases: every (or the named) subject x its first `prompts` (all 25) prompts, the
    subject's `input_photo` (the original evaluation's) as the input image. Generated images are scored
    against that photo (the original code), or against every photo of the subject with `all_photos`
    (DreamBooth's protocol)."""
    try:
        chosen = [bench.subject(s) for s in subjects] if subjects else bench.subjects
    except KeyError as err:
        raise EvaluationError(f"--subjects: {err.args[0]}") from None
    cases = []
    for subject in chosen:
        photos = tuple(subject.images)
        reference = subject.input_photo
        for p in bench.prompts_for(subject)[:prompts]:
            cases.append(SubjectCase(subject.name, p.index, p.kosmos_prompt, p.clip_t_text, reference,
                                     photos if all_photos else (reference,), photos))
    return cases


def dreambench_settings(generation: Generation) -> dict[str, Any]:
    """What `run_dreambench` records next to its images: the sampling settings and which input photos
    (images made from other photos in the same folder are refused, not mixed in)."""
    return {**asdict(generation), "input_photos": INPUT_PHOTOS}


@dataclass
class DreamBenchResult:
    scores: dict[str, float]
    """DINO, CLIP-I, CLIP-T (means over all generated images) and `images` (their number)."""
    per_subject: dict[str, dict[str, float]]
    generated: int = 0
    reused: int = 0


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _weighted_mean(per_subject: dict[str, dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """The mean over images of per-subject means (what one metric over every image computes)."""
    total = sum(s["images"] for s in per_subject.values())
    scores = {n: sum(s[n] * s["images"] for s in per_subject.values()) / total for n in names}
    return {**scores, "images": total}


def run_dreambench(pipe, cases: Sequence[SubjectCase], clip: ClipLike, dino: Union[str, Path, nn.Module],
                   generation: Generation = Generation(), image_dir: Optional[Union[str, Path]] = None,
                   grid_dir: Optional[Union[str, Path]] = None, device: Optional[Union[str, torch.device]] = None,
                   batch_size: int = 32, progress: bool = True) -> DreamBenchResult:
    """Generate `generation.images_per_prompt` images per case and score them (see the module doc).

    clip: a CLIPModel folder or `load_clip`'s (model, processor); dino: a file or a loaded timm ViT.
    image_dir: cache folder (`<dir>/<subject>/<index>_<k>.png`); grid_dir: one PNG per subject,
    its reference photo then the first image of each prompt.
    """
    if not cases:
        raise EvaluationError("no DreamBench cases to evaluate")
    cache = ImageCache(image_dir, dreambench_settings(generation))
    generation.prepare(pipe)
    n = generation.images_per_prompt
    by_subject: dict[str, list[tuple[SubjectCase, list]]] = defaultdict(list)
    for case in tqdm(cases, desc="dreambench: generate", unit="prompt", disable=not progress):
        names = [f"{case.key}_{k}.png" for k in range(n)]
        make = lambda c=case: generation(pipe, c.prompt, [load_image(c.reference)], c.key)  # noqa: E731
        # Kept in memory only without a cache folder (small validation sets); else read back below.
        images = cache.get(names, make, load=image_dir is None)
        by_subject[case.subject].append((case, images if image_dir is None else names))

    device = torch.device(device or "cpu")
    clip = load_clip(clip) if not isinstance(clip, tuple) else clip
    dino_m, clip_i, clip_t = DINOScore(dino).to(device), CLIPIScore(clip).to(device), CLIPTScore(clip).to(device)
    per_subject = {}
    for subject, items in tqdm(by_subject.items(), desc="dreambench: score", unit="subject", disable=not progress):
        refs = [to_tensor(p) for p in items[0][0].real_images]
        flat = [(case.text, img if image_dir is None else Path(image_dir) / img)
                for case, images in items for img in images]
        for chunk in _batches(flat, batch_size):
            gen = [to_tensor(img) for _, img in chunk]
            dino_m.update(gen, refs)
            clip_i.update(gen, refs)
            clip_t.update(gen, [text for text, _ in chunk])
        per_subject[subject] = {"DINO": dino_m.compute().item(), "CLIP-I": clip_i.compute().item(),
                                "CLIP-T": clip_t.compute().item(), "images": len(flat)}
        for m in (dino_m, clip_i, clip_t):
            m.reset()
        if grid_dir is not None:
            first = [load_image(images[0] if image_dir is None else Path(image_dir) / images[0]) for _, images in items]
            save_grid([load_image(items[0][0].reference)] + first, Path(grid_dir) / f"{subject}.png")
    scores = _weighted_mean(per_subject, ("DINO", "CLIP-I", "CLIP-T"))
    return DreamBenchResult(scores, per_subject, cache.generated, cache.reused)


def evaluate_dreambench(pipe, cases: Sequence[SubjectCase], clip: ClipLike, dino: Union[str, Path, nn.Module],
                        **kwargs) -> dict[str, float]:
    """{"DINO", "CLIP-I", "CLIP-T", "images"} for `cases` (e.g. a validation subset); kwargs as
    `run_dreambench` (generation=Generation(...), image_dir, device, progress, ...)."""
    return run_dreambench(pipe, cases, clip, dino, **kwargs).scores


def _same_image(a: ImageLike, b: ImageLike) -> bool:
    if isinstance(a, Image.Image) or isinstance(b, Image.Image):
        return a is b
    return Path(a).resolve() == Path(b).resolve()


def real_image_scores(cases: Sequence[SubjectCase], clip: ClipLike, dino: Union[str, Path, nn.Module],
                      device: Optional[Union[str, torch.device]] = None, progress: bool = True
                      ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The "real images" upper bound: DINO and CLIP-I of real photos scored as generated images are,
    never against themselves, averaged over the photos scored. Cases scored against all photos
    (DreamBooth's protocol): each photo against the other photos of its subject. Cases scored against
    the input photo: each other photo against it. Returns (scores, per-subject scores); CLIP-T has no
    real counterpart."""
    device = torch.device(device or "cpu")
    clip = load_clip(clip) if not isinstance(clip, tuple) else clip
    metrics = {"DINO": DINOScore(dino).to(device), "CLIP-I": CLIPIScore(clip).to(device)}
    subjects = {c.subject: c for c in cases}
    per_subject = {}
    for subject, case in tqdm(subjects.items(), desc="real images: score", unit="subject", disable=not progress):
        photos = list(case.all_photos)
        refs = photos if tuple(case.real_images) == tuple(photos) else list(case.real_images)
        # against[i, j]: photo i is scored against reference j (never itself; by position for all photos)
        against = (torch.ones(len(photos), len(photos), dtype=torch.bool).fill_diagonal_(False) if refs is photos
                   else torch.tensor([[not _same_image(p, r) for r in refs] for p in photos]))
        scored = against.any(1)
        if not scored.any():
            continue  # no other photo to compare with
        images = [to_tensor(p) for p in photos + ([] if refs is photos else refs)]
        row = {}
        for name, metric in metrics.items():
            with torch.no_grad():
                emb = F.normalize(metric.embed(images).double(), dim=-1)
            cos = emb[:len(photos)] @ (emb if refs is photos else emb[len(photos):]).T
            mean = (cos * against).sum(1)[scored] / against.sum(1)[scored]  # each photo's mean over its refs
            row[name] = mean.mean().item()
        per_subject[subject] = {**row, "images": int(scored.sum())}
    if not per_subject:
        raise EvaluationError("the real-images row needs subjects with at least two photos")
    return _weighted_mean(per_subject, ("DINO", "CLIP-I")), per_subject


# ---------------------------------------------------------------------------------------------
# COCO FID


@dataclass(frozen=True)
class CaptionCase:
    key: str
    """Names the generated file (the COCO image id)."""
    caption: str
    image: Path
    """The captioned real image."""


def load_coco_captions(captions: Union[str, Path], images_dir: Union[str, Path], num: int,
                       seed: int = 0) -> list[CaptionCase]:
    """`num` distinct images, drawn at random (fixed by `seed`), each with its first caption.

    `captions` is COCO's `captions_val2014.json` ({"images": [...], "annotations": [...]}) or a
    list of {"caption", "file_name"} records (file names relative to `images_dir`).
    """
    captions, images_dir = Path(captions), Path(images_dir)
    if not captions.is_file():
        raise EvaluationError(f"--captions {captions}: file not found; pass COCO's captions_val2014.json")
    if not images_dir.is_dir():
        raise EvaluationError(f"--images {images_dir}: folder not found; pass the folder of the val2014 images")
    data = json.loads(captions.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "annotations" in data:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first: dict[Any, tuple] = {}
        for ann in sorted(data["annotations"], key=lambda a: a.get("id", 0)):
            first.setdefault(ann["image_id"], (str(ann["image_id"]), ann["caption"].strip(), files[ann["image_id"]]))
        records = [first[k] for k in sorted(first)]
    elif isinstance(data, list) and all(isinstance(r, dict) and {"caption", "file_name"} <= set(r) for r in data):
        seen: dict[str, tuple] = {}
        for r in data:
            seen.setdefault(r["file_name"], (Path(r["file_name"]).stem, r["caption"].strip(), r["file_name"]))
        records = list(seen.values())
    else:
        raise EvaluationError(f"--captions {captions}: expected COCO's captions JSON (images + annotations) "
                              "or a list of {\"caption\", \"file_name\"} records")
    if num > len(records):
        raise EvaluationError(f"--num {num}: {captions} captions only {len(records)} images")
    chosen = sorted(random.Random(seed).sample(range(len(records)), num))
    cases = [CaptionCase(key, caption, images_dir / file) for key, caption, file in (records[i] for i in chosen)]
    missing = [c.image for c in cases if not c.image.is_file()]
    if missing:
        raise EvaluationError(f"--images {images_dir}: {len(missing)} captioned images are missing, "
                              f"e.g. {missing[0].name}")
    return cases


def fid_resize(image: ImageLike, size: int = FID_IMAGE_SIZE) -> Tensor:
    """uint8 [3, size, size]: the shorter side resized (bicubic, antialiased), then centre-cropped."""
    image = TF.resize(to_tensor(image), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(image, [size, size])


class ClipImageTower(nn.Module):
    """A CLIPModel's image embedding as an FID feature extractor (the tiny world's stand-in for
    Inception); `fid_from_clip` gives it the CLIP processor's size and normalisation."""

    def __init__(self, clip):
        super().__init__()
        self.clip = ClipFeatures(clip)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.clip.get_image_features(pixels)


def fid_from_clip(clip: ClipLike, **kwargs) -> FID:
    model, processor = load_clip(clip) if not isinstance(clip, tuple) else clip
    ip = processor.image_processor
    return build_fid(feature_extractor=ClipImageTower(model), image_size=ip.crop_size["height"],
                     mean=ip.image_mean, std=ip.image_std, **kwargs)


def _real_stats_key(cases: Sequence[CaptionCase], features_id: str, size: int) -> str:
    h = hashlib.sha1(f"{features_id}|{size}".encode())
    for c in cases:
        h.update(f"|{c.image.resolve()}".encode())
    return h.hexdigest()[:16]


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _fid_pass(fid: FID, images: Sequence[ImageLike], real: bool, size: int, batch_size: int, desc: str,
              progress: bool) -> None:
    """Feed `images` (resized by `fid_resize`) to `fid` in batches; decoding runs in threads."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for chunk in tqdm(list(_batches(list(images), batch_size)), desc=desc, unit="batch", disable=not progress):
            batch = torch.stack(list(pool.map(lambda image: fid_resize(image, size), chunk)))
            fid.update(batch.to(fid.device), real=real)


def coco_settings(generation: Generation) -> dict[str, Any]:
    """What `evaluate_fid` records next to its images (one image per caption)."""
    return {**asdict(generation), "images_per_prompt": 1}


def evaluate_fid(pipe, cases: Sequence[CaptionCase], fid: FID, generation: Generation = Generation(),
                 image_dir: Optional[Union[str, Path]] = None, size: int = FID_IMAGE_SIZE,
                 device: Optional[Union[str, torch.device]] = None, batch_size: int = 32,
                 real_stats_dir: Optional[Union[str, Path]] = None, features_id: str = "",
                 progress: bool = True) -> dict[str, float]:
    """Generate one image per caption and return {"FID", "images"} against the captioned real images.

    real_stats_dir: where the real images' feature sums are saved and looked up (keyed by the
    image list, `features_id` and `size`), so evaluating another pipeline skips the real pass.
    """
    if len(cases) < 2:
        raise EvaluationError("FID needs at least 2 captions (--num 2 or more)")
    cache = ImageCache(image_dir, coco_settings(generation))
    generation.prepare(pipe)
    generated = []
    for c in tqdm(cases, desc="coco: generate", unit="image", disable=not progress):
        make = lambda c=c: generation(pipe, c.caption, [], f"coco/{c.key}", n=1)  # noqa: E731
        images = cache.get([f"{c.key}.png"], make, load=image_dir is None)
        generated.append(images[0] if image_dir is None else Path(image_dir) / f"{c.key}.png")

    fid = fid.to(torch.device(device or "cpu"))
    stats = (Path(real_stats_dir) / f"fid_real_{_real_stats_key(cases, features_id, size)}.pt"
             if real_stats_dir else None)
    if stats is not None and stats.is_file():
        saved = torch.load(stats, map_location=fid.device)
        for name in REAL_STATES:
            setattr(fid, name, saved[name])
    else:
        _fid_pass(fid, [c.image for c in cases], True, size, batch_size, "coco: real features", progress)
        if stats is not None:
            stats.parent.mkdir(parents=True, exist_ok=True)
            torch.save({name: getattr(fid, name) for name in REAL_STATES}, stats)
    _fid_pass(fid, generated, False, size, batch_size, "coco: generated features", progress)
    return {"FID": fid.compute().item(), "images": len(cases), "generated": cache.generated, "reused": cache.reused}


def save_grid(images: Sequence[ImageLike], path: Union[str, Path], columns: int = 8, cell: int = 128) -> Path:
    """Images side by side (`columns` a row), each resized to `cell` px, as one PNG."""
    images = [load_image(i).resize((cell, cell), Image.BICUBIC) for i in images]
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (cell * min(columns, len(images)), cell * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * cell, (i // columns) * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
