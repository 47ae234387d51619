"""KosmosGProcessor: interleaved prompt -> ids, image/loss masks and pixels; batching; save/load."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kosmos_g.config import load_config
from kosmos_g.models.tokenizers import (BOS, EOS, IMAGE_END, IMAGE_START, PAD, train_clip_tokenizer,
                                        train_mllm_tokenizer)
from kosmos_g.processor import CLIP_MEAN, CLIP_STD, Encoded, KosmosGProcessor, PromptError

N = 4  # image tokens per image
SIZE = 32  # ViT input size
CORPUS = ["a red circle next to a blue square", "a green triangle on the grass", "a photo of a dog wearing a hat"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_mllm_tokenizer(CORPUS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return KosmosGProcessor(tokenizer, num_image_tokens=N, image_size=SIZE, max_length=64)


def solid(color: tuple[int, int, int], size: int = 48) -> Image.Image:
    return Image.new("RGB", (size, size), color)


RED, BLUE = solid((255, 0, 0)), solid((0, 0, 255), size=40)


def ids_of(tokenizer, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def test_both_prompt_forms_give_the_same_encoding(processor):
    by_string = processor("a photo of <i> wearing <i> on the grass", images=[RED, BLUE])
    by_list = processor(["a photo of", RED, "wearing", BLUE, "on the grass"])
    spaced = processor(["  a photo of ", RED, " wearing  ", BLUE, " on the grass "])
    for other in (by_list, spaced):
        for field in ("input_ids", "image_mask", "loss_mask", "pixel_values"):
            assert torch.equal(getattr(by_string, field), getattr(other, field)), field


def test_document_layout_and_masks(processor, tokenizer):
    """The original's layout: `<s>` text (N + 1) x `<image>` `</image>` text ..., no `</s>`; slots = the N after
    the first `<image>` of a block."""
    enc = processor("a red circle <i> next to <i>", images=[RED, BLUE])
    ids = enc.input_ids.tolist()
    bos, eos, start, end = ids_of(tokenizer, BOS, EOS, IMAGE_START, IMAGE_END)
    text1 = tokenizer("a red circle", add_special_tokens=False).input_ids
    text2 = tokenizer("next to", add_special_tokens=False).input_ids
    block = [start] * (N + 1) + [end]
    assert ids == [bos] + text1 + block + text2 + block
    assert ids[0] == bos and ids.count(bos) == 1 and eos not in ids

    # image_mask: exactly the slots; loss_mask: exactly the text tokens.
    slots = [False] + [True] * N + [False]
    assert enc.image_mask.tolist() == [False] * (1 + len(text1)) + slots + [False] * len(text2) + slots
    text = [False] + [True] * len(text1) + [False] * len(block) + [True] * len(text2) + [False] * len(block)
    assert enc.loss_mask.tolist() == text
    assert not (enc.loss_mask & enc.image_mask).any()
    for special in (bos, start, end):
        assert not enc.loss_mask[enc.input_ids == special].any()
    assert enc.image_mask.dtype == enc.loss_mask.dtype == torch.bool and enc.input_ids.dtype == torch.long


def test_special_ids_follow_the_original_layout(tokenizer):
    """`<s> <pad> </s> <unk>` = 0..3 as in fairseq's dictionary; the image tokens are named specials after the pieces."""
    assert ids_of(tokenizer, BOS, PAD, EOS, IMAGE_START, IMAGE_END) == [0, 1, 2, len(tokenizer) - 4, len(tokenizer) - 3]
    assert tokenizer.pad_token_id == 1 and tokenizer.bos_token_id == 0


