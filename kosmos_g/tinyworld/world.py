"""Tiny world: a procedurally drawn world of coloured shapes, with ground truth for every picture.

Why it exists: SD v1.5 and CLIP cannot be downloaded here, so nothing "real" can show that the three
training stages (MLLM pre-training, alignment, instruction tuning) learn subject-driven generation.
This world can: every image is drawn from a handful of attributes in well under a millisecond, every
caption and instruction is exact, and held-out attribute combinations test generalisation. A tiny
model trained on it for minutes on a CPU should put *the subject shown in the image* (shape and
colour) where *the text* says (position and background).

The world, read top to bottom:
  1. attributes: 5 shapes, 6 saturated colours, 5 positions, 4 grey textured backgrounds;
  2. `Obj` and `Scene` (frozen dataclasses), `render(scene)` (deterministic, PIL ImageDraw, 4x
     supersampled then box-filtered), `caption(scene)` ("a red circle at the top left on a striped
     background"), `crop_object` (the subject image) and `read_scene` (an image back to its scene);
  3. splits: a fixed set of (shape, colour) and (colour, background) pairs appears only in
     `split="test"`; every single attribute value still appears in train. Only the stage-1 documents
     (`interleaved_samples`, the world's "web") show every combination;
  4. sample generators returning `kosmos_g.data.format.Sample`s of each kind. The subject, edit and
     caption generators come in two flavours: `*_examples` returns `Example(sample, target, source)`
     (the ground-truth scenes, for scoring), `*_samples` returns just the `Sample`s. Subject samples
     show one subject or, for a third of them (`two_subject_examples`), two.

Everything is deterministic given the seed; generators with the same seed draw independent streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from kosmos_g.data.format import SAMPLE_KINDS, Entity, InputCaption, Sample, SubjectImage

# ---- 1. Attributes ---------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Saturated and far apart in RGB (closest pair, blue-cyan, is ~130 apart), and far from the greys of
# the backgrounds, so the colour of a region names the object's colour.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
           "yellow": (240, 210, 40), "magenta": (210, 50, 210), "cyan": (40, 210, 220)}
# Object centres as fractions of the image side; the object's box is OBJECT_SIZE of the side.
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
OBJECT_SIZE = 0.4
CROP_MARGIN = 0.125  # subject crops keep this much of the box around the object, per side
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
# Not sampled: the background of the "subject pasted on white" image (`SubjectImage.on_white`).
WHITE = "white"
SPLITS = ("train", "test")

SUPERSAMPLE = 4   # draw at 4x and box-filter down: smooth edges, still fully deterministic
_CELLS = 8        # texture cells per image side (4 px at 32 px: visible, and finer than an object)
_LIGHT, _DARK, _MID = 185, 85, 135


@lru_cache(maxsize=32)   # a handful of (texture, size) pairs, drawn once: rendering only copies them
def _background(name: str, side: int) -> Image.Image:
    """The background texture as a side x side RGB image (greys only, unlike every object)."""
    c = (np.arange(side) + 0.5) / side * _CELLS           # pixel centres in texture-cell units
    x, y = np.meshgrid(c, c)
    if name == WHITE:
        grey = np.full((side, side), 255.0)
    elif name == "plain":
        grey = np.full((side, side), float(_MID))
    elif name == "striped":                                 # horizontal bands, one cell tall
        grey = np.where(np.floor(y) % 2 == 0, _LIGHT, _DARK)
    elif name == "checkered":
        grey = np.where((np.floor(x) + np.floor(y)) % 2 == 0, _LIGHT, _DARK)
    elif name == "dotted":                                  # a dark dot in the middle of every cell
        dist = np.hypot(x % 1 - 0.5, y % 1 - 0.5)
        grey = np.where(dist < 0.3, _DARK, _LIGHT)
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {', '.join(BACKGROUNDS)}")
    return Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2))


# ---- 2. Scenes: rendering, captions, subject crops, reading an image back --------------------

@dataclass(frozen=True)
class Obj:
    """One shape: its kind, its colour (a key of COLOURS) and where it sits (a key of POSITIONS)."""

    shape: str
    colour: str
    position: str

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

    @property
    def name(self) -> str:
        """The words naming the object ("red circle"): what the subject's `Entity` says."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A picture: 1-4 objects (one, or several at distinct corners) on a background."""

    objects: tuple[Obj, ...]
    background: str

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))   # a list would make it unhashable
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if self.background not in BACKGROUNDS + (WHITE,):
            raise ValueError(f"unknown background {self.background!r}; "
                             f"expected one of {', '.join(BACKGROUNDS)} (or {WHITE!r})")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position in {positions}; give each its own")
        if len(self.objects) > 1 and "centre" in positions:
            # A centre object overlaps every corner object; keeping them apart keeps all visible.
            raise ValueError("a scene with several objects cannot use 'centre'; use the four corners")


