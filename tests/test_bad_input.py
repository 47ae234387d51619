"""Bad input, one clear error each, and a failing launch changes nothing in the run folder.

A module fixture trains stage mllm and stage align for 2 steps each (run "ok"); every failing launch
below is aimed at a copy of that run (often with resume=none, which would move checkpoints aside)
and must leave every file of it byte for byte as it was. Also: safe loading (weights_only, no pickle
code runs) and no network access during training.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import socket
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from kosmos_g.train import main

STEPS = ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_world):
    """runs/ok/{mllm,align}: exports, checkpoints, assets (tokenizer, tiny SD)."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(tiny_world(100), root / "data")
    base = [f"runs_dir={root / 'runs'}", "run_name=ok", f"data.root={root / 'data'}", *STEPS]
    main(["stage=mllm", *base])
    main(["stage=align", *base])
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run and the overrides aimed at it."""
    shutil.copytree(trained / "runs", tmp_path / "runs")
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run_name=ok", f"data.root={trained / 'data'}", *STEPS]
    return tmp_path / "runs" / "ok", overrides


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(argv: list[str], capsys, *needles: str) -> str:
    """train.py exits with status 2 and one `error:` line naming the problem."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error: ")]  # after progress bars
    assert len(starts) == 1 and "Traceback" not in err, err
    message = "\n".join(err.splitlines()[starts[0]:])
    for needle in needles:
        assert needle in message, err
    return message


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("override,needles", [
    ("trainer.max_step=5", ["Unknown config key 'trainer.max_step'", "Did you mean 'trainer.max_steps'"]),
    ("trainer=a100", ["trainer/a100", "a100_fsdp"]),
    ("stage=pretrain", ["stage/pretrain", "mllm"]),
    ("trainer.max_steps=many", ["trainer.max_steps", "many"]),
    ("trainer.strategy=deepspeed", ["trainer.strategy must be one of auto, ddp, fsdp"]),
    ("trainer.precision=bf16", ["trainer.precision must be one of", "bf16-mixed"]),
    ("trainer.preempt_signals=[SIGFOO]", ["SIGFOO"]),
    ("trainer.fsdp_wrap_layers=[Kosmos2Block]", ["'Kosmos2Block'", "Kosmos2TextBlock"]),
])
def test_config_errors(run, capsys, override, needles):
    folder, overrides = run
    before = snapshot(folder)
    strategy = ["trainer.strategy=fsdp"] if "wrap_layers" in override else []
    fails(["stage=align", *overrides, *strategy, override, "resume=none"], capsys, *needles)
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# stage order and exports


def test_stage_order(tmp_path, capsys):
    base = [f"runs_dir={tmp_path}", "run_name=fresh"]
    fails(["stage=instruct", *base], capsys, "`python train.py stage=align run_name=fresh` first",
          "mllm -> align -> instruct")
    fails(["stage=align", *base], capsys, "`python train.py stage=mllm run_name=fresh` first", "init_from=none")
    fails(["stage=instruct", "init_from=none", *base], capsys, "cannot start from scratch")
    assert not (tmp_path / "fresh").exists()  # nothing was created


def test_missing_wrong_and_mismatched_exports(run, tmp_path, capsys):
    folder, overrides = run
    before = snapshot(folder)
    fails(["stage=align", *overrides, f"init_from={tmp_path / 'nowhere'}"], capsys, "manifest.json is missing")
    fails(["stage=instruct", *overrides, f"init_from={folder / 'mllm' / 'export'}"], capsys,
          "is a 'mllm' export, but stage=instruct needs a 'align' export")
    # the mllm export has hidden size 64; a preset with 32 cannot load it (resume=none must not move anything)
    fails(["stage=align", *overrides, "model.llm.hidden_size=32", "resume=none"], capsys,
          "has hidden size 64, but model.llm.hidden_size=32")
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# checkpoints: corrupt, unsafe, of another stage, of other sizes


class _Boom:
    def __reduce__(self):  # what a malicious checkpoint does: run code when unpickled
        return (Path.touch, (Path(_Boom.marker),))


