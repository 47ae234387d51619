"""Webdataset tar shards for every sample kind: the byte layout, written and read back.

One shard set holds one kind. Members of a sample share the key `<key>` (no dots in it: webdataset
splits a member name at the first dot, so `<key>.img0.jpg` reaches us as the field "img0.jpg").

| kind                      | members                                                          |
|---------------------------|------------------------------------------------------------------|
| text                      | `<key>.txt`                                                      |
| caption                   | `<key>.jpg` (or .jpeg/.png/.webp) + `<key>.txt` (+ `<key>.json`, ignored) |
| interleaved/subject/edit  | `<key>.json` + `<key>.img0.jpg`, `<key>.img1.jpg`, ... (+ `<key>.target.jpg`) |

The JSON of the last three kinds is `{"kind": ..., "segments": [...]}` where each segment is one of
`{"text": "..."}`, `{"image": "img0.jpg"}`, `{"entity": "red circle"}` (subject only),
`{"image": "img1.jpg", "on_white": "img1w.jpg"}` (subject only) or `{"input_caption": "..."}` (edit
only, before the source image); image values name members of the same sample.
Images are stored as JPEG quality 95 (or PNG) and always decoded to RGB. docs/data-format.md has
the full description with byte-level examples.

A corrupt sample raises `BadSample(reason)` in `decode_sample`; `read_shards` skips it and counts
the reason, so bad data costs a counter tick, never a crashed run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Iterator, Optional, Sequence, Union

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from kosmos_g.data.format import SAMPLE_KINDS, TARGET_KINDS, Entity, InputCaption, Sample, SubjectImage

log = logging.getLogger(__name__)

MAX_CHARS = 4000
"""Default limit on the text of a caption / subject / edit prompt (documents are not limited)."""
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions the reader accepts, in lookup order."""
IMAGE_FORMATS = {"jpeg": ("jpg", "JPEG"), "png": ("png", "PNG")}
"""`image_format` argument -> (member extension, PIL format name)."""
REASONS = ("bad_tar", "missing_member", "bad_image", "bad_json", "bad_text", "empty_text",
           "text_too_long", "wrong_kind", "bad_layout")
"""Every reason `decode_sample` / `read_shards` count a skipped sample under."""


class BadSample(ValueError):
    """A sample that cannot be used. `reason` is a short tag (one of `REASONS`) to count by."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# checks shared by both directions


def check_sample(sample: Sample, max_chars: Optional[int] = MAX_CHARS) -> None:
    """Raise BadSample unless `sample` has the segment layout of its kind (see format.py) with
    non-empty texts, and (caption/subject/edit) at most `max_chars` characters of text."""
    kind, segments = sample.kind, sample.segments
    allowed = {"text": (str,), "caption": (str,), "interleaved": (str, Image.Image),
               "subject": (str, Entity, SubjectImage, Image.Image),
               "edit": (str, InputCaption, Image.Image)}[kind]
    for seg in segments:
        if not isinstance(seg, allowed):
            raise BadSample("bad_layout", f"{type(seg).__name__} segment in a {kind} sample")
        text = seg.text if isinstance(seg, (Entity, InputCaption)) else seg
        if isinstance(text, str) and not text.strip():
            raise BadSample("empty_text", f"sample {sample.key!r} has an empty text segment")
    if kind in ("text", "caption") and len(segments) != 1:
        raise BadSample("bad_layout", f"a {kind} sample has exactly one text segment")
    if kind == "edit":
        body = segments[1:] if segments and isinstance(segments[0], InputCaption) else segments
        if not (len(body) == 2 and isinstance(body[0], Image.Image) and isinstance(body[1], str)):
            raise BadSample("bad_layout", "an edit sample is [input caption (optional), source image, "
                            "instruction]")
    if kind in TARGET_KINDS and max_chars is not None:
        if len(sample.text) > max_chars:
            raise BadSample("text_too_long", f"{len(sample.text)} > max_chars={max_chars} characters")


# ---------------------------------------------------------------------------------------------
# Sample -> webdataset dict


def encode_image(image: Image.Image, image_format: str = "jpeg", quality: int = 95) -> tuple[str, bytes]:
    """(member extension, bytes) of `image` as RGB JPEG (quality `quality`) or PNG."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}; use one of {', '.join(IMAGE_FORMATS)}")
    ext, pil_format = IMAGE_FORMATS[image_format]
    buf = io.BytesIO()
    image = image if image.mode == "RGB" else image.convert("RGB")  # JPEG has no alpha; readers want RGB
    image.save(buf, format=pil_format, **({"quality": quality} if pil_format == "JPEG" else {}))
    return ext, buf.getvalue()


