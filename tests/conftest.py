"""Shared test set-up: no network, few threads, and the overrides for a tiny, fast run in a tmp folder."""

import os

# Tiny models: one thread is as fast as two and never oversubscribes a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that put a run in tmp_path with a small tiny world and few steps."""
    return [f"runs_dir={tmp_path / 'runs'}", "run_name=t", "data.tiny_world_samples=200",
            "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3"]
