"""The tiny world: deterministic, readable renderings, sound splits, valid samples with exact truth."""

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos_g.data.format import Entity, InputCaption, Sample, SubjectImage
from kosmos_g.tinyworld import world as tw
from kosmos_g.tinyworld.world import (BACKGROUNDS, COLOURS, HELDOUT_COLOUR_BACKGROUND, HELDOUT_SHAPE_COLOUR,
                                      POSITIONS, SHAPES, Obj, Scene, caption, is_heldout, object_box,
                                      read_scene, render, sample_scene)

ONE_OBJECT_SCENES = [Scene((Obj(s, c, p),), b) for s, c, p, b in
                     itertools.product(SHAPES, COLOURS, POSITIONS, BACKGROUNDS)]


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - np.asarray(rgb)) ** 2).sum()))


def fingerprint(sample: Sample) -> list:
    """Everything in a sample, images as raw bytes, for exact comparisons."""
    def one(x):
        if isinstance(x, Image.Image):
            return x.tobytes()
        if isinstance(x, SubjectImage):
            return (x.image.tobytes(), x.on_white.tobytes())
        return x.text if isinstance(x, (Entity, InputCaption)) else x
    return [sample.kind, sample.key, [one(s) for s in sample.segments],
            sample.target.tobytes() if sample.target is not None else None]


REPO = Path(__file__).resolve().parents[2]
GENERATORS = {
    "text": lambda n, seed: tw.text_samples(n, seed),
    "caption": lambda n, seed: tw.caption_samples(n, seed, "train"),
    "interleaved": lambda n, seed: tw.interleaved_samples(n, seed),
    "subject": lambda n, seed: tw.subject_samples(n, seed, "test"),
    "edit": lambda n, seed: tw.edit_samples(n, seed, "train"),
}


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generators_are_deterministic_and_seeded(kind):
    make = GENERATORS[kind]
    a, b, other = make(6, 7), make(6, 7), make(6, 8)
    assert [fingerprint(s) for s in a] == [fingerprint(s) for s in b]
    assert [fingerprint(s)[2:] for s in a] != [fingerprint(s)[2:] for s in other]
    assert len({s.key for s in a + other}) == 12, "keys must be unique across seeds"


def test_render_is_deterministic_and_every_one_object_scene_reads_back():
    scene = Scene((Obj("cross", "green", "top right"), Obj("circle", "red", "bottom left")), "dotted")
    assert render(scene).tobytes() == render(scene).tobytes()
    assert render(scene).size == (32, 32) and render(scene, 48).size == (48, 48)
    # Nearest-template reading recovers all 600 scenes: every rendering is distinct and legible.
    assert [read_scene(render(s)) for s in ONE_OBJECT_SCENES] == ONE_OBJECT_SCENES


def test_changing_one_attribute_changes_the_image():
    base = Scene((Obj("circle", "red", "top left"),), "plain")
    changed = [Scene((Obj("circle", "blue", "top left"),), "plain"),
               Scene((Obj("square", "red", "top left"),), "plain"),
               Scene((Obj("circle", "red", "bottom right"),), "plain"),
               Scene((Obj("circle", "red", "top left"),), "striped")]
    images = [np.asarray(render(s), dtype=float) for s in [base] + changed]
    for other in images[1:]:   # circle -> square differs only at the corners: count changed pixels
        assert (np.abs(images[0] - other).max(axis=2) > 30).sum() >= 10


def test_object_colour_dominates_its_stated_place():
    two = Scene((Obj("triangle", "yellow", "top right"), Obj("cross", "cyan", "bottom left")), "checkered")
    for scene in ONE_OBJECT_SCENES + [two]:
        check_colours_in_place(scene)


def check_colours_in_place(scene):
    pixels = np.asarray(render(scene), dtype=float)
    for obj in scene.objects:
        x0, y0, x1, y1 = object_box(obj.position, 32)
        assert nearest_colour(pixels[y0:y1, x0:x1].reshape(-1, 3).mean(0)) == obj.colour
    # Quadrants no object's box touches show only greys (the background).
    boxes = [object_box(o.position, 32) for o in scene.objects]
    for qx, qy in [(0, 0), (16, 0), (0, 16), (16, 16)]:
        if not any(x0 < qx + 16 and qx < x1 and y0 < qy + 16 and qy < y1 for x0, y0, x1, y1 in boxes):
            assert np.ptp(pixels[qy:qy + 16, qx:qx + 16], axis=2).max() == 0


def test_captions():
    assert caption(Scene((Obj("circle", "red", "top left"),), "striped")) == \
        "a red circle at the top left on a striped background"
    two = Scene([Obj("circle", "red", "top left"), Obj("square", "blue", "bottom right")], "dotted")
    assert caption(two) == \
        "a red circle at the top left and a blue square at the bottom right on a dotted background"
    assert two.objects == tuple(two.objects) and hash(two) == hash(Scene(two.objects, "dotted"))
    assert caption(Scene((Obj("diamond", "cyan", "centre"),), "plain")).endswith(
        "in the centre on a plain background")


