"""From `trainer.*` config to a Lightning strategy: single device, DDP, or FSDP (docs/scaling.md).

    strategy = build_strategy(cfg.trainer)      # "auto", a DDPStrategy or a KosmosFSDPStrategy
    prepare_module(module, cfg.trainer)         # before Trainer.fit: hand activation checkpointing to FSDP

FSDP (the paper preset, `trainer=a100_fsdp` / `v100_fsdp`):
  * one FSDP unit per layer class in `trainer.fsdp_wrap_layers` (Kosmos-2 text blocks and ViT layers,
    the aligner's encoder/decoder layers); everything else (embeddings, LM head, connector, ViT stem,
    aligner projections and query tables) is in the root unit;
  * `use_orig_params=True`: a unit may mix frozen and trainable parameters (the ViT keeps only its last
    block trainable) and the optimiser sees the original parameters, so it still only gets trainable ones;
  * mixed precision: parameters all-gathered in bf16 (A100) or fp16 (V100) for compute, gradients
    reduce-scattered in fp32, fp32 master weights (the sharded flat parameters) and Adam state; fp16
    adds FSDP's ShardedGradScaler (Lightning's FSDPPrecision creates it for `16-mixed`);
  * activation checkpointing by the strategy (non-reentrant `checkpoint_wrapper` on `trainer.checkpoint_layers`),
    in place of the model's own (transformers) checkpointing, which `prepare_module` turns off so
    nothing is recomputed twice;
  * `trainer.fsdp_ignored_modules` (U-Net/VAE, CLIP text encoder) stay outside FSDP, replicated and frozen
    on every GPU: they get no gradients or optimiser state either way, and replicating SD v1.5's 1.1B frozen
    fp16 weights costs 2 GB per GPU, while sharding them would all-gather them at every step.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator, TypeVar

import lightning as L
import torch
from torch import nn

from kosmos_g.config import ConfigError, TrainerConfig

T = TypeVar("T")

# Layer class names accepted in trainer.fsdp_wrap_layers / trainer.checkpoint_layers -> "module:Class".
# A dotted "package.module:Class" (or "package.module.Class") is accepted too.
LAYER_CLASSES = {
    "Kosmos2TextBlock": "transformers.models.kosmos2.modeling_kosmos2:Kosmos2TextBlock",
    "Kosmos2VisionEncoderLayer": "transformers.models.kosmos2.modeling_kosmos2:Kosmos2VisionEncoderLayer",
    "TransformerEncoderLayer": "torch.nn:TransformerEncoderLayer",
    "TransformerDecoderLayer": "torch.nn:TransformerDecoderLayer",
    "AlignerEncoderLayer": "kosmos_g.models.aligner:AlignerEncoderLayer",
    "AlignerDecoderLayer": "kosmos_g.models.aligner:AlignerDecoderLayer",
    "CLIPEncoderLayer": "transformers.models.clip.modeling_clip:CLIPEncoderLayer",
    "BasicTransformerBlock": "diffusers.models.attention:BasicTransformerBlock",
    "ResnetBlock2D": "diffusers.models.resnet:ResnetBlock2D",
}


def layer_classes(names: list[str], key: str) -> set[type[nn.Module]]:
    """The nn.Module classes named in config `key` (a short name of LAYER_CLASSES or an import path)."""
    classes = set()
    for name in names:
        path = LAYER_CLASSES.get(name, name)
        module_name, _, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr) if module_name else None
        except (ImportError, AttributeError):
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"{key} has {name!r}, which is not a known layer class. Use one of "
                              f"{', '.join(LAYER_CLASSES)} or an import path such as 'package.module:Class'.")
        classes.add(cls)
    return classes


def mixed_precision(precision: str):
    """FSDP's MixedPrecision for a Lightning precision string (None: FSDP keeps fp32 everywhere).

    Compute copies in the half type; gradient reduce-scatter and buffers (e.g. rotary frequencies) in fp32,
    which costs one extra byte per gradient element of communication but keeps the sums exact enough.
    """
    from torch.distributed.fsdp import MixedPrecision

    half = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
            "16-mixed": torch.float16, "16-true": torch.float16}.get(str(precision))
    if half is None:
        return None
    return MixedPrecision(param_dtype=half, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def _fsdp_strategy_class():
    from lightning.pytorch.strategies import FSDPStrategy

    class KosmosFSDPStrategy(FSDPStrategy):
        """Lightning's FSDPStrategy plus `ignored_modules` given by attribute name on the LightningModule.

        Ignored modules are moved to this rank's device (FSDP does not move what it ignores) and left
        replicated; the names are resolved when the model is wrapped, after the stage built it.
        """

        def __init__(self, ignored_module_names: list[str] = (), **kwargs):
            super().__init__(**kwargs)
            self.ignored_module_names = list(ignored_module_names)
            # the layer classes recomputed in backward (Lightning keeps its converted policy private)
            self.activation_checkpointing_layers = set(kwargs.get("activation_checkpointing_policy") or ())

        def _setup_model(self, model: nn.Module) -> nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel

            ignored = ignored_modules(model, self.ignored_module_names)
            if ignored:
                for m in ignored:
                    m.to(self.root_device)
                self.kwargs["ignored_modules"] = ignored
            if self.root_device.type == "cpu":
                # FSDP runs on CPU processes (gloo) when told the device; Lightning passes only a device
                # index. Used by the tests: the same wrapping, sharding and checkpoints as on GPUs.
                model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                                 mixed_precision=self.mixed_precision_config,
                                                 sharding_strategy=self.sharding_strategy,
                                                 device_id=torch.device("cpu"), **self.kwargs)
                self.kwargs.pop("auto_wrap_policy", None)  # applied; Lightning would warn it is ignored
            return super()._setup_model(model)

    return KosmosFSDPStrategy


def ignored_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The submodules of `model` at the attribute paths `names` that exist (a stage may lack some)."""
    out = []
    for name in names:
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            out.append(module)
    return out


