"""Optional precomputed targets for a shard set, stored as sidecar shards keyed like the samples.

    python -m kosmos_g.data.cache clip-text --shards data/caption --text-encoder sd15 --out cache/caption-clip
    python -m kosmos_g.data.cache vae-latents --shards data/edit --kind edit --sd sd15 --size 512 \\
        --out cache/edit-vae

Stage 2 spends much of its time in the frozen CLIP text encoder and stage 3 in the frozen VAE
encoder, and both compute the same thing for a sample at every pass: the CLIP-text hidden states of
the caption, and the VAE posterior (mean and log-variance; the latent drawn from it stays fresh at
every step, see `latents_from_moments`). So they can be computed once.

A cache mirrors its shard set: for each source shard `<name>.tar` a sidecar `<out>/<name>.tar`
holds `<key>.clip.npy` (float [77, d]) or `<key>.moments.npy` (float [8, h, w]) for each usable
sample of that shard, under the sample's own `__key__`; `<out>/cache.json` (written last, so an
interrupted run leaves no cache) records what was computed and how. Keys must be unique in the
shard set. Samples the reader skips, or that are too long for CLIP, have no entry.

Stages use `open_cache(folder)` (None when there is no cache), `cache.check(...)` against their
settings, and `cache.get(sample.key)` in their featurize, falling back to computing when it is None.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import webdataset as wds
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from kosmos_g.config import AlignerConfig
from kosmos_g.data.datamodule import vae_image_transform
from kosmos_g.data.format import SAMPLE_KINDS, TARGET_KINDS, Sample
from kosmos_g.data.shards import decode_samples, shard_urls, tar_samples

META = "cache.json"
MEMBERS = {"clip-text": "clip.npy", "vae-latents": "moments.npy"}


# ---------------------------------------------------------------------------------------------
# reading


class FeatureCache:
    """Random access by sample key to one cache folder. The key index (one small tuple per sample)
    is built from the tar headers on first use, in each process that uses it (DataLoader workers
    included): no file stays open across a pickle."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self._index: Optional[dict] = None
        self._files: dict = {}

    def check(self, **expected) -> None:
        """Raise ValueError unless the cache was made with these settings (e.g. type=, size=)."""
        wrong = {k: self.meta.get(k) for k, v in expected.items() if self.meta.get(k) != v}
        if wrong:
            raise ValueError(f"cache {self.folder} was made with {wrong}, this run needs "
                             f"{ {k: expected[k] for k in wrong} }: rebuild it with `python -m kosmos_g.data.cache "
                             f"{self.meta.get('type')} ... --out {self.folder}` or stop using it")

    @property
    def index(self) -> dict:
        if self._index is None:
            self._index = {}
            for path in sorted(self.folder.glob("*.tar")):
                with tarfile.open(path) as tf:
                    for member in tf:  # headers only: tarfile seeks over the data
                        key = member.name.split(".", 1)[0]
                        self._index[key] = (str(path), member.offset_data, member.size)
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> Optional[torch.Tensor]:
        """The cached float32 tensor of sample `key`, or None when the cache has no entry for it."""
        entry = self.index.get(key)
        if entry is None:
            return None
        path, offset, size = entry
        if path not in self._files:
            self._files[path] = open(path, "rb")
        f = self._files[path]
        f.seek(offset)
        array = np.load(io.BytesIO(f.read(size)), allow_pickle=False)
        return torch.from_numpy(array.astype(np.float32))

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


def open_cache(folder: Optional[str | os.PathLike]) -> Optional[FeatureCache]:
    """The cache in `folder`, or None when there is none (no folder, or an unfinished one)."""
    if folder is None or not (Path(folder) / META).is_file():
        return None
    return FeatureCache(folder)


