"""`python -m kosmos_g.generate`: images and a grid from a saved pipeline; input mistakes exit 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos_g.generate import main
from kosmos_g.testing import build_tiny_pipeline

SIZE = 32


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny pipeline saved as the stage-3 export would be, and a subject image beside it."""
    root = tmp_path_factory.mktemp("gen")
    build_tiny_pipeline(seed=0, image_size=SIZE).save_pretrained(root / "export")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / "subject.jpg")
    return root


def args(export, out, *extra):
    return ["--pipeline", str(export / "export"), "--prompt", "a <i> on the beach", "--image",
            str(export / "subject.jpg"), "--out", str(out), "--steps", "2", "--device", "cpu", *extra]


def test_writes_images_and_a_grid(export, tmp_path, capsys):
    assert main(args(export, tmp_path / "a", "--num-images", "3", "--seed", "1")) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000.png", "001.png", "002.png", "grid.png"]
    images = [np.asarray(Image.open(tmp_path / "a" / n)) for n in names[:3]]
    assert all(im.shape == (SIZE, SIZE, 3) for im in images)
    assert np.abs(images[0].astype(int) - images[1]).max() > 0  # different noise per image
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (2 * SIZE, 2 * SIZE, 3)  # 3 images in a 2x2 grid, row by row
    np.testing.assert_array_equal(grid[SIZE:, :SIZE], images[2])
    assert (grid[SIZE:, SIZE:] == 255).all()  # the empty cell stays white
    assert "wrote 3 image(s)" in capsys.readouterr().out

    # Same seed, same images; the DDIM sampler and another seed give other ones.
    assert main(args(export, tmp_path / "b", "--num-images", "1", "--seed", "1")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b" / "000.png")), images[0])
    assert main(args(export, tmp_path / "c", "--num-images", "1", "--seed", "1", "--scheduler", "ddim")) == 0
    assert main(args(export, tmp_path / "d", "--num-images", "1", "--seed", "2")) == 0
    for other in ("c", "d"):
        assert np.abs(np.asarray(Image.open(tmp_path / other / "000.png")).astype(int) - images[0]).max() > 0


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_image_file(export, tmp_path, capsys):
    argv = args(export, tmp_path / "out")
    argv[argv.index("--image") + 1] = str(tmp_path / "missing.jpg")
    assert main(argv) == 2
    err = error_line(capsys)
    assert "image file not found" in err and "missing.jpg" in err
    assert not (tmp_path / "out").exists()


def test_unreadable_image_file(export, tmp_path, capsys):
    (tmp_path / "fake.jpg").write_text("not an image")
    argv = args(export, tmp_path / "out")
    argv[argv.index("--image") + 1] = str(tmp_path / "fake.jpg")
    assert main(argv) == 2
    assert "cannot read image" in error_line(capsys)


def test_more_placeholders_than_images(export, tmp_path, capsys):
    argv = args(export, tmp_path / "out")
    argv[argv.index("--prompt") + 1] = "a <i> wearing <i>"
    assert main(argv) == 2
    assert "2 <i> placeholder(s) but 1 image(s)" in error_line(capsys)


def test_missing_or_unreadable_export_folder(export, tmp_path, capsys):
    argv = args(export, tmp_path / "out")
    argv[argv.index("--pipeline") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    assert "nope not found" in error_line(capsys)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "KosmosGPipeline"}))  # no components
    argv[argv.index("--pipeline") + 1] = str(broken)
    assert main(argv) == 2
    assert "cannot load the pipeline from" in error_line(capsys)

    (broken / "model_index.json").write_text("{ not json")
    assert main(argv) == 2
    assert "cannot load the pipeline from" in error_line(capsys)


@pytest.mark.slow  # a fresh interpreter importing torch/diffusers: 7-8 s on 2 busy cores
def test_module_entry_point_exits_2_with_one_line(tmp_path):
    """The real command: exit status 2, one stderr line, no traceback."""
    cmd = [sys.executable, "-m", "kosmos_g.generate", "--pipeline", str(tmp_path / "nope"), "--prompt", "a cat"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=repo)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: pipeline folder") and "save_pretrained" in proc.stderr


def test_out_that_is_a_file_is_one_line(export, tmp_path, capsys):
    (tmp_path / "taken.png").write_bytes(b"x")
    assert main(args(export, tmp_path / "taken.png")) == 2
    assert "--out" in error_line(capsys) and (tmp_path / "taken.png").read_bytes() == b"x"
