"""Trainer presets -> Lightning strategies, checked against the paper-preset model on the meta device
(wrap policy, mixed precision, activation checkpointing, what stays out of FSDP), activation
checkpointing by the strategy's policy (real, on the tiny model on CPU), optimizer state for
trainable parameters only, and the memory plan. FSDP training itself runs in test_distributed.py.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointWrapper,
                                                                        apply_activation_checkpointing,
                                                                        checkpoint_wrapper)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextBlock, Kosmos2VisionEncoderLayer

from benchmarks import memory_plan
from kosmos_g.config import ConfigError, load_config
from kosmos_g.models.aligner import AlignerDecoderLayer, AlignerEncoderLayer
from kosmos_g.scale import build_strategy, ignored_modules, layer_classes, prepare_module
from kosmos_g.stages.common import configure_adamw, trainable_names, trainable_state_dict

PAPER_UNITS = {Kosmos2TextBlock, Kosmos2VisionEncoderLayer, AlignerEncoderLayer, AlignerDecoderLayer}


def trainer_cfg(preset: str, *overrides: str):
    return load_config([f"trainer={preset}", *overrides]).trainer


@pytest.fixture(scope="module")
def paper():
    return memory_plan.build_paper()


# ---------------------------------------------------------------------------------------------
# presets -> strategy objects


def wrapped_by(strategy) -> nn.Module:
    """The model as `strategy` wraps it for training: one step of a tiny module in this process (world size 1,
    gloo), the process group, environment and thread count restored afterwards."""
    seen = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 1), nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen.append(self.trainer.strategy.model)
            return self.used(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    env, threads = dict(os.environ), torch.get_num_threads()
    try:
        L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(
            Tiny(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 2)), batch_size=2))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    return seen[0]


def test_cpu_and_ddp_presets():
    assert build_strategy(trainer_cfg("cpu")) == "auto"
    for t in (trainer_cfg("ddp"), trainer_cfg("cpu", "trainer.devices=2")):  # several devices: DDP, not ddp_spawn
        strategy = build_strategy(t)
        assert isinstance(strategy, DDPStrategy) and not isinstance(strategy, FSDPStrategy)
        assert strategy.process_group_backend == t.process_group_backend
    # what training gets: torch's DDP wrapper, tolerating parameters without a gradient in a step
    ddp = wrapped_by(build_strategy(trainer_cfg("cpu", "trainer.devices=2", "trainer.process_group_backend=gloo")))
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.find_unused_parameters is True


def wraps(policy, module: nn.Module) -> bool:
    """Whether an FSDP auto-wrap policy makes `module` a unit of its own (the policy's callable form)."""
    return policy(module, recurse=False, nonwrapped_numel=0)


@pytest.mark.parametrize("preset,half,scaler", [("a100_fsdp", torch.bfloat16, None),
                                                ("v100_fsdp", torch.float16, ShardedGradScaler)])
def test_fsdp_presets_build_the_paper_strategy(preset, half, scaler, tiny, tmp_path):
    t = trainer_cfg(preset)
    strategy = build_strategy(t)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    mp = strategy.mixed_precision_config  # what FSDP gets: half-precision compute, fp32 reductions
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (half, torch.float32, torch.float32)
    assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs["limit_all_gathers"] is True
    policy = strategy.kwargs["auto_wrap_policy"]  # one unit per layer of these classes (tiny: one of each kind)
    assert isinstance(policy, ModuleWrapPolicy) and {type(m) for m in tiny.modules() if wraps(policy, m)} == PAPER_UNITS
    assert strategy.activation_checkpointing_layers == PAPER_UNITS
    assert strategy.ignored_module_names == ["diffusion", "text_encoder"]
    # full state dict: a checkpoint is one file (rank 0 gathers), not a folder of shards
    strategy.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    # the precision plugin Lightning pairs with it: fp16 gets FSDP's sharded gradient scaler, bf16 none
    plugin = FSDPPrecision(t.precision)
    assert (plugin.scaler is None) if scaler is None else isinstance(plugin.scaler, scaler)
    # no activation checkpointing: no policy
    off = build_strategy(trainer_cfg(preset, "trainer.activation_checkpointing=false"))
    assert isinstance(off, FSDPStrategy) and off.activation_checkpointing_layers == set()


def test_unknown_layer_class_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer.fsdp_wrap_layers has 'Kosmos2Block'.*Kosmos2TextBlock"):
        build_strategy(trainer_cfg("a100_fsdp", "trainer.fsdp_wrap_layers=[Kosmos2Block]"))
    assert layer_classes(["torch.nn:Linear"], "k") == {nn.Linear}


@pytest.mark.parametrize("stage,units,ignored", [
    ("mllm", {Kosmos2TextBlock: 24, Kosmos2VisionEncoderLayer: 24}, []),
    ("align", {Kosmos2TextBlock: 24, Kosmos2VisionEncoderLayer: 24, AlignerEncoderLayer: 24, AlignerDecoderLayer: 24},
     ["text_encoder"]),
    ("instruct", {Kosmos2TextBlock: 24, Kosmos2VisionEncoderLayer: 24, AlignerEncoderLayer: 24, AlignerDecoderLayer: 24},
     ["diffusion"]),
])
def test_wrap_policy_on_the_paper_model(paper, stage, units, ignored):
    """The FSDP units of each stage's modules: one per decoder layer, ViT block and aligner layer; the
    frozen U-Net/VAE and CLIP text encoder are left out (replicated), nothing inside them is wrapped."""
    strategy = build_strategy(trainer_cfg("a100_fsdp"))
    module = memory_plan.stage_module(paper, stage)
    left_out = ignored_modules(module, strategy.ignored_module_names)
    assert left_out == [getattr(module, name) for name in ignored]
    policy = strategy.kwargs["auto_wrap_policy"]
    inside_ignored = {id(m) for root in left_out for m in root.modules()}
    counts = {}
    for m in module.modules():
        if m is not module and id(m) not in inside_ignored and wraps(policy, m):
            counts[type(m)] = counts.get(type(m), 0) + 1
    assert counts == units
    # nothing inside the frozen modules would be a unit, even if they were not left out
    assert not any(wraps(policy, m) for root in left_out for m in root.modules())
    # the ViT keeps its last block trainable: that unit mixes nothing, the frozen ones are all frozen
    blocks = module.mllm.vision_model.model.encoder.layers
    assert {p.requires_grad for p in blocks[-1].parameters()} == {stage != "align"}
    assert {p.requires_grad for p in blocks[0].parameters()} == {False}


def test_frozen_parameters_get_no_optimizer_state(paper):
    cfg = load_config(["stage=instruct"])
    for stage in ("mllm", "align", "instruct"):
        module = memory_plan.stage_module(paper, stage)
        opt = configure_adamw(module, cfg.stage.optim, 100)["optimizer"]
        optimised = {id(p) for g in opt.param_groups for p in g["params"]}
        assert optimised == {id(p) for p in module.parameters() if p.requires_grad}, stage
        frozen = [module.diffusion] if stage == "instruct" else [module.text_encoder] if stage == "align" else []
        assert not any(id(p) in optimised for m in frozen for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# activation checkpointing by the strategy's policy, for real on the tiny model


@pytest.fixture(scope="module")
def tiny():
    from kosmos_g.models.aligner import AlignerNet
    from kosmos_g.models.mllm import build_mllm
    from kosmos_g.models.tokenizers import train_mllm_tokenizer

    cfg = load_config(["model=tiny"])
    torch.manual_seed(0)
    tok = train_mllm_tokenizer([f"a red circle number {i}" for i in range(50)], vocab_size=300)
    root = nn.Module()
    root.mllm = build_mllm(cfg.model, tok)
    root.mllm.lock_vision(1, True)
    root.aligner = AlignerNet(llm_dim=64, clip_dim=32, **asdict(cfg.model.aligner))
    return root.train()


def _grads(root: nn.Module):
    torch.manual_seed(1)
    ids = torch.randint(10, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    px = torch.randn(2, 3, 32, 32)
    slots = torch.cat([torch.ones(2, 8, dtype=torch.bool), torch.zeros(2, 12, dtype=torch.bool)], 1)  # 1 image each
    states = root.mllm.encode(torch.cat([torch.full((2, 8), 5), ids], 1),
                              torch.cat([torch.ones(2, 8, dtype=torch.long), mask], 1), px, slots)
    cond = root.aligner.encode(states, padding_mask=torch.cat([torch.zeros(2, 8, dtype=torch.bool), mask == 0], 1))
    loss = cond.square().mean() + root.aligner.reconstruct(cond, states.shape[1]).square().mean()
    loss.backward()
    trainable = zip(trainable_names(root), (p for p in root.parameters() if p.requires_grad))
    out = {name: p.grad.clone() for name, p in trainable if p.grad is not None}
    root.zero_grad(set_to_none=True)
    return out


def test_strategy_activation_checkpointing_recomputes_the_same_gradients(tiny):
    t = trainer_cfg("a100_fsdp")
    plain = _grads(tiny)
    wrapped = copy.deepcopy(tiny)
    layers = build_strategy(t).activation_checkpointing_layers  # applied as Lightning applies its policy
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   auto_wrap_policy=ModuleWrapPolicy(layers))
    n = sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules())
    assert n == 2 + 2 + 4 + 4  # 2 decoder blocks, 2 ViT layers, 2+2 encoder and 2+2 decoder layers of M and N
    ckpt = _grads(wrapped)
    # every trainable parameter (the LM head is tied to the embeddings), names as in the state dict, wrapper prefixes removed
    assert len(plain) == len(trainable_names(tiny)) and sorted(ckpt) == sorted(plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6)
    kept = trainable_state_dict(wrapped, {k.replace("_checkpoint_wrapped_module.", ""): v
                                          for k, v in wrapped.state_dict().items()})
    assert sorted(kept) == sorted(trainable_names(tiny))


def test_prepare_module_hands_checkpointing_to_fsdp(tiny):
    module = copy.deepcopy(tiny)
    module.mllm.set_activation_checkpointing(True)
    module.aligner.set_activation_checkpointing(True)
    prepare_module(module, trainer_cfg("ddp", "trainer.activation_checkpointing=true"))
    assert module.mllm.text_model.model.gradient_checkpointing  # ddp: the model's own checkpointing stays
    assert module.aligner.is_gradient_checkpointing
    prepare_module(module, trainer_cfg("a100_fsdp"))
    assert not module.mllm.text_model.model.gradient_checkpointing
    assert not module.mllm.vision_model.model.encoder.gradient_checkpointing
    assert not module.aligner.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------------
# the memory plan


@pytest.mark.slow
def test_memory_plan_of_the_paper_preset(paper):
    result = memory_plan.plan(64, "a100_fsdp", shapes={"mllm": dict(batch=1, seq=256, images=1),
                                                       "align": dict(batch=2, seq=32, images=0),
                                                       "instruct": dict(batch=1, seq=96, images=1, px=256)},
                              parts=paper)
    stages = result["stages"]
    assert 1.3e9 < stages["mllm"]["counts"]["trainable"] < 1.5e9  # decoder + connector + last ViT block
    assert stages["align"]["counts"]["trainable"] == sum(p.numel() for p in paper.aligner.parameters())
    for stage, r in stages.items():
        b, n = r["bytes"], r["counts"]
        assert b["adamw"] == 2 * b["params"] == 2 * b["grads"] == 8 * n["trainable"] / 64
        assert 0 < b["activations"] and r["activations_detail"]["checkpointing"] < r["activations_detail"]["no_checkpointing"]
        assert b["total"] < 80 * 2**30
    assert stages["instruct"]["counts"]["frozen_replicated"] == sum(
        p.numel() for m in (paper.unet, paper.vae) for p in m.parameters())
    text = memory_plan.table(result, 80)
    assert text.count("\n") == 4 and "| instruct |" in text
