"""ValidationCallback: DreamBench-subset scores and a grid in TensorBoard during training, without
changing what training does; and DINO stand-ins that record their own architecture.

A small LightningModule carries a random tiny KosmosGPipeline (`pipeline()`, as ScoreDistillTuner)
and trains a separate little head on global-RNG noise, so any random draw left behind by the
validation would change its weights. Its `pipeline()` itself draws from every global RNG, standing
in for a sampler that forgets its generator: the callback must undo that.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from kosmos_g.config import EvalConfig
from kosmos_g.eval.callback import ValidationCallback
from kosmos_g.eval.dreambench import PROMPTS_FILE
from kosmos_g.eval.metrics import (TINY_DINO_KWARGS, dino_kwargs_file, load_dino, save_tiny_clip,
                                   save_tiny_dino)
from kosmos_g.pipeline import KosmosGPipeline
from kosmos_g.testing import build_tiny_pipeline
from kosmos_g.testing import read_scalars

SHARED = Path(__file__).parents[2].parent / "shared" / "dreambench"
needs_shared = pytest.mark.skipif(not (SHARED / PROMPTS_FILE).is_file(), reason=f"{SHARED} not present")
SCALARS = ("val/DINO", "val/CLIP-I", "val/CLIP-T")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    clip = save_tiny_clip(root / "clip", texts=["a backpack in the jungle", "a backpack in the snow"])
    return SimpleNamespace(clip=clip, dino=save_tiny_dino(root / "dino.safetensors"))


def eval_cfg(backbones, every: int = 2, **kw) -> EvalConfig:
    return EvalConfig(every_n_steps=every, dreambench_root=str(SHARED), clip_path=str(backbones.clip),
                      dino_path=str(backbones.dino), subjects=2, prompts=2, steps=2, **kw)


class TinyTuner(L.LightningModule):
    """Pipeline parts as submodules (with a frozen, eval-mode VAE, as FrozenDiffusion) and a trained head."""

    def __init__(self, cfg: EvalConfig):
        super().__init__()
        self.cfg = SimpleNamespace(eval=cfg)
        pipe = build_tiny_pipeline()
        self.mllm, self.aligner, self.unet, self.vae = pipe.mllm, pipe.aligner, pipe.unet, pipe.vae
        self.processor, self.scheduler = pipe.processor, pipe.scheduler
        self.vae.eval()
        self.head = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        self.modes_seen: list[dict] = []  # every submodule's train flag at each training step
        self.training_during_validation: list[bool] = []

    def pipeline(self) -> KosmosGPipeline:
        self.training_during_validation.append(self.training)
        torch.rand(3), random.random(), np.random.rand()  # a careless sampler: global RNG draws
        return KosmosGPipeline(mllm=self.mllm, processor=self.processor, aligner=self.aligner, unet=self.unet,
                               vae=self.vae, scheduler=self.scheduler)

    def training_step(self, batch, batch_idx):
        self.modes_seen.append({name: m.training for name, m in self.named_modules()})
        x = torch.randn(4, 8)  # global RNG: shifts if validation leaves its state changed
        return self.head(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)

    def configure_callbacks(self):
        cfg = self.cfg  # the exact wiring of ScoreDistillTuner.configure_callbacks
        return [ValidationCallback(cfg.eval)] if cfg.eval.every_n_steps else []

    def train_dataloader(self):
        return DataLoader(list(range(16)), batch_size=1)


def fit(cfg: EvalConfig, logdir: Path) -> TinyTuner:
    L.seed_everything(0, verbose=False)
    module = TinyTuner(cfg)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        logger=TensorBoardLogger(str(logdir), name="", version=""))
    trainer.fit(module)
    module.rng_after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    module.callbacks = [c for c in trainer.callbacks if isinstance(c, ValidationCallback)]
    return module


@needs_shared
def test_validation_logs_scores_and_grid_and_leaves_training_unchanged(tmp_path, backbones):
    with_val = fit(eval_cfg(backbones, every=2), tmp_path / "with")
    without = fit(eval_cfg(backbones, every=0), tmp_path / "without")
    assert len(with_val.callbacks) == 1 and not without.callbacks  # configure_callbacks' switch

    # Every 2 steps and at the end of training: steps 2 and 3, on 2 subjects x 2 prompts x 1 image.
    scalars = read_scalars(tmp_path / "with")
    for tag in SCALARS:
        assert [s for s, _ in scalars[tag]] == [2, 3], tag
        assert all(-1 <= v <= 1 for _, v in scalars[tag]), tag
    assert [s for s, _ in scalars["val/seconds"]] == [2, 3]
    (_, first), (_, last) = with_val.callbacks[0].history
    assert first["images"] == 4
    # The pipeline's weights are not trained here and the noise is fixed per case: identical scores.
    assert first == last
    assert not any(t.startswith("val/") for t in read_scalars(tmp_path / "without"))

    acc = EventAccumulator(str(tmp_path / "with"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("val/dreambench")
    # One row per subject: its reference photo then one generation per prompt (128 px cells).
    assert [i.step for i in images] == [2, 3] and (images[0].width, images[0].height) == (3 * 128, 2 * 128)

    # Validation ran in eval mode and left every submodule's mode (the VAE: eval) as it was.
    assert with_val.training_during_validation == [False, False]
    assert with_val.modes_seen[2] == with_val.modes_seen[0] and not with_val.modes_seen[2]["vae"]
    assert with_val.modes_seen[0]["head"]
    # Training is identical to the run without validation: same weights, same RNG states after.
    for a, b in zip(with_val.head.parameters(), without.head.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(with_val.rng_after[0], without.rng_after[0])
    assert with_val.rng_after[1] == without.rng_after[1]
    assert np.array_equal(with_val.rng_after[2], without.rng_after[2])


@needs_shared
def test_missing_paths_fail_when_fit_starts_naming_the_key(tmp_path, backbones):
    trainer, module = SimpleNamespace(is_global_zero=True), SimpleNamespace(pipeline=lambda: None)
    for key in ("clip_path", "dino_path", "dreambench_root"):
        cfg = eval_cfg(backbones)
        setattr(cfg, key, str(tmp_path / "nope"))
        with pytest.raises(FileNotFoundError, match=f"eval.{key}"):
            ValidationCallback(cfg).setup(trainer, module, "fit")
    with pytest.raises(TypeError, match="pipeline"):
        ValidationCallback(eval_cfg(backbones)).setup(trainer, SimpleNamespace(), "fit")
    ValidationCallback(eval_cfg(backbones)).setup(trainer, module, "fit")  # all present: no error


def test_tiny_dino_records_its_architecture(tmp_path):
    path = save_tiny_dino(tmp_path / "dino.safetensors", seed=3)
    assert dino_kwargs_file(path).is_file()
    # No kwargs needed any more; explicit ones (the old way) still work and give the same weights.
    auto, explicit = load_dino(path), load_dino(path, **TINY_DINO_KWARGS)
    assert auto.patch_embed.img_size[0] == TINY_DINO_KWARGS["img_size"]
    for a, b in zip(auto.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)
    # A weight file without the JSON (older stand-ins, real DINO weights) needs the kwargs, as before.
    dino_kwargs_file(path).unlink()
    with pytest.raises(RuntimeError):
        load_dino(path)  # the default ViT-S/16 does not match the tiny weights
    assert load_dino(path, **TINY_DINO_KWARGS).patch_embed.img_size[0] == TINY_DINO_KWARGS["img_size"]
