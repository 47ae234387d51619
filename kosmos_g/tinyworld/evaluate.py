"""Score subject-driven generation in the tiny world: held-out interleaved prompts, ground truth, the oracle.

Each test example is "<subject image> at the bottom right on a dotted background" (entity words dropped):
shape and colour can only come from the image, position and background only from the text. Rows:
  trained   the stage-3 export (KosmosGPipeline)
  initial   the same pipeline with a freshly initialised MLLM + aligner (what training starts from)
  teacher   the frozen U-Net prompted with the ground-truth caption through its own CLIP text encoder
            (StableDiffusionPipeline): the upper bound of what the decoder can draw
Columns: the oracle's per-attribute accuracy, CLIP-I / CLIP-T / DINO / FID from `kosmos_g.eval` with the
tiny backbones (the teachers' CLIP, a random tiny DINO), all against the rendered ground truth.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from kosmos_g.eval.metrics import CLIPIScore, CLIPTScore, DINOScore, load_clip, load_dino, save_tiny_dino
from kosmos_g.eval.protocols import fid_from_clip
from kosmos_g.stages.instruct import instruction
from kosmos_g.tinyworld import caption, subject_examples
from kosmos_g.tinyworld.oracle import ATTRIBUTES, Oracle
from kosmos_g.tinyworld.teachers import load_pipeline

Generate = Callable[[list, int], torch.Tensor]  # (examples, seed) -> images [N, 3, H, W] in [0, 1]
SUBJECT, SCENE = ("shape", "colour"), ("position", "background")


def test_examples(n: int, seed: int = 0, size: int = 32):
    return subject_examples(n, seed, split="test", size=size)


def kosmos_generator(pipe, steps: int = 20, guidance: float = 4.0, batch_size: int = 50) -> Generate:
    """Interleaved prompts (entity words dropped, subject crop shown) through a KosmosGPipeline."""
    pipe.set_progress_bar_config(disable=True)

    def generate(examples, seed):
        rng = random.Random(seed)
        prompts = [instruction(e.sample, rng, entity_drop_prob=1.0) for e in examples]
        g = torch.Generator().manual_seed(seed)
        return torch.cat([pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                               generator=g, output_type="pt").images.float()
                          for i in range(0, len(prompts), batch_size)])
    return generate


def teacher_generator(sd_folder: Path, steps: int = 20, guidance: float = 4.0, batch_size: int = 50) -> Generate:
    """The upper bound: the teacher SD pipeline given each target's true caption."""
    pipe = load_pipeline(sd_folder)

    def generate(examples, seed):
        g = torch.Generator().manual_seed(seed)
        texts = [caption(e.target) for e in examples]
        return torch.cat([pipe(texts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                               generator=g, output_type="pt").images.float()
                          for i in range(0, len(texts), batch_size)])
    return generate


class WorldScorer:
    """Oracle accuracies + the eval issue's metrics with the tiny backbones, for one set of images."""

    def __init__(self, teachers: Path, assets: Path):
        self.oracle = Oracle.from_pretrained(teachers / "oracle")
        self.clip = load_clip(teachers / "clip")
        dino_file = assets / "tiny_dino.safetensors"
        if not dino_file.is_file():  # no DINO can be trained here: a fixed random tiny ViT stands in
            save_tiny_dino(dino_file)
        self.dino = load_dino(dino_file)

    def __call__(self, images: torch.Tensor, examples) -> dict[str, float]:
        truth = torch.stack([_tensor(e.sample.target) for e in examples])
        scores = {k: 100 * v for k, v in self.oracle.score(images, [e.target for e in examples]).items()}
        clip_i, dino, clip_t = CLIPIScore(self.clip), DINOScore(self.dino), CLIPTScore(self.clip)
        fid = fid_from_clip(self.clip)
        for img, ref, ex in zip(images, truth, examples):
            clip_i.update(img[None], ref[None])
            dino.update(img[None], ref[None])
        clip_t.update(list(images), [caption(e.target) for e in examples])
        fid.update(truth, real=True)
        fid.update(images, real=False)
        scores.update({"CLIP-I": clip_i.compute().item(), "CLIP-T": clip_t.compute().item(),
                       "DINO": dino.compute().item(), "FID": fid.compute().item()})
        return scores


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per pipeline; accuracies in %, chance noted in the header."""
    chance = {a: 100 / len(v) for a, v in ATTRIBUTES.items()}
    cols = [*SUBJECT, *SCENE, "all", "CLIP-I", "CLIP-T", "DINO", "FID"]
    head = [f"{c} (chance {chance[c]:.0f}%)" if c in chance else c for c in cols]
    lines = ["| pipeline | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c]:.1f}" if c in chance or c == "all" else f"{r[c]:.3f}" if c != "FID" else f"{r[c]:.2f}"
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_comparison_grid(examples, generated: dict[str, torch.Tensor], path: Path, rows: int = 8,
                         scale: int = 3) -> Path:
    """PNG grid, one example per row: input subject | each pipeline's generation | ground truth."""
    rng = random.Random(0)
    cells = []
    for i, e in enumerate(examples[:rows]):
        subject = next(s for s in instruction(e.sample, rng, 1.0) if isinstance(s, Image.Image))
        cells.append([_tensor(subject)] + [g[i] for g in generated.values()] + [_tensor(e.sample.target)])
    size = cells[0][0].shape[-1]
    canvas = Image.new("RGB", (len(cells[0]) * size * scale, len(cells) * size * scale), "white")
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            pil = Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
            canvas.paste(pil.resize((size * scale, size * scale), Image.NEAREST), (c * size * scale, r * size * scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
