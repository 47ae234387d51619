"""`python -m kosmos_g.evaluate`: DreamBench and COCO protocols, tables, resuming, errors.

A fake pipeline (a seeded blend of the reference image and noise) stands in for most runs; one
test evaluates the real tiny KosmosGPipeline saved with save_pretrained and loaded from its folder.
Metric backbones are tiny random CLIP / DINO saved in their real formats.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import kosmos_g.evaluate as evaluate
from kosmos_g.eval.dreambench import PROMPTS_FILE, load_dreambench
from kosmos_g.eval.metrics import (TINY_DINO_KWARGS, CLIPIScore, CLIPTScore, DINOScore, load_clip, load_dino,
                                   save_tiny_clip, save_tiny_dino)
from kosmos_g.eval.protocols import (SubjectCase, case_seed, dreambench_cases, evaluate_dreambench,
                                     load_coco_captions, real_image_scores, to_tensor)

SHARED = Path(__file__).parents[1].parent / "shared" / "dreambench"
needs_shared = pytest.mark.skipif(not (SHARED / PROMPTS_FILE).is_file(), reason=f"{SHARED} not present")
SUBJECTS = "backpack,dog"


class FakePipeline:
    """KosmosGPipeline's call, cheaply: 0.7 x the reference image (or grey) + 0.3 x seeded noise, 32 px."""

    def __init__(self):
        self.prompts = []

    def __call__(self, prompt, images=None, negative_prompt=None, num_inference_steps=20, guidance_scale=6.0,
                 num_images_per_prompt=1, generator=None, output_type="pil"):
        assert output_type == "pil" and isinstance(generator, torch.Generator)
        assert prompt.count("<i>") == len(images)
        self.prompts.append(prompt)
        base = TF.pil_to_tensor(images[0].resize((32, 32))) / 255 if images else torch.full((3, 32, 32), 0.5)
        noise = torch.rand(num_images_per_prompt, 3, 32, 32, generator=generator)
        return SimpleNamespace(images=[TF.to_pil_image(0.7 * base + 0.3 * n) for n in noise])


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    clip = save_tiny_clip(root / "clip", texts=["a backpack in the jungle", "a dog in the snow", "a red dog"])
    return SimpleNamespace(clip=clip, dino=save_tiny_dino(root / "dino.safetensors"))


@pytest.fixture
def fake(monkeypatch):
    pipe = FakePipeline()
    monkeypatch.setattr(evaluate, "load_pipeline", lambda path, device, dtype: pipe)
    return pipe


def dreambench_argv(out, backbones, *extra):
    return ["dreambench", "--pipeline", "exports/a", "--data", str(SHARED), "--out", str(out),
            "--subjects", SUBJECTS, "--prompts", "2", "--images-per-prompt", "1", "--steps", "2",
            "--clip", str(backbones.clip), "--dino", str(backbones.dino), "--tiny-dino", "--quiet", *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- DreamBench


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, backbones):
    """One DreamBench evaluation with the fake pipeline: (out folder, the prompts it was called with)."""
    out, pipe = tmp_path_factory.mktemp("first") / "eval", FakePipeline()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "load_pipeline", lambda path, device, dtype: pipe)
        assert evaluate.main(dreambench_argv(out, backbones)) == 0
    return out, pipe.prompts


