"""MultimodalLM: the image path (ViT -> connector -> slots), loss, freezing, FSDP-safe text-only path, save/load,
equivalence with transformers' Kosmos2Model, paper size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from kosmos_g.config import load_config
from kosmos_g.models.mllm import MultimodalLM, build_mllm
from kosmos_g.models.tokenizers import IMAGE_START, train_clip_tokenizer, train_mllm_tokenizer
from benchmarks.memory_plan import VocabStub
from kosmos_g.processor import KosmosGProcessor

CORPUS = ["a red circle next to a blue square", "a green triangle on the grass", "a photo of a dog wearing a hat"]


@pytest.fixture(scope="module")
def model_cfg():
    return load_config(["model=tiny"]).model  # decoder 64 wide, ViT 32 wide at 32 px, 8 image tokens


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


def test_placeholders_hold_exactly_the_connector_outputs(model, processor, tokenizer):
    batch = make_batch(processor)
    captured = []
    handle = model.image_to_text_projection.register_forward_hook(lambda mod, args, out: captured.append(out[0].detach()))
    try:
        with torch.no_grad():
            embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
            # computed independently: all ViT tokens -> post_layernorm -> L2 -> connector
            tokens = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
            tokens = F.normalize(model.vision_model.model.post_layernorm(tokens), dim=-1)
            expected = model.image_to_text_projection(tokens)[0]
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
    # Every other position holds its token embedding, and no slot keeps the <image> embedding.
    table = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(embeds[~mask], table[batch["input_ids"][~mask]], rtol=0, atol=0)
    assert not torch.isclose(embeds[mask], table[tokenizer.convert_tokens_to_ids(IMAGE_START)]).all(-1).any()
    # Without image_mask, the slots are found from the ids (an <image> after an <image>).
    assert torch.equal(model.placeholder_mask(batch["input_ids"]), mask)
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
    torch.testing.assert_close(model.text_model.lm_head(h), logits)


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


def test_lock_vision_trains_decoder_connector_last_vit_block_and_norm(model_cfg, tokenizer, processor):
    model = fresh_model(model_cfg, tokenizer)
    model.lock_vision()
    model.train()
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in names} == {"text_model", "vision_model", "image_to_text_projection"}
    expected = {n for n in names if n.startswith(("text_model.", "image_to_text_projection.",
                                                  "vision_model.model.encoder.layers.1.",
                                                  "vision_model.model.post_layernorm."))}
    assert trainable == expected
    assert set(names) - trainable == {n for n in names if n.startswith("vision_model.")} - expected
    assert {"vision_model.model.embeddings.class_embedding", "vision_model.model.embeddings.position_embedding.weight",
            "vision_model.model.embeddings.patch_embedding.weight", "vision_model.model.pre_layrnorm.weight",
            "vision_model.model.encoder.layers.0.self_attn.q_proj.weight"} <= set(names) - trainable
    # Frozen ViT parts stay in eval mode under train(); the unlocked block trains.
    vit = model.vision_model.model
    assert not any(m.training for m in [*vit.encoder.layers[0].modules(), vit.embeddings, vit.pre_layrnorm])
    assert vit.encoder.layers[1].training and vit.post_layernorm.training
    assert model.image_to_text_projection.training and model.text_model.training
    # Gradients reach exactly the trainable parameters, through the slots into the ViT.
    model(**make_batch(processor)).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert vit.encoder.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.image_to_text_projection.latent_query.grad.abs().sum() > 0
    model.lock_vision(0, False)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    with pytest.raises(ValueError, match="unlocked_last_blocks"):
        model.lock_vision(unlocked_last_blocks=3)


def test_lock_freezes_everything_and_keeps_eval_mode(model_cfg, tokenizer, processor):
    model = fresh_model(model_cfg, tokenizer)
    assert model.lock() is model
    model.train()
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert model(**make_batch(processor)).loss.requires_grad is False


def test_text_only_batch_runs_vision_on_a_dummy_with_zero_effect(model_cfg, tokenizer, processor):
    """FSDP: every rank must run the same modules, also when its batch has no image (issue 16)."""
    model = fresh_model(model_cfg, tokenizer)
    model.lock_vision()
    model.train()
    torch.manual_seed(0)  # dropout off in the tiny preset; fixed anyway
    batch = processor.collate([processor("a red circle next to a blue square"), processor.null_prompt()])
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model(**batch)
    finally:
        handle.remove()
    assert calls == [1]  # the tower ran, on one dummy image
    # The result is exactly the text-only computation (decoder alone, no image anywhere).
    with torch.no_grad():
        h = model.text_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).last_hidden_state
    torch.testing.assert_close(out.logits, model.text_model.lm_head(h), rtol=0, atol=0)
    out.loss.backward()
    vision_grads = [p.grad for p in [*model.vision_model.parameters(), *model.image_to_text_projection.parameters()]
                    if p.requires_grad]
    assert vision_grads and all(g is not None and torch.isfinite(g).all() and not g.any() for g in vision_grads)
    assert all(torch.isfinite(p.grad).all() for p in model.text_model.parameters() if p.grad is not None)


def test_activation_checkpointing_keeps_loss_and_gradients(model_cfg, tokenizer, processor):
    batch = make_batch(processor)
    model = fresh_model(model_cfg, tokenizer)
    model.lock_vision()
    model.train()
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.set_activation_checkpointing(True)
    assert model.vision_model.model.encoder.gradient_checkpointing and model.text_model.model.gradient_checkpointing
    loss = model(**batch).loss
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()  # incl. the last ViT block behind frozen, checkpointed blocks
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)
    model.set_activation_checkpointing(False)
    assert not model.vision_model.model.encoder.gradient_checkpointing
    assert not model.text_model.model.gradient_checkpointing


def test_clip_weights_load_and_whole_model_round_trips(model_cfg, tokenizer, processor, tmp_path):
    # A transformers CLIP folder for the tiny tower (open_clip/OpenAI layouts are covered in test_vision.py).
    v = model_cfg.vision
    torch.manual_seed(123)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=v.img_size, patch_size=v.patch_size, hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, intermediate_size=v.ffn_dim))
    clip.save_pretrained(tmp_path / "clip")
    cfg = load_config(["model=tiny", f"model.vision.weights_path={tmp_path / 'clip'}"]).model
    model = fresh_model(cfg, tokenizer).eval()
    ours = model.vision_model.state_dict()
    for name, value in clip.state_dict().items():
        assert torch.equal(ours["model." + name.removeprefix("vision_model.")], value), name

    model.save_pretrained(tmp_path / "mllm")
    loaded = MultimodalLM.from_pretrained(tmp_path / "mllm").eval()  # ViT rebuilt from config, no CLIP file
    for sub in ("text_config", "vision_config"):
        ignore = {"dtype", "_name_or_path"}  # the loaded config records the saved dtype
        a, b = getattr(loaded.config, sub).to_dict(), getattr(model.config, sub).to_dict()
        assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}, sub
    assert loaded.config.num_image_tokens == model.config.num_image_tokens == 8
    assert loaded.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_START)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert {k.split(".")[0] for k in restored} == {"text_model", "vision_model", "image_to_text_projection"}
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    assert loaded.text_model.lm_head.weight is loaded.text_model.model.embed_tokens.weight  # tied, as the original
    batch = make_batch(processor)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)

    missing = load_config(["model=tiny", f"model.vision.weights_path={tmp_path / 'nope.pt'}"]).model
    with pytest.raises(FileNotFoundError, match="model.vision.weights_path"):
        build_mllm(missing, tokenizer)


def test_state_dict_keys_are_kosmos2s(model):
    """The converter writes transformers' Kosmos2ForConditionalGeneration names: they must load as they are."""
    stock = transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config(
        text_config=model.config.text_config.to_dict(), vision_config=model.config.vision_config.to_dict(),
        latent_query_num=model.config.latent_query_num))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(stock) == shapes(model)
    stock.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("pad_first", [False, True])
