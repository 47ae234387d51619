"""The attribute oracle: a small CNN that reads (shape, colour, position, background) off an image.

Why: the tiny world's demo scores generated images by the attributes they show. `world.read_scene`
(nearest rendered template in pixel space) is exact on clean renders, but a generated image is
blurry, slightly off in colour and a pixel or two off in place, and an L2 template match is then
dominated by whichever texture it best overlaps. The oracle is trained on renderings of every
one-object scene degraded by random blur, noise, colour jitter, small shifts and a moved background
phase, so it keeps reading the right attributes where the template match starts to guess (held-out
renders blurred with sigma 1 / 1.5 px: oracle 100% / 100% on all four, template 50% / 25% on the
background). Held-out combinations are in its training set on purpose: it is an evaluator, not a model
under test, and one trained on the train split alone read only 79% of held-out colours right.

    oracle = train_oracle(seed=0)                 # ~20 s on 2 cores
    oracle.save_pretrained("runs/x/teachers/oracle")   # model.safetensors + config.json
    oracle = Oracle.from_pretrained("runs/x/teachers/oracle")
    oracle.score(images, scenes)  # {"shape": 1.0, "colour": 0.98, "position": 1.0, "background": 0.97, "all": 0.95}

Images are PIL images or float tensors [B, 3, H, W] in [0, 1] (uint8 works too); any square size is
resized to the oracle's input size. Only the first object of each scene is scored: the subject and
edit targets of the tiny world have exactly one object.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kosmos_g.tinyworld.world import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SUPERSAMPLE, WHITE, Obj, Scene,
                                      _background, render)

# One classification head per attribute, classes in the world's own order.
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS), "background": BACKGROUNDS}
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


class Oracle(nn.Module):
    """Conv stack 32 -> 16 -> 8 -> 4 px, flattened (position needs the layout), then one head per attribute."""

    def __init__(self, config: OracleConfig = OracleConfig()):
        super().__init__()
        self.config = config
        c = config.width
        conv = lambda cin, cout, stride: [nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False),  # noqa: E731
                                          nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(
            *conv(3, c, 1), *conv(c, 2 * c, 2), *conv(2 * c, 4 * c, 2), *conv(4 * c, 4 * c, 2),
            nn.Flatten(), nn.Linear(4 * c * (config.image_size // 8) ** 2, config.hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(config.hidden, len(values))
                                    for name, values in ATTRIBUTES.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W] in [0, 1] -> logits per attribute."""
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        h = self.features(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Images, batch_size: int = 256) -> list[Scene]:
        """The one-object scene each image shows, by the oracle's reading."""
        x = to_tensor(images)
        was_training = self.training
        self.eval()
        picks = {name: [] for name in ATTRIBUTES}
        for chunk in x.split(batch_size):
            for name, logits in self(chunk.to(next(self.parameters()).device)).items():
                picks[name] += logits.argmax(-1).tolist()
        self.train(was_training)
        return [Scene((Obj(ATTRIBUTES["shape"][s], ATTRIBUTES["colour"][c], ATTRIBUTES["position"][p]),),
                      ATTRIBUTES["background"][b])
                for s, c, p, b in zip(picks["shape"], picks["colour"], picks["position"], picks["background"])]

    def score(self, images: Images, scenes: Sequence[Scene]) -> dict[str, float]:
        """Per-attribute accuracy of `images` against the first object of each of `scenes`."""
        return attribute_accuracy(self.predict(images), scenes)

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        config = dict(asdict(self.config), attributes={k: list(v) for k, v in ATTRIBUTES.items()})
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
        if saved != {k: list(v) for k, v in ATTRIBUTES.items()}:
            raise ValueError(f"oracle in {folder} was trained on other attribute values {saved}; "
                             "the world changed since, so retrain it (delete the folder)")
        oracle = cls(OracleConfig(**config))
        oracle.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return oracle.eval()


def attribute_accuracy(predicted: Sequence[Scene], truth: Sequence[Scene]) -> dict[str, float]:
    """Fraction of images whose first object's shape/colour/position and whose background match,
    plus "all" (every attribute right). Works for any reader: the oracle or `world.read_scene`."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need one scene per image, got {len(predicted)} predictions and {len(truth)} scenes")
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


def _labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    return {"shape": torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes]),
            "colour": torch.tensor([ATTRIBUTES["colour"].index(s.objects[0].colour) for s in scenes]),
            "position": torch.tensor([ATTRIBUTES["position"].index(s.objects[0].position) for s in scenes]),
            "background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])}


class _Layers:
    """Renders of one-object scenes split so the background's phase can be moved under the object.

    A render is linear in what shows through: image = alpha * object + keep * background, with
    keep = 1 - alpha. Rendering the scene on white gives keep exactly (white is 1 everywhere)."""

    def __init__(self, scenes: Sequence[Scene], size: int):
        if any(len(s.objects) != 1 for s in scenes):
            raise ValueError("the oracle trains on one-object scenes only (it reads the first object)")
        self.images = to_tensor([render(s, size) for s in scenes])
        white = to_tensor([render(replace(s, background=WHITE), size) for s in scenes])
        # Read keep off the object's darkest channel: the one farthest from white, so the least rounding error.
        colour = torch.tensor([COLOURS[s.objects[0].colour] for s in scenes], dtype=torch.float32) / 255
        channel = colour.argmin(1)
        c = colour.gather(1, channel[:, None])[..., None, None]                          # [N, 1, 1, 1]
        w = white.gather(1, channel[:, None, None, None].expand(-1, 1, *white.shape[2:]))  # [N, 1, H, W]
        self.keep = ((w - c) / (1 - c)).clamp(0, 1)
        # The bare background, drawn exactly as `render` draws it before adding objects.
        bare = {b: to_tensor([_background(b, size * SUPERSAMPLE).resize((size, size), Image.Resampling.BOX)])[0]
                for b in BACKGROUNDS}
        self.backgrounds = torch.stack([bare[s.background] for s in scenes])

    def sample(self, idx: Tensor, generator: torch.Generator) -> Tensor:
        """The renders at `idx`, each background shifted by a random phase (up to two texture cells).

        Why: a generator may draw a checkered background one cell off (dark and light squares swapped);
        that is still "checkered", but an oracle that only saw one phase calls it "dotted"."""
        size = self.images.shape[-1]
        moves = torch.randint(0, max(size // 4, 1), (len(idx), 2), generator=generator).tolist()
        rolled = torch.stack([torch.roll(self.backgrounds[i], shifts=(dy, dx), dims=(1, 2))
                              for i, (dy, dx) in zip(idx.tolist(), moves)])
        return self.images[idx] + self.keep[idx] * (rolled - self.backgrounds[idx])


def train_oracle(steps: int = 800, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, size: int = 32,
                 scenes: Optional[Sequence[Scene]] = None, log_every: int = 200) -> Oracle:
    """Train an oracle on degraded renders of one-object `scenes` (default: all 600, held-out included).

    Each batch: a quarter exact renders (clean renders are read exactly), the rest with the background
    phase moved and then degraded (blur, noise, colour jitter, shifts)."""
    scenes = list(scenes or all_scenes())
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layers = _Layers(scenes, size)
    labels = _labels(scenes)
    oracle = Oracle(OracleConfig(image_size=size))
    opt = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    oracle.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(scenes), (batch_size,), generator=g)
        n_clean = batch_size // 4
        x = torch.cat([layers.images[idx[:n_clean]], degrade(layers.sample(idx[n_clean:], g), g)])
        logits = oracle(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"[teachers] oracle step {step}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return oracle.eval()