@needs_shared
def test_dreambench_writes_tables_grids_and_tensorboard(first_run, backbones):
    out, prompts = first_run
    # 2 subjects x their first 2 prompts, "<i> ..." with one reference photo each.
    assert prompts == ["<i> in the jungle", "<i> in the snow"] * 2

    rows = {r["name"]: r for r in read_csv(out / "dreambench.csv")}
    assert list(rows) == ["real images", "a"]
    row, real = rows["a"], rows["real images"]
    assert (row["images"], row["subjects"], row["prompts"], row["steps"]) == ("4", "2", "2", "2")
    assert row["against"] == real["against"] == "input photo"  # the original evaluation's protocol
    # The real row scores every other photo of a subject against its input photo.
    assert real["CLIP-T"] == "" and int(real["images"]) == sum(
        len(load_dreambench(SHARED).subject(s).images) - 1 for s in SUBJECTS.split(","))
    for r in (row, real):
        assert all(-1 <= float(r[k]) <= 1 for k in ("DINO", "CLIP-I"))

    # The table's numbers are the metrics over the saved images, recomputed here independently.
    clip, dino = load_clip(backbones.clip), load_dino(backbones.dino, **TINY_DINO_KWARGS)
    bench = load_dreambench(SHARED)
    metrics = [DINOScore(dino), CLIPIScore(clip), CLIPTScore(clip)]
    for case in dreambench_cases(bench, SUBJECTS.split(","), 2):
        image = to_tensor(out / "images" / "a" / "dreambench" / f"{case.key}_0.png")[None]
        refs = [to_tensor(bench.subject(case.subject).input_photo)]  # the photo `<i>` stood for
        metrics[0].update(image, refs)
        metrics[1].update(image, refs)
        metrics[2].update(image, [case.text])
    for metric, column in zip(metrics, ("DINO", "CLIP-I", "CLIP-T")):
        assert float(row[column]) == pytest.approx(metric.compute().item(), abs=1e-5)

    per_subject = read_csv(out / "dreambench_subjects.csv")
    assert {(r["name"], r["subject"]) for r in per_subject} == {(n, s) for n in rows for s in SUBJECTS.split(",")}
    md = (out / "dreambench.md").read_text()
    assert "| method | DINO | CLIP-I | CLIP-T | against |" in md and "| real images |" in md
    # The header says what the rows were scored against and sampled with, before the table.
    header = md[:md.index("| method")]
    assert "each generated image against the input photo of its subject" in header
    assert "Sampling: dpm++, 2 steps, guidance 7.5, 1 images per prompt; the paper's: dpm++, 100 steps, " \
           "guidance 7.5, 4 images per prompt." in header
    assert {p.name for p in (out / "grids" / "a" / "dreambench").iterdir()} == {"backpack.png", "dog.png"}
    assert Image.open(out / "grids" / "a" / "dreambench" / "dog.png").size == (3 * 128, 128)  # reference + 2
    assert list((out / "tensorboard" / "a").glob("events.out.tfevents.*"))


@needs_shared
def test_all_photos_protocol_scores_against_every_photo(tmp_path, first_run, backbones, fake):
    """--all-photos: DreamBooth's protocol on the same images (reused: the protocol is not a sampling setting)."""
    out = shutil.copytree(first_run[0], tmp_path / "eval")
    input_dino = {r["name"]: r for r in read_csv(out / "dreambench.csv")}["a"]["DINO"]
    assert evaluate.main(dreambench_argv(out, backbones, "--all-photos")) == 0
    assert fake.prompts == []  # nothing regenerated
    rows = {r["name"]: r for r in read_csv(out / "dreambench.csv")}
    assert rows["a"]["against"] == rows["real images"]["against"] == "all photos"
    bench = load_dreambench(SHARED)
    assert int(rows["real images"]["images"]) == sum(len(bench.subject(s).images) for s in SUBJECTS.split(","))
    clip, dino = load_clip(backbones.clip), load_dino(backbones.dino, **TINY_DINO_KWARGS)
    metric = DINOScore(dino)
    for case in dreambench_cases(bench, SUBJECTS.split(","), 2, all_photos=True):
        assert case.real_images == tuple(bench.subject(case.subject).images)
        metric.update(to_tensor(out / "images" / "a" / "dreambench" / f"{case.key}_0.png")[None],
                      [to_tensor(p) for p in case.real_images])
    assert float(rows["a"]["DINO"]) == pytest.approx(metric.compute().item(), abs=1e-5)
    assert float(rows["a"]["DINO"]) != pytest.approx(float(input_dino), abs=1e-4)
    header = (out / "dreambench.md").read_text().split("| method")[0]
    assert "each generated image against every photo of its subject, averaged (DreamBooth's" in header
    # Rows of both protocols in one table: the header says so and the column tells them apart.
    assert evaluate.main(dreambench_argv(out, backbones, "--name", "b", "--no-real")) == 0
    header = (out / "dreambench.md").read_text().split("| method")[0]
    assert "rows differ in what each generated image is scored against" in header
    assert "all photos: every photo of its subject" in header and "input photo: the input photo" in header


