"""Where along the image path does a subject's shape stop generalising to held-out (shape, colour) pairs?

    python -m kosmos_g.tinyworld.probe runs/demo

For one-subject prompts (entity words dropped, as evaluated), a linear shape classifier is fitted on the
features of train-split prompts and scored on held-out prompts, separately on those whose subject is a seen
(shape, colour) pair and those whose pair is novel, at each point of the path the condition takes:

    ViT CLS -> connector (mean of its N latents) -> MLLM states at the image slots (mean) -> M's output c

for the MLLM and aligner after stage 2 (the stage-1 MLLM) and after stage 3, and at the CLS of the CLIP image
tower the ViT starts from (`<run>/teachers/clip`). A point that is seen-right but novel-wrong stores shape
bound to colour: what comes after it cannot draw a novel pair's shape from the image.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModel

from kosmos_g.models.aligner import AlignerNet
from kosmos_g.models.mllm import MultimodalLM
from kosmos_g.processor import KosmosGProcessor, clip_image_transform
from kosmos_g.stages.instruct import instruction
from kosmos_g.tinyworld.evaluate import is_novel
from kosmos_g.tinyworld.world import SHAPES, subject_examples

POINTS = ("ViT CLS", "connector", "MLLM image slots", "M output c")


def prompts(examples) -> list[list]:
    """The prompts as the demo evaluates them: entity words dropped, the crop or the crop on white."""
    rng = random.Random(0)
    return [instruction(e.sample, rng, entity_drop_prob=1.0) for e in examples]


@torch.no_grad()
def features(export: Path, examples, batch_size: int = 50) -> dict[str, torch.Tensor]:
    """Per example and per point of the image path (see `POINTS`), one feature vector [n, d]."""
    mllm, aligner = MultimodalLM.from_pretrained(export / "mllm").eval(), AlignerNet.from_pretrained(export / "aligner").eval()
    processor = KosmosGProcessor.from_pretrained(export / "processor")
    texts, out = prompts(examples), {p: [] for p in POINTS}
    for i in range(0, len(texts), batch_size):
        batch = processor.collate([processor(prompt) for prompt in texts[i:i + batch_size]])
        pixels, slots = batch["pixel_values"], batch["image_mask"].bool()
        # One ViT pass for both: Kosmos-2's image features keep the tower's tokens beside the connector's output.
        image = mllm.get_image_features(pixels, return_dict=True)
        states = mllm.encode(batch["input_ids"], batch["attention_mask"], pixel_values=pixels, image_mask=slots)
        c = aligner.encode(states, padding_mask=batch["attention_mask"] == 0)
        out["ViT CLS"].append(mllm.vision_model.model.post_layernorm(image.last_hidden_state[:, 0]))
        out["connector"].append(image.pooler_output.mean(1))
        out["MLLM image slots"].append(torch.stack([s[m].mean(0) for s, m in zip(states, slots)]))
        out["M output c"].append(c.flatten(1))
    return {p: torch.cat(v) for p, v in out.items()}


@torch.no_grad()
def tower_features(clip: Path, examples) -> torch.Tensor:
    """The CLS (pooled, post-LayerNorm) of a CLIP image tower, e.g. the teacher CLIP the MLLM's ViT starts from."""
    tower = CLIPVisionModel.from_pretrained(clip).eval()
    transform = clip_image_transform(tower.config.image_size)
    crops = [next(seg for seg in prompt if isinstance(seg, Image.Image)) for prompt in prompts(examples)]
    return tower(pixel_values=torch.stack([transform(c.convert("RGB")) for c in crops])).pooler_output


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Fit a multinomial logistic regression (standardised features, small L2) and predict the test classes."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    layer = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(layer(x_train), y_train) + 1e-3 * layer.weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return layer(x_test).argmax(1)


def probe(exports: dict[str, Path], clip: Path | None = None, n_train: int = 1000,
          n_test: int = 400) -> dict[str, dict[str, tuple[float, float]]]:
    """{export name: {point: (seen %, novel %)}}: shape accuracy of the linear probe on held-out prompts; with
    `clip`, also {"init": {"ViT CLS": ...}}: the CLIP image tower the MLLM's ViT started from."""
    train, test = subject_examples(n_train, 11, split="train"), subject_examples(n_test, 12, split="test")
    y_train, y_test = (torch.tensor([SHAPES.index(e.target.objects[0].shape) for e in ex]) for ex in (train, test))
    novel = torch.tensor([is_novel(e) for e in test])
    if novel.all() or not novel.any():
        raise ValueError(f"{n_test} held-out prompts need both seen and novel (shape, colour) pairs; use more")

    def score(x_train, x_test) -> tuple[float, float]:
        hit = (linear_probe(x_train, y_train, x_test) == y_test).float()
        return 100 * hit[~novel].mean().item(), 100 * hit[novel].mean().item()

    table = {}
    if clip is not None:
        table["init"] = {"ViT CLS": score(tower_features(clip, train), tower_features(clip, test))}
    for name, export in exports.items():
        f_train, f_test = features(export, train), features(export, test)
        table[name] = {point: score(f_train[point], f_test[point]) for point in POINTS}
    return table


def markdown(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    names = [n for n in table if n != "init"]
    lines = ["| shape read linearly from | " + " | ".join(f"{n}: seen pairs | {n}: novel pairs" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for point in POINTS:
        lines.append(f"| {point} | " + " | ".join(f"{table[n][point][0]:.1f} | {table[n][point][1]:.1f}"
                                                  for n in names) + " |")
    if "init" in table:
        seen, novel = table["init"]["ViT CLS"]
        lines.append(f"\nThe CLIP image tower the ViT starts from (CLS): seen pairs {seen:.1f}, novel pairs {novel:.1f}.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kosmos_g.tinyworld.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a demo run folder (runs/demo): its align/ and instruct/ exports are read")
    parser.add_argument("--train", type=int, default=1000, help="train-split prompts the probe is fitted on")
    parser.add_argument("--test", type=int, default=400, help="held-out prompts it is scored on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exports = {"after stage 2": args.run / "align" / "export", "after stage 3": args.run / "instruct" / "export"}
    for export in exports.values():
        if not (export / "manifest.json").is_file():
            raise SystemExit(f"no stage export at {export}: run `python -m kosmos_g.tinyworld.demo` (or the stages) first")
    clip = args.run / "teachers" / "clip"
    print(markdown(probe(exports, clip if clip.is_dir() else None, args.train, args.test)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