def object_box(position: str, side: int) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom; right/bottom exclusive) an object fills."""
    cx, cy = POSITIONS[position]
    half = OBJECT_SIZE / 2
    return (round((cx - half) * side), round((cy - half) * side),
            round((cx + half) * side), round((cy + half) * side))


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int) -> None:
    x0, y0, x1, y1 = object_box(obj.position, side)
    x1, y1 = x1 - 1, y1 - 1                                 # ImageDraw boxes are inclusive
    cx, cy, third = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 3
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif obj.shape == "cross":                              # a plus sign with arms a third as wide
        draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
        draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw `scene` as a size x size RGB image. Deterministic: same scene, same bytes."""
    if size < 8:
        raise ValueError(f"render size must be >= 8 pixels to show a shape, got {size}")
    side = size * SUPERSAMPLE
    image = _background(scene.background, side).copy()   # copy: the cached one must stay blank
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, side)
    return image.resize((size, size), Image.Resampling.BOX)


def where(position: str) -> str:
    return "in the centre" if position == "centre" else f"at the {position}"


def on(background: str) -> str:
    return f"on a {background} background"


def caption(scene: Scene) -> str:
    """"a red circle at the top left and a blue square at the bottom right on a striped background"."""
    things = " and ".join(f"a {o.name} {where(o.position)}" for o in scene.objects)
    return f"{things} {on(scene.background)}"


def crop_object(scene: Scene, index: int = 0, size: int = 32) -> Image.Image:
    """Object `index` of `scene` cut out along its box plus a margin, scaled to size x size.

    The margin (CROP_MARGIN of the box per side, as in a real subject photo) keeps a square from
    filling the whole crop. The scene is drawn large enough that the crop is sharp."""
    big = math.ceil(size * (1 + 2 * CROP_MARGIN) / OBJECT_SIZE)
    x0, y0, x1, y1 = object_box(scene.objects[index].position, big)
    pad = round((x1 - x0) * CROP_MARGIN)
    return render(scene, big).crop((x0 - pad, y0 - pad, x1 + pad, y1 + pad)).resize(
        (size, size), Image.Resampling.BOX)


@lru_cache(maxsize=4)
def _templates(size: int) -> tuple[list[Scene], np.ndarray]:
    scenes = [Scene((Obj(s, c, p),), b) for s in SHAPES for c in COLOURS for p in POSITIONS
              for b in BACKGROUNDS]
    pixels = np.stack([np.asarray(render(s, size), dtype=np.float32).ravel() for s in scenes])
    return scenes, pixels


def read_scene(image: Image.Image) -> Scene:
    """The one-object scene whose rendering is nearest to `image` (L2 over RGB pixels).

    A scorer for clean renders of one-object scenes (edit targets, one-subject targets): comparing
    `read_scene(image)` with the `Example.target` gives per-attribute accuracy. Generated images: the oracle."""
    if image.width != image.height:
        raise ValueError(f"read_scene needs a square image, got {image.width}x{image.height}")
    scenes, pixels = _templates(image.width)
    x = np.asarray(image.convert("RGB"), dtype=np.float32).ravel()
    return scenes[int(np.argmin(((pixels - x) ** 2).sum(axis=1)))]


# ---- 3. Splits: held-out combinations --------------------------------------------------------

# Fixed by hand (stable across numpy versions): each colour loses one shape (6 of 30 pairs, 20%)
# and each background loses one colour (4 of 24 pairs); every value keeps many train pairs.
HELDOUT_SHAPE_COLOUR = frozenset({("triangle", "red"), ("circle", "green"), ("square", "blue"),
                                  ("cross", "yellow"), ("diamond", "magenta"), ("triangle", "cyan")})
HELDOUT_COLOUR_BACKGROUND = frozenset({("red", "dotted"), ("green", "striped"), ("blue", "checkered"),
                                       ("yellow", "plain")})