def test_defaults_are_the_papers_settings():
    """What a user gets without sampler flags: DreamBench DPM-Solver++ 100 steps, guidance 7.5, 4 images per
    prompt, scored against the input photo; COCO DDIM 250 steps, guidance 3, 30k captions (nothing generated)."""
    parser = evaluate.build_parser()
    db = parser.parse_args(["dreambench", "--pipeline", "p", "--data", "d", "--out", "o", "--clip", "c", "--dino", "x"])
    assert (db.scheduler, db.steps, db.guidance, db.images_per_prompt, db.all_photos) == ("dpm++", 100, 7.5, 4, False)
    coco = parser.parse_args(["coco", "--pipeline", "p", "--captions", "c", "--images", "i", "--out", "o",
                              "--inception", "w"])
    assert (coco.scheduler, coco.steps, coco.guidance, coco.num, coco.size) == ("ddim", 250, 3.0, 30000, 256)
    # Those names are samplers the pipeline knows (DPM-Solver++ is the original's "dpms" scheduler).
    from kosmos_g.pipeline import SCHEDULERS
    assert SCHEDULERS["dpm++"][1] == {"algorithm_type": "dpmsolver++"} and "ddim" in SCHEDULERS


@needs_shared
def test_rerun_reuses_images_and_another_pipeline_appends_a_row(tmp_path, first_run, backbones, fake, capsys):
    out = shutil.copytree(first_run[0], tmp_path / "eval")
    first = read_csv(out / "dreambench.csv")
    assert evaluate.main(dreambench_argv(out, backbones, "--no-real")) == 0  # (the real row stays as it is)
    assert fake.prompts == []  # nothing regenerated
    assert "0 images generated, 4 reused" in capsys.readouterr().out
    assert read_csv(out / "dreambench.csv") == first  # same row replaced by the same values

    # A half-finished run: only the missing prompt is generated again.
    (out / "images" / "a" / "dreambench" / "dog" / "01_0.png").unlink()
    assert evaluate.main(dreambench_argv(out, backbones, "--no-real")) == 0
    assert fake.prompts == ["<i> in the snow"]

    assert evaluate.main(dreambench_argv(out, backbones, "--no-real", "--name", "b", "--seed", "1")) == 0
    rows = read_csv(out / "dreambench.csv")
    assert [r["name"] for r in rows] == ["real images", "a", "b"]
    assert rows[1]["DINO"] != rows[2]["DINO"]  # another seed, other images

    # Other settings under the same name would mix images: refused, naming the way out.
    capsys.readouterr()
    assert evaluate.main(dreambench_argv(out, backbones, "--steps", "5")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps: 2 -> 5" in err and "--name" in err


@needs_shared
def test_validation_entry_point_is_seeded_and_in_memory(backbones):
    cases = dreambench_cases(load_dreambench(SHARED), ["backpack"], 2)
    clip, dino = load_clip(backbones.clip), load_dino(backbones.dino, **TINY_DINO_KWARGS)
    a = evaluate_dreambench(FakePipeline(), cases, clip, dino, progress=False)
    b = evaluate_dreambench(FakePipeline(), cases, clip, dino, progress=False)
    assert a == b and set(a) == {"DINO", "CLIP-I", "CLIP-T", "images"} and a["images"] == 2
    # Seeds depend on the case, not on what else runs.
    assert case_seed(0, cases[1].key) != case_seed(0, cases[0].key) != case_seed(1, cases[0].key)


def test_real_images_row_is_the_leave_one_out_mean(tmp_path, backbones):
    photos = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(photos):
        Image.new("RGB", (40, 40), (200, 40 * i, 30)).save(p)
    same = SubjectCase("twins", 0, "<i>", "a thing", photos[0], (photos[0], photos[0]))
    three = SubjectCase("trio", 0, "<i>", "a thing", photos[0], tuple(photos))
    dino = load_dino(backbones.dino, **TINY_DINO_KWARGS)
    scores, per_subject = real_image_scores([same, three], backbones.clip, dino, progress=False)
    assert per_subject["twins"]["DINO"] == pytest.approx(1.0, abs=1e-5)  # identical photos, self excluded
    # trio: each photo's mean cosine to the two others, averaged over the three photos.
    emb = torch.nn.functional.normalize(DINOScore(dino).embed([to_tensor(p) for p in photos]).double(), dim=-1)
    cos = emb @ emb.T
    expected = (cos.sum() - cos.trace()).item() / 6
    assert per_subject["trio"]["DINO"] == pytest.approx(expected, abs=1e-6)
    assert scores["DINO"] == pytest.approx((2 * 1.0 + 3 * expected) / 5, abs=1e-5)
    assert scores["images"] == 5
    # Scored against the input photo: each *other* photo against it (the input photo itself is not scored).
    against_input = SubjectCase("trio", 0, "<i>", "a thing", photos[0], (photos[0],), tuple(photos))
    scores, per_subject = real_image_scores([against_input], backbones.clip, dino, progress=False)
    assert scores["images"] == 2
    assert scores["DINO"] == pytest.approx((cos[1, 0] + cos[2, 0]).item() / 2, abs=1e-6)


# ---------------------------------------------------------------------------------------------- COCO


def make_coco(root: Path, n: int = 5) -> tuple[Path, Path]:
    images = root / "val2014"
    images.mkdir(parents=True)
    data = {"images": [], "annotations": []}
    for i in range(n):
        file = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (48 + 8 * i, 40), (50 * i, 120, 255 - 40 * i)).save(images / file)
        data["images"].append({"id": i, "file_name": file})
        data["annotations"] += [{"id": 10 * i + 1, "image_id": i, "caption": f"a red dog number {i}"},
                                {"id": 10 * i + 2, "image_id": i, "caption": "a second caption"}]
    (root / "captions.json").write_text(json.dumps(data))
    return root / "captions.json", images


