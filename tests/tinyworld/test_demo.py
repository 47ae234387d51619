"""The tiny-world demo end to end in its mini version, and the notebook executed on its outputs."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient
import pytest

from kosmos_g.tinyworld import probe
from kosmos_g.tinyworld.demo import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_demo_runs_all_stages_the_probe_and_the_notebook(tmp_path, monkeypatch, capsys):
    rows = main(["--quick", "--runs-dir", str(tmp_path), "--run-name", "mini"])
    run = tmp_path / "mini"
    pipelines = {"trained (ours)", "initial MLLM + aligner", "teacher U-Net + true caption (upper bound)"}
    assert set(rows) == {"one subject", "two subjects", "edits"}
    assert set(rows["one subject"]) == set(rows["two subjects"]) == pipelines
    assert set(rows["edits"]) == pipelines | {"source image, unchanged (reference)"}
    columns = {"one subject": {"shape", "colour", "position", "background", "all"},
               "two subjects": {"first", "second", "all objects", "shape", "colour", "background"},
               "edits": {"edited", "kept", "both", "kept shape", "kept colour", "kept position", "kept background"}}
    for task, table in rows.items():
        for r in table.values():
            assert columns[task] | {"CLIP-I", "CLIP-T", "DINO", "FID"} <= set(r["all"])
            assert r["all"]["n"] == 8 and 0 <= r["novel pairs"]["n"] <= 8
            for group in r.values():   # every accuracy is a percentage
                assert all(0 <= group[c] <= 100 for c in columns[task] if c in group)
    # Handing back the source keeps every other attribute and gets no edit right: the edit scoring is sound.
    source = rows["edits"]["source image, unchanged (reference)"]["all"]
    assert source["edited"] <= 25 and source["kept"] >= 75
    results = (run / "demo_results.md").read_text()
    assert "| trained (ours) |" in results and "chance 20.0%" in results
    for title in ("## one subject", "## two subjects", "## edits", "| novel pairs: trained (ours) |"):
        assert title in results
    assert (run / "demo_grid.png").stat().st_size > 0
    for stage in ("mllm", "align", "instruct"):
        assert (run / stage / "export" / "manifest.json").is_file()
    # The web app's examples: prompts with one <i> per saved subject image, edits with their source image.
    from kosmos_g.app import load_examples
    examples = load_examples(run)
    assert len(examples["generate"]) == 4 and len(examples["edit"]) == 2
    for prompt, *images in examples["generate"]:
        assert prompt.count("<i>") == len([im for im in images if im]) and Path(images[0]).is_file()

    # The image-path probe reads both stages' exports: one row per point, a percentage in every cell.
    capsys.readouterr()
    assert probe.main([str(run), "--train", "60", "--test", "40"]) == 0
    rows_out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows_out[1:]] == list(probe.POINTS)
    assert all(0 <= float(v) <= 100 for r in rows_out[1:] for v in r.strip("| ").split(" | ")[1:])

    nb = nbformat.read(REPO / "notebooks" / "tinyworld.ipynb", as_version=4)
    monkeypatch.setenv("KOSMOS_G_RUN", str(run))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
