"""Shard format: converters -> shards -> Samples round trip, and corrupt shards are skipped and counted."""

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageStat

from kosmos_g.data import convert
from kosmos_g.data.format import Entity, InputCaption, Sample, SubjectImage
from kosmos_g.data.shards import (BadSample, decode_sample, encode_sample, read_shards, shard_urls,
                                  write_shards)

COLORS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (240, 200, 0), (120, 0, 160), (0, 200, 200)]


def make_image(folder, name, color, size):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return name


def assert_image(image, color, size):
    """Same size and (up to JPEG error) the same solid colour: the right image in the right slot."""
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size == size
    mean = ImageStat.Stat(image).mean
    assert all(abs(m - c) < 8 for m, c in zip(mean, color)), (mean, color)


def read_all(urls, kind, max_chars=4000):
    """Read a shard set in a thread with a deadline, so a hanging reader fails the test instead of
    blocking it. Returns (samples, skip counts)."""
    counts, out = Counter(), {}
    thread = threading.Thread(target=lambda: out.update(samples=list(read_shards(urls, kind, counts, max_chars))),
                              daemon=True)
    thread.start()
    thread.join(timeout=15)
    assert not thread.is_alive(), "read_shards hung"
    assert "samples" in out, "read_shards raised (see the thread's traceback above)"
    return out["samples"], counts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_convert(capsys, *argv):
    rc = convert.main([*argv, "--quiet"])
    return rc, capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# round trips through the converters