def test_splits_hold_out_combinations_and_keep_every_value_in_train():
    assert 0.15 <= len(HELDOUT_SHAPE_COLOUR) / (len(SHAPES) * len(COLOURS)) <= 0.25
    rng = np.random.default_rng(0)
    train = [sample_scene(rng, "train", 2) for _ in range(1500)]
    test = [sample_scene(rng, "test", 2) for _ in range(1500)]
    assert not any(is_heldout(s) for s in train) and all(is_heldout(s) for s in test)
    train_objs = [(o, s.background) for s in train for o in s.objects]
    assert {o.shape for o, _ in train_objs} == set(SHAPES)
    assert {o.colour for o, _ in train_objs} == set(COLOURS)
    assert {o.position for o, _ in train_objs} == set(POSITIONS)
    assert {b for _, b in train_objs} == set(BACKGROUNDS)
    assert not {(o.shape, o.colour) for o, _ in train_objs} & HELDOUT_SHAPE_COLOUR
    assert not {(o.colour, b) for o, b in train_objs} & HELDOUT_COLOUR_BACKGROUND
    test_objs = [(o, s.background) for s in test for o in s.objects]
    assert HELDOUT_SHAPE_COLOUR <= {(o.shape, o.colour) for o, _ in test_objs}
    assert HELDOUT_COLOUR_BACKGROUND <= {(o.colour, b) for o, b in test_objs}
    assert {len(s.objects) for s in train} == {1, 2}


def test_generators_respect_the_split():
    for split in ("train", "test"):
        for e in tw.subject_examples(40, 1, split) + tw.edit_examples(40, 1, split) + \
                tw.caption_examples(40, 1, split):
            assert is_heldout(e.target) == (split == "test")
            if split == "train" and e.source is not None:      # nothing held out leaks through inputs
                assert not is_heldout(e.source)
    # Only the stage-1 documents (the world's "web") show held-out pairs too.
    docs = " ".join(s.text for s in tw.interleaved_samples(60, 1))
    assert any(f"{colour} {shape}" in docs for shape, colour in HELDOUT_SHAPE_COLOUR)


def test_every_generator_returns_valid_samples_of_its_kind():
    for kind, make in GENERATORS.items():
        samples = make(8, 3)
        assert len(samples) == 8 and all(isinstance(s, Sample) and s.kind == kind for s in samples)
        for s in samples:
            assert all(im.size == (32, 32) and im.mode == "RGB" for im in s.images)
            assert s.text.strip()
    for s in GENERATORS["text"](8, 3):
        assert s.segments == [s.text] and s.text.count(".") >= 2
    for s in GENERATORS["interleaved"](8, 3):
        assert len(s.images) >= 2
        kinds = [type(x) for x in s.segments]
        assert all(a is not b for a, b in zip(kinds, kinds[1:])), "text and images alternate"
    # Some images are close-ups of one object (what stage 3 shows as a subject), named as such.
    docs = " ".join(s.text for s in GENERATORS["interleaved"](8, 3))
    assert "a close-up of a " in docs and " at the " in docs
    for s in GENERATORS["edit"](8, 3):
        assert [type(x) for x in s.segments] == [InputCaption, Image.Image, str]
    counts = []
    for s in tw.subject_samples(30, 3, "train"):
        subject = [x for x in s.segments if isinstance(x, SubjectImage)]
        counts.append(len(subject))
        assert subject[0].on_white.size == (32, 32)
    assert counts.count(2) == 10 and counts.count(1) == 20   # a third show two subjects
    forms = {tuple(type(x).__name__ for x in s.segments) for s in tw.subject_samples(30, 3, "train")}
    assert ("str", "Entity", "SubjectImage", "str") in forms and ("SubjectImage", "str") in forms


@pytest.mark.parametrize("split", ["train", "test"])
def test_subject_truth_matches_instruction_and_images(split):
    for e in tw.subject_examples(30, 5, split):
        obj = e.target.objects[0]
        segments = e.sample.segments
        assert e.sample.text.endswith(caption(e.target)[len(f"a {obj.name}"):])   # place and background
        assert [x.text for x in segments if isinstance(x, Entity)] in ([], [obj.name])
        assert e.sample.target.tobytes() == render(e.target).tobytes() and read_scene(e.sample.target) == e.target
        # The subject image carries shape and colour, taken from a scene of the same object.
        src = e.source.objects[0]
        assert (src.shape, src.colour) == (obj.shape, obj.colour)
        subject = [x for x in segments if isinstance(x, SubjectImage)][0]
        crop, on_white = np.asarray(subject.image, dtype=float), np.asarray(subject.on_white, dtype=float)
        assert (on_white[0, 0] == 255).all() and (crop[0, 0] < 255).all()   # corners: white vs source background
        ink = on_white.reshape(-1, 3)[on_white.reshape(-1, 3).min(1) < 200]
        assert nearest_colour(ink.mean(0)) == obj.colour