def test_coco_fid_with_a_small_feature_extractor_and_resume(tmp_path, backbones, fake, capsys):
    captions, images = make_coco(tmp_path / "coco")
    argv = ["coco", "--pipeline", "exports/a", "--captions", str(captions), "--images", str(images), "--num", "4",
            "--fid-features", str(backbones.clip), "--size", "32", "--out", str(tmp_path / "eval"), "--quiet",
            "--steps", "2"]
    assert evaluate.main(argv) == 0
    header = (tmp_path / "eval" / "coco.md").read_text().split("| method")[0]
    assert "Sampling: ddim, 2 steps, guidance 3; the paper's: ddim, 250 steps, guidance 3." in header
    assert len(fake.prompts) == 4 and all(p.startswith("a red dog number") for p in fake.prompts)
    (row,) = read_csv(tmp_path / "eval" / "coco.csv")
    assert row["features"] == "clip:clip" and row["images"] == "4"
    assert math.isfinite(float(row["FID"])) and float(row["FID"]) > 0
    assert (tmp_path / "eval" / "grids" / "a" / "coco.png").is_file()
    assert len(list((tmp_path / "eval" / "fid_real").glob("fid_real_*.pt"))) == 1

    fake.prompts.clear()
    assert evaluate.main(argv) == 0  # images and the real statistics both reused
    assert fake.prompts == [] and "0 images generated, 4 reused" in capsys.readouterr().out
    assert read_csv(tmp_path / "eval" / "coco.csv") == [row]
    # A DINO file works as the extractor too.
    argv[argv.index("--fid-features") + 1] = str(backbones.dino)
    assert evaluate.main(argv + ["--tiny-dino", "--name", "dino-features"]) == 0
    assert [r["features"] for r in read_csv(tmp_path / "eval" / "coco.csv")] == ["clip:clip", "dino:dino.safetensors"]


