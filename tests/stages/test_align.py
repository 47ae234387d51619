"""Stage 2 (align): exactly the aligner trains, its losses are the paper's, and train.py runs it end to end."""

import json

import pytest
import torch

from kosmos_g.config import ConfigError, load_config
from kosmos_g.models.aligner import AlignerNet
from kosmos_g.models.mllm import MultimodalLM
from kosmos_g.processor import KosmosGProcessor
from kosmos_g.run import RunPaths
from kosmos_g.testing import read_scalars
from kosmos_g.stages.align import build
from kosmos_g.stages.common import trainable_names
from kosmos_g.train import main


@pytest.fixture
def align(tmp_path, tiny_overrides, tiny_world):
    cfg = load_config(["stage=align", "init_from=none", *tiny_overrides, f"data.root={tiny_world(100)}"])
    module, data = build(cfg, RunPaths.create(cfg.runs_dir, cfg.run_name, "align").assets, None)
    return module, data


def test_only_the_aligner_trains(align):
    module, _ = align
    expected = sorted(f"aligner.{n}" for n, _ in module.aligner.named_parameters())
    assert sorted(trainable_names(module)) == expected
    assert "aligner.encoder_query" in expected and "aligner.decoder_query" in expected  # M and N
    optimised = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.aligner.parameters()}
    module.train()
    assert not module.mllm.training and not module.text_encoder.training and module.aligner.training


def test_step_updates_aligner_and_leaves_frozen_parts_unchanged(align):
    module, data = align
    batch = next(iter(data.train_dataloader()))
    batch.pop("skipped")
    assert batch["clip_input_ids"].shape == (module.cfg.stage.batch_size, 77)
    frozen = {n: p.clone() for n, p in module.named_parameters() if not n.startswith("aligner.")}
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    before = module.aligner.encoder_query.detach().clone()
    module.log_dict = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for n, p in module.named_parameters() if not n.startswith("aligner."))
    for g in opt.param_groups:
        g["lr"] = 1e-3
    opt.step()
    assert not torch.equal(before, module.aligner.encoder_query)
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)


def _losses(module, batch, weighting):
    """The step's loss with only the reconstruction term, and everything it logged."""
    module.cfg.stage.target_weight, module.cfg.stage.recon_weight = 0.0, 1.0
    module.cfg.stage.recon_weighting = weighting
    logged = {}
    module.log_dict = lambda d, **k: logged.update({k_: float(v.detach()) for k_, v in d.items()})
    torch.manual_seed(0)
    return module.training_step(batch, 0), logged


def _expected_terms(module, batch):
    """N(M(s)) and s for the batch, computed here from the parts (the reference for both weightings)."""
    with torch.no_grad():
        s = module.mllm.encode(batch["input_ids"], batch["attention_mask"])
        recon = module.aligner.reconstruct(module.aligner.encode(s, batch["attention_mask"] == 0), s.shape[1])
    return recon, s, batch["attention_mask"].float()


def test_reconstruction_is_the_official_padded_batch_mean_times_77_over_length(align):
    """Default: F.mse_loss over the whole padded batch (pad positions included) * 77 / L, as `rec_loss` in the
    original unilm/models/aligner.py."""
    module, data = align
    assert module.cfg.stage.recon_weighting == "official"
    batch = next(iter(data.train_dataloader()))
    mask = batch["attention_mask"]
    assert (mask.sum(1) < mask.shape[1]).any()  # the batch really is padded
    module.eval()  # no dropout: the reference below is computed without it
    loss, logged = _losses(module, batch, "official")
    recon, s, _ = _expected_terms(module, batch)
    L = s.shape[1]
    expected = ((recon - s) ** 2).mean() * 77 / L
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert logged["align/recon_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert logged["align/recon_mse"] == pytest.approx(float(((recon - s) ** 2).mean()), rel=1e-5)


def test_per_sample_reconstruction_weighting_counts_real_tokens_only(align):
    module, data = align
    batch = next(iter(data.train_dataloader()))
    module.eval()
    loss, logged = _losses(module, batch, "per_sample")
    recon, s, mask = _expected_terms(module, batch)
    lengths = mask.sum(1)
    per_caption = (((recon - s) ** 2).mean(-1) * mask).sum(1) / lengths
    expected = (per_caption * 77 / lengths).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    official, _ = _losses(module, batch, "official")
    assert not torch.isclose(loss, official, rtol=1e-3)  # the two weightings really differ on a padded batch


def test_unknown_reconstruction_weighting_is_a_config_error(tiny_overrides):
    with pytest.raises(ConfigError, match="stage.recon_weighting must be one of official, per_sample"):
        load_config(["stage=align", *tiny_overrides, "stage.recon_weighting=paper"])


def test_train_py_runs_align_end_to_end_and_resumes(tiny_overrides, tmp_path):
    main(["stage=align", "init_from=none", *tiny_overrides])
    stage = tmp_path / "runs" / "t" / "align"
    export = stage / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["stage"] == "align" and manifest["step"] == 6
    assert sorted(manifest["parts"]) == ["aligner", "mllm", "processor"]
    assert (stage / "config.yaml").read_text().count("name: align") == 1
    # every part loads back through its own from_pretrained
    aligner = AlignerNet.from_pretrained(export / "aligner")
    mllm = MultimodalLM.from_pretrained(export / "mllm")
    processor = KosmosGProcessor.from_pretrained(export / "processor")
    assert aligner.config.llm_dim == mllm.config.hidden_size
    assert processor("a red circle").input_ids[0] == processor.tokenizer.bos_token_id
    # checkpoints hold only what trains
    ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and all(k.startswith("aligner.") for k in ckpt["state_dict"])
    scalars = read_scalars(stage / "tensorboard")
    for tag in ("train/loss", "align/target_mse", "align/recon_mse", "align/cosine", "train/grad_norm",
                "throughput/samples_per_sec"):
        assert tag in scalars, sorted(scalars)
    assert any(t.startswith("lr-") for t in scalars)
    # resume=auto continues from last.ckpt to the new max_steps
    main(["stage=align", "init_from=none", *tiny_overrides, "trainer.max_steps=8"])
    assert json.loads((export / "manifest.json").read_text())["step"] == 8
