"""DreamBench (the DreamBooth dataset): subjects, their class nouns and images, and the 25+25 prompts.

Everything is parsed from the dataset folder (`eval.dreambench_root`, e.g. `../shared/dreambench`):
one subfolder of photos per subject and `prompts_and_classes.txt` with the subject -> class table
and the object / live-subject prompt lists, written as DreamBooth publishes them:
`'a {0} {1} in the jungle'.format(unique_token, class_token)`.

Each prompt is used in two forms (as in the original Kosmos-G evaluation code):
- `kosmos_prompt`, the interleaved input with `<i>` standing for the subject's reference image:
  "<i> in the jungle"; attribute prompts ("a red {0} {1}") become "<i>, red".
- `clip_t_text`, the text CLIP-T scores against, with the class noun: "a backpack in the jungle".

    bench = load_dreambench("../shared/dreambench")
    for subject, prompt in bench.cases():
        ...  # generate from prompt.kosmos_prompt with subject.input_photo; score vs it (or subject.images)

The input photo of each subject is the one the original evaluation keeps (`OFFICIAL_INPUT_PHOTOS`).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torchvision.io import ImageReadMode, decode_image

from kosmos_g.processor import IMAGE_PLACEHOLDER  # the `<i>` that stands for an image in a prompt

PROMPTS_FILE = "prompts_and_classes.txt"
# The file lists an object and a live-subject prompt set but does not say which subjects are
# "live": in DreamBooth (and the Kosmos-G code's LIVE_OBJECT table) they are its pets.
LIVE_CLASSES = ("cat", "dog")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SUBJECT_TOKEN = "{0} {1}"  # unique token then class noun, in every DreamBooth template
# The one photo per subject the original evaluation uses as the input image (and scores against): the
# files kosmos-g/scripts/remove_dreambench_multiimg.sh keeps before sample_kosmosg_dreambench.py runs.
OFFICIAL_INPUT_PHOTOS = {
    "pink_sunglasses": "04.jpg", "can": "01.jpg", "candle": "02.jpg", "teapot": "04.jpg", "backpack": "02.jpg",
    "dog3": "05.jpg", "cat2": "02.jpg", "dog8": "04.jpg", "grey_sloth_plushie": "04.jpg", "backpack_dog": "02.jpg",
    "robot_toy": "00.jpg", "dog5": "00.jpg", "duck_toy": "01.jpg", "dog2": "02.jpg", "dog": "02.jpg",
    "colorful_sneaker": "01.jpg", "red_cartoon": "00.jpg", "clock": "03.jpg", "shiny_sneaker": "01.jpg",
    "dog6": "02.jpg", "berry_bowl": "02.jpg", "bear_plushie": "03.jpg", "poop_emoji": "00.jpg", "rc_car": "03.jpg",
    "dog7": "01.jpg", "cat": "04.jpg", "fancy_boot": "02.jpg", "wolf_plushie": "04.jpg", "monster_toy": "04.jpg",
    "vase": "02.jpg",
}
_TEMPLATE_LINE = re.compile(r"""^\s*(['"])(.*)\1\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


class DreamBenchError(ValueError):
    """A DreamBench folder that cannot be read; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    live: bool
    images: list[Path] = field(hash=False)

    @property
    def input_photo(self) -> Path:
        """The photo given to the model as `<i>`: the original evaluation's (`OFFICIAL_INPUT_PHOTOS`) when
        the folder has it, else the first by file name."""
        official = OFFICIAL_INPUT_PHOTOS.get(self.name)
        return next((p for p in self.images if p.name == official), self.images[0])

    def load_images(self) -> list[torch.Tensor]:
        """The subject's photos as uint8 [3, H, W] RGB tensors (sizes differ)."""
        return [decode_image(str(p), mode=ImageReadMode.RGB) for p in self.images]


@dataclass(frozen=True)
class PromptPair:
    index: int
    """Position in its prompt list (0..24), for naming outputs."""
    template: str
    """The raw DreamBooth template, e.g. 'a {0} {1} in the jungle' ({0} unique token, {1} class noun)."""
    kosmos_prompt: str
    """The interleaved input: '<i> in the jungle' (`<i>` = the reference image)."""
    clip_t_text: str
    """The text for CLIP-T: 'a backpack in the jungle'."""


@dataclass
class DreamBench:
    root: Path
    subjects: list[Subject]
    object_prompts: list[str]
    """The 25 raw templates for objects."""
    live_prompts: list[str]
    """The 25 raw templates for live subjects (cats and dogs)."""

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise KeyError(f"no DreamBench subject {name!r}; subjects: {', '.join(s.name for s in self.subjects)}")

    def prompts_for(self, subject: Union[Subject, str], class_noun_in_prompt: bool = False) -> list[PromptPair]:
        """The subject's 25 prompts. `class_noun_in_prompt` writes "backpack <i> in the jungle"
        (the original code's `drop_object=False`); the default "<i> in the jungle" is its setting."""
        subject = self.subject(subject) if isinstance(subject, str) else subject
        templates = self.live_prompts if subject.live else self.object_prompts
        return [PromptPair(i, t, kosmos_prompt(t, subject.class_noun if class_noun_in_prompt else None),
                           clip_t_text(t, subject.class_noun)) for i, t in enumerate(templates)]

    def cases(self, **kwargs) -> Iterator[tuple[Subject, PromptPair]]:
        """Every (subject, prompt) pair: 30 x 25 = 750 for the full benchmark."""
        for subject in self.subjects:
            for prompt in self.prompts_for(subject, **kwargs):
                yield subject, prompt


def _split_template(template: str) -> tuple[str, str]:
    """'a red {0} {1} on the beach' -> ('red', ' on the beach'): words between 'a' and the subject, rest."""
    if template.count(SUBJECT_TOKEN) != 1:
        raise DreamBenchError(f"prompt template {template!r} must contain {SUBJECT_TOKEN!r} exactly once")
    before, after = template.split(SUBJECT_TOKEN)
    words = before.split()
    if words[:1] in (["a"], ["an"]):
        words = words[1:]
    return " ".join(words), after.rstrip()


def kosmos_prompt(template: str, class_noun: str | None = None) -> str:
    """The interleaved form: '<i> in the jungle', 'a red {0} {1}' -> '<i>, red'."""
    attributes, rest = _split_template(template)
    subject = f"{class_noun} {IMAGE_PLACEHOLDER}" if class_noun else IMAGE_PLACEHOLDER
    return f"{subject}, {attributes}{rest}" if attributes else f"{subject}{rest}"


def clip_t_text(template: str, class_noun: str) -> str:
    """The template with the unique token dropped: 'a backpack in the jungle'."""
    return " ".join(template.format("", class_noun).split())


def parse_prompts_file(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class noun, object templates, live-subject templates) from prompts_and_classes.txt.

    The file has a `subject_name,class` CSV block, then an "Object Prompts" and a "Live Subject
    Prompts" section, each a Python list of `'...'.format(unique_token, class_token)` lines.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().replace(" ", "") == "subject_name,class")
    except StopIteration:
        raise DreamBenchError(f"{path}: no 'subject_name,class' table found") from None
    table = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        table.append(line)
    classes = {row[0].strip(): row[1].strip() for row in csv.reader(table) if len(row) == 2}

    sections: dict[str, list[str]] = {}
    current = None
    for line in lines[start + len(table) + 1:]:
        heading = line.strip().lower()
        if heading in ("object prompts", "live subject prompts"):
            current = sections.setdefault(heading, [])
        elif (m := _TEMPLATE_LINE.match(line)) and current is not None:
            current.append(m.group(2))
    objects, live = sections.get("object prompts", []), sections.get("live subject prompts", [])
    if not classes or not objects or not live:
        raise DreamBenchError(f"{path}: expected a class table and 'Object Prompts' / 'Live Subject Prompts' "
                              f"lists; found {len(classes)} classes, {len(objects)} object and {len(live)} "
                              "live-subject prompts")
    return classes, objects, live


def load_dreambench(root: Union[str, Path], live_classes: Sequence[str] = LIVE_CLASSES) -> DreamBench:
    """Read a DreamBench folder (`eval.dreambench_root`): subjects, class nouns, images and prompts."""
    root = Path(root).expanduser()
    prompts_file = root / PROMPTS_FILE
    if not root.is_dir():
        raise FileNotFoundError(f"eval.dreambench_root={root}: folder not found. Point it at the DreamBench "
                                "folder (the project's ../shared/dreambench, or the DreamBooth dataset/ "
                                f"folder with {PROMPTS_FILE}).")
    if not prompts_file.is_file():
        raise FileNotFoundError(f"{prompts_file} not found: a DreamBench folder needs {PROMPTS_FILE} (the "
                                "subject -> class table and the prompt lists) beside the subject folders.")
    classes, objects, live = parse_prompts_file(prompts_file)
    subjects = []
    for name, noun in classes.items():
        folder = root / name
        images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not images:
            raise DreamBenchError(f"{folder}: no images for subject {name!r} listed in {prompts_file}; "
                                  "put the subject's photos (.jpg/.png) there")
        subjects.append(Subject(name, noun, noun in live_classes, images))
    return DreamBench(root, subjects, objects, live)
