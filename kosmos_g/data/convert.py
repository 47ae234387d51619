"""Convert common dataset layouts into Kosmos-G shards (docs/data-format.md describes the result).

    python -m kosmos_g.data.convert captions --images coco/val2014 \\
        --captions coco/annotations/captions_val2014.json --one-per-image --out shards/coco
    python -m kosmos_g.data.convert interleaved --rows obelics.parquet --image-root imgs --out shards/obelics
    python -m kosmos_g.data.convert edits --edits ip2p.jsonl --out shards/ip2p
    python -m kosmos_g.data.convert edits --edits clip-filtered-dataset/ --out shards/ip2p
    python -m kosmos_g.data.convert subjects --subjects compositions.jsonl --out shards/subjects
    python -m kosmos_g.data.convert text --docs corpus.jsonl --out shards/text

Every subcommand streams its input through an `iter_*` generator into `write_shards`, and prints
how many samples were written and how many were skipped, by reason. A bad row (missing or
undecodable image, empty text, ...) is skipped and counted, never fatal; writing no sample at all is
(exit code 1, naming image paths it looked for). Image paths are relative to `--image-root` (`--images`
for captions), by default the input file's folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections import Counter
from typing import Iterator, Optional

from PIL import Image

from kosmos_g.data.format import Entity, InputCaption, Sample, SubjectImage
from kosmos_g.data.shards import write_shards


class InputError(Exception):
    """An input the converter cannot start on (wrong format); reported in one line, exit code 2."""


class Skipped(Counter):
    """Skip counts by reason, plus the first image paths that were not found (for the error message)."""

    def __init__(self):
        super().__init__()
        self.missing: list[str] = []


def open_image(root: str, rel, skipped: Counter) -> Optional[Image.Image]:
    """`root/rel` as an RGB image, or None after counting "bad_row", "missing_image" or "bad_image"."""
    if not isinstance(rel, str) or not rel:
        skipped["bad_row"] += 1
        return None
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        skipped["missing_image"] += 1
        if isinstance(skipped, Skipped) and len(skipped.missing) < 3:
            skipped.missing.append(path)
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception:  # PIL raises many types on corrupt files; all mean "skip this one"
        skipped["bad_image"] += 1
        return None


def read_rows(path: str, skipped: Counter, columns: Optional[list] = None) -> Iterator[dict]:
    """Rows of a .jsonl file (one JSON object a line) or a .parquet file (only `columns`), streamed."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only needed here

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow.ArrowInvalid and friends
            raise InputError(f"{path}: not a readable parquet file ({e})") from None
        missing = set(columns or []) - set(table.schema_arrow.names)
        if missing:
            raise InputError(f"{path}: no column(s) {sorted(missing)}; it has {table.schema_arrow.names}")
        for batch in table.iter_batches(batch_size=256, columns=columns):
            yield from batch.to_pylist()
        return
    if not path.endswith(".jsonl"):
        raise InputError(f"{path}: expected a .jsonl or .parquet file")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                skipped["bad_row"] += 1
                continue
            if isinstance(row, dict):
                yield row
            else:
                skipped["bad_row"] += 1


def _text(value) -> Optional[str]:
    """A stripped non-empty string, or None."""
    return (value.strip() or None) if isinstance(value, str) else None


def iter_captions(captions: str, images: str, skipped: Counter, one_per_image: bool = False) -> Iterator[Sample]:
    """Caption samples from a jsonl of {"image": rel_path, "caption": ...} or a COCO captions json."""
    if captions.endswith(".json"):
        try:
            with open(captions, encoding="utf-8") as f:
                coco = json.load(f)
            files = {im["id"]: im["file_name"] for im in coco["images"]}
            rows = [{"image": files.get(a["image_id"]), "caption": a["caption"],
                     "key": f"{a['image_id']}_{a.get('id', i)}"} for i, a in enumerate(coco["annotations"])]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{captions}: not a COCO captions json (needs 'images' with id/file_name "
                             f"and 'annotations' with image_id/caption): {e!r}") from None
        rows.sort(key=lambda r: str(r["image"]))  # group captions of one image: decode it once
    else:
        rows = read_rows(captions, skipped)
    seen, cached = set(), (None, None)
    for row in rows:
        rel, caption = row.get("image"), _text(row.get("caption"))
        if one_per_image and rel in seen:
            continue
        if caption is None:
            skipped["empty_text"] += 1
            continue
        image = cached[1] if cached[0] == rel else open_image(images, rel, skipped)
        if image is None:
            continue
        seen.add(rel)
        cached = (rel, image)
        yield Sample("caption", [caption], target=image, key=str(row.get("key", "")).replace(".", "_"))


