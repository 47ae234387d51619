"""A first run on one's own data: overrides as documented, settings derived from the model preset, tiny assets
that know their size, exports that point to the assets they were trained against, converters that refuse to
write nothing. (The whole route, as the README writes it: tests/test_doc_commands.py::test_own_data_route.)"""

import json

import pytest
from PIL import Image

from kosmos_g import config
from kosmos_g.config import ConfigError, load_config


def test_per_kind_overrides_and_brace_patterns_work_as_documented():
    pattern = "/d/coco/captions-{000000..000041}.tar"
    for override, want in [("data.shards.caption=/d/coco", "/d/coco"),
                           ("data.shards={caption: /d/coco}", "/d/coco"),
                           (f"data.shards.caption={pattern}", pattern)]:
        cfg = load_config(["data=shards", override])
        assert cfg.data.shards == {"caption": want}, override
    cfg = load_config(["data=shards", "data.shards.edit=/d/ip2p", "data.vae_latent_caches.edit=/c/ip2p"])
    assert cfg.data.shards == {"edit": "/d/ip2p"} and cfg.data.vae_latent_caches == {"edit": "/c/ip2p"}
    with pytest.raises(ConfigError, match=r"Unknown sample kind 'captions'.*data\.shards\.caption\?"):
        load_config(["data=shards", "data.shards.captions=/d"])


def test_data_settings_follow_the_model_preset_unless_set(monkeypatch):
    tiny = load_config(["model=tiny", "data=shards"]).data
    assert (tiny.vae_image_size, tiny.num_workers, tiny.shuffle_buffer, tiny.max_text_tokens) == (32, 0, 64, 256)
    monkeypatch.setattr(config, "available_cpus", lambda: 2)
    paper = load_config(["model=paper", "data=shards"]).data
    assert (paper.vae_image_size, paper.num_workers, paper.shuffle_buffer, paper.max_text_tokens) == \
        (512, 1, 2000, 2048)
    monkeypatch.setattr(config, "available_cpus", lambda: 64)
    assert load_config(["model=paper", "data=shards"]).data.num_workers == 4
    mine = load_config(["model=tiny", "data=shards", "data.vae_image_size=64", "data.num_workers=3",
                        "data.shuffle_buffer=5"]).data
    assert (mine.vae_image_size, mine.num_workers, mine.shuffle_buffer) == (64, 3, 5)
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(["data.vae_image_size=30"])


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(path)


def test_converter_that_writes_nothing_fails_naming_the_paths(tmp_path, capsys):
    from kosmos_g.data import convert

    rows = tmp_path / "docs" / "rows.jsonl"
    _image(tmp_path / "docs" / "a" / "1.jpg")
    rows.write_text(json.dumps({"texts": ["hello", None], "images": [None, "a/1.jpg"]}) + "\n")
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    rc = convert.main(["interleaved", "--rows", str(rows), "--image-root", str(wrong), "--out", str(tmp_path / "x"),
                       "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "wrote 0 samples" in err and str(wrong / "a" / "1.jpg") in err
    # the default image root, for every subcommand, is the input file's folder
    assert convert.main(["interleaved", "--rows", str(rows), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out


def _tiny_sd(folder, texts, size=32):
    from kosmos_g.assets import diffusion_folder

    model = load_config(["model=tiny"]).model
    return diffusion_folder(model, folder, lambda: iter(texts * 3), parts=("tokenizer", "text_encoder"),
                            image_size=size)


def test_tiny_assets_record_their_size_and_refuse_another(tmp_path):
    from kosmos_g.assets import random_sd_size

    sd = _tiny_sd(tmp_path / "assets", ["a red circle", "a blue square"])
    assert random_sd_size(sd) == 32
    assert _tiny_sd(tmp_path / "assets", ["unused"]) == sd  # same size: reused
    with pytest.raises(ConfigError, match=r"built for 32-px images.*data\.vae_image_size=64"):
        _tiny_sd(tmp_path / "assets", ["unused"], size=64)


def test_exports_point_to_their_assets_and_init_from_reuses_them(tmp_path):
    from kosmos_g.run import adopt_export_assets, diffusion_record, write_export

    mine = _tiny_sd(tmp_path / "a" / "assets", ["a red circle on stripes", "a blue square"])
    other = _tiny_sd(tmp_path / "b" / "assets", ["completely different words", "in another corpus"])
    export = write_export(tmp_path / "a" / "align" / "export", "align", 1, "h", {},
                          diffusion_record(None, tmp_path / "a" / "assets"))
    assert json.loads((export / "manifest.json").read_text())["assets"]["random_tiny_sd"]
    assert adopt_export_assets(None, export, "instruct") == str(mine.resolve())  # not the new run's own assets
    assert adopt_export_assets(str(mine), export, "instruct") == str(mine)
    with pytest.raises(ConfigError, match=rf"trained against .*{mine.resolve()}.*would use {other}"):
        adopt_export_assets(str(other), export, "instruct")
    assert adopt_export_assets(None, None, "align") is None  # a fresh start: nothing to reuse


def test_evaluation_takes_an_image_size():
    from kosmos_g.eval.protocols import Generation
    from kosmos_g.evaluate import build_parser

    args = build_parser().parse_args(["coco", "--pipeline", "p", "--captions", "c", "--images", "i", "--out", "o",
                                      "--fid-features", "f", "--height", "32", "--width", "48"])
    assert (args.height, args.width) == (32, 48)
    seen = {}

    def pipe(prompt, images, **kw):
        seen.update(kw)
        return [Image.new("RGB", (kw["width"], kw["height"]))]

    Generation(height=32, width=48)(pipe, "a <i>", [Image.new("RGB", (8, 8))], "k")
    assert (seen["height"], seen["width"]) == (32, 48)