def is_heldout(scene: Scene) -> bool:
    """True if any object of `scene` shows a held-out combination (the scene belongs to test)."""
    return any((o.shape, o.colour) in HELDOUT_SHAPE_COLOUR
               or (o.colour, scene.background) in HELDOUT_COLOUR_BACKGROUND for o in scene.objects)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    corners = [p for p in POSITIONS if p != "centre"]
    positions = [str(rng.choice(list(POSITIONS)))] if n_objects == 1 else \
        [corners[i] for i in rng.choice(len(corners), n_objects, replace=False)]
    objects = tuple(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), p) for p in positions)
    return Scene(objects, str(rng.choice(BACKGROUNDS)))


def _draw_until(draw, fits, what: str):
    """draw() until fits(result) (rejection sampling); a split that no draw can reach is an error."""
    for _ in range(10_000):   # about a third of all scenes are test scenes: this never runs out
        result = draw()
        if fits(result):
            return result
    raise RuntimeError(f"10000 random {what} and none fits the split; the held-out sets "
                       "HELDOUT_SHAPE_COLOUR / HELDOUT_COLOUR_BACKGROUND must be non-empty and partial")


def sample_scene(rng: np.random.Generator, split: str = "train", max_objects: int = 1) -> Scene:
    """A random scene of 1..max_objects objects that belongs to `split` (drawn until it does)."""
    _check_split(split)
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    return _draw_until(lambda: _random_scene(rng, int(rng.integers(1, max_objects + 1))),
                       lambda scene: is_heldout(scene) == (split == "test"), "scenes")


# ---- 4. Sample generators --------------------------------------------------------------------

@dataclass
class Example:
    """A sample with its ground truth. target: the scene the target image shows. source: edit: the
    scene before the edit; subject: the scene the subject image was cut from; caption: None."""

    sample: Sample
    target: Scene
    source: Optional[Scene] = None


def _rng(seed: int, kind: str, n: int, split: str = "train", stream: int = 0) -> np.random.Generator:
    """The generator's random stream, after checking its arguments."""
    _check_split(split)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # Mixing the kind in keeps generators that share a seed independent of each other; `stream` > 0 gives
    # a kind a second independent stream (two-subject samples) without touching the first one's draws.
    return np.random.default_rng([int(seed), SAMPLE_KINDS.index(kind)] + ([stream] if stream else []))