def iter_interleaved(rows_path: str, image_root: str, skipped: Counter) -> Iterator[Sample]:
    """Interleaved samples from OBELICS-style rows: parallel `texts` and `images` lists with one of
    the two null at each position; image entries are paths relative to `image_root`."""
    for row in read_rows(rows_path, skipped, columns=["texts", "images"]):
        texts, images = row.get("texts"), row.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            skipped["bad_row"] += 1
            continue
        segments = []
        for text, rel in zip(texts, images):
            if text is not None and rel is not None:  # a position holds a text or an image, not both
                segments = None
                skipped["bad_row"] += 1
                break
            if rel is not None:
                image = open_image(image_root, rel, skipped)
                if image is None:  # one missing image drops the row: it would change the document
                    segments = None
                    break
                segments.append(image)
            elif isinstance(text, str) and text.strip():
                segments.append(text)
        if segments == []:
            skipped["empty_text"] += 1
        elif segments:
            yield Sample("interleaved", segments)


def ip2p_rows(folder: str, skipped: Counter) -> Iterator[dict]:
    """Edit rows of InstructPix2Pix's own release (`download_data.sh clip-filtered-dataset`): `seeds.json`
    lists [name, [seed, ...]]; `<name>/prompt.json` holds the input caption (`input`) and the instruction
    (`edit`); `<name>/<seed>_0.jpg` / `<seed>_1.jpg` are the source and edited images. One row per seed
    (the official loader picks one seed per read; shards keep them all)."""
    try:
        with open(os.path.join(folder, "seeds.json"), encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: no readable seeds.json ({e}); pass a .jsonl of edits or InstructPix2Pix's "
                         "dataset folder (seeds.json, <name>/prompt.json, <name>/<seed>_0.jpg)") from None
    for entry in entries if isinstance(entries, list) else []:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            skipped["bad_row"] += 1
            continue
        name, seeds = entry
        try:
            with open(os.path.join(folder, str(name), "prompt.json"), encoding="utf-8") as f:
                prompt = json.load(f)
        except (OSError, ValueError):
            skipped["bad_row"] += len(seeds)
            continue
        if not isinstance(prompt, dict):
            skipped["bad_row"] += len(seeds)
            continue
        for seed in seeds:
            yield {"input": f"{name}/{seed}_0.jpg", "output": f"{name}/{seed}_1.jpg", "edit": prompt.get("edit"),
                   "input_caption": prompt.get("input"), "key": f"{name}_{seed}"}


def iter_edits(edits: str, image_root: str, skipped: Counter) -> Iterator[Sample]:
    """Edit samples from InstructPix2Pix-style jsonl rows {"input": path, "edit": ..., "output": path,
    "input_caption": ... (optional)}, or from InstructPix2Pix's release folder (`ip2p_rows`).

    The input caption, when there is one, becomes the sample's `InputCaption` (the official prompt is
    `<s> caption <image>source</image> instruction`, the caption dropped with p 0.5 in training)."""
    rows = ip2p_rows(edits, skipped) if os.path.isdir(edits) else read_rows(edits, skipped)
    for row in rows:
        instruction = _text(row.get("edit"))
        if instruction is None:
            skipped["empty_text"] += 1
            continue
        source = open_image(image_root, row.get("input"), skipped)
        target = open_image(image_root, row.get("output"), skipped) if source is not None else None
        if target is not None:
            caption = _text(row.get("input_caption"))
            segments = ([InputCaption(caption)] if caption else []) + [source, instruction]
            yield Sample("edit", segments, target=target, key=str(row.get("key", "")).replace(".", "_"))


def _subject_segments(row: dict, image_root: str, skipped: Counter) -> Optional[list]:
    """The segments of one subjects row, or None after counting why the row is unusable."""
    segments = []
    for seg in row.get("segments") or []:
        if isinstance(seg, dict) and _text(seg.get("text")):
            segments.append(seg["text"])
        elif isinstance(seg, dict) and _text(seg.get("entity")):
            segments.append(Entity(seg["entity"]))
        elif isinstance(seg, dict) and "image" in seg:
            image = open_image(image_root, seg["image"], skipped)
            on_white = None
            if image is not None and "on_white" in seg:
                on_white = open_image(image_root, seg["on_white"], skipped)
            if image is None or ("on_white" in seg and on_white is None):
                return None  # open_image counted why
            segments.append(SubjectImage(image, on_white))
        else:
            skipped["bad_row"] += 1
            return None
    if not segments:
        skipped["bad_row"] += 1
        return None
    return segments


def iter_subjects(subjects: str, image_root: str, skipped: Counter) -> Iterator[Sample]:
    """Subject samples from jsonl rows shaped like the shard JSON, with image paths:
    {"segments": [{"text": ...}, {"entity": ...}, {"image": path, "on_white": path}], "target": path}."""
    for row in read_rows(subjects, skipped):
        segments = _subject_segments(row, image_root, skipped)
        target = open_image(image_root, row.get("target"), skipped) if segments else None
        if target is not None:
            yield Sample("subject", segments, target=target)


def iter_text(docs: str, skipped: Counter, text_field: str = "text") -> Iterator[Sample]:
    """Text samples from a .txt file (one document a line) or a .jsonl file ({text_field: ...})."""
    if docs.endswith(".txt"):
        with open(docs, encoding="utf-8", errors="replace") as f:
            texts = (line.rstrip("\n") for line in f)
            yield from (Sample("text", [t]) for t in texts if t.strip())
        return
    for row in read_rows(docs, skipped):
        text = row.get(text_field)
        if isinstance(text, str) and text.strip():
            yield Sample("text", [text])
        else:
            skipped["empty_text"] += 1


