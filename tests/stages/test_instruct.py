"""Stage 3 (instruct): what trains, what stays frozen, CFG dropout, and the whole mllm -> align -> instruct chain."""

import json

import pytest
import torch

from kosmos_g.config import load_config
from kosmos_g.pipeline import KosmosGPipeline, condition
from kosmos_g.run import RunPaths
from kosmos_g.testing import read_scalars
from kosmos_g.stages.common import trainable_names
from kosmos_g.stages.instruct import build, instruction
from kosmos_g.tinyworld import subject_samples
from kosmos_g.train import main


@pytest.fixture
def stage(tiny_overrides, tmp_path):
    main(["stage=align", "init_from=none", *tiny_overrides, "trainer.max_steps=1"])
    cfg = load_config(["stage=instruct", *tiny_overrides])
    paths = RunPaths.create(cfg.runs_dir, cfg.run_name, "instruct")
    return build(cfg, paths.assets, paths.root / "align" / "export")


def _batch(data):
    batch = next(iter(data.train_dataloader()))
    batch.pop("skipped")
    return batch


def test_trainable_parameters_are_mllm_connector_last_vit_block_and_m(stage):
    module, _ = stage
    mllm = module.mllm
    depth = len(mllm.vision_model.model.encoder.layers)
    expected = {f"mllm.text_model.{n}" for n, _ in mllm.text_model.named_parameters()}
    expected |= {f"mllm.image_to_text_projection.{n}" for n, _ in mllm.image_to_text_projection.named_parameters()}
    expected |= {f"mllm.vision_model.model.{n}" for n, _ in mllm.vision_model.model.named_parameters()
                 if n.startswith((f"encoder.layers.{depth - 1}.", "post_layernorm."))}
    m_ids = {id(p) for p in module.aligner.m_parameters()}
    expected |= {f"aligner.{n}" for n, p in module.aligner.named_parameters() if id(p) in m_ids}
    assert set(trainable_names(module)) == expected
    # N (decoder_query, decoder.*, decoder_proj.*) is locked
    assert not any(n.startswith(("diffusion.", "aligner.decoder")) for n in trainable_names(module))
    assert any(n.startswith("aligner.encoder_query") for n in trainable_names(module))


def test_unet_and_vae_get_no_gradient_and_do_not_change(stage):
    module, data = stage
    frozen = {n: p.detach().clone() for n, p in module.diffusion.named_parameters()}
    opt = module.configure_optimizers()["optimizer"]
    for g in opt.param_groups:
        g["lr"] = 1e-2
    module.train()
    assert not module.diffusion.unet.training and not module.diffusion.vae.training
    module.log_dict = lambda *a, **k: None
    loss = module.training_step(_batch(data), 0)
    loss.backward()
    assert all(p.grad is None for p in module.diffusion.parameters())
    assert module.mllm.text_model.model.embed_tokens.weight.grad is not None  # gradients reach the MLLM
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in module.diffusion.named_parameters())
    assert module.mllm.text_model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_cfg_dropout_rate_is_honoured(stage):
    module, _ = stage
    torch.manual_seed(0)
    rate = module.cfg_drop_mask(20000).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    module.cfg.stage.cfg_dropout = 0.0
    assert not module.cfg_drop_mask(1000).any()


def test_dropped_conditions_are_the_empty_prompts(stage):
    module, data = stage
    batch = _batch(data)
    module.cfg_drop_mask = lambda n: torch.ones(n, dtype=torch.bool)
    seen = {}
    real = module.diffusion.predict_noise
    module.diffusion.predict_noise = lambda noisy, t, cond: seen.setdefault("cond", cond) is not None and real(noisy, t, cond)
    module.log_dict = lambda *a, **k: None
    module.eval()
    module.training_step(batch, 0)
    null = condition(module.mllm, module.aligner, module.empty_prompt)
    assert torch.allclose(seen["cond"], null.expand_as(seen["cond"]), atol=1e-6)


def test_subject_instructions_drop_entity_words_at_the_configured_rate():
    import random
    from kosmos_g.data.format import Entity
    sample = next(s for s in subject_samples(20, seed=0) if any(isinstance(g, Entity) for g in s.segments))
    words = [seg.text for seg in sample.segments if isinstance(seg, Entity)]
    rng = random.Random(0)
    kept = sum(words[0] in [s for s in instruction(sample, rng, 0.5) if isinstance(s, str)] for _ in range(2000))
    assert 850 < kept < 1150
    assert all(words[0] in instruction(sample, rng, 0.0) for _ in range(10))


def test_entity_words_are_dropped_once_per_sample_as_in_the_official_loader():
    """openimage_loader.py draws `drop_object` once per document: all entity words go, or none."""
    import random
    from PIL import Image
    from kosmos_g.data.format import Entity, Sample, SubjectImage
    crop = SubjectImage(Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "white"))
    sample = Sample("subject", ["a ", Entity("dog"), crop, " and a ", Entity("hat"), crop, " on grass"],
                    Image.new("RGB", (8, 8)))
    rng = random.Random(0)
    prompts = [instruction(sample, rng, 0.5) for _ in range(2000)]
    kept = [{w for w in ("dog", "hat") if w in prompt} for prompt in prompts]
    assert {frozenset(k) for k in kept} == {frozenset(), frozenset({"dog", "hat"})}
    assert 850 < sum(bool(k) for k in kept) < 1150
    prompt = instruction(sample, random.Random(1), 1.0)
    assert [p for p in prompt if isinstance(p, str)] == ["a ", " and a ", " on grass"] and len(prompt) == 5


def test_edit_prompts_carry_the_input_caption_dropped_at_the_configured_rate():
    """The official edit prompt: `<s> [input caption, dropped with p 0.5] <image>src</image> instruction`."""
    import random
    from PIL import Image
    from kosmos_g.data.format import InputCaption, Sample
    source = Image.new("RGB", (8, 8), "red")
    sample = Sample("edit", [InputCaption("a red square"), source, "make it blue"], Image.new("RGB", (8, 8)))
    rng = random.Random(0)
    prompts = [instruction(sample, rng, 0.5) for _ in range(2000)]
    assert {tuple(p[:-2]) for p in prompts} == {(), ("a red square",)}
    assert all(p[-2] is source and p[-1] == "make it blue" for p in prompts)
    assert 850 < sum(len(p) == 3 for p in prompts) < 1150
    assert instruction(sample, rng, 0.5, caption_drop_prob=0.0)[0] == "a red square"
    assert instruction(sample, rng, 0.0, caption_drop_prob=1.0) == [source, "make it blue"]


@pytest.mark.slow
def test_three_stages_chain_and_export_a_pipeline(tiny_overrides, tmp_path):
    for stage in ("mllm", "align", "instruct"):
        main([f"stage={stage}", *tiny_overrides, "stage.sample_every_n_steps=3"])
    export = tmp_path / "runs" / "t" / "instruct" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["stage"] == "instruct" and {"mllm", "aligner", "unet", "vae", "scheduler"} <= set(manifest["parts"])
    pipe = KosmosGPipeline.from_pretrained(export)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    scalars = read_scalars(export.parent / "tensorboard")
    assert {"train/loss", "instruct/cfg_dropped", "train/grad_norm"} <= set(scalars)
    assert any(t.startswith("instruct/loss_t") for t in scalars)
