"""The training recipe follows the model preset (configs/recipe/<model>/<stage>.yaml): the paper preset trains
with the paper's numbers, read here from ../shared/kosmos-g-reference.md; a global batch becomes a per-device
micro-batch and gradient accumulation for the world size at launch, or a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kosmos_g.config import ConfigError, load_config

REFERENCE = Path(__file__).parents[1].parent / "shared" / "kosmos-g-reference.md"
STAGES = ("mllm", "align", "instruct")


def number(text: str) -> float:
    """'1.2M' -> 1.2e6, '300k' -> 3e5, '2e-4' -> 2e-4, '3584' -> 3584."""
    text = text.strip().split()[0]
    scale = {"k": 1e3, "M": 1e6}.get(text[-1], 1)
    return float(text.rstrip("kM")) * scale


def reference_recipe() -> dict:
    """Per stage (batch, steps, lr) from the table row 'batch / steps / lr', and the shared optimiser line."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    text = REFERENCE.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| batch / steps / lr"))
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    table = {stage: [number(p) for p in cell.split("/")] for stage, cell in zip(STAGES, cells)}
    shared = re.search(r"Adam β \(([\d.]+), ([\d.]+)\), eps ([\de.-]+), weight decay ([\d.]+), grad clip ([\d.]+), "
                       r"polynomial decay,\s+(\d+) warm-up steps", text)
    betas, eps, wd, clip, warmup = [float(shared[1]), float(shared[2])], *map(float, shared.groups()[2:5]), int(shared[6])
    return {"table": table, "betas": betas, "eps": eps, "weight_decay": wd, "grad_clip": clip, "warmup": warmup}


@pytest.mark.parametrize("stage", STAGES)
def test_paper_preset_trains_with_the_papers_recipe(stage):
    ref = reference_recipe()
    batch, steps, lr = ref["table"][stage]
    cfg = load_config([f"stage={stage}", "model=paper", "data=shards", "trainer=a100_fsdp", "trainer.num_nodes=8"])
    o = cfg.stage.optim
    assert o.lr == pytest.approx(lr) and cfg.trainer.max_steps == steps
    assert o.warmup_steps == ref["warmup"] and o.decay_power == 1.0 and o.end_lr == 0.0  # linear = polynomial, power 1
    assert list(o.betas) == ref["betas"] and o.eps == ref["eps"]
    assert o.weight_decay == ref["weight_decay"] and o.grad_clip == ref["grad_clip"]
    if stage == "mllm":  # tokens, in whole 2,048-token rows; "1.2M" to 2%
        assert cfg.stage.global_batch_size % 2048 == 0 and cfg.stage.pack_length == 2048  # packed 2,048-token rows
        assert cfg.stage.global_batch_size == pytest.approx(batch, rel=0.02)
    else:
        assert cfg.stage.global_batch_size == batch
    if stage == "instruct":
        assert cfg.stage.cfg_dropout == 0.1
    # 64 GPUs: micro-batch x accumulation x devices is exactly the global batch
    rows = cfg.stage.global_batch_size // (2048 if stage == "mllm" else 1)
    assert cfg.stage.batch_size * cfg.stage.accumulate_grad_batches * 64 == rows


def test_the_tiny_preset_keeps_its_own_recipe_and_no_accumulation():
    cfg = load_config(["stage=mllm"])
    assert (cfg.stage.optim.lr, cfg.stage.optim.warmup_steps, cfg.stage.batch_size) == (2e-3, 30, 8)
    assert cfg.stage.global_batch_size is None and cfg.stage.accumulate_grad_batches == 1
    cfg = load_config(["stage=instruct", "model=tiny", "recipe=paper/instruct", "trainer.devices=4"])
    assert (cfg.stage.batch_size, cfg.stage.accumulate_grad_batches) == (16, 16)  # 1024 / 4 devices = 256 = 16 x 16


@pytest.mark.parametrize("devices,micro,accumulate", [(1, 6, 2), (2, 6, 1), (4, 3, 1)])
def test_global_batch_splits_into_the_fewest_micro_batches_that_fit(devices, micro, accumulate):
    cfg = load_config(["stage=align", "stage.global_batch_size=12", "stage.batch_size=8", f"trainer.devices={devices}"])
    assert (cfg.stage.batch_size, cfg.stage.accumulate_grad_batches) == (micro, accumulate)


def test_an_impossible_global_batch_names_the_numbers_and_a_fix():
    with pytest.raises(ConfigError, match=r"12 samples\) does not split evenly over 5 devices.*10 or 15"):
        load_config(["stage=align", "stage.global_batch_size=12", "trainer.devices=5"])
    with pytest.raises(ConfigError, match="not a whole number of 128-token rows"):
        load_config(["stage=mllm", "stage.global_batch_size=1000"])


def test_cfg_job_prints_the_recipe_and_the_derived_batch(capsys):
    from kosmos_g.train import main

    main(["--cfg", "job", "stage=instruct", "model=paper", "trainer=a100_fsdp", "trainer.num_nodes=8"])
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "warmup_steps: 375" in out and "max_steps: 200000" in out
    assert "global_batch_size: 1024" in out
    assert "# batch: global 1024 per step = 64 device(s) x micro-batch 16 x accumulation 1" in out


@pytest.mark.slow
def test_accumulation_trains_the_global_batch_and_resumes_exactly(tiny_overrides, tmp_path):
    """Global batch 4 as 2 micro-batches of 2: the run goes through, logs one loss per optimizer step, and a
    resumed run (stopped at step 2 of 4) ends with the same weights as an uninterrupted one."""
    from kosmos_g.testing import read_steps
    from kosmos_g.train import run

    base = [*tiny_overrides, "stage=align", "init_from=none", "stage.global_batch_size=4", "stage.batch_size=2",
            "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.deterministic=true"]
    run(load_config([*base, "run_name=whole"]))
    run(load_config([*base, "run_name=cut", "trainer.max_steps=2"]))
    run(load_config([*base, "run_name=cut"]))
    whole = read_steps(tmp_path / "runs" / "whole" / "align" / "steps.jsonl")
    cut = read_steps(tmp_path / "runs" / "cut" / "align" / "steps.jsonl")
    assert sorted(whole) == [1, 2, 3, 4]
    assert [whole[i]["loss"] for i in (3, 4)] == pytest.approx([cut[i]["loss"] for i in (3, 4)], rel=1e-6)