def test_pixels_are_clip_normalised_center_crops_in_prompt_order(processor):
    enc = processor(["x", RED, "y", BLUE])
    assert enc.pixel_values.shape == (2, 3, SIZE, SIZE) and enc.pixel_values.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    for k, rgb in enumerate([(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]):
        expected = ((torch.tensor(rgb) - mean) / std)[:, None, None].expand(3, SIZE, SIZE)
        torch.testing.assert_close(enc.pixel_values[k], expected, atol=1e-5, rtol=0)
    # A non-square, non-RGB image is resized on its short side, centre-cropped and converted.
    wide = Image.new("L", (80, 40), 255)
    assert processor("<i>", images=[wide]).pixel_values.shape == (1, 3, SIZE, SIZE)


def test_text_only_prompt(processor, tokenizer):
    enc = processor("a green triangle")
    assert enc.pixel_values.shape == (0, 3, SIZE, SIZE)
    assert not enc.image_mask.any() and enc.loss_mask[1:].all() and not enc.loss_mask[0]
    assert enc.input_ids.tolist()[-1] != tokenizer.eos_token_id
    # The null prompt (classifier-free guidance) is `<s>` alone; so is an empty prompt.
    null = processor.null_prompt()
    assert null.input_ids.tolist() == processor("").input_ids.tolist() == ids_of(tokenizer, BOS)
    assert not null.loss_mask.any() and not null.image_mask.any() and null.pixel_values.shape == (0, 3, SIZE, SIZE)


def test_prompt_errors_name_the_problem(processor):
    with pytest.raises(PromptError, match=r"2 <i> placeholder\(s\) but 1 image"):
        processor("a <i> and <i>", images=[RED])
    with pytest.raises(PromptError, match=r"1 <i> placeholder\(s\) but 2 image"):
        processor("a <i>", images=[RED, BLUE])
    with pytest.raises(PromptError, match=r"0 <i> placeholder\(s\) but 1 image"):
        processor("no placeholder", images=[RED])
    with pytest.raises(PromptError, match="list prompt carries its images inline"):
        processor(["a", RED], images=[RED])
    with pytest.raises(PromptError, match="longer than the context of 64 .*model.llm.max_positions"):
        processor("a red circle " * 40)
    with pytest.raises(PromptError, match="longer than the context"):  # image blocks count too
        processor("<i>" * 11, images=[RED] * 11)
    with pytest.raises(PromptError, match="must be str or PIL.Image.Image, got int"):
        processor(["a", 42, RED])
    with pytest.raises(PromptError, match="got Tensor"):
        processor(["a", torch.zeros(3, SIZE, SIZE)])
    with pytest.raises(PromptError, match=r"images= must hold PIL.Image.Image objects, got \['str'\]"):
        processor("a <i>", images=["dog.png"])
    with pytest.raises(PromptError, match="prompt must be a str"):
        processor(RED)


def test_tokenizer_without_image_tokens_is_rejected():
    with pytest.raises(PromptError, match="lacks the image tokens"):
        KosmosGProcessor(train_clip_tokenizer(CORPUS, vocab_size=300))


def test_collate_pads_right_and_masks(processor, tokenizer):
    long = processor("a red circle next to a blue square <i> and <i>", images=[RED, BLUE])
    short = processor("<i> a dog", images=[BLUE])
    text = processor("a hat")
    batch = processor.collate([long, short, text])
    B, L = 3, len(long.input_ids)
    assert set(batch) == {"input_ids", "attention_mask", "image_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (B, L)
    for i, enc in enumerate([long, short, text]):
        n = len(enc.input_ids)
        assert torch.equal(batch["input_ids"][i, :n], enc.input_ids)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all() and tokenizer.pad_token_id == 1
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert torch.equal(batch["image_mask"][i, :n], enc.image_mask) and not batch["image_mask"][i, n:].any()
        expected = torch.where(enc.loss_mask, enc.input_ids, -100)
        assert torch.equal(batch["labels"][i, :n], expected) and (batch["labels"][i, n:] == -100).all()
    # Labels are -100 at every placeholder; images are concatenated sample by sample, in prompt order.
    assert (batch["labels"][batch["image_mask"]] == -100).all()
    assert int(batch["image_mask"].sum()) == 3 * N
    assert torch.equal(batch["pixel_values"], torch.cat([long.pixel_values, short.pixel_values]))
    assert processor.collate([text])["pixel_values"].shape == (0, 3, SIZE, SIZE)


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path / "processor")
    loaded = KosmosGProcessor.from_pretrained(tmp_path / "processor")
    assert (loaded.num_image_tokens, loaded.image_size, loaded.max_length) == (N, SIZE, 64)
    assert (loaded.image_start_id, loaded.image_end_id) == (processor.image_start_id, processor.image_end_id)
    prompt = ("a photo of <i> wearing <i> on the grass", [RED, BLUE])
    a, b = processor(*prompt), loaded(*prompt)
    for field in ("input_ids", "image_mask", "loss_mask", "pixel_values"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(FileNotFoundError, match="not a processor folder"):
        KosmosGProcessor.from_pretrained(tmp_path)


def test_from_config_uses_the_model_preset(tokenizer):
    model_cfg = load_config(["model=tiny"]).model
    processor = KosmosGProcessor.from_config(tokenizer, model_cfg)
    assert processor.num_image_tokens == model_cfg.vision.num_image_tokens == 8
    assert processor.image_size == model_cfg.vision.img_size == 32
    assert processor.max_length == model_cfg.llm.max_positions == 256
    enc = processor("<i>", images=[RED])
    assert isinstance(enc, Encoded) and int(enc.image_mask.sum()) == 8 and enc.pixel_values.shape[-1] == 32
    assert len(enc.input_ids) == 1 + 9 + 1  # <s>, 9 x <image>, </image>
