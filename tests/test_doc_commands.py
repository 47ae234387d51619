"""Every command line shown in README.md, data/README.md and docs/*.md runs, so a documented command that
fails is a red test; and the README's "Train on your own data" route runs end to end on small raw files.

How a documented command is run (mechanical, no per-command edits):
- The working directory is a temp folder holding small generated inputs at the very relative paths the docs
  use (`mydata/`, `coco/`, `ip2p/`, `runs/demo/teachers/sd`, `red.jpg`, ...; see `write_inputs`), so no path
  in a command is rewritten; `runs/`, `shards/`, `outputs/`, `eval/` land in the temp folder too.
- Commands come from fenced ```bash blocks (continuation lines joined, comment lines dropped) and from
  table cells holding a backticked `python`/`torchrun`/`srun`/`make` command.
- `python train.py ...`, `python -m kosmos_g.<module> ...` run in-process (their `main(argv)`), with
  `SMALL[...]` appended: Hydra and argparse take the last value, so only the sizes change (steps, samples).
- `export A=B` sets the environment for the commands after it; other shell lines run in bash, as written.
- `CANNOT_RUN` lists what cannot run here, each with its reason; those are checked as far as possible
  (`--cfg job` composes and validates the config; argparse accepts the flags; `make -n`).
To document a new command: write it in a ```bash block; it is run. If it cannot run on a CPU in seconds,
add a rule to `CANNOT_RUN` with its reason.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "data/README.md", "docs/data-format.md", "docs/evaluation.md", "docs/scaling.md",
        "docs/official-checkpoints.md"]  # docs/tokenizer.md shows no command
OWN_DATA = "Train on your own data"  # README section run by test_own_data_route (with more checks)

# Appended to runnable commands (last value wins): tiny sizes for a test.
SMALL = {
    "train": ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2",
              "stage.batch_size=2", "stage.sample_every_n_steps=0"],
    "tinyworld": ["--samples", "60"],
    "generate": ["--steps", "2", "--num-images", "1"],
    "evaluate": ["--steps", "2", "--quiet"],
}

# (what the command matches, reason) -> checked, not run. First match wins.
CANNOT_RUN = [
    (r"^make (demo|test)\b", "the 10-minute demo / the test suite itself: checked with `make -n`"),
    (r"^make venv\b", "installs packages from the index: checked with `make -n`"),
    (r"^torchrun\b", "starts several processes (8 GPUs); CPU multi-process runs are tests/test_distributed.py's"),
    (r"^srun\b", "SLURM"),
    (r"kosmos_g\.tinyworld\.probe\b", "reads a finished demo run (runs/demo); tests/tinyworld/test_demo.py runs it "
                                     "on the mini demo's"),
    (r"\bmodel=paper\b", "needs the paper's weights (SD v1.5, CLIP ViT-L/14, a Llama tokenizer) and GPUs"),
    (r"\btrainer=(ddp|a100_fsdp|v100_fsdp)\b(?!.*trainer\.accelerator=cpu)", "needs GPUs"),
    (r"\beval\.every_n_steps=[1-9]", "needs DreamBench and the CLIP / DINO weights"),
    (r"kosmos_g\.evaluate dreambench", "needs DreamBench and the CLIP / DINO weights"),
    (r"kosmos_g\.evaluate coco .*(--inception|<)", "needs COCO and the FID Inception weights"),
    (r"--pipeline runs/\S*paper", "the paper preset's export (needs its weights)"),
    (r"\bscontrol\b", "SLURM: checked with `bash -n`"),
    (r"kosmos_g\.convert official", "needs the authors' released checkpoints (no download here); "
                                     "tests/test_official.py converts fake ones in their format"),
    (r"--pipeline kosmos-g-", "a converted release (needs the released checkpoints)"),
    (r"kosmos_g\.tinyworld\.demo", "the 10-minute demo: tests/tinyworld/test_demo.py runs its --quick version"),
    (r"kosmos_g\.tinyworld\.teachers", "trains for ~7 min; tests/tinyworld/test_teachers.py trains the quick one"),
    (r"kosmos_g\.app\b", "a web server that runs until stopped: tests/test_app.py starts the README's app "
                          "commands as written and drives them"),
]


@dataclass
class Command:
    doc: str
    line: int
    section: str
    text: str

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands(doc: str) -> list[Command]:
    """The command lines of one markdown file, in order."""
    out, section, block, start = [], "", None, 0
    lines = (REPO / doc).read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if block is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip() == "```bash":
            block, start = [], i + 1
        elif line.strip() == "```" and block is not None:
            out += [Command(doc, n, section, text) for n, text in _logical_lines(block, start)]
            block = None
        elif block is not None:
            block.append(line)
        elif line.startswith("|"):  # a table cell holding a backticked command
            for cell in re.findall(r"`((?:python|torchrun|srun|make) [^`]+)`", line):
                out.append(Command(doc, i, section, cell))
    return out


def _logical_lines(block: list[str], start: int):
    text, first = "", None
    for n, line in enumerate(block, start):
        first = n if first is None else first
        if line.rstrip().endswith("\\"):
            text += line.rstrip()[:-1] + " "
            continue
        text = re.sub(r"\s+#\s.*$", "", text + line).strip()  # a trailing comment
        if text and not text.startswith("#"):
            yield first, text
        text, first = "", None


def cannot_run(cmd: str) -> str | None:
    return next((reason for pattern, reason in CANNOT_RUN if re.search(pattern, cmd)), None)


def run_command(cmd: Command, monkeypatch) -> str:
    """Run (or check, for CANNOT_RUN) one command in the current directory; returns what was done."""
    from kosmos_g import app, evaluate, generate, train
    from kosmos_g import convert as convert_official
    from kosmos_g.data import cache, convert
    from kosmos_g.tinyworld import data as tinyworld_data, demo, probe, teachers

    argv = shlex.split(cmd.text, comments=True)
    reason = cannot_run(cmd.text)
    if argv[0] not in ("python", "torchrun", "srun", "make", "export"):  # a shell line
        subprocess.run(["bash", *(["-n"] if reason else []), "-c", cmd.text], check=True)
        return f"bash -n ({reason})" if reason else "ran (bash)"
    if argv[0] == "export":
        for assignment in argv[1:]:
            monkeypatch.setenv(*assignment.split("=", 1))
        return "env"
    if argv[0] == "make":
        subprocess.run(["make", "-n", "-C", str(REPO), *argv[1:]], check=True, capture_output=True)
        return f"make -n ({reason})"
    if "train.py" in argv:  # python train.py / torchrun ... train.py / srun python train.py
        args = argv[argv.index("train.py") + 1:]
        if reason or "--cfg" in args:
            from kosmos_g.config import load_config
            if "--cfg" not in args:
                load_config(args)  # builds the dataclasses: every __post_init__ check runs
            train.main(["--cfg", "job", *[a for a in args if a not in ("--cfg", "job")]])
            return f"--cfg job ({reason})" if reason else "ran"
        train.main(args + SMALL["train"])
        return "ran"
    if argv[:2] == ["python", "-m"]:
        module, args = argv[2], argv[3:]
        mains = {"kosmos_g.data.convert": (convert.main, convert.build_parser().parse_args, []),
                 "kosmos_g.data.cache": (cache.main, cache.build_parser().parse_args, []),
                 "kosmos_g.generate": (generate.main, generate.parse_args, SMALL["generate"]),
                 "kosmos_g.evaluate": (evaluate.main, evaluate.build_parser().parse_args, SMALL["evaluate"]),
                 "kosmos_g.convert": (convert_official.main, convert_official.build_parser().parse_args, []),
                 "kosmos_g.app": (app.main, app.parse_args, []),
                 "kosmos_g.tinyworld.demo": (demo.main, demo.build_parser().parse_args, []),
                 "kosmos_g.tinyworld.teachers": (teachers.main, teachers.build_parser().parse_args, []),
                 "kosmos_g.tinyworld.probe": (probe.main, probe.build_parser().parse_args, []),
                 "kosmos_g.tinyworld.data": (tinyworld_data.main, tinyworld_data.build_parser().parse_args,
                                             SMALL["tinyworld"])}
        assert module in mains, f"{cmd}: no rule to run python -m {module}; add one to run_command"
        main, parse, small = mains[module]
        if reason:
            parse(args)
            return f"flags parsed ({reason})"
        assert main(args + small) == 0, f"{cmd} failed"
        return "ran"
    raise AssertionError(f"{cmd}: no rule to run or check this command; add one to run_command")


# ---------------------------------------------------------------------------------------------
# the inputs the documented commands name, small and generated

SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def draw(shape: str, colour: str, size: int = 48, background="white") -> Image.Image:
    im = Image.new("RGB", (size, size), background)
    d, box = ImageDraw.Draw(im), (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=fill)
    return im


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_own_data(root: Path, n: int = 24) -> list[str]:
    """`mydata/` as the README's own-data section describes it; returns the captions."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    captions, images = [], []
    for i in range(n):
        shape, colour = pairs[i % len(pairs)]
        name = f"{i:03d}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        draw(shape, colour).save(root / "images" / name)
        captions.append(f"a {colour} {shape} on a white background")
        images.append({"id": i, "file_name": name})
    coco = {"images": images, "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(captions)]}
    (root / "captions.json").write_text(json.dumps(coco))
    write_jsonl(root / "docs.jsonl", [{"texts": [f"Here is a {captions[i][2:]}.", None, "It is simple."],
                                       "images": [None, f"{i:03d}.jpg", None]} for i in range(n // 2)])
    (root / "corpus.txt").write_text("".join(f"The {c} is drawn with care, number {i}.\n"
                                             for i, c in enumerate(captions)))
    (root / "edits").mkdir(exist_ok=True)
    subjects = []
    for i in range(10):
        shape, colour = pairs[i % len(pairs)]
        other = list(COLOURS)[(i + 1) % 3]
        draw(shape, other).save(root / "edits" / f"{i}.jpg")
        crop, target = draw(shape, colour, 32, "gray"), draw(shape, colour, background=(230, 200, 120))
        crop.save(root / "edits" / f"crop{i}.jpg")
        draw(shape, colour, 32).save(root / "edits" / f"crop{i}w.jpg")
        target.save(root / "edits" / f"scene{i}.jpg")
        subjects.append({"segments": [{"text": "a "}, {"entity": f"{colour} {shape}"},
                                      {"image": f"edits/crop{i}.jpg", "on_white": f"edits/crop{i}w.jpg"},
                                      {"text": " on a sandy background"}], "target": f"edits/scene{i}.jpg"})
    write_jsonl(root / "edits.jsonl", [{"input": f"edits/{i}.jpg", "edit": f"make it {list(COLOURS)[i % 3]}",
                                        "output": f"images/{i:03d}.jpg"} for i in range(10)])
    write_jsonl(root / "subjects.jsonl", subjects)
    return captions


def write_inputs(root: Path) -> None:
    """Everything the documented commands read, at the relative paths they name."""
    from kosmos_g.eval.metrics import save_tiny_clip
    from kosmos_g.testing import build_tiny_pipeline, write_tiny_sd

    captions = write_own_data(root / "mydata")
    write_tiny_sd(root / "runs/demo/teachers/sd", captions)
    save_tiny_clip(root / "runs/demo/teachers/clip", texts=captions)
    build_tiny_pipeline().save_pretrained(root / "runs/demo/instruct/export")
    write_tiny_sd(root / "sd15", captions)
    draw("square", "red").save(root / "red.jpg")
    draw("circle", "blue").save(root / "subject.png")
    # docs/data-format.md's converter examples
    mydata = root / "mydata"
    (root / "coco").mkdir()
    (mydata / "images").rename(root / "coco/train2014")
    (root / "coco/annotations").mkdir()
    (mydata / "captions.json").rename(root / "coco/annotations/captions_train2014.json")
    (root / "images/00000").mkdir(parents=True)
    draw("circle", "green").save(root / "images/00000/000000017.jpg")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"texts": [["Intro paragraph.", None, "Next paragraph."]],
                             "images": [[None, "00000/000000017.jpg", None]]}), root / "obelics-local.parquet")
    (root / "ip2p/0000001").mkdir(parents=True)
    draw("square", "red").save(root / "ip2p/0000001/input.jpg")
    draw("square", "blue").save(root / "ip2p/0000001/output.jpg")
    write_jsonl(root / "ip2p/edits.jsonl", [{"input": "0000001/input.jpg", "edit": "make it winter",
                                             "output": "0000001/output.jpg"}])
    release = root / "clip-filtered-dataset"  # InstructPix2Pix's own release layout
    (release / "0000001").mkdir(parents=True)
    (release / "seeds.json").write_text(json.dumps([["0000001", [7]]]))
    (release / "0000001/prompt.json").write_text(json.dumps({"input": "a red square", "edit": "make it blue"}))
    draw("square", "red").save(release / "0000001/7_0.jpg")
    draw("square", "blue").save(release / "0000001/7_1.jpg")
    (root / "crops").mkdir()
    draw("circle", "red", 32, "gray").save(root / "crops/1_dog.jpg")
    draw("circle", "red", 32).save(root / "crops/1_dog_white.jpg")
    draw("circle", "red", background="green").save(root / "images/1.jpg")
    write_jsonl(root / "compositions.jsonl", [
        {"segments": [{"text": "a "}, {"entity": "dog"},
                      {"image": "crops/1_dog.jpg", "on_white": "crops/1_dog_white.jpg"},
                      {"text": " on the grass"}], "target": "images/1.jpg"}])
    write_jsonl(root / "corpus.jsonl", [{"text": "The quick brown fox."}, {"text": "A second document."}])
    (root / "corpus.txt").write_text("The quick brown fox.\nA second document.\n")
    # the own-data section needs mydata/ whole again
    write_own_data(root / "mydata")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOSMOS_G_DATA", raising=False)
    monkeypatch.delenv("KOSMOS_G_WEIGHTS", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# tests


def test_extraction_finds_the_documented_commands():
    readme = documented_commands("README.md")
    texts = [c.text for c in readme]
    assert "make venv" in texts and "python train.py stage=mllm" in texts
    assert any(c.section == OWN_DATA and "kosmos_g.evaluate coco" in c.text for c in readme)
    assert any(t.startswith("torchrun --standalone --nproc_per_node 8") for t in texts)  # from the table
    fmt = [c.text for c in documented_commands("docs/data-format.md")]
    assert any(t.startswith("mkdir s && cp red.jpg") for t in fmt)
    assert not any(t.startswith("#") for c in map(documented_commands, DOCS) for t in (x.text for x in c))
    assert cannot_run("python train.py stage=mllm model=paper data=shards")
    assert not cannot_run("python train.py stage=mllm")


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run(doc, workdir, monkeypatch):
    done = []
    for cmd in documented_commands(doc):
        if cmd.section == OWN_DATA and not cannot_run(cmd.text):
            continue  # run by test_own_data_route
        try:
            done.append((str(cmd), run_command(cmd, monkeypatch)))
        except SystemExit as e:  # train.main exits 2 on a config error, after printing it
            pytest.fail(f"{cmd} exited with {e.code}")
    assert done, f"no commands found in {doc}"


@pytest.mark.slow
def test_own_data_route(workdir, monkeypatch, capsys):
    """README "Train on your own data": convert -> three stages -> generate -> evaluate, as written
    (with `SMALL` appended), on small generated raw files; then what each step must leave behind."""
    route = [c for c in documented_commands("README.md") if c.section == OWN_DATA and not cannot_run(c.text)]
    programs = [c.text.split()[2] if c.text.startswith("python -m") else c.text.split()[1] for c in route]
    assert programs == ["OMP_NUM_THREADS=1"] + ["kosmos_g.data.convert"] * 5 + ["train.py"] * 3 + \
        ["kosmos_g.generate", "kosmos_g.evaluate"]
    for cmd in route:
        assert run_command(cmd, monkeypatch) in ("ran", "env"), cmd
    for kind in ("caption", "interleaved", "text", "edit", "subject"):
        assert list((workdir / "shards" / kind).glob("*.tar")), kind
    teachers = str((workdir / "runs/demo/teachers/sd").resolve())
    for stage in ("align", "instruct"):
        manifest = json.loads((workdir / f"runs/mine/{stage}/export/manifest.json").read_text())
        assert manifest["assets"]["diffusion_path"] == teachers and not manifest["assets"]["random_tiny_sd"]
    resolved = (workdir / "runs/mine/instruct/config.yaml").read_text()
    assert "vae_image_size: 32" in resolved and "num_workers: 0" in resolved  # derived from model=tiny
    assert len(list((workdir / "outputs/mine").glob("0*.png"))) == 1
    assert Image.open(workdir / "outputs/mine/000.png").size == (32, 32)
    assert "FID" in (workdir / "eval/mine/coco.md").read_text()
