"""Teachers of the tiny world: saved in the real formats, loaded through the stages' own calls, cached.

One quick-budget run (~15-25 s on 2 cores) is shared by the whole module."""

import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import ImageFilter
from transformers import CLIPTextModel, CLIPTokenizer

from kosmos_g.assets import load_text_encoder
from kosmos_g.eval.metrics import CLIPTScore, load_clip
from kosmos_g.models.diffusion import FrozenDiffusion
from kosmos_g.tinyworld.oracle import Oracle, all_scenes, attribute_accuracy, to_tensor
from kosmos_g.tinyworld.teacher_data import PARTIALS, closeup_data, codec_images, near_misses, world_data
from kosmos_g.tinyworld.teachers import MANIFEST, TeacherConfig, generate, load_pipeline, train_teachers
from kosmos_g.tinyworld.world import (BACKGROUNDS, COLOURS, HELDOUT_SHAPE_COLOUR, SHAPES, WHITE, Obj, Scene, caption,
                                      is_heldout, render)

HELDOUT = [s for s in all_scenes() if is_heldout(s)]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    return train_teachers(tmp_path_factory.mktemp("run") / "teachers", seed=0, size=32, budget="quick")


@pytest.mark.slow
def test_layout_and_manifest(teachers):
    assert sorted(p.name for p in teachers.iterdir()) == ["clip", "oracle", "sd", MANIFEST]
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler", "model_index.json"):
        assert (teachers / "sd" / part).exists(), part
    assert not teachers.with_name(teachers.name + ".tmp").exists()   # the build folder was renamed away