def test_corrupt_and_unsafe_checkpoints(run, tmp_path, capsys):
    folder, overrides = run
    last = folder / "align" / "checkpoints" / "last.ckpt"
    last.write_bytes(b"not a checkpoint")
    before = snapshot(folder)
    fails(["stage=align", *overrides], capsys, f"checkpoint {last} is unreadable", "resume=none")

    _Boom.marker = str(tmp_path / "pwned")
    with open(last, "wb") as f:
        torch.save({"global_step": 1, "state_dict": {}, "payload": _Boom()}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    before = snapshot(folder)
    fails(["stage=align", *overrides], capsys, "is unreadable", "weights_only")
    assert not (tmp_path / "pwned").exists()  # weights_only=True refused to run the pickled code
    assert snapshot(folder) == before


def test_checkpoint_of_another_stage_or_size(run, capsys):
    folder, overrides = run
    before = snapshot(folder)
    mllm_ckpt = folder / "mllm" / "checkpoints" / "last.ckpt"
    fails(["stage=align", *overrides, f"resume={mllm_ckpt}"], capsys, "was written by stage=mllm, not stage=align")
    fails(["stage=align", *overrides, "model.aligner.ffn_size=64"], capsys, "does not fit the model",
          "shape [128, 64] there and [64, 64] here")
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# data: missing path, empty, nothing usable


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_data_errors(run, tmp_path, capsys):
    folder, overrides = run
    before = snapshot(folder)
    shards = ["data=shards", "data.num_workers=0", "resume=none"]
    fails(["stage=align", *overrides, *shards, f"data.root={tmp_path / 'no' / 'such'}"], capsys,
          "no 'caption' shards", str(tmp_path / "no" / "such" / "caption"), "data.root")
    _tar(tmp_path / "empty" / "caption" / "000.tar", {})
    fails(["stage=align", *overrides, *shards, f"data.root={tmp_path / 'empty'}"], capsys,
          "no usable 'caption' sample", "got no sample at all")
    _tar(tmp_path / "broken" / "caption" / "000.tar", {"a.txt": b"a red circle", "a.jpg": b"not an image",
                                                       "b.txt": b"\xff\xfe"})
    fails(["stage=align", *overrides, *shards, f"data.root={tmp_path / 'broken'}"], capsys,
          "no usable 'caption' sample", "were skipped", "bad_image")
    (tmp_path / "folder-without-tars" / "caption").mkdir(parents=True)
    fails(["stage=align", *overrides, *shards, f"data.root={tmp_path / 'folder-without-tars'}"], capsys,
          "no .tar shards in folder")
    assert snapshot(folder) == before  # resume=none moved nothing aside


def test_prompt_image_mismatches(run):
    from kosmos_g.models.mllm import MultimodalLM
    from kosmos_g.processor import KosmosGProcessor, PromptError

    folder, _ = run
    processor = KosmosGProcessor.from_pretrained(folder / "align" / "export" / "processor")
    image = Image.new("RGB", (40, 40), "red")
    with pytest.raises(PromptError, match=r"prompt has 2 <i> placeholder\(s\) but 1 image\(s\)"):
        processor("a <i> next to a <i>", images=[image])
    with pytest.raises(PromptError, match="images= is only for the string form"):
        processor(["a", image], images=[image])
    mllm = MultimodalLM.from_pretrained(folder / "align" / "export" / "mllm")
    batch = processor.collate([processor(["a", image, "b"])])
    with pytest.raises(ValueError, match=r"placeholder positions but 2 image\(s\)"):
        mllm.embed(batch["input_ids"], torch.cat([batch["pixel_values"]] * 2), batch["image_mask"])


# ---------------------------------------------------------------------------------------------
# no network at run time


def test_training_never_touches_the_network(run, monkeypatch, tmp_path):
    folder, overrides = run
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError(f"network access during training: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # a fresh run (tokenizers, tiny SD, models built and saved), then stage instruct from its export
    main(["stage=align", "init_from=none", *overrides, "run_name=net"])
    main(["stage=instruct", *overrides, "stage.sample_every_n_steps=0"])
    assert not calls
    assert (folder / "instruct" / "export" / "manifest.json").is_file()
