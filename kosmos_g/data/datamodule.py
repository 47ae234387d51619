"""The one LightningDataModule every stage uses: a weighted mixture of webdataset shard sets.

Per stage, `data.mixture.<stage>` names the sample kinds and their weights. Every reader (one
DataLoader worker of one rank) reads a disjoint part of every kind's shards: whole shards when a
kind has at least as many shards as there are readers, otherwise every reader reads all shards and
keeps every k-th sample. It shuffles raw samples through a buffer, decodes them into `Sample`s
(`shards.decode_sample`), turns them into features with the stage's `featurize`, and batches them.

Bad data never crashes a run: a corrupt sample (`shards.decode_sample`) or one the stage rejects
(`featurize` raising `BadSample`, e.g. too many tokens) is skipped and counted by reason, and the
counts new since the previous batch ride along as `batch["skipped"]` so the LightningModule can log
them. Each sample is counted by the one reader that owns it, so the counts summed over all batches
of all readers are exact. Only a source with nothing usable in a whole pass is an error (raised
after that pass, instead of spinning forever).

Resume: `start_step` (set by the trainer on resume) re-seeds the stream. Given the same seed,
`start_step`, shard lists and reader count, the batches are identical from run to run; that is
exact for the seeded tiny data (the tiny world regenerates the same shards from its seed). What is
*not* restored is the position inside the pass that was running when the job stopped: the resumed
run starts a fresh, differently shuffled pass, so until that pass ends a few samples may be seen
twice and others not yet. For the large, effectively infinite streams of the paper preset (far
fewer steps than samples) that is statistically the same as continuing, and it is what one can do
without checkpointing every reader's shard offsets and shuffle buffer; hence "approximate".
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from kosmos_g.config import ConfigError, DataConfig
from kosmos_g.data.convert import SUBCOMMANDS
from kosmos_g.data.format import Sample
from kosmos_g.data.shards import MAX_CHARS, BadSample, decode_sample, shard_urls, tar_samples

log = logging.getLogger(__name__)


def vae_image_transform(size: int) -> T.Compose:
    """A target image for the VAE: resize the short side to `size`, centre-crop `size` x `size`,
    scale to [-1, 1] (what SD's VAE was trained on). Returns a float32 [3, size, size] tensor."""
    return T.Compose([
        # Resizing the uint8 image keeps values in [0, 255] (no bicubic overshoot past [-1, 1]).
        T.ToImage(), T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3),
    ])


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the RANK/WORLD_SIZE env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class EmptySourceError(RuntimeError):
    """A source that gave this reader no usable sample in a whole pass (an endless stream would spin)."""


class MixtureStream(IterableDataset):
    """Collated batches mixed from several shard sets; endless unless `epochs` is set.

    `sources` maps kind -> shard paths, `weights` kind -> sampling weight (per delivered sample).
    `rank`/`world_size` default to `rank_and_world()` read when the stream is built, i.e. in the
    main process, where torch.distributed is initialised (DataLoader workers may not see it).
    With `epochs` set, every kind is read that many times and the last batch may be short.
    """

    def __init__(self, sources: dict[str, list[str]], weights: dict[str, float], featurize: Callable,
                 collate: Callable, batch_size: int, shuffle_buffer: int, seed: int, start_step: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, epochs: Optional[int] = None,
                 max_chars: Optional[int] = MAX_CHARS):
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}); check RANK / WORLD_SIZE")
        self.sources, self.weights = sources, weights
        self.featurize, self.collate = featurize, collate
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.start_step, self.epochs, self.max_chars = seed, start_step, epochs, max_chars
        self.rank, self.world_size = rank, world_size

    def reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks x DataLoader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _raw(self, kind: str, urls: list[str], epoch: int, index: int, count: int, skipped: Counter):
        """This reader's raw samples of one pass over `urls`."""
        # The shard order is the same on every reader (seeded without the reader index), so the
        # split below is a partition; it changes every pass and with `start_step`.
        order = list(urls)
        random.Random(f"{self.seed}-{self.start_step}-{kind}-{epoch}").shuffle(order)
        if len(order) >= count:  # enough shards: each reader reads whole shards of its own
            return tar_samples([{"url": u} for u in order[index::count]], skipped)
        # Fewer shards than readers: all read everything and keep every count-th sample. A tar-level
        # error is then seen by every reader, so only reader 0 counts it (exact totals).
        tar_counts = skipped if index == 0 else Counter()
        return itertools.islice(tar_samples([{"url": u} for u in order], tar_counts), index, None, count)

    def _features(self, kind: str, urls: list[str], index: int, count: int, skipped: Counter) -> Iterator:
        """Endless (or `epochs` passes of) featurized samples of one kind for this reader."""
        rng = random.Random(f"{self.seed}-{self.start_step}-{kind}-{index}-{count}")
        passes = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in passes:
            raws = iter(self._raw(kind, urls, epoch, index, count, skipped))
            if self.shuffle_buffer > 1:
                raws = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(raws)
            n_raw = n_used = 0
            for raw in raws:
                n_raw += 1
                try:
                    features = self.featurize(decode_sample(raw, kind, self.max_chars), rng)
                except BadSample as e:
                    skipped[e.reason] += 1
                    log.debug("skipping %s sample %r from %s: %s", kind, raw.get("__key__"), raw.get("__url__"), e)
                    continue
                n_used += 1
                yield features
            if n_used == 0 and self.epochs is None:
                share = (f"{len(urls)} shard(s)" if count == 1 else
                         f"reader {index} of {count} (ranks x workers), "
                         + ("whole shards" if len(urls) >= count else f"every {count}-th sample"))
                few = " (fewer samples than the readers?)" if len(urls) < count else ""
                why = (f"this reader got no sample at all{few}" if n_raw == 0 else f"all {n_raw} were skipped")
                why += f"; skipped so far, all kinds: {dict(skipped)}"
                raise EmptySourceError(
                    f"no usable {kind!r} sample in a whole pass over {share} ({urls[0]} ...): {why}. "
                    f"Fix or rewrite these shards (docs/data-format.md), or set this kind's mixture weight to 0.")

    def __iter__(self) -> Iterator[dict]:
        index, count = self.reader()
        rng = random.Random(f"{self.seed}-{self.start_step}-mixture-{index}-{count}")
        skipped, reported = Counter(), Counter()
        streams = {kind: self._features(kind, urls, index, count, skipped) for kind, urls in self.sources.items()}
        batch = []
        while streams:
            kinds = list(streams)
            kind = rng.choices(kinds, [self.weights[k] for k in kinds])[0]
            try:
                batch.append(next(streams[kind]))
            except StopIteration:  # only with `epochs`: this kind is done, mix the rest
                del streams[kind]
                continue
            if len(batch) == self.batch_size:
                yield self._emit(batch, skipped, reported)
                batch = []
        if batch:
            yield self._emit(batch, skipped, reported)

    def _emit(self, batch: list, skipped: Counter, reported: Counter) -> dict:
        out = self.collate(batch)
        out["skipped"] = dict(skipped - reported)  # only what is new since this reader's last batch
        reported.update(out["skipped"])
        return out