def test_condition_equals_stock_kosmos2_model(model, processor, pad_first):
    """The condition (final layer_norm at every position) equals transformers' Kosmos2Model's, one image per sample.

    Kosmos2Model is an independent implementation (measured equal to the original decoder, SPEC.md)."""
    stock = transformers.Kosmos2Model(transformers.Kosmos2Config(
        text_config=model.config.text_config.to_dict(), vision_config=model.config.vision_config.to_dict(),
        latent_query_num=model.config.latent_query_num)).eval()
    sd = {k: v for k, v in model.state_dict().items() if k != "text_model.lm_head.weight"}  # no LM head there
    stock.load_state_dict(sd, strict=True)
    prompts = [processor("<i> a red circle next to a blue square", images=[noise_image(3)]),
               processor("a dog <i>", images=[noise_image(4)])]
    batch = processor.collate(prompts[::-1] if pad_first else prompts)  # right padding in either row
    with torch.no_grad():
        ours = model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_mask"])
        theirs = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"],
                       image_embeds_position_mask=batch["image_mask"].long()).last_hidden_state
    real = batch["attention_mask"].bool()
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_on_meta_device_has_paper_size():
    cfg = load_config(["model=paper", "model.vision.weights_path=null", "model.llm.tokenizer_path=null",
                       "model.diffusion_path=null"]).model
    with torch.device("meta"):  # the original tokenizer's size and ids (test_tokenizers.py checks the real one)
        model = build_mllm(cfg, VocabStub(64007))
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # nothing allocated
    text, vit, connector = count(model.text_model), count(model.vision_model), count(model.image_to_text_projection)
    # Exact sizes: decoder 1,340,180,480 (24 x 2048, FFN 8192, vocab 64007, head tied to the embeddings:
    # the original's 1.3B); CLIP ViT-L/14 image tower 303,179,776; connector 19,015,680 (dense 1024->2048,
    # 64 latent queries, one 32-head attention).
    assert (text, vit, connector) == (1_340_180_480, 303_179_776, 19_015_680)
    assert model.config.text_config.vocab_size == 64007 and model.config.image_token_id == 64003
    assert model.config.num_image_tokens == 64 and model.config.vision_config.image_size == 224
    t, v = model.config.text_config, model.config.vision_config
    assert (t.embed_dim, t.layers, t.attention_heads, t.ffn_dim, t.activation_function) == (2048, 24, 32, 8192, "gelu")
    assert (t.dropout, t.attention_dropout, t.layer_norm_eps, t.scale_embedding) == (0.1, 0.1, 1e-5, True)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.hidden_act) == (1024, 24, 16, 4096, 14, "quick_gelu")
    model.lock_vision()
    trainable = sum(p.numel() for p in model.vision_model.parameters() if p.requires_grad)
    assert trainable == 12_596_224 + 2048  # one ViT-L block + post_layernorm


def test_tokenizer_with_another_special_layout_is_rejected():
    cfg = load_config(["model=tiny"]).model
    with pytest.raises(ValueError, match=r"at ids 0..3"):
        build_mllm(cfg, train_clip_tokenizer(CORPUS, vocab_size=300))
