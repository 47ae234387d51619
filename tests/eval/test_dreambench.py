"""DreamBench reader: the shared dataset (skipped when absent) and small synthetic folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from kosmos_g.eval.dreambench import (OFFICIAL_INPUT_PHOTOS, PROMPTS_FILE, DreamBenchError, clip_t_text,
                                      kosmos_prompt, load_dreambench)

SHARED = Path(__file__).parents[2].parent / "shared" / "dreambench"
needs_shared = pytest.mark.skipif(not (SHARED / PROMPTS_FILE).is_file(), reason=f"{SHARED} not present")


@pytest.fixture(scope="module")
def bench():
    return load_dreambench(SHARED)


# ---------------------------------------------------------------------------------------------- the real data


@needs_shared
def test_thirty_subjects_with_their_class_nouns_and_folders(bench):
    assert len(bench.subjects) == 30
    # Class nouns come from the file's table, in its order (read here independently with csv).
    text = (SHARED / PROMPTS_FILE).read_text()
    table = text[text.index("subject_name,class"):].split("\n\n")[0]
    rows = list(csv.reader(io.StringIO(table)))[1:]
    assert [(s.name, s.class_noun) for s in bench.subjects] == [(r[0], r[1]) for r in rows]
    assert bench.subject("bear_plushie").class_noun == "stuffed animal"
    assert bench.subject("backpack_dog").class_noun == "backpack"  # a backpack, not a dog
    # Every subject folder of the dataset is a subject, and nothing else is.
    folders = {p.name for p in SHARED.iterdir() if p.is_dir()}
    assert folders == {s.name for s in bench.subjects}


@needs_shared
def test_live_subjects_are_the_cats_and_dogs(bench):
    live = {s.name for s in bench.subjects if s.live}
    assert len(live) == 9
    assert live == {s.name for s in bench.subjects if s.class_noun in ("cat", "dog")}
    assert not bench.subject("backpack_dog").live


@needs_shared
def test_every_subject_has_at_least_four_readable_images(bench):
    for s in bench.subjects:
        assert len(s.images) >= 4, s.name
        assert all(p.is_file() and p.parent == SHARED / s.name for p in s.images)
    assert sum(len(s.images) for s in bench.subjects) == 158  # as the dataset's README says
    first = bench.subjects[0].load_images()[0]
    assert first.dtype == torch.uint8 and first.shape[0] == 3 and min(first.shape[1:]) == 512


@needs_shared
def test_twenty_five_prompts_of_each_kind(bench):
    assert len(bench.object_prompts) == len(bench.live_prompts) == 25
    assert len(set(bench.object_prompts)) == len(set(bench.live_prompts)) == 25
    assert all("{0} {1}" in t for t in bench.object_prompts + bench.live_prompts)
    # The two lists share the scene and attribute prompts; only the live list dresses its subjects.
    assert bench.object_prompts[:10] == bench.live_prompts[:10]
    assert any("wearing" in t for t in bench.live_prompts)
    assert not any("wearing" in t for t in bench.object_prompts)
    assert [p.template for p in bench.prompts_for("dog")] == bench.live_prompts
    assert [p.template for p in bench.prompts_for("backpack")] == bench.object_prompts
    assert len(list(bench.cases())) == 30 * 25


@needs_shared
def test_prompt_forms_for_a_subject(bench):
    jungle = bench.prompts_for("backpack")[0]
    assert (jungle.template, jungle.kosmos_prompt, jungle.clip_t_text) == (
        "a {0} {1} in the jungle", "<i> in the jungle", "a backpack in the jungle")
    red = next(p for p in bench.prompts_for("bear_plushie") if p.template == "a red {0} {1}")
    assert (red.kosmos_prompt, red.clip_t_text) == ("<i>, red", "a red stuffed animal")
    hat = next(p for p in bench.prompts_for("dog2", class_noun_in_prompt=True) if "santa" in p.template)
    assert (hat.kosmos_prompt, hat.clip_t_text) == ("dog <i> wearing a santa hat", "a dog wearing a santa hat")
    for subject, prompt in bench.cases():
        assert prompt.kosmos_prompt.count("<i>") == 1
        assert subject.class_noun in prompt.clip_t_text and "{" not in prompt.clip_t_text


@needs_shared
def test_input_photos_are_the_ones_the_original_evaluation_keeps(bench):
    """kosmos-g/scripts/remove_dreambench_multiimg.sh deletes all photos but one per subject before
    sample_kosmosg_dreambench.py walks the folder: that photo is `<i>` and what DINO / CLIP-I compare with."""
    kept = {"backpack": "02.jpg", "dog": "02.jpg", "cat": "04.jpg", "robot_toy": "00.jpg", "vase": "02.jpg"}
    assert {name: bench.subject(name).input_photo.name for name in kept} == kept
    assert set(OFFICIAL_INPUT_PHOTOS) == {s.name for s in bench.subjects}
    assert all(s.input_photo in s.images and s.input_photo.name == OFFICIAL_INPUT_PHOTOS[s.name]
               for s in bench.subjects)


# ---------------------------------------------------------------------------------------------- formatting


def test_prompt_formatting_from_templates():
    assert kosmos_prompt("a {0} {1} on top of a mirror") == "<i> on top of a mirror"
    assert kosmos_prompt("a cube shaped {0} {1}") == "<i>, cube shaped"
    assert kosmos_prompt("a {0} {1} in the snow", class_noun="cat") == "cat <i> in the snow"
    assert kosmos_prompt("a wet {0} {1}", class_noun="cat") == "cat <i>, wet"
    assert clip_t_text("a cube shaped {0} {1}", "stuffed animal") == "a cube shaped stuffed animal"
    assert clip_t_text("a {0} {1} floating in an ocean of milk", "can") == "a can floating in an ocean of milk"
    with pytest.raises(DreamBenchError, match="exactly once"):
        kosmos_prompt("a photo of a {1}")


# ---------------------------------------------------------------------------------------------- synthetic folders


PROMPTS = """Classes

