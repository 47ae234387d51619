"""The FSDP presets for real, on a CUDA device (skipped without one): the tiny preset under
`trainer=a100_fsdp` trains, checkpoints only trainable weights under their plain names, and resumes.
With 2+ GPUs, torchrun runs it sharded over two of them.

    pytest tests/gpu -m gpu
"""

from __future__ import annotations

import json
import os
import subprocess
import shutil
import sys

import pytest
import torch

from kosmos_g.testing import read_steps
from kosmos_g.train import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def world(tmp_path, tiny_world):
    shutil.copytree(tiny_world(200), tmp_path / "world")


def overrides(tmp_path, devices: int = 1):
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return [f"runs_dir={tmp_path}", "run_name=g", f"data.root={tmp_path / 'world'}", "trainer=a100_fsdp",
            f"trainer.devices={devices}", f"trainer.precision={precision}", "trainer.max_steps=4",
            "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1"]


def test_fsdp_align_and_instruct_on_one_gpu(tmp_path):
    main(["stage=align", "init_from=none", *overrides(tmp_path)])
    stage = tmp_path / "g" / "align"
    ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("aligner.") and "_fsdp_wrapped_module" not in k for k in keys)
    assert json.loads((stage / "export" / "manifest.json").read_text())["step"] == 4
    main(["stage=align", "init_from=none", *overrides(tmp_path), "trainer.max_steps=6"])  # resume=auto
    steps = read_steps(stage / "steps.jsonl")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    # stage instruct: the frozen U-Net/VAE stay out of FSDP (moved to the GPU by the strategy)
    main(["stage=instruct", *overrides(tmp_path), "stage.sample_every_n_steps=0"])
    assert (tmp_path / "g" / "instruct" / "export" / "manifest.json").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus_with_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "stage=align", "init_from=none", *overrides(tmp_path, devices=2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    export = tmp_path / "g" / "align" / "export"
    assert json.loads((export / "manifest.json").read_text())["step"] == 4
    # rank 0 wrote whole tensors (gathered from both shards), not its own half
    from kosmos_g.models.aligner import AlignerNet
    aligner = AlignerNet.from_pretrained(export / "aligner")
    assert all(p.abs().sum() > 0 for p in aligner.parameters() if p.ndim == 2)
