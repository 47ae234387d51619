"""The oracle reads every object of a scene, and the demo's two-subject and edit scores mean what they say."""

from dataclasses import replace

import pytest
import torch
from PIL import ImageFilter

from kosmos_g.tinyworld import world as tw
from kosmos_g.tinyworld.evaluate import chance, is_novel, oracle_scores
from kosmos_g.tinyworld.oracle import (Oracle, Reading, _Layers, edit_accuracy, edited_attribute, scene_accuracy,
                                       to_tensor, train_oracle)
from kosmos_g.tinyworld.world import Obj, Scene, render


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    """The quick budget's oracle (TeacherConfig.oracle_steps of "quick"), saved and loaded back."""
    folder = train_oracle(250, seed=3, log_every=0).save_pretrained(tmp_path_factory.mktemp("oracle"))
    return Oracle.from_pretrained(folder)


def heldout_two_object_scenes(n: int) -> list[Scene]:
    return [e.target for e in tw.two_subject_examples(n, 9, "test")]


def test_layers_compose_the_renders_of_one_and_two_object_scenes():
    layers = _Layers(32)
    scenes = layers.random_scenes(300, torch.Generator().manual_seed(0))
    assert {len(s.objects) for s in scenes} == {1, 2}
    diff = (layers.compose(scenes) - to_tensor([render(s) for s in scenes])).abs()
    # Exact but for rounding, and edge pixels where an object's rim crosses a texture's (box filter of a product).
    assert diff.mean() < 1 / 255 and (diff > 3 / 255).float().mean() < 0.01 and diff.max() < 16 / 255


def test_oracle_reads_every_object_of_clean_and_blurred_renders(oracle):
    two = heldout_two_object_scenes(200)
    clean = scene_accuracy(oracle.predict([render(s) for s in two]), two)
    assert clean["exact"] >= 0.97, clean          # every object, nothing extra, and the background
    blurred = scene_accuracy(oracle.predict([render(s).filter(ImageFilter.GaussianBlur(1.0)) for s in two]), two)
    assert blurred["all objects"] >= 0.9 and blurred["background"] >= 0.85, blurred
    one = [e.target for e in tw.subject_examples(200, 9, "test")]
    readings = oracle.predict([render(s) for s in one])
    assert scene_accuracy(readings, one)["exact"] >= 0.97
    assert oracle.score([render(s) for s in one], one)["all"] >= 0.97   # the one-object scores, as before


def test_scene_accuracy_reads_each_object_at_its_stated_place():
    truth = Scene((Obj("circle", "red", "top left"), Obj("square", "blue", "bottom right")), "dotted")
    swapped = Reading((Obj("square", "blue", "top left"), Obj("circle", "red", "bottom right")), "dotted")
    assert scene_accuracy([swapped], [truth]) == {"shape": 0.0, "colour": 0.0, "first": 0.0, "second": 0.0,
                                                  "all objects": 0.0, "background": 1.0, "exact": 0.0}
    one_right = Reading((Obj("circle", "red", "top left"), Obj("square", "red", "bottom right"),
                         Obj("cross", "green", "centre")), "plain")
    assert scene_accuracy([one_right], [truth]) == {"shape": 1.0, "colour": 0.5, "first": 1.0, "second": 0.0,
                                                    "all objects": 0.0, "background": 0.0, "exact": 0.0}
    assert scene_accuracy([truth], [truth])["exact"] == 1.0 and one_right.at("top right") is None
    with pytest.raises(ValueError, match="one scene per image"):
        scene_accuracy([truth], [truth, truth])


def test_edit_scoring_of_the_true_target_is_perfect_and_of_the_source_edits_nothing(oracle):
    examples = tw.edit_examples(120, 4, "test")
    sources, targets = [e.source for e in examples], [e.target for e in examples]
    assert edit_accuracy(targets, sources, targets) == pytest.approx(
        {"edited": 1.0, "kept": 1.0, "both": 1.0, "colour edits": 1.0, "position edits": 1.0, "shape edits": 1.0,
         "background edits": 1.0, "kept shape": 1.0, "kept colour": 1.0, "kept position": 1.0,
         "kept background": 1.0})
    unchanged = edit_accuracy(sources, sources, targets)
    assert unchanged["edited"] == 0 and unchanged["kept"] == 1
    assert all(unchanged[f"kept {a}"] == 1 for a in ("shape", "colour", "position", "background"))
    # kept <attribute> counts only the edits that leave it alone: a source moved elsewhere keeps no position.
    moved = [replace(s, objects=(replace(s.objects[0], position="centre" if s.objects[0].position != "centre"
                                         else "top left"),)) for s in sources]
    scores = edit_accuracy(moved, sources, targets)
    assert scores["kept position"] == 0 and scores["kept shape"] == 1 and scores["kept colour"] == 1
    # The same through the oracle and the demo's scorer, on the rendered truth.
    truth = oracle_scores(oracle, to_tensor([e.sample.target for e in examples]), examples, "edits")
    assert truth["edited"] >= 97 and truth["kept"] >= 97
    odds = chance("edits", examples)
    assert 16 < odds["edited"] < 26 and odds["kept"] < 2
    with pytest.raises(ValueError, match="exactly one attribute"):
        edited_attribute(sources[0], sources[0])


def test_novel_pairs_are_the_held_out_shape_colour_ones():
    examples = tw.two_subject_examples(60, 0, "test") + tw.subject_examples(60, 0, "test")
    novel = [e for e in examples if is_novel(e)]
    assert 0 < len(novel) < len(examples)
    for e in examples:
        pairs = {(o.shape, o.colour) for o in e.target.objects}
        assert is_novel(e) == bool(pairs & tw.HELDOUT_SHAPE_COLOUR)


def test_oracle_refuses_a_one_object_folder(tmp_path, oracle):
    folder = oracle.save_pretrained(tmp_path / "o")
    config = (folder / "config.json").read_text().replace('"slots": true', '"slots": false')
    (folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match="retrain"):
        Oracle.from_pretrained(folder)
    loaded = Oracle.from_pretrained(oracle.save_pretrained(tmp_path / "p"))
    images = [render(s) for s in heldout_two_object_scenes(8)]
    assert loaded.predict(images) == oracle.predict(images)