def _sentence(rng: np.random.Generator, scene: Scene) -> str:
    if len(scene.objects) == 2 and rng.random() < 0.5:     # teach the spatial words too
        a, b = scene.objects
        (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
        parts = ([("above" if ay < by else "below")] if ay != by else []) + \
                ([f"to the {'left' if ax < bx else 'right'} of"] if ax != bx else [])
        return f"The {a.name} is {' and '.join(parts)} the {b.name}."   # "above and to the left of"
    template = str(rng.choice(["There is {}.", "This picture shows {}.", "I drew {}.", "Look at {}."]))
    return template.format(caption(scene))


def text_samples(n: int, seed: int) -> list[Sample]:
    """Short documents of 2-4 sentences about train scenes (captions and spatial relations)."""
    rng = _rng(seed, "text", n)
    return [Sample("text", [" ".join(_sentence(rng, sample_scene(rng, "train", 2))
                                     for _ in range(int(rng.integers(2, 5))))],
                   key=f"tiny_text_{seed}_{i:06d}") for i in range(n)]


def caption_examples(n: int, seed: int, split: str = "train", size: int = 32) -> list[Example]:
    """Rendered scenes (1 or 2 objects) with their captions; `target` is the scene drawn."""
    rng = _rng(seed, "caption", n, split)
    examples = []
    for i in range(n):
        scene = sample_scene(rng, split, 2)
        key = f"tiny_caption_{split}_{seed}_{i:06d}"
        examples.append(Example(Sample("caption", [caption(scene)], render(scene, size), key=key), scene))
    return examples


def caption_samples(n: int, seed: int, split: str = "train", size: int = 32) -> list[Sample]:
    return [e.sample for e in caption_examples(n, seed, split, size)]


def _merge_text(segments: list) -> list:
    """Join neighbouring strings so text and images alternate; trim the document's two ends."""
    merged = []
    for s in segments:
        if isinstance(s, str) and merged and isinstance(merged[-1], str):
            merged[-1] += s
        else:
            merged.append(s)
    merged[0], merged[-1] = (x.strip() if isinstance(x, str) else x for x in (merged[0], merged[-1]))
    return merged


def interleaved_samples(n: int, seed: int, size: int = 32) -> list[Sample]:
    """The stage-1 "web": documents of 2-3 images of *any* combination, each described just before
    ("Here is a red circle ...: <img>") or just after ("and here is <img> a blue square ..."). A third
    of the images are close-ups of one object (cut out as `crop_object` does, on its background or on
    white) described as "a close-up of a red circle": the kind of picture stage 3 shows as a subject.
    Why: an MLLM that only ever saw whole scenes named a close-up's colour (~80%) but hardly its shape
    (10-25%); with close-ups, 68-84% of train subjects' shapes (34-38% of held-out shape-colour pairs').

    Why any combination, held-out ones included: these documents stand in for web-scale pre-training,
    which shows Kosmos-G the kinds of objects DreamBench later asks for. The held-out pairs stay out of
    every caption (stage 2) and every caption, subject and edit (stage 3). With them kept out of stage 1
    too, the MLLM learnt to read a held-out pair's shape less well (demo shape accuracy 48.5 vs 57.0)."""
    rng = _rng(seed, "interleaved", n)

    def any_scene(max_objects: int) -> Scene:
        return _random_scene(rng, int(rng.integers(1, max_objects + 1)))

    samples = []
    for i in range(n):
        segments = []
        for j in range(int(rng.integers(2, 4))):
            opener = "Here is" if j == 0 else str(rng.choice(["And here is", "Next comes", "Then there is"]))
            if rng.random() < 1 / 3:
                scene = any_scene(1)
                if rng.random() < 0.5:
                    scene = replace(scene, background=WHITE)
                text, image = f"a close-up of a {scene.objects[0].name}", crop_object(scene, 0, size)
            else:
                scene = any_scene(2)
                text, image = caption(scene), render(scene, size)
            if rng.random() < 0.5:
                segments += [f"{opener} {text}: ", image, ". "]
            else:
                segments += [f"{opener} ", image, f" {text}. "]
        samples.append(Sample("interleaved", _merge_text(segments), key=f"tiny_interleaved_{seed}_{i:06d}"))
    return samples


def _subject_image(rng: np.random.Generator, obj: Obj, split: str, size: int) -> tuple[Scene, SubjectImage]:
    """The subject image of `obj`: the same object at a random place on a random background (a
    train-legal one in train), cut out, and the same cut on white. Returns (source scene, image)."""
    source = _draw_until(lambda: Scene((replace(obj, position=str(rng.choice(list(POSITIONS)))),),
                                       str(rng.choice(BACKGROUNDS))),
                         lambda scene: split == "test" or not is_heldout(scene), "subject sources")
    return source, SubjectImage(crop_object(source, 0, size), crop_object(replace(source, background=WHITE), 0, size))


def subject_examples(n: int, seed: int, split: str = "train", size: int = 32) -> list[Example]:
    """Subject-driven generation: the image carries the subject (shape, colour), the text its place.

    segments: ["a ", Entity("red circle"), SubjectImage, " at the bottom right on a dotted background"],
    or without the entity words, or image first: [SubjectImage, " at the bottom right on ..."].
    The subject image is cut from `source`: the same object at a random place on a random background
    (a train-legal one in train), so position and background can only come from the text."""
    rng = _rng(seed, "subject", n, split)
    examples = []
    for i in range(n):
        target = sample_scene(rng, split, 1)
        obj = target.objects[0]
        source, subject = _subject_image(rng, obj, split, size)
        rest = f" {where(obj.position)} {on(target.background)}"
        form = int(rng.integers(3))
        segments = (["a ", Entity(obj.name), subject, rest] if form == 0 else
                    ["a ", subject, rest] if form == 1 else [subject, rest])
        key = f"tiny_subject_{split}_{seed}_{i:06d}"
        sample = Sample("subject", segments, render(target, size), key=key)
        examples.append(Example(sample, target, source))
    return examples


def two_subject_examples(n: int, seed: int, split: str = "train", size: int = 32) -> list[Example]:
    """Two subjects in one prompt (Kosmos-G's "<dog> wearing <hat>"): a two-object target scene, each
    object shown by its own subject image, the text giving both places and the background:

    ["a ", Entity("red circle"), img1, " at the top left and a ", Entity("blue square"), img2,
     " at the bottom right on a dotted background"], or without the entity words, or image first
    ([img1, " at the top left and ", img2, " at the bottom right on ..."]). Objects sit at two distinct
    corners (`Scene` keeps several objects off the centre). In test, the target holds a held-out
    combination (any object's (shape, colour) or (colour, background)); in train, neither the target nor
    a subject's source does. `source`: the first subject's source scene (the second's is in the image).

    A random stream of its own (not `subject_examples`'), so the one-subject samples stay as they were."""
    rng = _rng(seed, "subject", n, split, stream=2)
    examples = []
    for i in range(n):
        target = _draw_until(lambda: _random_scene(rng, 2), lambda s: is_heldout(s) == (split == "test"),
                             "two-object scenes")
        (a, b), form = target.objects, int(rng.integers(3))
        (source, img_a), (_, img_b) = (_subject_image(rng, o, split, size) for o in (a, b))
        entity = (lambda o: ["a ", Entity(o.name)]) if form == 0 else (lambda o: ["a "]) if form == 1 else \
            (lambda o: [])
        segments = [*entity(a), img_a, f" {where(a.position)} and ", *entity(b), img_b,
                    f" {where(b.position)} {on(target.background)}"]
        if form != 2:   # " at the top left and " + "a ": one string, so text and images alternate
            at = segments.index(img_a) + 1
            segments[at:at + 2] = [segments[at] + segments[at + 1]]
        key = f"tiny_subject2_{split}_{seed}_{i:06d}"
        examples.append(Example(Sample("subject", segments, render(target, size), key=key), target, source))
    return examples


# Share of stage-3 subject samples with two subjects. A third: enough that stage 3 sees ~1,000 two-subject
# prompts in the demo, while two thirds stay one-subject, so the one-subject table stays comparable.
TWO_SUBJECT_SHARE = 1 / 3


def subject_samples(n: int, seed: int, split: str = "train", size: int = 32,
                    two_subject_share: float = TWO_SUBJECT_SHARE) -> list[Sample]:
    """`n` subject samples: round(n * two_subject_share) two-subject ones spread evenly among the rest.

    The one-subject samples are `subject_examples(n_one, seed, ...)`' exactly (same stream, same keys)."""
    if not 0 <= two_subject_share <= 1:
        raise ValueError(f"two_subject_share is a fraction of samples, so it must be in [0, 1]; "
                         f"got {two_subject_share}")
    n_two = round(n * two_subject_share)
    one = [e.sample for e in subject_examples(n - n_two, seed, split, size)]
    two = [e.sample for e in two_subject_examples(n_two, seed, split, size)]
    # Spread: sample i is two-subject when floor((i+1) * share) steps up, so shards mix both kinds.
    out, it_one, it_two = [], iter(one), iter(two)
    for i in range(n):
        step_up = n_two and (i + 1) * n_two // n != i * n_two // n
        out.append(next(it_two) if step_up else next(it_one))
    return out


def _random_edit(rng: np.random.Generator) -> tuple[Scene, str, Scene]:
    """A random one-object scene and one single-attribute edit of it: (scene, instruction, edited)."""
    scene = _random_scene(rng, 1)
    obj = scene.objects[0]
    what = str(rng.choice(["colour", "position", "shape", "background"]))
    values = {"colour": list(COLOURS), "position": list(POSITIONS), "shape": SHAPES, "background": BACKGROUNDS}
    old = scene.background if what == "background" else getattr(obj, what)
    new = str(rng.choice([v for v in values[what] if v != old]))
    if what == "background":
        return scene, f"change the background to {new}", replace(scene, background=new)
    instruction = {"colour": f"make it {new}", "position": f"move it to the {new}",
                   "shape": f"turn it into a {new}"}
    return scene, instruction[what], replace(scene, objects=(replace(obj, **{what: new}),))


def edit_examples(n: int, seed: int, split: str = "train", size: int = 32) -> list[Example]:
    """Edits of one-object scenes: segments [InputCaption(caption of the source), source image,
    "make it blue"], target = edited image (InstructPix2Pix's layout: every edit has an input caption).

    train: neither source nor target holds a held-out combination; test: the target does."""
    rng = _rng(seed, "edit", n, split)

    def fits(edit: tuple[Scene, str, Scene]) -> bool:
        source, _, target = edit
        return is_heldout(target) if split == "test" else not (is_heldout(source) or is_heldout(target))

    examples = []
    for i in range(n):
        source, instruction, target = _draw_until(lambda: _random_edit(rng), fits, "edits")
        sample = Sample("edit", [InputCaption(caption(source)), render(source, size), instruction],
                        render(target, size), key=f"tiny_edit_{split}_{seed}_{i:06d}")
        examples.append(Example(sample, target, source))
    return examples


def edit_samples(n: int, seed: int, split: str = "train", size: int = 32) -> list[Sample]:
    return [e.sample for e in edit_examples(n, seed, split, size)]
