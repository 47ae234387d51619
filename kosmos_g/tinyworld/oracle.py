"""The attribute oracle: a small CNN that reads every object (shape, colour, position) and the background.

Why: the tiny world's demo scores generated images by the attributes they show. `world.read_scene`
(nearest rendered template in pixel space) is exact on clean renders, but a generated image is
blurry, slightly off in colour and a pixel or two off in place, and an L2 template match is then
dominated by whichever texture it best overlaps. The oracle is trained on one- and two-object scenes
composited from per-object layers and degraded by random blur, noise, colour jitter, small shifts and a
moved background phase, so it keeps reading the right attributes where the template match starts to
guess. Held-out combinations are in its training set on purpose: it is an evaluator, not a model under
test, and one trained on the train split alone read only 79% of held-out colours right.

How it reads: per position slot (the 5 places an object can sit) a shape-or-empty and a colour-or-empty
head, plus a background head. A slot is occupied when the two heads' mean "not empty" probability is
over one half. The one-object scores (shape, colour, position, background) read the most confidently
occupied slot, so they mean what they meant when the oracle read one object only.

    oracle = train_oracle(seed=0)
    oracle.save_pretrained("runs/x/teachers/oracle")   # model.safetensors + config.json
    oracle = Oracle.from_pretrained("runs/x/teachers/oracle")
    oracle.score(images, scenes)  # one object: {"shape": 1.0, "colour": 0.98, "position": 1.0, ..., "all": 0.95}
    scene_accuracy(oracle.predict(images), scenes)           # every object, each at its stated place
    edit_accuracy(oracle.predict(images), sources, targets)  # the edited attribute right, the rest kept

Images are PIL images or float tensors [B, 3, H, W] in [0, 1] (uint8 works too); any square size is
resized to the oracle's input size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kosmos_g.tinyworld.world import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SUPERSAMPLE, WHITE, Obj, Scene,
                                      _background, object_box, render)

# The attributes and their values, in the world's own order (what the one-object scores read).
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS), "background": BACKGROUNDS}
SLOTS = tuple(POSITIONS)   # one head pair per place an object can sit
CORNERS = tuple(p for p in POSITIONS if p != "centre")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
Images = Union[Tensor, Sequence[Image.Image]]


def all_scenes() -> list[Scene]:
    """Every one-object scene of the world (600), held-out combinations included."""
    return [Scene((Obj(s, c, p),), b) for s in SHAPES for c in COLOURS for p in POSITIONS for b in BACKGROUNDS]


def to_tensor(images: Images) -> Tensor:
    """PIL images or a [B, 3, H, W] tensor (float in [0, 1] or uint8) -> float32 [B, 3, H, W] in [0, 1]."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images as a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        return images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]
    if not arrays:
        raise ValueError("got no images")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("all images must have the same size; resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def degrade(x: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Random mild blur, noise, colour jitter and a shift of up to 2 px: what generated images look like.

    x: [B, 3, H, W] in [0, 1]. Each image draws its own amounts; `strength` scales them all."""
    b, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    # Gaussian blur with a per-image sigma in [0, 1.5 px] (separable, 5 taps, reflect padding).
    sigma = (rand(b) * 1.5 * strength).clamp_min(1e-3)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)                       # [B, 5]
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    rows = sum(kernel[:, i, None, None, None] * pad[..., :, i:i + w] for i in range(5))
    x = sum(kernel[:, i, None, None, None] * rows[..., i:i + h, :] for i in range(5))
    # Brightness/contrast per image, a small shift per channel, pixel noise.
    gain = 1 + (rand(b, 1, 1, 1) - 0.5) * 0.3 * strength
    shift = (rand(b, 3, 1, 1) - 0.5) * 0.12 * strength
    noise = torch.randn(x.shape, generator=generator) * rand(b, 1, 1, 1) * 0.06 * strength
    x = (x - 0.5) * gain + 0.5 + shift + noise
    # Translate by up to 2 px (objects sit 8 px apart at 32 px, so the position stays unambiguous).
    moves = (torch.randint(-2, 3, (b, 2), generator=generator) * strength).round().int().tolist()
    x = torch.stack([torch.roll(img, shifts=(dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(x, moves)])
    return x.clamp(0, 1)


@dataclass
class OracleConfig:
    image_size: int = 32
    width: int = 16
    """Channels of the first conv; later ones double."""
    hidden: int = 128


@dataclass(frozen=True)
class Reading:
    """What the oracle reads off one image. `objects`: the objects of the occupied slots, the most
    confident first, never empty (when no slot looks occupied, the likeliest one counts), so `objects[0]`
    is the one-object reading. Not a `Scene`: a generated image may show a centre and a corner object."""

    objects: tuple[Obj, ...]
    background: str

    def at(self, position: str) -> Optional[Obj]:
        """The object read at `position`, or None when that slot is empty."""
        return next((o for o in self.objects if o.position == position), None)


class Oracle(nn.Module):
    """Convs 32 -> 16 -> 8 px; one head, shared by the 5 slots, reads shape-or-empty and colour-or-empty off
    the 4x4 window of the 8x8 map where the slot's object box sits (shared: each slot's reading learns
    from every slot's objects); a background head reads the whole map (one more conv, 4x4, flattened)."""

    def __init__(self, config: OracleConfig = OracleConfig()):
        super().__init__()
        self.config = config
        c, side = config.width, config.image_size // 4
        conv = lambda cin, cout, stride: [nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False),  # noqa: E731
                                          nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*conv(3, c, 1), *conv(c, 2 * c, 2), *conv(2 * c, 4 * c, 2),
                                      *conv(4 * c, 4 * c, 1))
        self.windows = [object_box(p, side) for p in SLOTS]   # (left, top, right, bottom) on the feature map
        w = max(r - l for l, _, r, _ in self.windows)
        if any(r - l != w or b - t != w for l, t, r, b in self.windows):
            raise ValueError(f"image_size {config.image_size} gives slot windows of unequal sizes {self.windows}; "
                             "use a multiple of 32")
        self.slot = nn.Sequential(nn.Flatten(), nn.Linear(4 * c * w * w, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, len(SHAPES) + 1 + len(COLOURS) + 1))
        self.background = nn.Sequential(*conv(4 * c, 4 * c, 2), nn.Flatten(),
                                        nn.Linear(4 * c * (side // 2) ** 2, config.hidden), nn.ReLU(),
                                        nn.Linear(config.hidden, len(BACKGROUNDS)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W] in [0, 1] -> logits: shape [B, 5, 6] and colour [B, 5, 7] per slot (last class:
        empty), background [B, 4]."""
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        h = self.features(x * 2 - 1)
        windows = torch.stack([h[..., t:b, l:r] for l, t, r, b in self.windows], 1)     # [B, 5, C, w, w]
        slots = self.slot(windows.flatten(0, 1)).view(len(h), len(SLOTS), -1)
        return {"shape": slots[..., :len(SHAPES) + 1], "colour": slots[..., len(SHAPES) + 1:],
                "background": self.background(h)}

    @torch.no_grad()
    def predict(self, images: Images, batch_size: int = 256) -> list[Reading]:
        """What each image shows, by the oracle's reading (see `Reading`)."""
        x = to_tensor(images)
        was_training = self.training
        self.eval()
        out = {"shape": [], "colour": [], "background": []}
        for chunk in x.split(batch_size):
            for name, logits in self(chunk.to(next(self.parameters()).device)).items():
                out[name].append(logits.float().softmax(-1).cpu())
        self.train(was_training)
        shape, colour, background = (torch.cat(out[k]) for k in ("shape", "colour", "background"))
        occupied = 1 - (shape[..., -1] + colour[..., -1]) / 2                        # [B, slots]
        shapes, colours = shape[..., :-1].argmax(-1), colour[..., :-1].argmax(-1)   # best non-empty class
        readings = []
        for i in range(len(x)):
            order = occupied[i].argsort(descending=True).tolist()
            slots = [j for j in order if occupied[i, j] > 0.5] or order[:1]
            readings.append(Reading(tuple(Obj(SHAPES[shapes[i, j]], ATTRIBUTES["colour"][colours[i, j]], SLOTS[j])
                                          for j in slots), BACKGROUNDS[int(background[i].argmax())]))
        return readings

    def score(self, images: Images, scenes: Sequence[Scene]) -> dict[str, float]:
        """One-object accuracy (`attribute_accuracy`) of `images` against the first object of each of `scenes`."""
        return attribute_accuracy(self.predict(images), scenes)

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        config = dict(asdict(self.config), attributes={k: list(v) for k, v in ATTRIBUTES.items()}, slots=True)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path]) -> "Oracle":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"oracle folder {folder} lacks {CONFIG_NAME} or {WEIGHTS_NAME}; "
                                    "write one with train_oracle(...).save_pretrained(folder) or train_teachers")
        config = json.loads((folder / CONFIG_NAME).read_text())
        saved = config.pop("attributes")
        if saved != {k: list(v) for k, v in ATTRIBUTES.items()} or not config.pop("slots", False):
            raise ValueError(f"oracle in {folder} was trained on other attribute values or reads one object only; "
                             "the world changed since, so retrain it (delete the teachers folder)")
        oracle = cls(OracleConfig(**config))
        oracle.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return oracle.eval()


