"""Shared test set-up: no network, few threads, the tiny world's shards, and the overrides for a tiny, fast run
in a tmp folder."""

import os
from pathlib import Path

# Tiny models: one thread is as fast as two and never oversubscribes a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """`tiny_world(samples)`: a folder of the tiny world's shards (seed 0, 32 px), written once per session (read-only:
    copy it to write into it). The core never writes the world; `python -m kosmos_g.tinyworld.data` does."""
    from kosmos_g.tinyworld.data import write_world_shards

    made: dict[int, Path] = {}

    def world(samples: int = 200) -> Path:
        if samples not in made:
            made[samples] = write_world_shards(tmp_path_factory.mktemp(f"world{samples}"), samples=samples, size=32)
        return made[samples]

    return world


@pytest.fixture
def tiny_overrides(tmp_path, tiny_world):
    """Overrides that put a run in tmp_path with a small tiny world and few steps."""
    return [f"runs_dir={tmp_path / 'runs'}", "run_name=t", f"data.root={tiny_world(200)}",
            "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3"]