def latents_from_moments(moments: torch.Tensor, scaling_factor: float, sample: bool = True,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cached VAE moments [..., 8, h, w] -> scaled latents [..., 4, h, w], exactly as
    `FrozenDiffusion.encode_images` does: a fresh posterior sample (or the mean with sample=False), from the
    VAE's own posterior class."""
    lead, (c, h, w) = moments.shape[:-3], moments.shape[-3:]
    posterior = DiagonalGaussianDistribution(moments.float().reshape(-1, c, h, w))  # it splits dim 1
    latents = posterior.sample(generator) if sample else posterior.mode()
    return (latents * scaling_factor).reshape(*lead, c // 2, h, w)


# ---------------------------------------------------------------------------------------------
# computing


def _part_dir(folder: Path, part: str) -> Path:
    """`folder/part` of a Stable Diffusion-layout folder, or `folder` itself when it is the part."""
    return folder / part if (folder / part).is_dir() else folder


class ClipTextTargets:
    """Captions -> CLIP-text last hidden states [max_tokens, d], computed as stage 2 does: the stripped
    text's token ids (with <bos>/<eos>) padded with the pad token to `max_tokens`, no attention mask."""

    def __init__(self, folder: str, max_tokens: int = AlignerConfig.num_queries, device: str = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(_part_dir(folder, "tokenizer"), local_files_only=True)
        self.encoder = CLIPTextModel.from_pretrained(_part_dir(folder, "text_encoder"), local_files_only=True)
        self.encoder.to(device).eval()
        self.max_tokens, self.device = max_tokens, device
        self.meta = {"max_tokens": max_tokens, "hidden_size": self.encoder.config.hidden_size}

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[Optional[np.ndarray]]:
        ids = [self.tokenizer(s.text.strip()).input_ids for s in samples]
        fits = [i for i, x in enumerate(ids) if len(x) <= self.max_tokens]  # the others are skipped as too_long
        out: list = [None] * len(samples)
        if fits:
            pad = self.tokenizer.pad_token_id
            batch = torch.tensor([ids[i] + [pad] * (self.max_tokens - len(ids[i])) for i in fits], device=self.device)
            states = self.encoder(batch).last_hidden_state.float().cpu().numpy()
            for row, i in enumerate(fits):
                out[i] = states[row]
        return out


class VaeMoments:
    """Target images -> VAE posterior moments [8, h, w] (mean, log-variance) of
    `vae_image_transform(size)(target)`, the training-time target crop."""

    def __init__(self, folder: str, size: int, device: str = "cpu"):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(_part_dir(Path(folder), "vae"), local_files_only=True)
        self.vae.to(device).eval()
        self.transform, self.device = vae_image_transform(size), device
        self.meta = {"size": size, "scaling_factor": float(self.vae.config.scaling_factor)}

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[Optional[np.ndarray]]:
        pixels = torch.stack([self.transform(s.target) for s in samples]).to(self.device, self.vae.dtype)
        return list(self.vae.encode(pixels).latent_dist.parameters.float().cpu().numpy())


def write_cache(shards, kind: str, out: str, compute: Callable[[list[Sample]], list], cache_type: str,
                meta: dict, batch_size: int = 32, dtype: str = "float16") -> dict:
    """Run `compute` over the usable samples of `shards` (of `kind`) into sidecar shards in `out`;
    returns (and writes as cache.json) the metadata with counts written and skipped by reason."""
    urls = shard_urls(shards)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("source shards must have distinct file names: their sidecars share one folder")
    os.makedirs(out, exist_ok=True)
    (Path(out) / META).unlink(missing_ok=True)  # unfinished until written again at the end
    member, seen, skipped, written = MEMBERS[cache_type], set(), Counter(), 0
    for url, name in zip(urls, names):
        samples = decode_samples(tar_samples([{"url": url}], skipped), kind, skipped)
        with wds.TarWriter(os.path.join(out, name), mtime=int(time.time())) as sink:
            while batch := list(itertools.islice(samples, batch_size)):
                for sample, value in zip(batch, compute(batch)):
                    if value is None:
                        skipped["too_long"] += 1
                        continue
                    if sample.key in seen:
                        raise ValueError(f"duplicate sample key {sample.key!r} (in {url}): a cache needs keys "
                                         "unique across the shard set; rewrite the shards with unique keys")
                    seen.add(sample.key)
                    buf = io.BytesIO()
                    np.save(buf, value.astype(dtype))
                    sink.write({"__key__": sample.key, member: buf.getvalue()})
                    written += 1
    meta = {"type": cache_type, "kind": kind, "member": member, "dtype": dtype, **meta,
            "shards": urls, "written": written, "skipped": dict(skipped)}
    (Path(out) / META).write_text(json.dumps(meta, indent=2))
    return meta


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kosmos_g.data.cache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    clip = sub.add_parser("clip-text", help="CLIP-text targets of the captions (stage 2)")
    clip.add_argument("--text-encoder", required=True,
                      help="local folder: a Stable Diffusion folder (text_encoder/, tokenizer/) or a CLIP text model+tokenizer")
    clip.add_argument("--max-tokens", type=int, default=AlignerConfig.num_queries,
                      help="CLIP length incl. <bos>/<eos>: the U-Net condition length, model.aligner.num_queries "
                           f"(default {AlignerConfig.num_queries})")
    vae = sub.add_parser("vae-latents", help="VAE posterior moments of the target images (stage 3)")
    vae.add_argument("--sd", required=True, help="local Stable Diffusion-layout folder with vae/")
    vae.add_argument("--size", type=int, required=True, help="target crop size (data.vae_image_size)")
    for p, default_kind in ((clip, "caption"), (vae, "caption")):
        p.add_argument("--shards", required=True, help="the shard set: folder of .tar, brace pattern or path")
        p.add_argument("--kind", default=default_kind, choices=SAMPLE_KINDS,
                       help=f"its sample kind (default {default_kind})")
        p.add_argument("--out", required=True, help="output folder for the sidecar shards")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = args.text_encoder if args.command == "clip-text" else args.sd
    if not os.path.isdir(model_dir):
        print(f"error: {model_dir}: no such folder (nothing is downloaded; give a local model folder)", file=sys.stderr)
        return 2
    if args.command == "vae-latents" and args.kind not in TARGET_KINDS:
        print(f"error: {args.kind!r} samples have no target image to encode", file=sys.stderr)
        return 2
    try:
        urls = shard_urls(args.shards)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "clip-text":
        compute = ClipTextTargets(model_dir, args.max_tokens, args.device)
    else:
        compute = VaeMoments(model_dir, args.size, args.device)
    meta = write_cache(urls, args.kind, args.out, compute, args.command, {"model": model_dir, **compute.meta},
                       args.batch_size, args.dtype)
    skipped = ", ".join(f"{r}={n}" for r, n in Counter(meta["skipped"]).most_common()) or "none"
    print(f"{args.command}: cached {meta['written']} samples of {len(urls)} shard(s) in {args.out}; "
          f"skipped {sum(meta['skipped'].values())} ({skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