def test_edit_truth_changes_exactly_what_the_instruction_says():
    for e in tw.edit_examples(40, 2, "train") + tw.edit_examples(20, 2, "test"):
        input_caption, image, instruction = e.sample.segments
        assert input_caption == InputCaption(caption(e.source))   # InstructPix2Pix's "input" caption
        assert image.tobytes() == render(e.source).tobytes()
        assert e.sample.target.tobytes() == render(e.target).tobytes()
        before, after = e.source.objects[0], e.target.objects[0]
        changes = {f: getattr(after, f) for f in ("shape", "colour", "position")
                   if getattr(before, f) != getattr(after, f)}
        if e.source.background != e.target.background:
            changes["background"] = e.target.background
        assert len(changes) == 1
        assert instruction.endswith(next(iter(changes.values())))


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        Obj("star", "red", "centre")
    with pytest.raises(ValueError, match="unknown split"):
        tw.caption_samples(2, 0, split="val")
    with pytest.raises(ValueError, match="unknown split"):
        tw.subject_samples(0, 0, split="validation")
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(np.random.default_rng(0), "train", 3)
    with pytest.raises(ValueError, match="centre"):
        Scene((Obj("circle", "red", "centre"), Obj("square", "blue", "top left")), "plain")
    with pytest.raises(ValueError, match="at least one object"):
        Scene((), "plain")
    with pytest.raises(ValueError, match="seed"):
        tw.text_samples(2, -1)


def test_core_package_does_not_import_tinyworld():
    root = Path(tw.__file__).parents[1]
    offenders = [str(p) for p in root.rglob("*.py") if "tinyworld" not in p.parts
                 and re.search(r"^\s*(from|import)\s+kosmos_g\.tinyworld", p.read_text(), re.M)]
    assert offenders == []


def test_importing_every_core_module_leaves_tinyworld_unimported():
    """In a fresh interpreter (other tests' imports do not count): every kosmos_g module outside kosmos_g.tinyworld."""
    package = REPO / "kosmos_g"
    names = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                   for p in package.rglob("*.py") if "tinyworld" not in p.relative_to(package).parts)
    code = ("import sys, importlib\n"
            f"names = {names!r}\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "print(len(names), sorted(m for m in sys.modules if m.startswith('kosmos_g.tinyworld')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    count, loaded = out.stdout.strip().split(" ", 1)
    assert int(count) > 30 and loaded == "[]", out.stdout


def test_fresh_clone_names_the_missing_world_and_its_command_which_writes_it(tmp_path, monkeypatch, capsys):
    """`python train.py stage=mllm` (data=tiny) without shards: one error line naming the folder and the command;
    that command, as printed (with a small --samples, as the doc tests append), writes what train.py reads."""
    from kosmos_g.assets import check_tiny_world
    from kosmos_g.config import load_config
    from kosmos_g.train import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["stage=mllm"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs/tiny/data" in err, err
    command = re.search(r"`(python -m kosmos_g\.tinyworld\.data [^`]+)`", err).group(1)
    assert command == "python -m kosmos_g.tinyworld.data --out runs/tiny/data"
    argv = command.split()
    subprocess.run([sys.executable, *argv[1:], "--samples", "20"], cwd=tmp_path, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    check_tiny_world(load_config(["stage=mllm"]).data)  # no error now
    assert all(list((tmp_path / "runs/tiny/data" / kind).glob("*.tar")) for kind in GENERATORS)
    assert not (tmp_path / "runs/tiny/mllm").exists()  # the failed launch wrote nothing


def test_removed_world_keys_name_the_command():
    from kosmos_g.config import ConfigError, load_config

    for key in ("data.generate_tiny_world=true", "data.tiny_world_samples=100"):
        with pytest.raises(ConfigError, match="python -m kosmos_g.tinyworld.data --out"):
            load_config([key])


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_samples_round_trip_through_shards(kind, tmp_path):
    shards = pytest.importorskip("kosmos_g.data.shards")   # written by another helper; skip until then
    samples = GENERATORS[kind](5, 0)
    summary = shards.write_shards(samples, str(tmp_path), "tiny", kind, 2, progress=False, image_format="png")
    assert summary.written == 5 and len(summary.shards) == 3
    back = sorted(shards.read_shards(str(tmp_path), kind), key=lambda s: s.key)
    assert [fingerprint(s) for s in back] == [fingerprint(s) for s in sorted(samples, key=lambda s: s.key)]  # lossless
