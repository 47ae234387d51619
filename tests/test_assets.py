"""Where the pretrained parts come from (kosmos_g.assets): configured folders checked with one clear error, tiny
stand-ins written once into the run's assets folder in the real formats and reused, fingerprints."""

from __future__ import annotations

import shutil

import pytest

from kosmos_g.assets import (SD_IMAGE_PARTS, SD_TEXT_PARTS, corpus, diffusion_folder, fingerprint,
                             load_text_encoder, mllm_tokenizer, random_sd_size)
from kosmos_g.config import ConfigError, load_config

TEXTS = ["a red circle next to a blue square", "a green triangle on the grass", "a yellow star"] * 3


def never_called():
    raise AssertionError("the corpus was read again: the cached asset was not reused")


@pytest.fixture(scope="module")
def model():
    return load_config(["model=tiny"]).model


@pytest.fixture(scope="module")
def assets(tmp_path_factory, model):
    """A run's assets folder after its first launch (tokenizer and tiny SD written)."""
    folder = tmp_path_factory.mktemp("assets")
    mllm_tokenizer(model, folder, lambda: iter(TEXTS))
    diffusion_folder(model, folder, lambda: iter(TEXTS), parts=SD_TEXT_PARTS + SD_IMAGE_PARTS)
    return folder


def test_tiny_tokenizer_is_written_once_and_reused(assets, model):
    first = (assets / "tokenizer" / "tokenizer.json").read_bytes()
    tok = mllm_tokenizer(model, assets, never_called)
    assert (assets / "tokenizer" / "tokenizer.json").read_bytes() == first
    ids = tok("a red circle")["input_ids"]
    assert tok.unk_token_id not in ids  # trained on the corpus: its words are known
    assert not (assets / "tokenizer.tmp").exists()


def test_tiny_sd_folder_has_the_sd_layout_is_written_once_and_reused(assets, model):
    sd = assets / "sd"
    assert all((sd / part).is_dir() for part in SD_TEXT_PARTS + SD_IMAGE_PARTS)
    assert random_sd_size(sd) == 32
    before = fingerprint(sd, SD_TEXT_PARTS + SD_IMAGE_PARTS)
    assert diffusion_folder(model, assets, never_called, parts=SD_TEXT_PARTS + SD_IMAGE_PARTS) == sd
    assert fingerprint(sd, SD_TEXT_PARTS + SD_IMAGE_PARTS) == before
    text_encoder, tokenizer = load_text_encoder(sd)  # loads as SD v1.5's own text encoder does
    assert text_encoder.config.hidden_size == model.tiny_clip_text.hidden_size
    assert tokenizer.model_max_length == text_encoder.config.max_position_embeddings
    assert tokenizer.unk_token_id not in tokenizer("a green triangle")["input_ids"][1:-1]  # CLIP: unk is also eos


def test_fingerprint_follows_the_contents_of_the_named_parts_only(assets, tmp_path):
    copy = shutil.copytree(assets / "sd", tmp_path / "sd")
    assert fingerprint(copy) == fingerprint(assets / "sd")  # contents, not location
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    assert fingerprint(copy) == fingerprint(assets / "sd")  # the U-Net is not a CLIP text part
    assert fingerprint(copy, SD_IMAGE_PARTS) != fingerprint(assets / "sd", SD_IMAGE_PARTS)
    (copy / "tokenizer" / "vocab.json").write_text("{}")
    assert fingerprint(copy) != fingerprint(assets / "sd")


def test_a_random_sd_folder_is_not_a_configured_one(tmp_path):
    (tmp_path / "unet").mkdir()
    assert random_sd_size(tmp_path) is None


def test_missing_tokenizer_path_names_the_key_and_what_belongs_there(tmp_path):
    model = load_config([f"model.llm.tokenizer_path={tmp_path / 'nope'}"]).model
    with pytest.raises(ConfigError, match=r"model\.llm\.tokenizer_path=.*nope: folder not found.*nothing is downloaded"):
        mllm_tokenizer(model, tmp_path, never_called)


def test_a_folder_that_is_no_tokenizer_is_refused_naming_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    model = load_config([f"model.llm.tokenizer_path={tmp_path / 'empty'}"]).model
    with pytest.raises(ConfigError, match=r"^model\.llm\.tokenizer_path=.*empty: "):
        mllm_tokenizer(model, tmp_path, never_called)


def test_missing_diffusion_path_or_parts_name_the_key_and_the_layout(tmp_path):
    model = load_config([f"model.diffusion_path={tmp_path / 'sd'}"]).model
    with pytest.raises(ConfigError, match=r"model\.diffusion_path=.*sd: folder not found.*Stable Diffusion v1\.5"):
        diffusion_folder(model, tmp_path, never_called)
    (tmp_path / "sd" / "tokenizer").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"lacks \['text_encoder'\]: expected the Stable Diffusion v1\.5 layout"):
        diffusion_folder(model, tmp_path, never_called)
    (tmp_path / "sd" / "text_encoder").mkdir()
    assert diffusion_folder(model, tmp_path, never_called) == tmp_path / "sd"  # text parts suffice for align
    with pytest.raises(ConfigError, match=r"lacks \['unet', 'vae', 'scheduler'\]"):
        diffusion_folder(model, tmp_path, never_called, parts=SD_TEXT_PARTS + SD_IMAGE_PARTS)


def test_tiny_tokenizers_without_shards_say_what_to_write_or_set(tmp_path):
    data = load_config([f"data.root={tmp_path}"]).data
    with pytest.raises(ConfigError, match=r"no shards under data\.root=.*model\.llm\.tokenizer_path"):
        list(corpus(data))


def test_corpus_reads_the_configured_shards_up_to_the_limit(tmp_path):
    from kosmos_g.data.format import Sample
    from kosmos_g.data.shards import write_shards

    write_shards((Sample("text", [f"document {i}"], key=f"d{i}") for i in range(5)), str(tmp_path / "text"),
                 "t", "text", progress=False)
    data = load_config([f"data.root={tmp_path}"]).data
    assert sorted(corpus(data)) == [f"document {i}" for i in range(5)]
    assert len(list(corpus(data, limit=2))) == 2