@pytest.mark.slow
def test_sd_folder_loads_like_stable_diffusion(teachers):
    sd = teachers / "sd"
    diffusion = FrozenDiffusion.from_pretrained(str(sd))
    text_encoder = CLIPTextModel.from_pretrained(sd / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    assert tokenizer.model_max_length == 77
    assert diffusion.cross_attention_dim == text_encoder.config.hidden_size
    assert diffusion.noise_scheduler.config.beta_schedule == "scaled_linear"
    # The VAE's scale was measured on world latents, not copied from SD v1.5.
    assert diffusion.scaling_factor != pytest.approx(0.18215)
    images = to_tensor([render(s) for s in HELDOUT[:4]]) * 2 - 1
    latents = diffusion.encode_images(images, sample=False)
    assert latents.shape == (4, 4, 8, 8)
    assert diffusion.decode_latents(latents).shape == (4, 3, 32, 32)

    # The condition the U-Net was trained on: padded 77-token last_hidden_state, as SD encodes prompts.
    ids = tokenizer([caption(HELDOUT[0]), ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text_encoder(ids).last_hidden_state
        eps = diffusion.predict_noise(latents[:2], torch.tensor([10, 500]), cond)
    assert cond.shape == (2, 77, text_encoder.config.hidden_size) and eps.shape == (2, 4, 8, 8)

    # The stages' own loader reads the same folder.
    staged, staged_tok = load_text_encoder(sd)
    assert staged.config.hidden_size == text_encoder.config.hidden_size and len(staged_tok) == len(tokenizer)


@pytest.mark.slow
def test_text_encoder_is_clips_text_tower(teachers):
    clip, processor = load_clip(teachers / "clip")   # the evaluation's loader (CLIP-I / CLIP-T)
    text_encoder = CLIPTextModel.from_pretrained(teachers / "sd" / "text_encoder")
    ids = processor.tokenizer(["a red circle in the centre on a plain background"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(ids).last_hidden_state, clip.text_model(ids).last_hidden_state)
    metric = CLIPTScore((clip, processor))
    metric.update(torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"])
    assert -1 <= float(metric.compute()) <= 1


@pytest.mark.slow
def test_pipeline_generates_from_captions(teachers):
    pipe = StableDiffusionPipeline.from_pretrained(teachers / "sd", safety_checker=None)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    pipe = load_pipeline(teachers / "sd")
    prompts = [caption(s) for s in HELDOUT[:2]]
    a = generate(pipe, prompts, steps=3, guidance=5.0, seed=1)
    b = generate(pipe, prompts, steps=3, guidance=5.0, seed=1)
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b)   # deterministic given the seed


@pytest.mark.slow
def test_oracle_reads_clean_and_blurred_renders(teachers):
    oracle = Oracle.from_pretrained(teachers / "oracle")
    clean = oracle.score([render(s) for s in HELDOUT], HELDOUT)
    assert min(clean.values()) >= 0.97, clean
    blurred = oracle.score([render(s).filter(ImageFilter.GaussianBlur(1.0)) for s in HELDOUT], HELDOUT)
    assert min(blurred.values()) >= 0.9, blurred
    # uint8 tensors, float tensors and PIL images are read alike.
    pil = [render(s) for s in HELDOUT[:8]]
    as_uint8 = (to_tensor(pil) * 255).round().to(torch.uint8)
    assert oracle.predict(as_uint8) == oracle.predict(to_tensor(pil)) == oracle.predict(pil)


def test_attribute_accuracy_counts_each_attribute():
    truth = [Scene((Obj("circle", "red", "centre"),), "plain")] * 2
    pred = [Scene((Obj("circle", "red", "centre"),), "plain"), Scene((Obj("square", "red", "top left"),), "plain")]
    assert attribute_accuracy(pred, truth) == {"shape": 0.5, "colour": 1.0, "position": 0.5, "background": 1.0,
                                               "all": 0.5}
    with pytest.raises(ValueError, match="one scene per image"):
        attribute_accuracy(pred, truth[:1])


def test_teacher_data_splits():
    scenes, captions, images = world_data(seed=0, size=32, n_captions=50)
    assert not any(is_heldout(s) for s in scenes)   # CLIP and the U-Net never see a held-out combination...
    assert len(scenes) == len(captions) == len(images) == 450 and images.shape[1:] == (3, 32, 32)
    assert any(is_heldout(s) for s in world_data(0, 32, 50, heldout=True)[0])   # ...unless asked to
    # The VAE (a pixel codec) sees every one-object scene once, held-out ones included.
    assert codec_images(32).shape == (len(all_scenes()), 3, 32, 32)


def test_clip_also_sees_closeups_and_one_attribute_descriptions():
    scenes, captions, images = closeup_data(16)
    assert images.shape == (len(scenes), 3, 16, 16) and len(captions) == len(scenes)
    assert not {(s.objects[0].shape, s.objects[0].colour) for s in scenes} & HELDOUT_SHAPE_COLOUR
    assert {s.background for s in scenes} == {*BACKGROUNDS, WHITE}
    assert captions[0] == f"a close-up of a {scenes[0].objects[0].name}"
    assert len(closeup_data(16, heldout=True)[0]) == len(SHAPES) * len(COLOURS) * (len(BACKGROUNDS) + 1)
    red_triangle = Scene((Obj("triangle", "red", "top right"), Obj("circle", "blue", "top left")), "plain")
    assert [t for t, fits in PARTIALS.items() if fits(red_triangle)] == \
        ["a circle", "a triangle", "something red", "something blue"]


def test_teacher_config_refuses_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match=r"clip_partial .*\[0, 1\]"):
        TeacherConfig(clip_partial=1.5)


def attrs(scene: Scene) -> tuple:
    return scene.objects[0].shape, scene.objects[0].colour, scene.objects[0].position, scene.background


def test_near_misses_differ_in_exactly_one_attribute():
    scenes = [s for s in all_scenes() if not is_heldout(s)] + [Scene((Obj("circle", "red", "top left"),
                                                                      Obj("square", "blue", "top right")), "plain")]
    misses = near_misses(scenes)
    assert misses[-1] == []   # only one-object scenes have near misses
    for i, partners in enumerate(misses[:-1]):
        assert partners, scenes[i]
        for j in partners:
            assert sum(a != b for a, b in zip(attrs(scenes[i]), attrs(scenes[j]))) == 1


@pytest.mark.slow
def test_second_call_reuses_the_cache(teachers, capsys):
    files = {p: p.stat().st_mtime_ns for p in teachers.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    assert train_teachers(teachers, seed=0, size=32, budget="quick") == teachers
    assert time.perf_counter() - t0 < 2
    assert "reusing" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in teachers.rglob("*") if p.is_file()} == files


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a teachers folder"):
        train_teachers(tmp_path, budget="quick")
    with pytest.raises(ValueError, match="unknown teacher budget"):
        train_teachers(tmp_path / "new", budget="huge")


def test_the_shipped_teachers_are_the_demos_and_load():
    """The demo copies kosmos_g/tinyworld/shipped_teachers when they were made with its settings; a changed
    TeacherConfig must come with a rebuilt set (else every cold demo silently trains them again)."""
    from kosmos_g.tinyworld.demo import FULL, SHIPPED_TEACHERS
    from kosmos_g.tinyworld.teachers import is_complete, teacher_settings

    assert is_complete(SHIPPED_TEACHERS, teacher_settings(FULL["teachers"], seed=0, size=32)), (
        "the shipped teachers were made with other settings: rebuild them with "
        "`python -m kosmos_g.tinyworld.teachers --out kosmos_g/tinyworld/shipped_teachers`")
    assert FrozenDiffusion.from_pretrained(str(SHIPPED_TEACHERS / "sd")).cross_attention_dim > 0
    Oracle.from_pretrained(SHIPPED_TEACHERS / "oracle")
    load_clip(SHIPPED_TEACHERS / "clip")
