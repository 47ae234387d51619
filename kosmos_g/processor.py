"""One callable from an interleaved prompt to model inputs, shared by training and inference.

    processor(["a photo of", dog_image, "wearing", hat_image, "on the beach"])
    processor("a photo of <i> wearing <i> on the beach", images=[dog_image, hat_image])

As in the original Kosmos-G, a prompt is `<s>` + for each image (the text before it + the image block) + the
tail text, and never ends with `</s>` (neither in training nor in inference). An image block is N + 1
`<image>` then `</image>`; the MLLM overwrites the N slots after the first `<image>` with the connector's
output for that image. The null prompt (classifier-free guidance, the empty negative) is `<s>` alone.
Text segments are stripped of the whitespace around them and tokenized one by one, so both prompt forms
give the same ids. Only text tokens are next-token targets (`loss_mask`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kosmos_g.models.tokenizers import IMAGE_END, IMAGE_START, check_special_layout

IMAGE_PLACEHOLDER = "<i>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "processor_config.json"


class PromptError(ValueError):
    """A prompt that cannot be encoded; the message says how to fix it."""


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [L] long
    image_mask: torch.Tensor  # [L] bool: placeholder positions, filled in image order
    loss_mask: torch.Tensor  # [L] bool: positions whose token is a next-token target (text tokens)
    pixel_values: torch.Tensor  # [num_images, 3, S, S], CLIP-normalised


def clip_image_transform(size: int) -> T.Compose:
    """224 px CLIP-normalised in the paper: resize the short side, centre-crop, normalise."""
    return T.Compose([
        T.ToImage(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


class KosmosGProcessor:
    """Tokenizer + image transform: an interleaved prompt -> `Encoded`; a list of those -> a padded batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int = 64, image_size: int = 224,
                 max_length: int = 2048):
        missing = [t for t in (IMAGE_START, IMAGE_END) if t not in tokenizer.get_vocab()]
        if missing:
            raise PromptError(f"tokenizer lacks the image tokens {missing}; build it with "
                              "kosmos_g.models.tokenizers (official_tokenizer or train_mllm_tokenizer)")
        try:
            check_special_layout(tokenizer)
        except ValueError as e:
            raise PromptError(str(e)) from None
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.max_length = max_length
        self.image_transform = clip_image_transform(image_size)
        self.image_start_id, self.image_end_id = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, model_cfg) -> "KosmosGProcessor":
        """The processor matching a `ModelConfig`: its image tokens per image, ViT input size and context length."""
        return cls(tokenizer, num_image_tokens=model_cfg.vision.num_image_tokens, image_size=model_cfg.vision.img_size,
                   max_length=model_cfg.llm.max_positions)

    def __call__(self, prompt: str | list, images: list[Image.Image] | None = None) -> Encoded:
        """Encode one prompt: a string with `<i>` placeholders plus `images`, or a list of str and PIL images."""
        segments = self.split_prompt(prompt, images)
        ids, is_image, is_target = [self.tokenizer.bos_token_id], [False], [False]
        pixels = []
        for seg in segments:
            if isinstance(seg, Image.Image):
                block = [self.image_start_id] * (self.num_image_tokens + 1) + [self.image_end_id]
                ids += block
                is_image += [False] + [True] * self.num_image_tokens + [False]
                is_target += [False] * len(block)
                pixels.append(self.image_transform(seg.convert("RGB")))
            else:
                text_ids = self.text_ids(seg)
                ids += text_ids
                is_image += [False] * len(text_ids)
                is_target += [True] * len(text_ids)
        if len(ids) > self.max_length:
            raise PromptError(f"prompt is {len(ids)} tokens, longer than the context of {self.max_length} "
                              "(model.llm.max_positions); shorten the text or use fewer images")
        empty = torch.empty(0, 3, self.image_size, self.image_size)
        return Encoded(torch.tensor(ids), torch.tensor(is_image), torch.tensor(is_target),
                       torch.stack(pixels) if pixels else empty)

    def text_ids(self, text: str) -> list[int]:
        """The ids of one text segment, as the original tokenises it: the pieces alone, no `<s>`/`</s>`, and
        `<image>`-like strings in the text split into pieces (a prompt's text cannot forge an image block)."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def null_prompt(self) -> Encoded:
        """`<s>` alone: the null condition of classifier-free guidance (stage 3's dropout, the default negative)."""
        return self([])

    @staticmethod
    def split_prompt(prompt: str | list, images: list[Image.Image] | None = None) -> list:
        """Normalise both prompt forms to one list of stripped, non-empty str and PIL images, in order."""
        if isinstance(prompt, str):
            parts = re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", prompt)
            images = [images] if isinstance(images, Image.Image) else list(images or [])
            bad = [type(i).__name__ for i in images if not isinstance(i, Image.Image)]
            if bad:
                raise PromptError(f"images= must hold PIL.Image.Image objects, got {bad}; "
                                  "open image files with PIL.Image.open first")
            n = parts.count(IMAGE_PLACEHOLDER)
            if n != len(images):
                raise PromptError(f"prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) "
                                  f"were given; pass exactly one image per {IMAGE_PLACEHOLDER}")
            it = iter(images)
            segments = [next(it) if p == IMAGE_PLACEHOLDER else p for p in parts]
        elif isinstance(prompt, (list, tuple)):
            if images:
                raise PromptError("images= is only for the string form with <i> placeholders; "
                                  "a list prompt carries its images inline")
            segments = list(prompt)
        else:
            raise PromptError(f"prompt must be a str with {IMAGE_PLACEHOLDER} placeholders or a list of str and "
                              f"PIL images, got {type(prompt).__name__}")
        for seg in segments:
            if not isinstance(seg, (str, Image.Image)):
                raise PromptError(f"prompt items and images must be str or PIL.Image.Image, got {type(seg).__name__}; "
                                  "open image files with PIL.Image.open first")
        # Whitespace next to an image carries no meaning; stripping it makes both forms tokenize alike.
        return [s.strip() if isinstance(s, str) else s for s in segments if not isinstance(s, str) or s.strip()]

    def collate(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad a batch; `labels` hold -100 wherever no next-token loss applies.

        pixel_values are concatenated in batch order (sample 0's images first), as `MultimodalLM.embed` expects.
        """
        if not encoded:
            raise ValueError("collate needs at least one encoded prompt")
        length = max(len(e.input_ids) for e in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), length), self.tokenizer.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(encoded), length, dtype=torch.long),
            "image_mask": torch.zeros(len(encoded), length, dtype=torch.bool),
            "labels": torch.full((len(encoded), length), -100, dtype=torch.long),
        }
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            batch["input_ids"][i, :n] = e.input_ids
            batch["attention_mask"][i, :n] = 1
            batch["image_mask"][i, :n] = e.image_mask
            batch["labels"][i, :n] = torch.where(e.loss_mask, e.input_ids, -100)
        batch["pixel_values"] = torch.cat([e.pixel_values for e in encoded])
        return batch

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {"num_image_tokens": self.num_image_tokens, "image_size": self.image_size, "max_length": self.max_length}
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "KosmosGProcessor":
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path / CONFIG_NAME} not found: not a processor folder "
                                    "(expected one written by KosmosGProcessor.save_pretrained)")
        cfg = json.loads((path / CONFIG_NAME).read_text())
        return cls(AutoTokenizer.from_pretrained(path), **cfg)
