"""MultimodalLM: the image path (ViT -> resampler -> placeholders), loss, freezing, save/load, paper size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kosmos_g.config import load_config
from kosmos_g.models.mllm import MultimodalLM, build_mllm
from kosmos_g.models.tokenizers import IMAGE_END, IMAGE_PAD, IMAGE_START, train_mllm_tokenizer
from kosmos_g.models.vision import VisionEncoder
from kosmos_g.processor import KosmosGProcessor

CORPUS = ["a red circle next to a blue square", "a green triangle on the grass", "a photo of a dog wearing a hat"]


@pytest.fixture(scope="module")
def model_cfg():
    return load_config(["model=tiny"]).model  # llm 64 wide, ViT 32 wide at 32 px, 8 image tokens


@pytest.fixture(scope="module")
def tokenizer():
    return train_mllm_tokenizer(CORPUS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def processor(tokenizer, model_cfg):
    return KosmosGProcessor.from_config(tokenizer, model_cfg)


def fresh_model(model_cfg, tokenizer, seed: int = 0) -> MultimodalLM:
    torch.manual_seed(seed)
    return build_mllm(model_cfg, tokenizer)


@pytest.fixture(scope="module")
def model(model_cfg, tokenizer):
    return fresh_model(model_cfg, tokenizer).eval()


def noise_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_batch(processor, images=(0, 1, 2)):
    """Sample 0 holds two images, sample 1 one (after its first text), so the order matters."""
    a, b, c = (noise_image(s) for s in images)
    return processor.collate([
        processor("a red circle <i> next to <i> on the grass", images=[a, b]),
        processor("a dog <i> wearing a hat", images=[c]),
    ])


def block_starts(batch) -> list[tuple[int, int]]:
    """(sample, position) of the first placeholder of each image block, in batch order."""
    mask = batch["image_mask"]
    starts = mask & ~F.pad(mask, (1, 0))[:, :-1]
    return [tuple(x) for x in starts.nonzero().tolist()]


def test_placeholders_hold_exactly_the_resampler_outputs(model, processor, tokenizer):
    batch = make_batch(processor)
    captured = []
    handle = model.resampler.register_forward_hook(lambda mod, args, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
            expected = model.resampler(model.vision(batch["pixel_values"]))  # computed independently
    finally:
        handle.remove()
    n, mask = model.config.num_image_tokens, batch["image_mask"]
    assert captured[0].shape == (3, n, 64)
    torch.testing.assert_close(embeds[mask], captured[0].reshape(-1, 64), rtol=0, atol=0)
    # Image k fills the k-th block in batch order: sample 0's two images, then sample 1's.
    starts = block_starts(batch)
    assert [i for i, _ in starts] == [0, 0, 1]
    for k, (i, start) in enumerate(starts):
        torch.testing.assert_close(embeds[i, start:start + n], expected[k])
    # Every other position holds its token embedding, and no placeholder keeps the <image_pad> embedding.
    table = model.lm.get_input_embeddings().weight.detach()
    torch.testing.assert_close(embeds[~mask], table[batch["input_ids"][~mask]], rtol=0, atol=0)
    assert not torch.isclose(embeds[mask], table[tokenizer.convert_tokens_to_ids(IMAGE_PAD)]).all(-1).any()
    # Without image_mask, the placeholders are found through config.image_pad_token_id.
    with torch.no_grad():
        torch.testing.assert_close(model.embed(batch["input_ids"], batch["pixel_values"]), embeds, rtol=0, atol=0)


def test_encode_reads_images_causally_and_per_sample(model, processor):
    batch, other = make_batch(processor), make_batch(processor, images=(0, 1, 7))  # sample 1's image differs
    args = ("input_ids", "attention_mask", "pixel_values", "image_mask")
    with torch.no_grad():
        h = model.encode(*(batch[k] for k in args))
        h_other = model.encode(*(other[k] for k in args))
        text_only = model.encode(batch["input_ids"][:, :3], batch["attention_mask"][:, :3])
    assert h.shape == (2, batch["input_ids"].shape[1], 64)
    start = block_starts(batch)[2][1]
    torch.testing.assert_close(h[0], h_other[0])  # sample 0 does not see sample 1's image
    torch.testing.assert_close(h[1, :start], h_other[1, :start])  # causal: before the image, unchanged
    assert not torch.allclose(h[1, start:], h_other[1, start:])  # from the image on, changed
    torch.testing.assert_close(h[:, :3], text_only)  # text-only prefix: no image needed
    # encode returns the states after the final norm: the LM head applied to them gives the logits.
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in args}).logits
    torch.testing.assert_close(model.lm.lm_head(h), logits)


def test_image_count_mismatch_is_a_clear_error(model, processor, tokenizer):
    batch = make_batch(processor)
    ids, mask, pixels = batch["input_ids"], batch["image_mask"], batch["pixel_values"]
    with pytest.raises(ValueError, match=r"24 image placeholder positions but 2 image\(s\) x 8 tokens = 16"):
        model.embed(ids, pixels[:2], mask)
    with pytest.raises(ValueError, match=r"24 image placeholder positions but 0 image\(s\)"):
        model.encode(ids, batch["attention_mask"])  # placeholders found by id, but no pixels given
    with pytest.raises(ValueError, match="image_mask has shape"):
        model.embed(ids, pixels, mask[:, :-1])


def test_loss_is_next_token_cross_entropy_on_text_only(model, processor):
    batch = make_batch(processor)
    mask, labels = batch["image_mask"], batch["labels"]
    assert (labels[mask] == -100).all()
    with torch.no_grad():
        out = model(**batch)
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)

    # Placeholder ids are never read: any ids there give the same logits and loss, even with naive labels.
    scrambled = batch["input_ids"].clone()
    scrambled[mask] = torch.randint(10, 200, (int(mask.sum()),))
    with torch.no_grad():
        out2 = model(scrambled, batch["attention_mask"], batch["pixel_values"], mask, labels=labels)
        naive = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], mask,
                      labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        naive2 = model(scrambled, batch["attention_mask"], batch["pixel_values"], mask,
                       labels=scrambled.masked_fill(batch["attention_mask"] == 0, -100))
    torch.testing.assert_close(out2.logits, out.logits)
    torch.testing.assert_close(out2.loss, out.loss)
    torch.testing.assert_close(naive.loss, naive2.loss)


def test_lock_vision_trains_lm_resampler_last_vit_block_and_norm(model_cfg, tokenizer, processor):
    model = fresh_model(model_cfg, tokenizer)
    model.lock_vision()
    model.train()
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in names} == {"lm", "vision", "resampler"}
    expected = {n for n in names if n.startswith(("lm.", "resampler.", "vision.vit.blocks.1.", "vision.vit.norm."))}
    assert trainable == expected
    assert set(names) - trainable == {n for n in names if n.startswith("vision.vit.")} - expected
    assert {"vision.vit.cls_token", "vision.vit.pos_embed", "vision.vit.patch_embed.proj.weight",
            "vision.vit.norm_pre.weight", "vision.vit.blocks.0.attn.qkv.weight"} <= set(names) - trainable
    # Frozen ViT parts stay in eval mode under train(); the unlocked block trains.
    vit = model.vision.vit
    assert not any(m.training for m in [*vit.blocks[0].modules(), vit.patch_embed, vit.norm_pre])
    assert vit.blocks[1].training and vit.norm.training and model.resampler.training and model.lm.training
    # Gradients reach exactly the trainable parameters, through the placeholders into the ViT.
    model(**make_batch(processor)).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert vit.blocks[1].attn.qkv.weight.grad.abs().sum() > 0 and model.resampler.latents.grad.abs().sum() > 0


def test_activation_checkpointing_keeps_loss_and_gradients(model_cfg, tokenizer, processor):
    batch = make_batch(processor)
    model = fresh_model(model_cfg, tokenizer)
    model.lock_vision()
    model.train()
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.set_activation_checkpointing(True)
    assert model.vision.vit.grad_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.lm.model.layers)
    loss = model(**batch).loss
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()  # incl. the last ViT block behind frozen, checkpointed blocks
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)
    model.set_activation_checkpointing(False)
    assert not model.vision.vit.grad_checkpointing
    assert not any(layer.gradient_checkpointing for layer in model.lm.model.layers)


def test_clip_weights_load_and_whole_model_round_trips(model_cfg, tokenizer, processor, tmp_path):
    # A CLIP file for the tiny ViT (timm layout; open_clip/OpenAI layouts are covered in test_vision.py).
    torch.manual_seed(123)
    clip = VisionEncoder.from_config(model_cfg.vision.model_name, model_cfg.vision.img_size, None,
                                     **model_cfg.vision.timm_kwargs)
    torch.save(clip.vit.state_dict(), tmp_path / "clip.pt")
    cfg = load_config(["model=tiny", f"model.vision.weights_path={tmp_path / 'clip.pt'}"]).model
    model = fresh_model(cfg, tokenizer).eval()
    for name, value in clip.vit.state_dict().items():
        assert torch.equal(model.vision.vit.state_dict()[name], value), name

    model.save_pretrained(tmp_path / "mllm")
    loaded = MultimodalLM.from_pretrained(tmp_path / "mllm").eval()  # ViT rebuilt from config, no CLIP file
    for key in ("vision_model_name", "vision_img_size", "vision_timm_kwargs", "num_image_tokens",
                "resampler_heads", "image_pad_token_id", "hidden_size"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert {k.split(".")[0] for k in restored} == {"lm", "vision", "resampler"}
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    batch = make_batch(processor)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)

    missing = load_config(["model=tiny", f"model.vision.weights_path={tmp_path / 'nope.pt'}"]).model
    with pytest.raises(FileNotFoundError, match="model.vision.weights_path"):
        build_mllm(missing, tokenizer)


class PaperTokenizer:
    """What build_mllm reads from a tokenizer: a 32k SentencePiece vocabulary plus the 3 image tokens."""

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 0
    extra = {IMAGE_START: 32000, IMAGE_END: 32001, IMAGE_PAD: 32002}

    def __init__(self, with_image_tokens: bool = True):
        self.vocab = dict(self.extra) if with_image_tokens else {}

    def __len__(self):
        return 32000 + len(self.vocab)

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_on_meta_device_has_paper_size():
    cfg = load_config(["model=paper", "model.vision.weights_path=null", "model.llm.tokenizer_path=null",
                       "model.diffusion_path=null"]).model
    with torch.device("meta"):
        model = build_mllm(cfg, PaperTokenizer())
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # nothing allocated
    lm, vit, resampler = count(model.lm), count(model.vision), count(model.resampler)
    # Exact sizes (vocab 32003, SwiGLU 5504, untied head): LM 1,345,435,648; ViT-L/14 303,179,776;
    # resampler 52,592,640. LM + resampler = 1,398,028,288, in the paper's 1.3-1.6B.
    assert (lm, vit, resampler) == (1_345_435_648, 303_179_776, 52_592_640)
    assert 1.3e9 <= lm + resampler <= 1.6e9
    assert model.vision.num_tokens == 257 and model.vision.width == 1024
    assert model.resampler.num_latents == 64 and model.resampler.llm_width == 2048
    assert model.config.image_pad_token_id == 32002 and model.lm.config.vocab_size == 32003


def test_tokenizer_without_image_pad_is_rejected():
    cfg = load_config(["model=tiny"]).model
    with pytest.raises(ValueError, match="no <image_pad> token"):
        build_mllm(cfg, PaperTokenizer(with_image_tokens=False))
