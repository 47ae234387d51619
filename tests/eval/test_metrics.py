"""FID, DINO, CLIP-I, CLIP-T on tiny random backbones saved in their real formats and loaded from paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub access would fail loudly instead of downloading

import pytest
import timm
import torch
import torch.nn.functional as F

from kosmos_g.eval.metrics import (DINO_MODEL_NAME, TINY_DINO_KWARGS, CLIPIScore, CLIPTScore, DINOScore,
                                   build_fid, load_clip, load_dino, save_tiny_clip, save_tiny_dino)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip"), texts=["a red backpack in the jungle", "a dog"])
    return load_clip(folder)


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    path = save_tiny_dino(tmp_path_factory.mktemp("dino") / "dino.safetensors")
    return load_dino(path, **TINY_DINO_KWARGS)


def images(n, seed, size=(40, 48)):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- loading


def test_missing_weight_files_name_path_and_config_key(tmp_path):
    missing = tmp_path / "nope"
    for call, key in [(lambda: load_clip(missing), "eval.clip_path"),
                      (lambda: load_dino(missing), "eval.dino_path"),
                      (lambda: build_fid(inception_path=missing), "eval.inception_path")]:
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert key in str(err.value) and str(missing) in str(err.value) and "downloaded" in str(err.value)


def test_dino_loads_torch_checkpoints_through_timm_too(tmp_path, dino):
    # The original DINO weights are a plain torch.save'd state dict; timm's file path reads both.
    torch.save(dino.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    again = load_dino(tmp_path / "dino_deitsmall16_pretrain.pth", DINO_MODEL_NAME, **TINY_DINO_KWARGS)
    for (k, a), b in zip(dino.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # A file that does not match the architecture is refused (timm loads strictly).
    other = timm.create_model(DINO_MODEL_NAME, num_classes=0, img_size=32, depth=1, embed_dim=64, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "short.pth")
    with pytest.raises(RuntimeError):
        load_dino(tmp_path / "short.pth", **TINY_DINO_KWARGS)


def test_backbones_stay_frozen_in_eval_mode(clip, dino):
    for metric in (DINOScore(dino), CLIPIScore(clip), CLIPTScore(clip)):
        metric.train()
        assert all(not m.training for m in metric.modules() if m is not metric)
        assert not any(p.requires_grad for p in metric.parameters())


# ---------------------------------------------------------------------------------------------- FID


def test_fid_is_zero_for_a_set_with_itself_and_positive_otherwise(dino):
    fid = build_fid(feature_extractor=dino, image_size=32)
    a, b = images(24, 0), images(24, 1) * 0.5
    fid.update(a, real=True)
    fid.update(a, real=False)
    same = fid.compute().item()
    fid.reset()
    fid.update(a, real=True)
    fid.update(b, real=False)
    different = fid.compute().item()
    assert different > 0.1 and abs(same) < 1e-3 * different


def test_fid_accepts_uint8_like_float(dino):
    a, b = images(8, 0), images(8, 1)
    scores = []
    for cast in (lambda x: x, lambda x: (x * 255).round().to(torch.uint8)):
        fid = build_fid(feature_extractor=dino, image_size=32)
        fid.update(cast(a), real=True)
        fid.update(cast((a + b) / 2), real=False)
        scores.append(fid.compute())
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-2, atol=1e-4)  # uint8 rounding only


def test_fid_states_merge_like_one_process(dino):
    a, b = images(12, 0), images(12, 1)
    whole, part1, part2 = (build_fid(feature_extractor=dino, image_size=32) for _ in range(3))
    whole.update(a, real=True)
    whole.update(b, real=False)
    part1.update(a[:5], real=True)
    part1.update(b[:7], real=False)
    part2.update(a[5:], real=True)
    part2.update(b[7:], real=False)
    part1.merge_state(part2)
    torch.testing.assert_close(part1.compute(), whole.compute(), rtol=1e-4, atol=1e-4)


def test_fid_needs_exactly_one_backbone(dino, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_fid()
    with pytest.raises(ValueError, match="exactly one"):
        build_fid(feature_extractor=dino, inception_path=tmp_path)


def test_images_outside_unit_range_are_refused(dino):
    fid = build_fid(feature_extractor=dino, image_size=32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.update(images(2, 0) * 2 - 1, real=True)


# ---------------------------------------------------------------------------------------------- DINO, CLIP-I


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_identical_images_score_one_and_different_less(kind, clip, dino):
    metric = DINOScore(dino) if kind == "dino" else CLIPIScore(clip)
    img = images(1, 0)
    metric.update(img.repeat(3, 1, 1, 1), img)
    torch.testing.assert_close(metric.compute(), torch.tensor(1.0), rtol=0, atol=1e-5)
    metric.reset()
    metric.update(img, images(1, 1))
    assert -1 <= metric.compute().item() < 1 - 1e-4


def test_dino_is_symmetric_and_takes_mixed_size_references(dino):
    a, b, c = images(1, 0), images(1, 1, size=(64, 48)), images(1, 2, size=(32, 80))

    def score(gen, refs):
        metric = DINOScore(dino)
        metric.update(gen, refs)
        return metric.compute()

    torch.testing.assert_close(score(a, b), score(b, a))
    # Each generated image scores the mean over all references of its subject.
    torch.testing.assert_close(score(a, [b[0], c[0]]), (score(a, b) + score(a, c)) / 2)


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_subject_similarity_merges_like_one_process(kind, clip, dino):
    make = (lambda: DINOScore(dino)) if kind == "dino" else (lambda: CLIPIScore(clip))
    gen1, gen2, refs1, refs2 = images(3, 0), images(2, 1), images(2, 2), images(4, 3)
    whole, part1, part2 = make(), make(), make()
    whole.update(gen1, refs1)
    whole.update(gen2, refs2)
    part1.update(gen1, refs1)
    part2.update(gen2, refs2)
    part1.merge_state(part2)
    torch.testing.assert_close(part1.compute(), whole.compute())
    assert part1.n_samples.item() == 5


# ---------------------------------------------------------------------------------------------- CLIP-T


def test_clip_t_is_the_plain_cosine_clipscore_computes(clip):
    model, processor = clip
    imgs, texts = images(3, 0), ["a red backpack in the jungle", "a dog", "a backpack"]
    metric = CLIPTScore(clip)
    metric.update(imgs, texts)
    score = metric.compute().item()
    # The same cosine by hand: no 100x scale and no clipping at 0.
    pixels = processor(images=[(i * 255).round().to(torch.uint8) for i in imgs], return_tensors="pt")
    tokens = processor(text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        txt = model.get_text_features(**tokens).pooler_output
    expected = F.cosine_similarity(img, txt).mean().item()
    assert -1 <= score <= 1
    assert score == pytest.approx(expected, abs=1e-5)


def test_clip_t_merges_and_checks_lengths(clip):
    imgs = images(4, 1)
    texts = ["a dog", "a red backpack", "a backpack in the jungle", "a dog in the jungle"]
    whole, part1, part2 = CLIPTScore(clip), CLIPTScore(clip), CLIPTScore(clip)
    whole.update(imgs, texts)
    part1.update(imgs[:1], texts[:1])
    part2.update(imgs[1:], texts[1:])
    part1.merge_state(part2)
    torch.testing.assert_close(part1.compute(), whole.compute())
    with pytest.raises(ValueError, match="one text per image"):
        whole.update(imgs, texts[:2])