def test_captions_jsonl_round_trip_with_skips(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    rows = [{"image": make_image(imgs, f"sub/{i}.png", COLORS[i], (20 + 4 * i, 16 + i)), "caption": f"photo {i}"}
            for i in range(5)]
    (imgs / "broken.jpg").write_bytes(b"this is not a jpeg")
    rows += [{"image": "nope.jpg", "caption": "missing"}, {"image": "broken.jpg", "caption": "broken"},
             {"image": rows[0]["image"], "caption": "   "}]
    rc, out = run_convert(capsys, "captions", "--images", str(imgs), "--captions", write_jsonl(tmp_path / "c.jsonl", rows),
                          "--out", str(tmp_path / "out"), "--prefix", "cap", "--shard-size", "2")
    assert rc == 0
    assert "wrote 5 samples to 3 shard(s)" in out.out
    for reason in ("missing_image=1", "bad_image=1", "empty_text=1"):
        assert reason in out.out
    assert sorted(os.listdir(tmp_path / "out")) == [f"cap-00000{i}.tar" for i in range(3)]

    samples, counts = read_all(str(tmp_path / "out" / "cap-{000000..000002}.tar"), "caption")
    assert counts == Counter()
    assert [s.text for s in samples] == [f"photo {i}" for i in range(5)]
    for i, s in enumerate(samples):
        assert s.kind == "caption" and s.segments == [f"photo {i}"]
        assert_image(s.target, COLORS[i], (20 + 4 * i, 16 + i))


def test_coco_captions_all_or_first_per_image(tmp_path, capsys):
    imgs = tmp_path / "val"
    coco = {"images": [{"id": 7, "file_name": make_image(imgs, "a.jpg", COLORS[0], (32, 32))},
                       {"id": 9, "file_name": make_image(imgs, "b.jpg", COLORS[1], (24, 40))}],
            "annotations": [{"id": 1, "image_id": 9, "caption": "b one"}, {"id": 2, "image_id": 7, "caption": "a one"},
                            {"id": 3, "image_id": 9, "caption": "b two\n"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    common = ["captions", "--images", str(imgs), "--captions", str(tmp_path / "coco.json")]
    assert run_convert(capsys, *common, "--out", str(tmp_path / "all"))[0] == 0
    assert run_convert(capsys, *common, "--out", str(tmp_path / "first"), "--one-per-image")[0] == 0

    every, _ = read_all(str(tmp_path / "all"), "caption")
    assert sorted((s.key, s.text) for s in every) == [("7_2", "a one"), ("9_1", "b one"), ("9_3", "b two")]
    first, _ = read_all(str(tmp_path / "first"), "caption")
    assert sorted(s.text for s in first) == ["a one", "b one"]
    assert_image(next(s for s in first if s.key.startswith("9")).target, COLORS[1], (24, 40))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_interleaved_round_trip(tmp_path, capsys, fmt):
    root = tmp_path / "imgs"
    a, b = make_image(root, "a.png", COLORS[2], (30, 20)), make_image(root, "b.png", COLORS[3], (18, 26))
    rows = [{"texts": ["Intro.", None, "Between.", None], "images": [None, a, None, b]},
            {"texts": [None, "Only text after an image."], "images": [b, None]},
            {"texts": ["x", None], "images": [None, "gone.png"]},  # missing image: skipped
            {"texts": ["fine", "both"], "images": [None, a]}]  # text and image at one position: skipped
    if fmt == "jsonl":
        rows_path = write_jsonl(tmp_path / "rows.jsonl", rows)
    else:
        rows_path = str(tmp_path / "rows.parquet")
        pq.write_table(pa.Table.from_pylist(rows), rows_path)
    rc, out = run_convert(capsys, "interleaved", "--rows", rows_path, "--image-root", str(root),
                          "--out", str(tmp_path / "out"))
    assert rc == 0 and "skipped 2 (" in out.out and "missing_image=1" in out.out and "bad_row=1" in out.out

    samples, counts = read_all(str(tmp_path / "out"), "interleaved")
    assert counts == Counter() and len(samples) == 2
    first, second = samples
    assert [type(s).__name__ for s in first.segments] == ["str", "Image", "str", "Image"]
    assert first.segments[0] == "Intro." and first.segments[2] == "Between." and first.target is None
    assert_image(first.segments[1], COLORS[2], (30, 20))
    assert_image(first.segments[3], COLORS[3], (18, 26))
    assert second.segments[1] == "Only text after an image."
    assert_image(second.segments[0], COLORS[3], (18, 26))


def test_edits_round_trip(tmp_path, capsys):
    make_image(tmp_path, "in.png", COLORS[0], (40, 30))
    make_image(tmp_path, "out.png", COLORS[1], (40, 30))
    rows = [{"input": "in.png", "edit": "make it green", "output": "out.png"},
            {"input": "in.png", "edit": "make it snow", "output": "out.png", "input_caption": "a red square"},
            {"input": "in.png", "edit": "", "output": "out.png"},
            {"input": "in.png", "edit": "lost", "output": "missing.png"}]
    rc, out = run_convert(capsys, "edits", "--edits", write_jsonl(tmp_path / "e.jsonl", rows),
                          "--out", str(tmp_path / "out"))
    assert rc == 0 and "wrote 2 samples" in out.out and "empty_text=1" in out.out and "missing_image=1" in out.out
    plain, captioned = read_all(str(tmp_path / "out"), "edit")[0]
    assert plain.segments[1] == "make it green"
    assert_image(plain.segments[0], COLORS[0], (40, 30))
    assert_image(plain.target, COLORS[1], (40, 30))
    caption, source, instruction = captioned.segments  # the input caption is optional and comes first
    assert (caption, instruction) == (InputCaption("a red square"), "make it snow")
    assert_image(source, COLORS[0], (40, 30))
    with tarfile.open(tmp_path / "out" / "edits-000000.tar") as tar:
        doc = json.loads(tar.extractfile("000000001.json").read())
    assert doc == {"kind": "edit", "segments": [{"input_caption": "a red square"}, {"image": "img0.jpg"},
                                                {"text": "make it snow"}]}


def test_edits_from_the_instructpix2pix_release_folder(tmp_path, capsys):
    """The folder `download_data.sh clip-filtered-dataset` writes: every seed's pair is a sample, and
    prompt.json's `input` (the caption of the source image) becomes its InputCaption."""
    ip2p = tmp_path / "clip-filtered-dataset"
    for name, seeds, color in (("0000007", [11, 12], 0), ("0000009", [5], 2)):
        (ip2p / name).mkdir(parents=True)
        (ip2p / name / "prompt.json").write_text(json.dumps(
            {"input": f"photo {name}", "edit": f"edit {name}", "output": f"edited photo {name}"}))
        for seed in seeds:
            make_image(ip2p, f"{name}/{seed}_0.jpg", COLORS[color], (24, 16))
            make_image(ip2p, f"{name}/{seed}_1.jpg", COLORS[color + 1], (24, 16))
    (ip2p / "seeds.json").write_text(json.dumps([["0000007", [11, 12]], ["0000009", [5]], ["0000404", [1]]]))
    rc, out = run_convert(capsys, "edits", "--edits", str(ip2p), "--out", str(tmp_path / "out"))
    assert rc == 0 and "wrote 3 samples" in out.out and "bad_row=1" in out.out  # 0000404 has no prompt.json
    samples, _ = read_all(str(tmp_path / "out"), "edit")
    assert [s.key for s in samples] == ["0000007_11", "0000007_12", "0000009_5"]
    assert [(s.segments[0], s.segments[2]) for s in samples] == [
        (InputCaption("photo 0000007"), "edit 0000007")] * 2 + [(InputCaption("photo 0000009"), "edit 0000009")]
    assert_image(samples[2].segments[1], COLORS[2], (24, 16))
    assert_image(samples[2].target, COLORS[3], (24, 16))
    rc, out = run_convert(capsys, "edits", "--edits", str(tmp_path / "out"), "--out", str(tmp_path / "o2"))
    assert rc == 2 and "seeds.json" in out.err


def test_subjects_round_trip(tmp_path, capsys):
    make_image(tmp_path, "dog.png", COLORS[4], (12, 14))
    make_image(tmp_path, "dog_white.png", COLORS[5], (12, 14))
    make_image(tmp_path, "scene.png", COLORS[0], (48, 32))
    row = {"segments": [{"text": "a "}, {"entity": "dog"}, {"image": "dog.png", "on_white": "dog_white.png"},
                        {"text": " on grass"}], "target": "scene.png"}
    rc, _ = run_convert(capsys, "subjects", "--subjects", write_jsonl(tmp_path / "s.jsonl", [row]),
                        "--out", str(tmp_path / "out"), "--image-format", "png")
    assert rc == 0
    (sample,), _ = read_all(str(tmp_path / "out"), "subject")
    a, entity, subject, rest = sample.segments
    assert (a, entity, rest) == ("a ", Entity("dog"), " on grass") and sample.text == "a dog on grass"
    assert isinstance(subject, SubjectImage)
    # PNG is lossless: exact pixels
    assert subject.image.getpixel((3, 3)) == COLORS[4] and subject.on_white.getpixel((3, 3)) == COLORS[5]
    assert sample.target.size == (48, 32) and sample.target.getpixel((0, 0)) == COLORS[0]
    with tarfile.open(tmp_path / "out" / "subjects-000000.tar") as tar:
        assert sorted(m.name.split(".", 1)[1] for m in tar) == ["img0.png", "img0w.png", "json", "target.png"]


def test_text_round_trip(tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("first document\n\nsecond document — naïve\n")
    rows = [{"body": "from jsonl"}, {"body": ""}]
    assert run_convert(capsys, "text", "--docs", str(tmp_path / "docs.txt"), "--out", str(tmp_path / "t"))[0] == 0
    rc, out = run_convert(capsys, "text", "--docs", write_jsonl(tmp_path / "d.jsonl", rows), "--text-field", "body",
                          "--out", str(tmp_path / "j"))
    assert rc == 0 and "empty_text=1" in out.out
    assert [s.text for s in read_all(str(tmp_path / "t"), "text")[0]] == ["first document", "second document — naïve"]
    assert [s.segments for s in read_all(str(tmp_path / "j"), "text")[0]] == [["from jsonl"]]


def test_missing_input_is_one_line_exit_2(tmp_path, capsys):
    rc, out = run_convert(capsys, "captions", "--images", str(tmp_path), "--captions", str(tmp_path / "no.jsonl"),
                          "--out", str(tmp_path / "o"))
    assert rc == 2 and out.err.strip().count("\n") == 0 and "no.jsonl" in out.err
    (tmp_path / "rows.csv").write_text("a,b\n")
    rc, out = run_convert(capsys, "interleaved", "--rows", str(tmp_path / "rows.csv"), "--image-root", str(tmp_path),
                          "--out", str(tmp_path / "o"))
    assert rc == 2 and ".jsonl or .parquet" in out.err and not (tmp_path / "o").exists()


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "kosmos_g.data.convert", "captions", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--one-per-image" in result.stdout and "--shard-size" in result.stdout


# ---------------------------------------------------------------------------------------------
# the writer's and decoder's own checks


def test_write_shards_rejects_wrong_kind_and_skips_unreadable_text(tmp_path):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="'text' sample but this shard set holds 'caption'"):
        write_shards([Sample("text", ["hi"])], str(tmp_path), "x", "caption", progress=False)
    summary = write_shards([Sample("caption", [" "], image), Sample("caption", ["y" * 4001], image)],
                           str(tmp_path / "none"), "x", "caption", progress=False)
    assert summary.written == 0 and summary.skipped == Counter(empty_text=1, text_too_long=1)
    assert summary.shards == [] and os.listdir(tmp_path / "none") == []  # no empty tar left behind
    with pytest.raises(ValueError, match="no '.'"):
        encode_sample(Sample("text", ["hi"], key="a.b"))


def test_decode_sample_reasons():
    image = Image.new("RGB", (8, 8), COLORS[0])
    raw = encode_sample(Sample("interleaved", ["t", image], key="k"))
    assert set(raw) == {"__key__", "json", "img0.jpg"}
    assert decode_sample(raw, "interleaved").segments[0] == "t"
    with pytest.raises(BadSample) as e:
        decode_sample(raw, "edit")
    assert e.value.reason == "wrong_kind"
    entity = dict(raw, json=json.dumps({"kind": "interleaved", "segments": [{"entity": "dog"}]}).encode())
    with pytest.raises(BadSample, match="bad_layout"):  # entities belong to subject samples only
        decode_sample(entity, "interleaved")
    edit = encode_sample(Sample("edit", [InputCaption("a dog"), image, "make it a cat"], image, key="e"))
    assert decode_sample(edit, "edit").segments[0] == InputCaption("a dog")
    for segments in ([{"image": "img0.jpg"}, {"input_caption": "a dog"}, {"text": "x"}],  # caption after image
                     [{"input_caption": "a"}, {"input_caption": "b"}, {"image": "img0.jpg"}, {"text": "x"}]):
        with pytest.raises(BadSample, match="bad_layout"):
            decode_sample(dict(edit, json=json.dumps({"kind": "edit", "segments": segments}).encode()), "edit")
    caption_in_doc = dict(raw, json=interleaved_json({"input_caption": "a dog"}))
    with pytest.raises(BadSample, match="bad_layout"):  # input captions belong to edit samples only
        decode_sample(caption_in_doc, "interleaved")
    for ref in ("__key__", "img9.jpg"):  # a reference must name an image member of this sample
        dangling = dict(raw, json=interleaved_json({"image": ref}))
        with pytest.raises(BadSample, match="missing_member"):
            decode_sample(dangling, "interleaved")
    with pytest.raises(TypeError, match="raw webdataset sample"):
        decode_sample({"__key__": "k", "txt": "already decoded"}, "text")


# ---------------------------------------------------------------------------------------------
# corrupt shards


def jpeg_bytes(color, size=(16, 12)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def interleaved_json(*segments):
    return json.dumps({"kind": "interleaved", "segments": list(segments)}).encode()


def write_tar(path, raws):
    with wds.TarWriter(str(path)) as sink:
        for raw in raws:
            sink.write(raw)
    return path


def test_adversarial_shards_are_skipped_and_counted(tmp_path):
    good = lambda key, i: {"__key__": key, "jpg": jpeg_bytes(COLORS[i]), "txt": f"good {key}".encode()}
    write_tar(tmp_path / "a-000000.tar", [
        good("g0", 0),
        {"__key__": "notimage", "jpg": b"GIF? no, just text", "txt": b"a caption"},
        {"__key__": "zerobyte", "jpg": b"", "txt": b"a caption"},
        {"__key__": "halfjpeg", "jpg": jpeg_bytes(COLORS[1], (64, 64))[:300], "txt": b"a caption"},
        {"__key__": "emptycap", "jpg": jpeg_bytes(COLORS[1]), "txt": b""},
        {"__key__": "hugecap", "jpg": jpeg_bytes(COLORS[1]), "txt": b"x" * 10_000},
        {"__key__": "noimage", "txt": b"caption without image"},
        {"__key__": "badutf8", "jpg": jpeg_bytes(COLORS[1]), "txt": b"\xff\xfe\xfa"},
        good("g1", 1)])
    # a shard cut inside its third sample's caption: the two before it survive, the third is half there
    write_tar(tmp_path / "a-000001.tar", [good("t0", 2), good("t1", 3), good("t2", 4), good("t3", 5)])
    data = (tmp_path / "a-000001.tar").read_bytes()
    (tmp_path / "a-000001.tar").write_bytes(data[:data.index(b"good t2") + 3])
    (tmp_path / "a-000002.tar").write_bytes(b"not a tar at all" * 64)
    # same key as the cut sample (separate converter runs both number from 0): must not merge with it
    write_tar(tmp_path / "a-000003.tar", [good("t2", 0)])

    samples, counts = read_all(str(tmp_path), "caption")
    assert [s.key for s in samples] == ["g0", "g1", "t0", "t1", "t2"]
    assert [s.text for s in samples] == [f"good {k}" for k in ("g0", "g1", "t0", "t1", "t2")]
    assert_image(samples[2].target, COLORS[2], (16, 12))
    assert_image(samples[4].target, COLORS[0], (16, 12))
    # missing_member: "noimage" and the cut sample; bad_tar: the cut shard and the non-tar
    assert counts == Counter(bad_image=3, empty_text=1, text_too_long=1, missing_member=2, bad_text=1, bad_tar=2)
    # the limit is a parameter: with a larger one the long caption is delivered
    samples, counts = read_all(str(tmp_path / "a-000000.tar"), "caption", max_chars=20_000)
    assert "hugecap" in [s.key for s in samples] and "text_too_long" not in counts


def test_adversarial_interleaved_json(tmp_path):
    img = jpeg_bytes(COLORS[0])
    write_tar(tmp_path / "i-000000.tar", [
        {"__key__": "ok", "json": interleaved_json({"text": "hi "}, {"image": "img0.jpg"}), "img0.jpg": img},
        {"__key__": "dangling", "json": interleaved_json({"text": "hi"}, {"image": "img0.jpg"})},
        {"__key__": "zeroimg", "json": interleaved_json({"image": "img0.jpg"}), "img0.jpg": b""},
        {"__key__": "zerojson", "json": b"", "img0.jpg": img},
        {"__key__": "notjson", "json": b"{'kind': 'interleaved'", "img0.jpg": img},
        {"__key__": "noseg", "json": interleaved_json(), "img0.jpg": img},
        {"__key__": "emptyseg", "json": interleaved_json({"text": ""}, {"image": "img0.jpg"}), "img0.jpg": img},
        {"__key__": "oddseg", "json": interleaved_json({"video": "v.mp4"}), "img0.jpg": img},
        {"__key__": "ok2", "json": interleaved_json({"image": "img0.jpg"}, {"text": " bye"}), "img0.jpg": img}])
    samples, counts = read_all(str(tmp_path / "i-000000.tar"), "interleaved")
    assert [s.key for s in samples] == ["ok", "ok2"]
    assert [type(s).__name__ for s in samples[1].segments] == ["Image", "str"]
    assert counts == Counter(missing_member=1, bad_image=1, bad_json=3, bad_layout=1, empty_text=1)


def test_shard_urls_expands_and_checks(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    assert shard_urls(str(tmp_path)) == [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    assert len(shard_urls(str(tmp_path / "s-{000000..000002}.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="s-000003.tar"):
        shard_urls(str(tmp_path / "s-{000000..000003}.tar"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        shard_urls(str(tmp_path / "empty_dir"))
