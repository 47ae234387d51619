"""Every shipped YAML composes and validates; bad keys, bad types and wrong stage order fail clearly."""

import itertools
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from kosmos_g.config import CONFIG_DIR, ConfigError, OptimConfig, load_config
from kosmos_g.models.aligner import AlignerNet
from kosmos_g.train import main

GROUPS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in ("stage", "model", "data", "trainer")}
REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_yaml_is_in_a_group():
    shipped = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")}
    grouped = {f"{g}/{n}.yaml" for g, names in GROUPS.items() for n in names} | {"train.yaml"}
    recipes = {f"recipe/{m}/{s}.yaml" for m in GROUPS["model"] for s in GROUPS["stage"]}  # one per model x stage
    assert shipped == grouped | recipes
    assert GROUPS["stage"] == ["align", "instruct", "mllm"]
    assert {"tiny", "paper"} <= set(GROUPS["model"])


@pytest.mark.parametrize("group,name", [(g, n) for g, names in GROUPS.items() for n in names])
def test_each_yaml_composes_and_validates(group, name):
    cfg = load_config([f"{group}={name}"])
    assert getattr(cfg, group).name == name


def test_every_stage_model_combination_validates():
    for stage, model in itertools.product(GROUPS["stage"], GROUPS["model"]):
        cfg = load_config([f"stage={stage}", f"model={model}"])
        assert cfg.stage.name == stage and cfg.model.clip_max_tokens == cfg.model.aligner.num_queries == 77
        assert load_config([f"stage={stage}", f"model={model}", f"recipe={model}/{stage}"]) == cfg  # the recipe follows


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load_config(["stage=align", "bogus.key=1"])
    msg = str(e.value)
    assert "Unknown config key 'bogus.key'" in msg and "init_from" in msg and "run_name" in msg


def test_the_condition_length_is_one_key_and_the_clip_length_follows_it():
    cfg = load_config(["model.aligner.num_queries=64"])
    assert cfg.model.clip_max_tokens == cfg.model.aligner.num_queries == 64
    with pytest.raises(ConfigError, match=r"'model.clip_max_tokens' .* no longer a setting: "
                                          r"set model.aligner.num_queries"):
        load_config(["model.clip_max_tokens=64"])


def test_typo_gets_a_guess():
    with pytest.raises(ConfigError, match=r"Did you mean 'stage.optim.lr'\?"):
        load_config(["stage.optim.lrr=1e-3"])


def test_wrong_type_and_bad_value_fail_at_start():
    with pytest.raises(ConfigError, match="stage.optim.lr.*could not be converted|could not be converted.*"):
        load_config(["stage.optim.lr=fast"])
    with pytest.raises(ConfigError, match="stage.cfg_dropout must be in"):
        load_config(["stage=instruct", "stage.cfg_dropout=1.5"])
    with pytest.raises(ConfigError, match="betas"):
        OptimConfig(betas=[0.9])


def test_cli_bogus_key_is_one_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage=align", "bogus.key=1", f"runs_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Unknown config key 'bogus.key'") and len(err.splitlines()) == 1
    assert not (tmp_path / "tiny").exists()  # nothing was created


def test_instruct_without_predecessors_says_what_to_run_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage=instruct", f"runs_dir={tmp_path}", "run_name=exp"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "stage=instruct starts from the 'align' stage's export" in err
    assert "python train.py stage=align run_name=exp" in err and "mllm -> align -> instruct" in err


def test_align_without_mllm_offers_init_from_none(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["stage=align", f"runs_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "python train.py stage=mllm" in err and "init_from=none" in err


def test_help_and_cfg_job_work():
    out = subprocess.run([sys.executable, "train.py", "--cfg", "job", "stage=instruct"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cfg_dropout: 0.1" in out.stdout and "name: instruct" in out.stdout
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "stage: align, instruct, mllm" in out.stdout


def test_paper_aligner_has_the_papers_size_on_meta():
    cfg = load_config(["model=paper"]).model
    with torch.device("meta"):
        aligner = AlignerNet(llm_dim=cfg.llm.hidden_size, clip_dim=768, **asdict(cfg.aligner))
    m = sum(p.numel() for p in aligner.m_parameters())
    assert 215e6 < m < 235e6, m  # the paper: ≈225M
    assert all(p.is_meta for p in aligner.parameters())