def encode_sample(sample: Sample, image_format: str = "jpeg", quality: int = 95,
                  max_chars: Optional[int] = MAX_CHARS) -> dict:
    """The webdataset dict (`__key__` plus member bytes) storing `sample` in the layout above.
    Raises BadSample for data that the reader would reject, ValueError for a key it cannot store."""
    key = sample.key
    if not key or "." in key:
        raise ValueError(f"sample key {key!r} must be non-empty and have no '.' (webdataset splits "
                         "member names at the first dot); replace the dots, e.g. key.replace('.', '_')")
    check_sample(sample, max_chars)
    raw = {"__key__": key}
    if sample.kind in ("text", "caption"):
        raw["txt"] = sample.segments[0].encode("utf-8")
        if sample.kind == "caption":
            ext, raw_image = encode_image(sample.target, image_format, quality)
            raw[ext] = raw_image
        return raw

    def add_image(image: Image.Image, name: str) -> str:
        ext, raw_image = encode_image(image, image_format, quality)
        raw[f"{name}.{ext}"] = raw_image
        return f"{name}.{ext}"

    segments, n_images = [], 0
    for seg in sample.segments:
        if isinstance(seg, str):
            segments.append({"text": seg})
        elif isinstance(seg, Entity):
            segments.append({"entity": seg.text})
        elif isinstance(seg, InputCaption):
            segments.append({"input_caption": seg.text})
        else:
            image = seg.image if isinstance(seg, SubjectImage) else seg
            segments.append({"image": add_image(image, f"img{n_images}")})
            if isinstance(seg, SubjectImage) and seg.on_white is not None:
                segments[-1]["on_white"] = add_image(seg.on_white, f"img{n_images}w")
            n_images += 1
    if sample.target is not None:
        add_image(sample.target, "target")
    raw["json"] = json.dumps({"kind": sample.kind, "segments": segments}, ensure_ascii=False).encode("utf-8")
    return raw


# ---------------------------------------------------------------------------------------------
# webdataset dict -> Sample


def _member(raw: dict, name: str) -> bytes:
    data = raw.get(name.lower())  # webdataset lower-cases member extensions
    if data is None or name.startswith("_"):  # "__key__", "__url__" are webdataset's, not members
        raise BadSample("missing_member", f"no member {name!r} (has {sorted(k for k in raw if k[0] != '_')})")
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"member {name!r} is {type(data).__name__}, not bytes: give decode_sample the raw "
                        "webdataset sample (no .decode() in the pipeline)")
    return bytes(data)


