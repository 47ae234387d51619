"""The in-memory sample every data source is turned into, one kind per shard set.

How each kind is laid out inside a webdataset tar shard is written down in `docs/data-format.md`
and implemented in `kosmos_g/data/shards.py`. In memory, every sample is a `Sample`:

| kind        | segments (the model's input, in order)                    | target        |
|-------------|-----------------------------------------------------------|---------------|
| text        | [str]                                                     | None          |
| caption     | [str] (the caption)                                       | the image     |
| interleaved | str and PIL images in document order                      | None          |
| subject     | str, Entity and SubjectImage in instruction order         | the scene     |
| edit        | [InputCaption (optional), source PIL image, instruction]  | edited image  |

Entity and InputCaption are text the training stage drops at random (`stages/instruct.py`), so the
model learns to read the subject, or the source image, from the image alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from PIL import Image

SAMPLE_KINDS = ("text", "caption", "interleaved", "subject", "edit")
TARGET_KINDS = ("caption", "subject", "edit")  # the kinds with a target image


@dataclass
class Entity:
    """Words naming a subject in an instruction ("red circle"). The paper drops them with
    probability 0.5 at training time so the model learns to read the subject from the image alone."""

    text: str


@dataclass
class InputCaption:
    """The caption of an edit's source image ("a house by a lake"), shown before it. InstructPix2Pix
    provides one per edit; the official prompt is `<s> caption <image>source</image> instruction`
    with the caption dropped with probability 0.5 at training time."""

    text: str


@dataclass
class SubjectImage:
    """A cropped subject, plus the same crop pasted on white (the paper trains on both)."""

    image: Image.Image
    on_white: Optional[Image.Image] = None


Segment = Union[str, Image.Image, Entity, InputCaption, SubjectImage]


@dataclass
class Sample:
    kind: str
    segments: list = field(default_factory=list)
    target: Optional[Image.Image] = None
    key: str = ""

    def __post_init__(self):
        if self.kind not in SAMPLE_KINDS:
            raise ValueError(f"unknown sample kind {self.kind!r}; expected one of {', '.join(SAMPLE_KINDS)}")
        if not self.segments:
            raise ValueError(f"sample {self.key!r} ({self.kind}) has no segments")
        needs_target = self.kind in TARGET_KINDS
        if needs_target != (self.target is not None):
            raise ValueError(f"sample {self.key!r}: kind {self.kind!r} "
                             f"{'needs' if needs_target else 'takes no'} target image")

    @property
    def images(self) -> list[Image.Image]:
        """The input images in order (a SubjectImage counts once, as its crop)."""
        return [s.image if isinstance(s, SubjectImage) else s for s in self.segments
                if isinstance(s, (Image.Image, SubjectImage))]

    @property
    def text(self) -> str:
        """All text segments (entity words and input captions included) joined; for text and caption
        kinds, the text."""
        return "".join(s.text if isinstance(s, (Entity, InputCaption)) else s for s in self.segments
                       if isinstance(s, (str, Entity, InputCaption)))