subject_name,class
mug,cup
puppy,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a shiny {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def make_bench(root: Path, prompts: str = PROMPTS, subjects=("mug", "puppy")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / PROMPTS_FILE).write_text(prompts)
    for name in subjects:
        (root / name).mkdir()
        for i in range(2):
            Image.new("RGB", (24, 16), (i * 80, 10, 200)).save(root / name / f"{i:02d}.jpg")
    (root / "mug" / "notes.txt").write_text("not an image")
    return root


def test_reads_any_folder_with_the_same_layout(tmp_path):
    bench = load_dreambench(make_bench(tmp_path / "db"))
    assert [(s.name, s.class_noun, s.live, len(s.images)) for s in bench.subjects] == [
        ("mug", "cup", False, 2), ("puppy", "dog", True, 2)]
    assert [p.kosmos_prompt for p in bench.prompts_for("mug")] == ["<i> in the jungle", "<i>, shiny"]
    assert [p.clip_t_text for p in bench.prompts_for("puppy")] == ["a dog wearing a red hat"]
    assert bench.subject("mug").load_images()[1].shape == (3, 16, 24)
    assert bench.subject("mug").input_photo.name == "00.jpg"  # not in the original list: the first photo
    with pytest.raises(KeyError, match="mug, puppy"):
        bench.subject("teapot")


def test_clear_errors_for_a_broken_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.dreambench_root"):
        load_dreambench(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=PROMPTS_FILE):
        load_dreambench(tmp_path / "empty")
    with pytest.raises(DreamBenchError, match="no images for subject 'puppy'"):
        load_dreambench(make_bench(tmp_path / "no_puppy", subjects=("mug",)))
    no_live = PROMPTS.split("Live Subject Prompts")[0]
    with pytest.raises(DreamBenchError, match="0 live-subject prompts"):
        load_dreambench(make_bench(tmp_path / "no_live", prompts=no_live))
