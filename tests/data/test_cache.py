"""Stages 2 and 3 read precomputed CLIP-text targets / VAE moments (`python -m kosmos_g.data.cache`) when given."""

import pytest
import torch

from kosmos_g.config import ConfigError, load_config
from kosmos_g.data.cache import main as cache_main
from kosmos_g.run import RunPaths
from kosmos_g.stages import align, instruct
from kosmos_g.train import main


def _first_batch(data):
    batch = next(iter(data.train_dataloader()))
    batch.pop("skipped")
    return batch


def test_align_uses_cached_clip_targets_equal_to_live_ones(tiny_overrides, tmp_path, tiny_world):
    main(["stage=align", "init_from=none", *tiny_overrides, "trainer.max_steps=1"])  # writes the assets
    run = tmp_path / "runs" / "t"
    cache = tmp_path / "clip-cache"
    assert cache_main(["clip-text", "--shards", str(tiny_world(200) / "caption"), "--text-encoder", str(run / "assets" / "sd"),
                       "--out", str(cache), "--dtype", "float32"]) == 0
    cfg = load_config(["stage=align", "init_from=none", *tiny_overrides, f"data.clip_text_cache={cache}"])
    module, data = align.build(cfg, RunPaths.create(cfg.runs_dir, cfg.run_name, "align").assets, None)
    batch = _first_batch(data)
    assert batch["clip_target"].shape[1:] == (77, module.text_encoder.config.hidden_size)
    with torch.no_grad():
        live = module.text_encoder(batch["clip_input_ids"]).last_hidden_state
    assert torch.allclose(batch["clip_target"], live, atol=1e-4)

    with pytest.raises(ConfigError, match="data.clip_text_cache"):
        bad = load_config(["stage=align", "init_from=none", *tiny_overrides, f"data.clip_text_cache={tmp_path}"])
        align.build(bad, RunPaths.create(bad.runs_dir, bad.run_name, "align").assets, None)


def test_instruct_uses_cached_vae_moments(tiny_overrides, tmp_path, tiny_world):
    main(["stage=align", "init_from=none", *tiny_overrides, "trainer.max_steps=1"])
    run = tmp_path / "runs" / "t"
    caches = []
    for kind in ("caption", "edit", "subject"):
        out = tmp_path / f"vae-{kind}"
        assert cache_main(["vae-latents", "--shards", str(tiny_world(200) / kind), "--kind", kind, "--sd",
                           str(run / "assets" / "sd"), "--size", "32", "--out", str(out), "--dtype", "float32"]) == 0
        caches.append(f"data.vae_latent_caches.{kind}={out}")
    cfg = load_config(["stage=instruct", *tiny_overrides, *caches])
    paths = RunPaths.create(cfg.runs_dir, cfg.run_name, "instruct")
    module, data = instruct.build(cfg, paths.assets, run / "align" / "export")
    batch = _first_batch(data)
    moments = batch["target_moments"]
    with torch.no_grad():
        mean = module.diffusion.vae.encode(batch["target_pixels"]).latent_dist.mean
    assert torch.allclose(moments[:, :4], mean, atol=1e-4)
    module.log_dict = lambda *a, **k: None
    module.diffusion.encode_images = lambda *a, **k: pytest.fail("the VAE encoder ran despite the cache")
    assert torch.isfinite(module.training_step(batch, 0))


def test_a_cache_folder_that_is_unfinished_or_made_for_other_settings_is_a_config_error(tmp_path):
    import json
    from kosmos_g.stages.base import checked_cache

    assert checked_cache(None, "data.clip_text_cache", "clip-text", "set data.clip_text_cache=null") is None
    with pytest.raises(ConfigError, match=r"data.clip_text_cache=.* not a finished cache folder; build it with `python "
                                          r"-m kosmos_g.data.cache clip-text \.\.\.` or set data.clip_text_cache=null"):
        checked_cache(str(tmp_path), "data.clip_text_cache", "clip-text", "set data.clip_text_cache=null")
    (tmp_path / "cache.json").write_text(json.dumps({"type": "clip-text", "max_tokens": 77, "hidden_size": 32}))
    cache = checked_cache(str(tmp_path), "k", "clip-text", "x", type="clip-text", max_tokens=77)
    assert cache.meta["hidden_size"] == 32
    with pytest.raises(ConfigError, match=r"data.clip_text_cache: cache .* was made with \{'max_tokens': 77\}"):
        checked_cache(str(tmp_path), "data.clip_text_cache", "clip-text", "x", type="clip-text", max_tokens=64)
