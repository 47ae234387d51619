"""Two subjects in one prompt: the stage-3 samples that show two subject images, and their mix with one-subject ones."""

import numpy as np
import pytest

from kosmos_g.data.format import Entity, SubjectImage
from kosmos_g.tinyworld import world as tw
from kosmos_g.tinyworld.world import COLOURS, caption, is_heldout, render, where


def ink_colour(image) -> str:
    """The object colour nearest to the mean of an image's non-grey, non-white pixels."""
    pixels = np.asarray(image, dtype=float).reshape(-1, 3)
    ink = pixels[np.ptp(pixels, axis=1) > 60].mean(0)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - ink) ** 2).sum()))


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_subject_samples_match_their_scene(split):
    examples = tw.two_subject_examples(40, 4, split)
    forms = set()
    for e in examples:
        a, b = e.target.objects
        assert a.position != b.position and "centre" not in (a.position, b.position)   # distinct corners
        assert is_heldout(e.target) == (split == "test")
        segments = e.sample.segments
        subjects = [x for x in segments if isinstance(x, SubjectImage)]
        entities = [x.text for x in segments if isinstance(x, Entity)]
        assert len(subjects) == 2 and entities in ([], [a.name, b.name])
        # Each image shows its own object (in the order the text places them), on its background and on white.
        for subject, obj in zip(subjects, (a, b)):
            assert ink_colour(subject.on_white) == ink_colour(subject.image) == obj.colour
        # The text: both places in order, then the background; names only through the entity words.
        text = e.sample.text
        assert text.index(where(a.position)) < text.index(where(b.position))
        assert text.endswith(caption(e.target).split(where(b.position))[1])
        if entities:
            assert text == caption(e.target)
        types = [type(x) for x in segments]
        assert all(x is not y for x, y in zip(types, types[1:])), "text and images alternate"
        forms.add(tuple(t.__name__ for t in types))
        assert e.sample.target.tobytes() == render(e.target).tobytes()
        assert e.sample.key.startswith(f"tiny_subject2_{split}_4_")
    assert ("SubjectImage", "str", "SubjectImage", "str") in forms and len(forms) == 3


def test_train_subjects_come_from_train_legal_sources():
    # The first subject's source scene is kept; both subjects are cut from scenes the split allows.
    for e in tw.two_subject_examples(60, 1, "train"):
        assert not is_heldout(e.source) and not is_heldout(e.target)
        assert (e.source.objects[0].shape, e.source.objects[0].colour) == \
            (e.target.objects[0].shape, e.target.objects[0].colour)
    assert any(is_heldout(e.source) for e in tw.two_subject_examples(60, 1, "test"))


def test_subject_samples_mix_keeps_the_one_subject_stream():
    mixed = tw.subject_samples(30, 2, "train")
    one = [s for s in mixed if sum(isinstance(x, SubjectImage) for x in s.segments) == 1]
    two = [s for s in mixed if sum(isinstance(x, SubjectImage) for x in s.segments) == 2]
    assert len(one) == 20 and len(two) == 10 and len({s.key for s in mixed}) == 30
    # The one-subject samples are exactly `subject_examples`' first 20, so one-subject results stay comparable.
    assert [s.key for s in one] == [e.sample.key for e in tw.subject_examples(20, 2, "train")]
    assert [s.key for s in two] == [e.sample.key for e in tw.two_subject_examples(10, 2, "train")]
    # Spread through the list, not bunched at the end (shards mix both kinds).
    positions = [i for i, s in enumerate(mixed) if s in two]
    assert positions[0] < 5 and positions[-1] >= 25
    assert all(len([x for x in s.segments if isinstance(x, SubjectImage)]) == 1
               for s in tw.subject_samples(6, 2, "train", two_subject_share=0))
    with pytest.raises(ValueError, match="two_subject_share"):
        tw.subject_samples(4, 0, two_subject_share=1.5)


def test_two_subject_generator_is_deterministic_and_seeded():
    a, b, c = (tw.two_subject_examples(4, s, "test") for s in (3, 3, 4))
    assert [e.target for e in a] == [e.target for e in b] != [e.target for e in c]
    assert [e.sample.segments[-1] for e in a] == [e.sample.segments[-1] for e in b]


def test_teacher_unet_learns_two_object_scenes_in_both_budgets():
    from kosmos_g.tinyworld.teachers import BUDGETS, TeacherConfig
    assert BUDGETS["default"].unet_max_objects == BUDGETS["quick"].unet_max_objects == 2
    with pytest.raises(ValueError, match="unet_max_objects must be 1 or 2"):
        TeacherConfig(unet_max_objects=3)