def _check_lengths(predicted: Sequence, truth: Sequence) -> None:
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need one scene per image, got {len(predicted)} predictions and {len(truth)} scenes")


def attribute_accuracy(predicted: Sequence[Union[Reading, Scene]], truth: Sequence[Scene]) -> dict[str, float]:
    """Fraction of images whose first object's shape/colour/position and whose background match,
    plus "all" (every attribute right). Works for any reader: the oracle or `world.read_scene`."""
    _check_lengths(predicted, truth)
    hits = {name: [] for name in ATTRIBUTES}
    for p, t in zip(predicted, truth):
        po, to = p.objects[0], t.objects[0]
        hits["shape"].append(po.shape == to.shape)
        hits["colour"].append(po.colour == to.colour)
        hits["position"].append(po.position == to.position)
        hits["background"].append(p.background == t.background)
    result = {name: float(np.mean(h)) for name, h in hits.items()}
    result["all"] = float(np.mean([all(h) for h in zip(*hits.values())]))
    return result


def scene_accuracy(predicted: Sequence[Union[Reading, Scene]], truth: Sequence[Scene]) -> dict[str, float]:
    """Every object, each read at its stated position. Fractions of:
    shape / colour: objects with that attribute right at their position (over all objects);
    first / second: the first / second object of each scene with shape and colour right at its position;
    all objects: scenes with every object right; background; exact: every object right, nothing else read,
    and the background right."""
    _check_lengths(predicted, truth)
    hits = {k: [] for k in ("shape", "colour", "first", "second", "all objects", "background", "exact")}
    for p, t in zip(predicted, truth):
        right = []
        for k, o in enumerate(t.objects):
            seen = next((x for x in p.objects if x.position == o.position), None)   # a Reading or a Scene
            hits["shape"].append(seen is not None and seen.shape == o.shape)
            hits["colour"].append(seen is not None and seen.colour == o.colour)
            right.append(seen == o)
            if k < 2:
                hits[("first", "second")[k]].append(seen == o)
        hits["all objects"].append(all(right))
        hits["background"].append(p.background == t.background)
        hits["exact"].append(all(right) and len(p.objects) == len(t.objects) and p.background == t.background)
    return {k: float(np.mean(h)) for k, h in hits.items() if h}


