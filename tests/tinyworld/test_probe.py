"""The image-path shape probe: its classifier, its table and its errors (the full run: tests/tinyworld/test_demo.py)."""

import pytest
import torch

from kosmos_g.tinyworld.probe import POINTS, linear_probe, main, markdown, probe


def test_linear_probe_separates_linearly_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(3, 16, generator=g)
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=g)
    assert (linear_probe(x[:200], y[:200], x[200:]) == y[200:]).float().mean() == 1.0
    # Labels unrelated to the features: the probe cannot beat chance by much on held-out points.
    noise = torch.randn(300, 16, generator=g)
    assert (linear_probe(noise[:200], y[:200], noise[200:]) == y[200:]).float().mean() < 0.6


def test_markdown_has_one_row_per_point_and_two_columns_per_export():
    table = {"after stage 2": {p: (100.0, 40.0) for p in POINTS}, "after stage 3": {p: (90.0, 20.0) for p in POINTS}}
    lines = markdown(table).splitlines()
    assert len(lines) == 2 + len(POINTS)
    assert lines[0].count("novel pairs") == 2 and lines[2] == "| ViT CLS | 100.0 | 40.0 | 90.0 | 20.0 |"
    # The tower the ViT starts from: one sentence under the table, not a column.
    with_init = markdown({"init": {"ViT CLS": (99.0, 84.0)}, **table})
    assert with_init.startswith(markdown(table)) and with_init.endswith("seen pairs 99.0, novel pairs 84.0.")


def test_a_run_without_exports_names_the_command_that_makes_them(tmp_path):
    with pytest.raises(SystemExit, match="tinyworld.demo"):
        main([str(tmp_path)])


def test_too_few_held_out_prompts_to_have_seen_and_novel_pairs_is_an_error_that_says_use_more():
    # One held-out prompt is either a seen or a novel pair: no seen-vs-novel comparison, so no silent NaN column.
    with pytest.raises(ValueError, match="need both seen and novel.*use more"):
        probe({}, n_train=2, n_test=1)
