"""Tiny world: procedurally drawn coloured shapes with exact captions, instructions and ground truth,
for proving on a CPU that the training stages learn subject-driven generation. See `world.py`.

Kept apart from the core package: nothing in `kosmos_g` outside this folder imports it."""

from kosmos_g.tinyworld.world import (BACKGROUNDS, COLOURS, HELDOUT_COLOUR_BACKGROUND, HELDOUT_SHAPE_COLOUR,
                                      POSITIONS, SHAPES, SPLITS, WHITE, Example, Obj, Scene, caption,
                                      caption_examples, caption_samples, crop_object, edit_examples,
                                      edit_samples, interleaved_samples, is_heldout, object_box, read_scene,
                                      render, sample_scene, subject_examples, subject_samples, text_samples,
                                      two_subject_examples)

__all__ = ["BACKGROUNDS", "COLOURS", "HELDOUT_COLOUR_BACKGROUND", "HELDOUT_SHAPE_COLOUR", "POSITIONS", "SHAPES",
           "SPLITS", "WHITE", "Example", "Obj", "Scene", "caption", "caption_examples", "caption_samples",
           "crop_object", "edit_examples", "edit_samples", "interleaved_samples", "is_heldout", "object_box",
           "read_scene", "render", "sample_scene", "subject_examples", "subject_samples", "text_samples",
           "two_subject_examples"]