def _attributes(scene: Union[Reading, Scene]) -> dict[str, str]:
    o = scene.objects[0]
    return {"shape": o.shape, "colour": o.colour, "position": o.position, "background": scene.background}


def edited_attribute(source: Scene, target: Scene) -> str:
    """The one attribute an edit changes (a one-object scene's shape, colour, position or background)."""
    changed = [k for k, v in _attributes(target).items() if _attributes(source)[k] != v]
    if len(changed) != 1:
        raise ValueError(f"an edit changes exactly one attribute; {source} -> {target} changes {changed}")
    return changed[0]


def edit_accuracy(predicted: Sequence[Union[Reading, Scene]], sources: Sequence[Scene],
                  targets: Sequence[Scene]) -> dict[str, float]:
    """Fractions of edits with the edited attribute right ("edited"), the other three as in the source
    ("kept"), and both ("both"); "<attribute> edits": "edited" among the edits of each attribute; "kept
    <attribute>": that attribute as in the source among the edits that leave it alone."""
    _check_lengths(predicted, targets)
    hits = {"edited": [], "kept": [], "both": [], **{f"{a} edits": [] for a in ATTRIBUTES},
            **{f"kept {a}": [] for a in ATTRIBUTES}}
    for p, s, t in zip(predicted, sources, targets):
        what, read, want = edited_attribute(s, t), _attributes(p), _attributes(t)
        edited = read[what] == want[what]
        kept = [a for a in ATTRIBUTES if a != what and read[a] == want[a]]
        hits["edited"].append(edited)
        hits["kept"].append(len(kept) == len(ATTRIBUTES) - 1)
        hits["both"].append(edited and hits["kept"][-1])
        hits[f"{what} edits"].append(edited)
        for a in ATTRIBUTES:
            if a != what:
                hits[f"kept {a}"].append(a in kept)
    return {k: float(np.mean(h)) for k, h in hits.items() if h}