class KosmosGDataModule(L.LightningDataModule):
    """`train_dataloader()` yields `collate([featurize(sample, rng), ...])` dicts plus `"skipped"`.

    Set `start_step` (the global step) before `train_dataloader()` on resume; `epochs` (None:
    endless, as training wants) limits the number of passes, for evaluation and tests."""

    def __init__(self, cfg: DataConfig, stage: str, batch_size: int, featurize: Callable[[Sample, random.Random], dict],
                 collate: Callable[[list], dict], seed: int = 0):
        super().__init__()
        if stage not in cfg.mixture:
            raise ConfigError(f"data.mixture has no entry for stage {stage!r}; it has {sorted(cfg.mixture)}")
        self.cfg, self.stage, self.batch_size, self.seed = cfg, stage, batch_size, seed
        self.featurize, self.collate = featurize, collate
        self.start_step = 0  # set by the trainer script on resume
        self.epochs: Optional[int] = None

    def sources(self) -> dict[str, list[str]]:
        """Shard paths per kind of this stage's mixture; a missing or empty source is a ConfigError."""
        out = {}
        mixture = dict(self.cfg.mixture[self.stage])
        for kind, weight in mixture.items():
            if weight <= 0:
                continue
            override = self.cfg.shards.get(kind)
            spec = override or str(Path(self.cfg.root) / kind)
            try:
                out[kind] = shard_urls(spec)
            except FileNotFoundError as e:
                key = f"data.shards.{kind}" if override else f"data.root (looked in <root>/{kind})"
                command = next(name for name, (k, *_) in SUBCOMMANDS.items() if k == kind)
                raise ConfigError(
                    f"no {kind!r} shards for stage={self.stage} (mixture {mixture}): {e}. Set by {key}. Write "
                    f"them with `python -m kosmos_g.data.convert {command} ... --out {spec}` (docs/data-format.md), "
                    f"point {key.split(' ')[0]} at existing shards, or set data.mixture.{self.stage}.{kind}=0.") from None
        return out

    def stream(self) -> MixtureStream:
        return MixtureStream(self.sources(), dict(self.cfg.mixture[self.stage]), self.featurize, self.collate,
                             self.batch_size, self.cfg.shuffle_buffer, self.seed, self.start_step,
                             epochs=self.epochs)

    def train_dataloader(self) -> DataLoader:
        stream = self.stream()
        log.info("data: stage=%s rank %d/%d, %d worker(s), kinds %s, start_step=%d", self.stage, stream.rank,
                 stream.world_size, self.cfg.num_workers, {k: len(v) for k, v in stream.sources.items()},
                 self.start_step)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0 and self.epochs is None)
