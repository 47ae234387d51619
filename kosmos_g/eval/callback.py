"""Validation while training: DreamBench-protocol scores on a small fixed subset, logged to TensorBoard.

    python train.py stage=instruct eval.every_n_steps=500 eval.dreambench_root=../shared/dreambench \\
        eval.clip_path=weights/clip-vit-base-patch32 eval.dino_path=weights/dino_deitsmall16_pretrain.pth

Every `eval.every_n_steps` optimizer steps, and once more when training ends (`eval.every_n_steps=0`, the
default, disables validation: stage=instruct then attaches no callback), every rank takes
the first `eval.subjects` DreamBench subjects x their first `eval.prompts` prompts, generates one
image per case with the module's current weights (`pl_module.pipeline()`, DPM-Solver++,
`eval.steps` steps, guidance `eval.guidance`, a fixed seed per case) and logs

    val/DINO  val/CLIP-I  val/CLIP-T   the protocol's scores (`kosmos_g.eval.protocols`)
    val/seconds                        how long the validation took (to choose every_n_steps)
    val/dreambench                     an image: one row per subject, its reference photo then the generations

The noise is the same at every validation, so the curves move only because the weights do.
Validation leaves training exactly as it found it: the torch / CUDA / Python / NumPy random states
and every submodule's train/eval mode are restored afterwards, so a run with validation trains
identically to one without. Every rank runs the same generation (under FSDP its sharded forwards are
collectives, through `kosmos_g.scale.sharded_call`); global rank 0 alone logs.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from kosmos_g.config import ConfigError, EvalConfig
from kosmos_g.eval.dreambench import load_dreambench
from kosmos_g.eval.metrics import load_clip, load_dino
from kosmos_g.eval.protocols import Generation, SubjectCase, dreambench_cases, evaluate_dreambench
from kosmos_g.scale import sharded_call

SCORES = ("DINO", "CLIP-I", "CLIP-T")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module.eval()` inside; on exit every submodule gets back its own mode (frozen parts stay in eval)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def stack_grids(paths: list[Path]) -> torch.Tensor:
    """PNG grids one under the other (narrower ones padded white) as a uint8 [3, H, W] tensor."""
    rows = [Image.open(p).convert("RGB") for p in paths]
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    return TF.pil_to_tensor(grid)


class ValidationCallback(L.Callback):
    """DreamBench-subset scores every `eval_cfg.every_n_steps` steps and at the end of training.

    `pl_module` must have `pipeline()` returning a `KosmosGPipeline` that shares its weights
    (stage=instruct's `ScoreDistillTuner`, which attaches it only when eval.every_n_steps > 0: 0 disables
    validation). An instance built directly with `every_n_steps=0` has no periodic validation and still
    validates once, when training ends.
    CLIP and DINO are loaded once, at the first validation; the paths are checked when fit starts,
    so a wrong path fails at step 0 rather than hours in. `history` keeps (step, scores) of every run.
    """

    def __init__(self, eval_cfg: EvalConfig, seed: int = 0, scheduler: Optional[str] = "dpm++"):
        self.cfg = eval_cfg
        self.generation = Generation(steps=eval_cfg.steps, guidance=eval_cfg.guidance, images_per_prompt=1,
                                     seed=seed, scheduler=scheduler)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._cases: Optional[list[SubjectCase]] = None
        self._backbones = None
        self._last_step: Optional[int] = None

    # -- inputs ----------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        value = getattr(self.cfg, key)
        if not value:
            raise ConfigError(f"validation needs eval.{key}: set it to a local path (eval.dreambench_root, "
                              "eval.clip_path, eval.dino_path; nothing is downloaded), or eval.every_n_steps=0")
        return Path(value).expanduser()

    def cases(self) -> list[SubjectCase]:
        """The first `eval.subjects` subjects (DreamBench order) x their first `eval.prompts` prompts."""
        if self._cases is None:
            if self.cfg.subjects < 1 or self.cfg.prompts < 1:
                raise ConfigError(f"eval.subjects ({self.cfg.subjects}) and eval.prompts ({self.cfg.prompts}) "
                                  "must be >= 1 for validation")
            bench = load_dreambench(self._path("dreambench_root"))  # errors name eval.dreambench_root
            names = [s.name for s in bench.subjects[:self.cfg.subjects]]
            self._cases = dreambench_cases(bench, names, self.cfg.prompts)
        return self._cases

    def check_backbone_paths(self) -> None:
        """Fail now, naming the key, if the CLIP folder or the DINO file is missing (loading waits)."""
        clip, dino = self._path("clip_path"), self._path("dino_path")
        if not (clip / "config.json").is_file():
            load_clip(clip)  # raises FileNotFoundError naming eval.clip_path
        if not dino.is_file():
            load_dino(dino)  # raises FileNotFoundError naming eval.dino_path

    def backbones(self):
        """(CLIP (model, processor), DINO ViT), loaded once from `eval.clip_path` / `eval.dino_path`."""
        if self._backbones is None:
            self._backbones = load_clip(self._path("clip_path")), load_dino(self._path("dino_path"))
        return self._backbones

    # -- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "pipeline", None)):
            raise TypeError(f"ValidationCallback needs a LightningModule with pipeline() returning a "
                            f"KosmosGPipeline (stage=instruct); {type(pl_module).__name__} has none. "
                            "Set eval.every_n_steps=0 for this stage.")
        self.cases()
        self.check_backbone_paths()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every, step = self.cfg.every_n_steps, trainer.global_step
        if every and step > 0 and step % every == 0:
            self._maybe_validate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._maybe_validate(trainer, pl_module)

    def _maybe_validate(self, trainer, pl_module) -> None:
        # Once per step: with gradient accumulation several batches end on the same global step. Every rank
        # validates (under FSDP the generation's sharded forwards are collectives); rank 0 logs.
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.validate(trainer, pl_module)

    # -- the validation itself -------------------------------------------------------------------------

    def validate(self, trainer, pl_module) -> dict[str, float]:
        """Generate, score and log at `trainer.global_step`; returns {"DINO", "CLIP-I", "CLIP-T", "images"}."""
        step, start = trainer.global_step, time.perf_counter()
        cases = self.cases()
        # The CUDA states only once CUDA is initialised (reading them would initialise it).
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with isolate_rng(include_cuda=cuda), eval_mode(pl_module), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            clip, dino = self.backbones()  # building them draws random initial weights: inside isolate_rng
            scores = sharded_call(trainer, lambda: evaluate_dreambench(
                pl_module.pipeline(), cases, clip, dino, generation=self.generation, grid_dir=tmp,
                device=pl_module.device, progress=False))
            grid = stack_grids(sorted(Path(tmp).glob("*.png")))  # one PNG per subject, by name
        seconds = time.perf_counter() - start
        metrics = {f"val/{k}": float(scores[k]) for k in SCORES} | {"val/seconds": seconds}
        self.history.append((step, dict(scores)))
        if not trainer.is_global_zero:
            return scores
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if hasattr(logger.experiment, "add_image"):  # TensorBoard; other loggers get the scalars only
                logger.experiment.add_image("val/dreambench", grid, step)
        rank_zero_info(f"[validation] step {step}: " + ", ".join(f"{k} {scores[k]:.3f}" for k in SCORES)
                       + f" on {scores['images']} images ({seconds:.1f} s)")
        return scores