# ---------------------------------------------------------------------------------------------
# command line

# subcommand -> (kind, help, [(flag, help, must be "file" | "dir" | "path" | None)], samples(args, skipped))
SUBCOMMANDS = {
    "captions": ("caption", "image folder + jsonl or COCO captions json", [
        ("--images", "folder the image paths are relative to (alias --image-root; default: the captions "
                     "file's folder)", None),
        ("--captions", '.jsonl of {"image": rel_path, "caption": ...} or a COCO captions .json', "file")],
        lambda a, s: iter_captions(a.captions, a.images, s, a.one_per_image)),
    "interleaved": ("interleaved", "OBELICS/MMC4-style rows with parallel texts/images lists", [
        ("--rows", ".jsonl or .parquet rows with `texts` and `images` lists", "file"),
        ("--image-root", "folder the image paths are relative to (default: the rows file's folder)", None)],
        lambda a, s: iter_interleaved(a.rows, a.image_root, s)),
    "edits": ("edit", "InstructPix2Pix: jsonl of {input, edit, output, input_caption} or the release folder", [
        ("--edits", '.jsonl of {"input": path, "edit": ..., "output": path, "input_caption": ... (optional)}, '
                    "or InstructPix2Pix's dataset folder (seeds.json, <name>/prompt.json)", "path"),
        ("--image-root", "folder the paths are relative to (default: the jsonl's folder / the dataset folder)",
         None)],
        lambda a, s: iter_edits(a.edits, a.image_root, s)),
    "subjects": ("subject", "subject compositions: jsonl of shard-style segments with image paths", [
        ("--subjects", '.jsonl of {"segments": [...], "target": path}', "file"),
        ("--image-root", "folder the paths are relative to (default: the jsonl's folder)", None)],
        lambda a, s: iter_subjects(a.subjects, a.image_root, s)),
    "text": ("text", "text documents from .txt (one a line) or .jsonl", [
        ("--docs", ".txt (one document a line) or .jsonl file", "file")],
        lambda a, s: iter_text(a.docs, s, a.text_field)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kosmos_g.data.convert", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (kind, help_text, inputs, _) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=f"{help_text} -> {kind} shards")
        for flag, flag_help, must_be in inputs:
            aliases = ["--image-root"] if flag == "--images" else []
            sub.add_argument(flag, *aliases, required=must_be is not None, help=flag_help)
        sub.add_argument("--out", required=True, help="output folder for the .tar shards")
        sub.add_argument("--prefix", default=name, help="shard name prefix: <out>/<prefix>-000000.tar")
        sub.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        sub.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                         help="how images are stored (JPEG quality 95 by default)")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "captions":
            sub.add_argument("--one-per-image", action="store_true",
                             help="keep only the first caption of each image (default: one sample per caption)")
        if name == "text":
            sub.add_argument("--text-field", default="text", help="jsonl field holding the document")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kind, _, inputs, make_samples = SUBCOMMANDS[args.command]
    # Image paths are relative to --image-root (--images), by default the input file's folder, for every subcommand.
    source = next(getattr(args, f[2:].replace("-", "_")) for f, _, must_be in inputs if must_be in ("file", "path"))
    for flag in ("images", "image_root"):
        if hasattr(args, flag) and getattr(args, flag) is None:  # a dataset folder is its own image root
            setattr(args, flag, source if os.path.isdir(source) else os.path.dirname(source) or ".")
    for flag, _, must_be in inputs:
        path = getattr(args, flag[2:].replace("-", "_"))
        exists = {"file": os.path.isfile, "dir": os.path.isdir, "path": os.path.exists, None: os.path.isdir}[must_be]
        if path is not None and not exists(path):
            what = {"file": "file", "path": "file or folder"}.get(must_be, "folder")
            print(f"error: {flag} {path}: no such {what}", file=sys.stderr)
            return 2
    skipped = Skipped()
    samples = make_samples(args, skipped)
    try:  # the generators check their input's format on the first step: fail before writing anything
        first = next(samples, None)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = itertools.chain([first] if first is not None else [], samples)
    summary = write_shards(samples, args.out, args.prefix, kind, max_samples_per_shard=args.shard_size,
                           progress=not args.quiet, image_format=args.image_format)
    summary.skipped.update(skipped)
    print(f"{args.command}: {summary}")
    if summary.shards:
        print(f"  {summary.shards[0]} .. {os.path.basename(summary.shards[-1])}")
    root = getattr(args, "images", None) or getattr(args, "image_root", None)
    looked = f"; images not found, e.g. {', '.join(skipped.missing)} (paths are relative to --image-root {root})" \
        if skipped.missing else ""
    if summary.written == 0:
        print(f"error: {args.command} wrote 0 samples{looked}. Check the input rows "
              "(docs/data-format.md) and --image-root.", file=sys.stderr)
        return 1
    if looked:
        print(f"  note{looked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