def _text(raw: dict, name: str) -> str:
    try:
        return _member(raw, name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", f"{name} is not UTF-8 ({e})") from None


def _image(raw: dict, name) -> Image.Image:
    if not isinstance(name, str):
        raise BadSample("bad_json", f"image reference {name!r} is not a member name")
    data = _member(raw, name)
    if not data:
        raise BadSample("bad_image", f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # decodes now: a truncated file fails here, not in a transform
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad bytes
        raise BadSample("bad_image", f"{name}: {type(e).__name__}: {e}") from None


def _first_image(raw: dict, stem: str) -> Image.Image:
    """The image member `<stem>jpg` (or .jpeg/.png/.webp)."""
    for ext in IMAGE_EXTS:
        if stem + ext in raw:
            return _image(raw, stem + ext)
    raise BadSample("missing_member", f"no {stem}{{{','.join(IMAGE_EXTS)}}} member")


def _json_segments(raw: dict, kind: str) -> list:
    try:
        doc = json.loads(_member(raw, "json"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample("bad_json", str(e)[:200]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
        raise BadSample("bad_json", 'expected {"kind": ..., "segments": [...]}')
    if doc.get("kind") != kind:
        raise BadSample("wrong_kind", f"JSON kind {doc.get('kind')!r}, reading {kind!r} shards")
    segments = []
    for seg in doc["segments"]:
        keys = set(seg) if isinstance(seg, dict) else None
        if keys == {"text"} and isinstance(seg["text"], str):
            segments.append(seg["text"])
        elif keys == {"entity"} and isinstance(seg["entity"], str):
            segments.append(Entity(seg["entity"]))
        elif keys == {"input_caption"} and isinstance(seg["input_caption"], str):
            segments.append(InputCaption(seg["input_caption"]))
        elif keys in ({"image"}, {"image", "on_white"}):
            image = _image(raw, seg["image"])
            if kind == "subject":
                on_white = _image(raw, seg["on_white"]) if "on_white" in seg else None
                segments.append(SubjectImage(image, on_white))
            elif "on_white" in seg:
                raise BadSample("bad_layout", f"on_white in a {kind} sample (subject samples only)")
            else:
                segments.append(image)
        else:
            raise BadSample("bad_json", f"bad segment {str(seg)[:100]}")
    return segments


def decode_sample(raw: dict, kind: str, max_chars: Optional[int] = MAX_CHARS) -> Sample:
    """Parse one raw webdataset sample (members as bytes) of shards of `kind` into a Sample.
    Pure (no I/O, no counters); raises BadSample(reason) for any corrupt or unusable sample."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(SAMPLE_KINDS)}")
    key = str(raw.get("__key__", ""))
    target = None
    if kind in ("text", "caption"):
        segments = [_text(raw, "txt")]
        if kind == "caption":
            target = _first_image(raw, "")
    else:
        segments = _json_segments(raw, kind)
        if kind != "interleaved":
            target = _first_image(raw, "target.")
    if not segments:
        raise BadSample("bad_layout", "no segments")
    sample = Sample(kind=kind, segments=segments, target=target, key=key)
    check_sample(sample, max_chars)
    return sample


# ---------------------------------------------------------------------------------------------
# whole shard sets


@dataclass
class WriteSummary:
    """What `write_shards` did: samples written, samples skipped by reason, shard files written."""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: list = field(default_factory=list)

    def __str__(self) -> str:
        skipped = ", ".join(f"{r}={n}" for r, n in self.skipped.most_common()) or "none"
        return (f"wrote {self.written} samples to {len(self.shards)} shard(s); "
                f"skipped {sum(self.skipped.values())} ({skipped})")


def write_shards(samples: Iterable[Sample], out_dir: str, prefix: str, kind: str,
                 max_samples_per_shard: int = 1000, progress: bool = True, *,
                 image_format: str = "jpeg", quality: int = 95, max_chars: Optional[int] = MAX_CHARS,
                 max_shard_bytes: float = 1e9) -> WriteSummary:
    """Write `samples` (all of `kind`) to `out_dir/<prefix>-000000.tar`, `-000001.tar`, ...

    A new shard starts after `max_samples_per_shard` samples or `max_shard_bytes` bytes. Samples
    without a key get their index (`000000042`). Samples the reader would reject (empty or too
    long text) are skipped and counted; a sample of another kind is a ValueError."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(SAMPLE_KINDS)}")
    if not prefix or any(c in prefix for c in "/\\%."):
        raise ValueError(f"prefix {prefix!r} must be a plain file name stem (no '/', '%' or '.')")
    if max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    summary = WriteSummary()
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    last_key = None
    # A whole-second mtime: webdataset's default float time.time() costs a 1 KB pax header per member.
    with wds.ShardWriter(pattern, maxcount=max_samples_per_shard, maxsize=max_shard_bytes,
                         post=summary.shards.append, verbose=0, mtime=int(time.time())) as sink:
        for index, sample in enumerate(tqdm(samples, desc=f"writing {prefix}", unit="sample",
                                            disable=not progress)):
            if sample.kind != kind:
                raise ValueError(f"sample {sample.key or index!r} is a {sample.kind!r} sample but this "
                                 f"shard set holds {kind!r}: write each kind with its own write_shards call")
            if not sample.key:
                sample = dataclasses.replace(sample, key=f"{index:09d}")
            if sample.key == last_key:  # adjacent equal keys would merge into one sample on reading
                raise ValueError(f"duplicate sample key {sample.key!r}; keys must be unique")
            try:
                sink.write(encode_sample(sample, image_format, quality, max_chars))
            except BadSample as e:
                summary.skipped[e.reason] += 1
                log.debug("skipping sample %r: %s", sample.key, e)
                continue
            last_key = sample.key
            summary.written += 1
    if summary.written == 0:  # ShardWriter opens its first shard eagerly; do not leave an empty tar
        for path in summary.shards:
            os.remove(path)
        summary.shards.clear()
    return summary


def shard_urls(spec: Union[str, os.PathLike, Sequence[str]]) -> list[str]:
    """Shard list from a brace pattern ("data/cap-{000000..000009}.tar"), a folder of .tar files,
    one path, or a list of those. Local shards must exist (a typo should not read as zero samples)."""
    if not isinstance(spec, (str, os.PathLike)):
        return [url for item in spec for url in shard_urls(item)]
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        urls = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in folder {spec}; write some with "
                                    "`python -m kosmos_g.data.convert`")
        return urls
    urls = wds.shardlists.expand_urls(spec)  # braces, "::"-joined lists, ${WDS_*} variables
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url):
            raise FileNotFoundError(f"shard not found: {url}")
    return urls


class CountTarErrors:
    """A webdataset `handler=`: count a tar-level error (unopenable shard, duplicate member name) as
    "bad_tar", log it, and go on reading."""

    def __init__(self, counts: Counter):
        self.counts = counts

    def __call__(self, exn: Exception) -> bool:
        self.counts["bad_tar"] += 1
        log.warning("skipping unreadable shard data: %s", exn)
        return True


def _shard_members(streams: Iterable[dict], handler: CountTarErrors) -> Iterator[dict]:
    """webdataset's tar_file_expander, except that a shard failing part-way (truncated, not a tar)
    is handled once, not once per member, and its stream is closed. The members it yielded before
    the failure stay: the sample cut in two is then rejected by decode_sample (missing_member)."""
    for source in streams:
        try:
            for member in wds.tariterators.tar_file_iterator(source["stream"]):  # raises on bad data
                member["__url__"] = source["url"]
                yield member
        except Exception as exn:  # tarfile.ReadError, EOFError, OSError, zlib.error... all mean "bad tar"
            handler(exn.__class__(f"{source['url']}: {exn}"))
        finally:
            source["stream"].close()
        yield {}  # end-of-shard marker: group_by_keys never merges samples of two shards


def tar_samples(shards: Iterable[dict], counts: Counter) -> Iterator[dict]:
    """Pipeline stage: shard dicts (`url=...`, as SimpleShardList / ResampledShards yield them) ->
    raw webdataset samples, counting every unreadable shard or tar-level error as "bad_tar"."""
    handler = CountTarErrors(counts)
    streams = wds.tariterators.url_opener(shards, handler=handler)
    return wds.tariterators.group_by_keys(_shard_members(streams, handler), handler=handler)


def decode_samples(raws: Iterable[dict], kind: str, counts: Counter,
                   max_chars: Optional[int] = MAX_CHARS) -> Iterator[Sample]:
    """Pipeline stage: decode raw samples, skipping each BadSample and counting its reason."""
    for raw in raws:
        try:
            yield decode_sample(raw, kind, max_chars)
        except BadSample as e:
            counts[e.reason] += 1
            log.debug("skipping sample %r from %s: %s", raw.get("__key__"), raw.get("__url__"), e)


def read_shards(urls, kind: str, handler_counts: Optional[Counter] = None,
                max_chars: Optional[int] = MAX_CHARS) -> wds.DataPipeline:
    """A webdataset pipeline (an IterableDataset) yielding the good Samples of shards of `kind`.

    `urls` is anything `shard_urls` takes. Every corrupt sample is skipped and its reason counted
    into `handler_counts` (in the process that iterates: DataLoader workers keep their own copy);
    an unreadable or truncated shard counts once as "bad_tar". A DataModule can assemble the same
    stages itself: shard list, `tar_samples`, its shuffle, `decode_samples`, its transforms."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(SAMPLE_KINDS)}")
    counts = handler_counts if handler_counts is not None else Counter()
    return wds.DataPipeline(
        wds.SimpleShardList(shard_urls(urls)),
        wds.split_by_worker,
        partial(tar_samples, counts=counts),
        partial(decode_samples, kind=kind, counts=counts, max_chars=max_chars),
    )
