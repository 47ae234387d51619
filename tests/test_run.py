"""Run folders, stage exports and their manifests, the stage handoff (`init_from`), checkpoints written
atomically, moved aside and checked before resuming (kosmos_g.run)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from kosmos_g.config import ConfigError
from kosmos_g.run import (MANIFEST, AtomicCheckpointIO, RunPaths, adopt_export_assets, check_checkpoint_fits,
                          config_hash, copy_part, move_aside, read_checkpoint, read_manifest, resolve_init,
                          write_export)


def write_text(name: str, text: str):
    """A part writer: one file in a fresh folder."""
    def write(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return write


def export(paths: RunPaths, stage: str, step: int = 5) -> None:
    write_export(paths.root / stage / "export", stage, step, "abc", {"model": write_text("w.txt", stage)})


@pytest.fixture
def paths(tmp_path):
    return RunPaths.create(str(tmp_path / "runs"), "r", "align")


def test_run_paths_lay_out_one_folder_per_stage(tmp_path):
    p = RunPaths.create(str(tmp_path), "demo", "instruct")
    assert p.root == tmp_path / "demo"
    assert p.stage_dir == tmp_path / "demo" / "instruct"
    assert p.checkpoints == tmp_path / "demo" / "instruct" / "checkpoints"
    assert p.export == tmp_path / "demo" / "instruct" / "export"
    assert p.assets == tmp_path / "demo" / "assets"  # shared by all stages of the run


def test_config_hash_ignores_key_order_and_follows_values():
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_export_holds_its_parts_and_a_manifest(tmp_path):
    out = write_export(tmp_path / "export", "align", 12, "h1", {"mllm": write_text("w.txt", "m"),
                                                                 ".": write_text("extra.json", "{}")},
                       assets={"diffusion_path": "/sd"})
    assert out == tmp_path / "export"
    assert (out / "mllm" / "w.txt").read_text() == "m" and (out / "extra.json").is_file()
    manifest = read_manifest(out)
    assert {k: manifest[k] for k in ("stage", "step", "config_hash", "assets")} == {
        "stage": "align", "step": 12, "config_hash": "h1", "assets": {"diffusion_path": "/sd"}}
    assert manifest["parts"] == ["extra.json", "mllm"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp or old folder left behind


def test_a_new_export_replaces_the_old_one_whole(tmp_path):
    write_export(tmp_path / "export", "mllm", 1, "h", {"old": write_text("a.txt", "1")})
    write_export(tmp_path / "export", "mllm", 2, "h", {"new": write_text("b.txt", "2")})
    assert sorted(os.listdir(tmp_path / "export")) == [MANIFEST, "new"]
    assert read_manifest(tmp_path / "export")["step"] == 2


def test_a_writer_that_fails_leaves_the_previous_export_intact(tmp_path):
    write_export(tmp_path / "export", "mllm", 1, "h", {"model": write_text("w.txt", "good")})

    def crash(folder):
        folder.mkdir()
        (folder / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_export(tmp_path / "export", "mllm", 2, "h", {"model": crash})
    assert read_manifest(tmp_path / "export")["step"] == 1
    assert (tmp_path / "export" / "model" / "w.txt").read_text() == "good"


def test_copy_part_copies_a_folder_into_a_new_export(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.bin").write_bytes(b"\x00\x01")
    out = write_export(tmp_path / "export", "align", 3, "h", {"mllm": copy_part(src)})
    assert (out / "mllm" / "sub" / "x.bin").read_bytes() == b"\x00\x01"


def test_read_manifest_names_a_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(ConfigError, match=r"not a stage export: manifest\.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="is corrupt.*re-run the stage"):
        read_manifest(tmp_path)


def test_stage_mllm_starts_fresh_and_takes_no_export(tmp_path):
    p = RunPaths.create(str(tmp_path), "r", "mllm")
    assert resolve_init("auto", "mllm", p, "r") is None
    assert resolve_init("none", "mllm", p, "r") is None
    with pytest.raises(ConfigError, match="stage=mllm has no predecessor"):
        resolve_init(str(tmp_path), "mllm", p, "r")


def test_auto_without_the_previous_export_says_what_to_run_first(paths):
    with pytest.raises(ConfigError) as e:
        resolve_init("auto", "align", paths, "r")
    msg = str(e.value)
    assert "Stage order is mllm -> align -> instruct" in msg
    assert "`python train.py stage=mllm run_name=r`" in msg and "init_from=none" in msg
    instruct = RunPaths.create(str(paths.root.parent), "r", "instruct")
    with pytest.raises(ConfigError, match=r"`python train.py stage=align run_name=r` first"):
        resolve_init("auto", "instruct", instruct, "r")


def test_instruct_cannot_start_from_scratch(tmp_path):
    p = RunPaths.create(str(tmp_path), "r", "instruct")
    with pytest.raises(ConfigError, match=r"stage=instruct cannot start from scratch.*stage=mllm.*stage=align"):
        resolve_init("none", "instruct", p, "r")


def test_init_from_finds_the_previous_stage_export(paths):
    export(paths, "mllm")
    expected = paths.root / "mllm" / "export"
    assert resolve_init("auto", "align", paths, "r") == expected
    assert resolve_init(str(expected), "align", paths, "r") == expected
    assert resolve_init(str(paths.root), "align", paths, "r") == expected  # a run folder is enough
    assert resolve_init("none", "align", paths, "r") is None  # align may start from a fresh MLLM


def test_init_from_an_export_of_the_wrong_stage_names_both(paths):
    export(paths, "instruct")
    wrong = paths.root / "instruct" / "export"
    with pytest.raises(ConfigError, match=r"is a 'instruct' export, but stage=align needs a 'mllm' export"):
        resolve_init(str(wrong), "align", paths, "r")
    # stage instruct may fine-tune an instruct export (e.g. the converted released weights)
    assert resolve_init(str(wrong), "instruct", paths, "r") == wrong


def sd_like(folder, text: str):
    for part in ("tokenizer", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "f.json").write_text(f"{part}:{text}")
    return folder


def test_a_stage_reuses_the_sd_folder_its_init_export_was_trained_against(tmp_path):
    from kosmos_g.run import diffusion_record

    trained_on = sd_like(tmp_path / "sd", "a")
    init = write_export(tmp_path / "export", "align", 1, "h", {"m": write_text("w", "")},
                        assets=diffusion_record(str(trained_on), tmp_path / "assets"))
    assert adopt_export_assets(None, init, "instruct") == str(trained_on.resolve())
    copy = sd_like(tmp_path / "copy", "a")
    assert adopt_export_assets(str(copy), init, "instruct") == str(copy)  # same contents elsewhere is fine
    other = sd_like(tmp_path / "other", "b")
    with pytest.raises(ConfigError, match=r"trained against the CLIP text encoder/tokenizer in .*fingerprint"):
        adopt_export_assets(str(other), init, "instruct")
    with pytest.raises(ConfigError, match=r"model\.diffusion_path .*missing"):
        adopt_export_assets(str(tmp_path / "gone"), init, "instruct")
    assert adopt_export_assets("/x", None, "instruct") == "/x"  # a fresh start keeps the configured folder


def test_checkpoints_are_written_whole_and_a_crash_mid_write_keeps_the_old_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]

    def crash_mid_write(self, checkpoint, target, storage_options=None):  # the process dies half-way through
        with open(target, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_move_aside_keeps_old_checkpoints_under_a_new_name(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert move_aside(ckpts) is None  # nothing there
    ckpts.mkdir()
    assert move_aside(ckpts) is None and ckpts.is_dir()  # empty: left alone
    (ckpts / "last.ckpt").write_text("1")
    first = move_aside(ckpts)
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_text("2")
    second = move_aside(ckpts)  # twice in one second must not collide
    assert not ckpts.exists() and first != second
    assert first.name.startswith("checkpoints.") and second.name.startswith("checkpoints.")
    assert (first / "last.ckpt").read_text() == "1" and (second / "last.ckpt").read_text() == "2"


def test_read_checkpoint_reports_step_stage_and_shapes_or_a_clear_error(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"global_step": 7, "kosmos_g": {"stage": "align"}, "state_dict": {"w": torch.zeros(2, 3)}}, path)
    assert read_checkpoint(path) == {"global_step": 7, "stage": "align", "shapes": {"w": (2, 3)}}
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"bad\.ckpt is unreadable.*resume=none"):
        read_checkpoint(tmp_path / "bad.ckpt")


def test_check_checkpoint_fits_refuses_another_stage_or_other_sizes(tmp_path):
    module = nn.Linear(3, 2)
    fits = {"stage": "align", "shapes": {"weight": (2, 3), "bias": (2,), "other": (9,)}}
    check_checkpoint_fits(tmp_path / "c", fits, "align", module)  # keys it does not have are not its business
    check_checkpoint_fits(tmp_path / "c", {**fits, "stage": None}, "align", module)
    with pytest.raises(ConfigError, match=r"written by stage=mllm, not stage=align"):
        check_checkpoint_fits(tmp_path / "c", {**fits, "stage": "mllm"}, "align", module)
    with pytest.raises(ConfigError, match=r"weight has shape \[4, 3\] there and \[2, 3\] here"):
        check_checkpoint_fits(tmp_path / "c", {"stage": "align", "shapes": {"weight": (4, 3)}}, "align", module)


def test_the_manifest_is_plain_json(tmp_path):
    out = write_export(tmp_path / "e", "mllm", 0, "h", {"m": write_text("w", "")})
    assert json.loads((out / MANIFEST).read_text())["stage"] == "mllm"