def _labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per slot: the shape / colour class there (EMPTY = the last class); and the background."""
    shape = torch.full((len(scenes), len(SLOTS)), len(SHAPES))
    colour = torch.full((len(scenes), len(SLOTS)), len(COLOURS))
    for i, s in enumerate(scenes):
        for o in s.objects:
            shape[i, SLOTS.index(o.position)] = SHAPES.index(o.shape)
            colour[i, SLOTS.index(o.position)] = ATTRIBUTES["colour"].index(o.colour)
    return {"shape": shape, "colour": colour, "background": torch.tensor([BACKGROUNDS.index(s.background)
                                                                           for s in scenes])}


class _Layers:
    """Every object as a layer, so any scene of objects in distinct boxes is a sum of layers on a background.

    A render is linear in what shows through: image = ink + keep * background, keep = 1 - alpha, ink =
    alpha * colour. Rendering the object on white gives ink + keep exactly (white is 1 everywhere), and
    objects at distinct corners cover disjoint pixels, so a two-object render is ink1 + ink2 + keep1 *
    keep2 * background: 150 layers and 4 backgrounds make all of the world's one- and two-object scenes."""

    def __init__(self, size: int):
        self.objects = [Obj(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
        scenes = [Scene((o,), WHITE) for o in self.objects]
        white = to_tensor([render(s, size) for s in scenes])
        # Read keep off the object's darkest channel: the one farthest from white, so the least rounding error.
        colour = torch.tensor([COLOURS[o.colour] for o in self.objects], dtype=torch.float32) / 255
        channel = colour.argmin(1)
        c = colour.gather(1, channel[:, None])[..., None, None]                          # [N, 1, 1, 1]
        w = white.gather(1, channel[:, None, None, None].expand(-1, 1, *white.shape[2:]))  # [N, 1, H, W]
        keep = ((w - c) / (1 - c)).clamp(0, 1)
        # One more layer, last: no object (keep 1, no ink), for the second object of one-object scenes.
        self.keep = torch.cat([keep, torch.ones_like(keep[:1])])
        self.ink = torch.cat([white - keep, torch.zeros_like(white[:1])])
        # The bare background, drawn exactly as `render` draws it before adding objects.
        self.backgrounds = torch.stack([to_tensor([_background(b, size * SUPERSAMPLE).resize(
            (size, size), Image.Resampling.BOX)])[0] for b in BACKGROUNDS])
        self.index = {o: i for i, o in enumerate(self.objects)}

    def random_scenes(self, n: int, generator: torch.Generator) -> list[Scene]:
        """n scenes, half of one object (any of the 5 places), half of two (distinct corners), all values uniform."""
        pick = lambda k: torch.randint(k, (n,), generator=generator).tolist()  # noqa: E731
        two, shapes, colours, backgrounds = torch.rand(n, generator=generator) < 0.5, pick(25), pick(36), pick(4)
        places, corners = pick(len(POSITIONS)), torch.rand(n, len(CORNERS), generator=generator).argsort(1).tolist()
        scenes = []
        for i in range(n):
            where = [CORNERS[j] for j in corners[i][:2]] if two[i] else [SLOTS[places[i]]]
            objs = tuple(Obj(SHAPES[(shapes[i] // 5, shapes[i] % 5)[k]], ATTRIBUTES["colour"][(colours[i] // 6,
                         colours[i] % 6)[k]], p) for k, p in enumerate(where))
            scenes.append(Scene(objs, BACKGROUNDS[backgrounds[i]]))
        return scenes

    def compose(self, scenes: Sequence[Scene], generator: Optional[torch.Generator] = None) -> Tensor:
        """The scenes' renders [N, 3, H, W]; with a generator, each background shifted by a random phase.

        Why the phase: a generator may draw a checkered background one cell off (dark and light squares
        swapped); that is still "checkered", but an oracle that only saw one phase calls it "dotted"."""
        blank = len(self.objects)
        first = torch.tensor([self.index[s.objects[0]] for s in scenes])
        second = torch.tensor([self.index[s.objects[1]] if len(s.objects) > 1 else blank for s in scenes])
        bg = self.backgrounds[torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])]
        if generator is not None:
            size = bg.shape[-1]
            moves = torch.randint(0, max(size // 4, 1), (len(scenes), 2), generator=generator).tolist()
            bg = torch.stack([torch.roll(b, shifts=(dy, dx), dims=(1, 2)) for b, (dy, dx) in zip(bg, moves)])
        return (self.ink[first] + self.ink[second] + self.keep[first] * self.keep[second] * bg).clamp(0, 1)


def train_oracle(steps: int = 800, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, size: int = 32,
                 log_every: int = 250) -> Oracle:
    """Train an oracle on random one- and two-object scenes (every combination, held-out ones included).

    Each batch: a quarter exact renders (clean renders are read exactly), the rest with the background
    phase moved and then degraded (blur, noise, colour jitter, shifts)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layers = _Layers(size)
    oracle = Oracle(OracleConfig(image_size=size))
    opt = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    oracle.train()
    for step in range(1, steps + 1):
        scenes = layers.random_scenes(batch_size, g)
        n_clean = batch_size // 4
        x = torch.cat([layers.compose(scenes[:n_clean]), degrade(layers.compose(scenes[n_clean:], g), g)])
        logits, labels = oracle(x), _labels(scenes)
        loss = sum(F.cross_entropy(logits[k].flatten(0, -2), labels[k].flatten()) for k in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"[teachers] oracle step {step}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return oracle.eval()