def build_strategy(t: TrainerConfig):
    """The Lightning strategy for `trainer.strategy` (validates class names: fails before anything runs)."""
    multi = t.num_nodes > 1 or (t.devices not in (1, "1") and not (isinstance(t.devices, list) and len(t.devices) == 1))
    if t.strategy == "auto" and not multi:
        return "auto"
    if t.strategy in ("auto", "ddp"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=t.find_unused_parameters,
                           process_group_backend=t.process_group_backend)
    wrap = layer_classes(t.fsdp_wrap_layers, "trainer.fsdp_wrap_layers")
    ckpt = layer_classes(t.checkpoint_layers, "trainer.checkpoint_layers") if t.activation_checkpointing else None
    return _fsdp_strategy_class()(
        ignored_module_names=t.fsdp_ignored_modules,
        auto_wrap_policy=wrap,
        activation_checkpointing_policy=ckpt,
        mixed_precision=mixed_precision(t.precision),
        sharding_strategy=t.fsdp_sharding,
        cpu_offload=t.fsdp_cpu_offload,
        process_group_backend=t.process_group_backend,
        state_dict_type="full",  # one .ckpt file (rank 0 gathers), read back by resume=auto and the exports
        limit_all_gathers=True,  # at most two units' unsharded weights in memory at once
        use_orig_params=True,
    )


def gradient_clipping(strategy, max_norm: float) -> tuple[float | None, list]:
    """(Trainer's gradient_clip_val, extra callbacks): Lightning clips by norm itself, except under FSDP,
    where it refuses to ("not supported for FSDPPrecision") and the FSDP root must compute the global norm."""
    if not max_norm:
        return None, []
    if isinstance(strategy, str) or not hasattr(strategy, "sharding_strategy"):
        return max_norm, []
    return None, [ShardedGradClip(max_norm)]


class ShardedGradClip(L.Callback):
    """Clip the global gradient norm under FSDP (`FullyShardedDataParallel.clip_grad_norm_`: every rank
    holds a shard, the norm is all-reduced). Runs after the numerical guard and the grad-norm logging."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        trainer.strategy.model.clip_grad_norm_(self.max_norm)


def prepare_module(module: nn.Module, t: TrainerConfig) -> None:
    """Under FSDP with activation checkpointing the strategy recomputes the layers: turn the model's own off."""
    if t.strategy != "fsdp" or not t.activation_checkpointing:
        return
    for m in module.modules():
        if hasattr(m, "set_activation_checkpointing") and m is not module:
            m.set_activation_checkpointing(False)


def is_sharded(trainer) -> bool:
    """True when this rank holds only a shard of the weights (FSDP other than NO_SHARD on 2+ processes)."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    return (isinstance(strategy, FSDPStrategy) and trainer.world_size > 1
            and strategy.sharding_strategy.name != "NO_SHARD")


def sharded_call(trainer, fn: Callable[[], T]) -> T:
    """Run `fn` (forwards of the LightningModule's submodules, e.g. a sample grid) on THIS rank so that it
    works under FSDP: through the FSDP root's forward, which gathers the root unit's weights (embeddings,
    norms, projections) that direct submodule calls outside training_step would find sharded; nested units
    gather themselves. It is a collective: every rank must call it, with the same number of forwards inside.
    The module's `forward(fn)` must return `fn()`. Without FSDP it is just `fn()`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = getattr(trainer.strategy, "model", None) if trainer is not None else None
    return model(fn) if isinstance(model, FSDP) else fn()


@contextlib.contextmanager
def full_weights(trainer) -> Iterator[None]:
    """Inside: rank 0's modules hold their full weights (FSDP gathers them, on the CPU), so the stage's
    `export_parts()` writes whole tensors. Every rank must enter (it is a collective); without FSDP a no-op."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True):
        yield