def test_coco_caption_selection(tmp_path):
    captions, images = make_coco(tmp_path / "coco", n=6)
    cases = load_coco_captions(captions, images, 4, seed=0)
    assert cases == load_coco_captions(captions, images, 4, seed=0)  # fixed by the seed
    assert len({c.image for c in cases}) == 4  # distinct images, each with its first caption
    assert all(c.caption == f"a red dog number {c.key}" and c.image.is_file() for c in cases)
    records = [{"caption": "a cat", "file_name": "COCO_val2014_000000000001.jpg"}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (case,) = load_coco_captions(tmp_path / "list.json", images, 1)
    assert (case.key, case.caption) == ("COCO_val2014_000000000001", "a cat")
    with pytest.raises(ValueError, match="--num 7: .* only 6 images"):
        load_coco_captions(captions, images, 7)


# ---------------------------------------------------------------------------------------------- errors


def one_error_line(capsys, argv) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@needs_shared
def test_missing_paths_give_one_line_naming_the_flag_and_path(tmp_path, backbones, capsys):
    base = dreambench_argv(tmp_path / "eval", backbones)

    def with_(flag, value):
        argv = list(base)
        argv[argv.index(flag) + 1] = value
        return argv

    missing = str(tmp_path / "nowhere")
    for flag in ("--clip", "--dino", "--data", "--pipeline"):
        err = one_error_line(capsys, with_(flag, missing))
        assert f"{flag} {missing}" in err and "nothing is downloaded" in err
    err = one_error_line(capsys, with_("--clip", str(tmp_path)))  # a folder, but not a CLIP one
    assert "no config.json" in err
    err = one_error_line(capsys, with_("--subjects", "backpack,unicorn"))
    assert "--subjects" in err and "unicorn" in err
    coco = ["coco", "--pipeline", missing, "--captions", missing, "--images", missing, "--out", str(tmp_path),
            "--inception", missing]
    assert f"--inception {missing}" in one_error_line(capsys, coco)
    if importlib.util.find_spec("torch_fidelity") is None:  # the paper's Inception FID needs it
        (tmp_path / "weights" / evaluate.INCEPTION_FILE).parent.mkdir()
        (tmp_path / "weights" / evaluate.INCEPTION_FILE).write_bytes(b"")
        coco[-1] = str(tmp_path / "weights")
        assert "pip install torch-fidelity" in one_error_line(capsys, coco)
    assert not (tmp_path / "eval").exists()  # nothing written before the arguments check out


# ---------------------------------------------------------------------------------------------- the real pipeline


@needs_shared
def test_real_tiny_pipeline_from_its_saved_folder(tmp_path, backbones, capsys):
    from kosmos_g.testing import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(tmp_path / "runs" / "t" / "instruct" / "export")
    argv = dreambench_argv(tmp_path / "eval", backbones, "--device", "cpu", "--no-real")
    argv[argv.index("--pipeline") + 1] = str(tmp_path / "runs" / "t" / "instruct" / "export")
    argv[argv.index("--subjects") + 1] = "dog"
    argv[argv.index("--prompts") + 1] = "1"
    assert evaluate.main(argv) == 0
    (row,) = read_csv(tmp_path / "eval" / "dreambench.csv")
    assert row["name"] == "t/instruct" and row["images"] == "1" and row["scheduler"] == "dpm++"
    assert all(-1 <= float(row[k]) <= 1 for k in ("DINO", "CLIP-I", "CLIP-T"))
    assert Image.open(tmp_path / "eval" / "images" / "t_instruct" / "dreambench" / "dog" / "00_0.png").size == (32, 32)
