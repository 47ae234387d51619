"""What the tiny world's teachers learn from (see teachers.py): scenes, captions and images for CLIP and
the U-Net, the VAE's codec images, CLIP's close-ups, near-miss pairs and one-attribute descriptions."""

from __future__ import annotations

from typing import Sequence

import torch

from kosmos_g.tinyworld.oracle import all_scenes, to_tensor
from kosmos_g.tinyworld.world import (BACKGROUNDS, COLOURS, HELDOUT_SHAPE_COLOUR, POSITIONS, SHAPES, WHITE, Obj, Scene,
                                      caption, caption_examples, crop_object, is_heldout, render)


def world_data(seed: int, size: int, n_captions: int, heldout: bool = False
               ) -> tuple[list[Scene], list[str], torch.Tensor]:
    """The text-image teachers' training set: every one-object train scene plus `n_captions` captioned
    train scenes (1-2 objects). Returns (scenes, captions, images [N, 3, size, size] in [0, 1]).

    heldout=False (default): no test-split combination appears, so a red triangle is as new to CLIP and
    the U-Net as to the stages. heldout=True adds them (every one-object scene, and n_captions // 4
    captioned test scenes), like a real SD that has seen every concept the benchmark asks for."""
    scenes = all_scenes() if heldout else [s for s in all_scenes() if not is_heldout(s)]
    scenes += [e.target for e in caption_examples(n_captions, seed, "train", size)]
    if heldout:
        scenes += [e.target for e in caption_examples(n_captions // 4, seed, "test", size)]
    return scenes, [caption(s) for s in scenes], to_tensor([render(s, size) for s in scenes])


def codec_images(size: int) -> torch.Tensor:
    """The VAE's training images: a render of every one-object scene, held-out ones included, each once.

    Why held-out too: the VAE is a pixel codec with no language in it (SD's VAE has seen everything).
    Trained on train combinations only, it turned a blue object on a checkered background cyan and a
    yellow one on plain grey orange (oracle colour accuracy on held-out reconstructions: ~66%), and no
    stage could ever draw one. Why each once: with the two-object train scenes added (twice as many
    images, held-out pairs rarer), 12% of held-out reconstructions still came out in the wrong colour;
    on this uniform set none do, and two objects in corners look locally like one."""
    return to_tensor([render(s, size) for s in all_scenes()])


def closeup_data(size: int, heldout: bool = False) -> tuple[list[Scene], list[str], torch.Tensor]:
    """Close-ups for CLIP: every (shape, colour) cut out on every background and on white (`crop_object`,
    the subject images of stage 3), captioned "a close-up of a red circle". Why: a CLIP that only saw
    whole scenes read the shape of a close-up at chance (zero-shot "a triangle" vs the other shapes: 21%),
    so no stage could learn to carry a subject's shape from its features."""
    scenes = [Scene((Obj(s, c, "centre"),), b) for s in SHAPES for c in COLOURS for b in (*BACKGROUNDS, WHITE)
              if heldout or (s, c) not in HELDOUT_SHAPE_COLOUR]
    captions = [f"a close-up of a {x.objects[0].name}" for x in scenes]
    return scenes, captions, to_tensor([crop_object(x, 0, size) for x in scenes])


def near_misses(scenes: Sequence[Scene]) -> list[list[int]]:
    """For each one-object scene, the indices of the one-object scenes differing from it in exactly one
    attribute (shape, colour, position or background); [] for the others."""
    def key(s: Scene) -> tuple:
        return (s.objects[0].shape, s.objects[0].colour, s.objects[0].position, s.background)

    first: dict[tuple, int] = {}
    for i, s in enumerate(scenes):
        if len(s.objects) == 1:
            first.setdefault(key(s), i)
    table = []
    for s in scenes:
        k = key(s) if len(s.objects) == 1 else None
        table.append([] if k is None else [
            first[m] for a, values in enumerate((SHAPES, tuple(COLOURS), tuple(POSITIONS), BACKGROUNDS))
            for v in values if v != k[a] and (m := k[:a] + (v,) + k[a + 1:]) in first])
    return table


# One-attribute descriptions: what `clip_partial` of the captions become, with the test each image must pass.
PARTIALS = {**{f"a {s}": lambda scene, s=s: any(o.shape == s for o in scene.objects) for s in SHAPES},
            **{f"something {c}": lambda scene, c=c: any(o.colour == c for o in scene.objects) for c in COLOURS}}
