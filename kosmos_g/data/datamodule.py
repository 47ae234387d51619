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

Resume. The stream is a function of the step: it is cut into segments of `segment_steps` steps
(train.py sets `trainer.checkpoint_every_n_steps`, so segments start where periodic checkpoints are
written), and segment k is seeded by (seed, k * segment_steps) alone. A run resumed from a periodic
checkpoint therefore reads exactly the batches the uninterrupted run read from that step on. A
checkpoint between boundaries (preemption) is exact too when `fast_forward` is on (train.py:
`trainer.exact_data_resume`, default): the stream replays its segment from the boundary and drops the
batches before the resumed step (featurized, not collated or trained on: at most one segment of data
loading). With it off, the partial segment is seeded by the resumed step instead: a fresh stream, so
until the next boundary some samples come twice and others not yet ("approximate"). Exactness needs the
same seed, shards, batch size, world size and `data.num_workers`: DataLoader workers hand out batches in
turn, so worker w of a run starting at step S makes the batches of steps S + w, S + w + W, ... (its
"lane", (S + w) mod W, not its worker id, picks its share of the shards).
Each segment starts a fresh, reshuffled pass over every kind, so over a long run every shard is read
about equally often rather than exactly once per pass; with many shards per reader that is the same
statistics, and it is what makes the stream stateless. `segment_steps=None` (the default outside
train.py, and with `epochs`) is one segment from `start_step`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import v2 as T
from webdataset.utils import pytorch_worker_info

from kosmos_g.config import ConfigError, DataConfig, TrainConfig
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
    """(rank, world size): the RANK/WORLD_SIZE env, else torch.distributed when initialised (webdataset's rule)."""
    rank, world_size, _, _ = pytorch_worker_info()
    return rank, world_size


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
                 max_chars: Optional[int] = MAX_CHARS, segment_steps: Optional[int] = None,
                 fast_forward: bool = True, pack_length: Optional[int] = None,
                 length: Optional[Callable[[dict], int]] = None):
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}); check RANK / WORLD_SIZE")
        self.sources, self.weights = sources, weights
        self.featurize, self.collate = featurize, collate
        self.pack_length, self.length = pack_length, length  # rows of whole samples (stage.pack_length)
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.start_step, self.epochs, self.max_chars = seed, start_step, epochs, max_chars
        self.rank, self.world_size = rank, world_size
        self.segment_steps, self.fast_forward = segment_steps, fast_forward
        if pack_length is not None and length is None:
            raise ValueError("pack_length needs length(features) -> tokens")
        self.pack_length, self.length = pack_length, length

    def reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks x DataLoader workers (lanes, see above)."""
        lane, workers = self._lane()
        return self.rank * workers + lane, self.world_size * workers

    def _lane(self) -> tuple[int, int]:
        _, _, worker, workers = pytorch_worker_info()
        return (self.start_step + worker) % workers, workers

    def _raw(self, kind: str, urls: list[str], epoch: int, index: int, count: int, skipped: Counter, seed_step: int):
        """This reader's raw samples of one pass over `urls`."""
        # The shard order is the same on every reader (seeded without the reader index), so the
        # split below is a partition; it changes every pass and every segment.
        order = list(urls)
        random.Random(f"{self.seed}-{seed_step}-{kind}-{epoch}").shuffle(order)
        if len(order) >= count:  # enough shards: each reader reads whole shards of its own
            return tar_samples([{"url": u} for u in order[index::count]], skipped)
        # Fewer shards than readers: all read everything and keep every count-th sample. A tar-level
        # error is then seen by every reader, so only reader 0 counts it (exact totals).
        tar_counts = skipped if index == 0 else Counter()
        return itertools.islice(tar_samples([{"url": u} for u in order], tar_counts), index, None, count)

    def _features(self, kind: str, urls: list[str], index: int, count: int, skipped: Counter,
                  seed_step: int) -> Iterator:
        """Endless (or `epochs` passes of) featurized samples of one kind for this reader."""
        rng = random.Random(f"{self.seed}-{seed_step}-{kind}-{index}-{count}")
        passes = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in passes:
            raws = iter(self._raw(kind, urls, epoch, index, count, skipped, seed_step))
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

    def _samples(self, seed_step: int, skipped: Counter) -> Iterator[list]:
        """Lists of `batch_size` featurized samples (the last may be short with `epochs`), seeded by `seed_step`."""
        index, count = self.reader()
        rng = random.Random(f"{self.seed}-{seed_step}-mixture-{index}-{count}")
        streams = {kind: self._features(kind, urls, index, count, skipped, seed_step)
                   for kind, urls in self.sources.items()}
        batch, used = [], []  # packing: rows (lists of samples) and their token counts
        while streams:
            kinds = list(streams)
            kind = rng.choices(kinds, [self.weights[k] for k in kinds])[0]
            try:
                sample = next(streams[kind])
            except StopIteration:  # only with `epochs`: this kind is done, mix the rest
                del streams[kind]
                continue
            if self.pack_length is None:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
                continue
            # Packing: whole samples, first fit into `batch_size` rows of `pack_length` tokens (a sample, and so
            # an image's slots, is never split); a sample that fits no row closes the batch and opens the next.
            n = self.length(sample)
            row = next((i for i, u in enumerate(used) if u + n <= self.pack_length), None)
            if row is None and len(batch) == self.batch_size:
                yield batch
                batch, used = [], []
            if row is None:
                batch.append([sample])
                used.append(n)
            else:
                batch[row].append(sample)
                used[row] += n
        if batch:
            yield batch

    def __iter__(self) -> Iterator[dict]:
        if self.epochs is not None or not self.segment_steps:  # one segment from start_step
            skipped, reported = Counter(), Counter()
            for batch in self._samples(self.start_step, skipped):
                yield self._emit(batch, skipped, reported)
            return
        lane, workers = self._lane()
        size = self.segment_steps
        step = self.start_step + (lane - self.start_step) % workers  # the step of this reader's first batch
        while True:
            boundary = step // size * size
            end = boundary + size
            first = boundary + (lane - boundary) % workers  # this lane's first step in the segment
            replay = self.fast_forward or step == first  # else: resumed mid-segment, approximate
            skipped, reported = Counter(), Counter()
            batches = self._samples(boundary if replay else step, skipped)
            if replay and step > first:  # drop this lane's batches of the segment that come before `step`
                for _ in range((step - first) // workers):
                    next(batches)
                reported.update(skipped)  # their skipped samples were counted by the run that trained on them
            while step < end:
                yield self._emit(next(batches), skipped, reported)
                step += workers

    def _emit(self, batch: list, skipped: Counter, reported: Counter) -> dict:
        out = self.collate(batch)
        out["skipped"] = dict(skipped - reported)  # only what is new since this reader's last batch
        reported.update(out["skipped"])
        return out


def resume_settings(cfg: TrainConfig, global_step: Optional[int]) -> dict:
    """The DataModule's stream settings for a training run that starts at optimizer step `global_step` (0: fresh;
    None: the defaults, one segment from step 0, for tests and tools). The stream counts micro-batches (gradient
    accumulation makes each optimizer step several) and its segments start where periodic checkpoints are written."""
    if global_step is None:
        return {}
    accumulate = cfg.stage.accumulate_grad_batches
    return {"start_step": global_step * accumulate, "segment_steps": cfg.trainer.checkpoint_every_n_steps * accumulate,
            "fast_forward": cfg.trainer.exact_data_resume}


class KosmosGDataModule(L.LightningDataModule):
    """`train_dataloader()` yields `collate([featurize(sample, rng), ...])` dicts plus `"skipped"`.

    `start_step`, `segment_steps`, `fast_forward`: where the stream starts and how it is cut (see the module
    docstring; train.py passes `resume_settings`). `epochs` (None: endless, as training wants) limits the number
    of passes, for evaluation and tests."""

    def __init__(self, cfg: DataConfig, stage: str, batch_size: int, featurize: Callable[[Sample, random.Random], dict],
                 collate: Callable[[list], dict], seed: int = 0, pack_length: Optional[int] = None,
                 length: Optional[Callable[[dict], int]] = None, start_step: int = 0,
                 segment_steps: Optional[int] = None, fast_forward: bool = True):
        super().__init__()
        if stage not in cfg.mixture:
            raise ConfigError(f"data.mixture has no entry for stage {stage!r}; it has {sorted(cfg.mixture)}")
        self.cfg, self.stage, self.batch_size, self.seed = cfg.derive(), stage, batch_size, seed  # null: derived
        self.featurize, self.collate = featurize, collate
        self.pack_length, self.length = pack_length, length  # rows of whole samples (stage.pack_length)
        self.start_step, self.segment_steps, self.fast_forward = start_step, segment_steps, fast_forward
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
                             epochs=self.epochs, segment_steps=self.segment_steps, fast_forward=self.fast_forward,
                             pack_length=self.pack_length, length=self.length)

    def check_sources(self) -> None:
        """Fail now, with a ConfigError, if a kind of this stage's mixture has no usable sample.

        Reads each kind until its first usable sample (one shard, no shuffle buffer), so train.py can refuse
        an empty or unreadable dataset before it touches the run folder, instead of mid-fit.
        """
        sources = self.sources()
        probe = MixtureStream(sources, dict(self.cfg.mixture[self.stage]), self.featurize, self.collate,
                              self.batch_size, 0, self.seed, rank=0, world_size=1)
        for kind, urls in sources.items():
            skipped = Counter()
            try:
                next(iter(probe._features(kind, urls, 0, 1, skipped, 0)))
            except EmptySourceError as e:
                raise ConfigError(f"stage={self.stage}: {e}") from None

    def train_dataloader(self) -> DataLoader:
        stream = self.stream()
        log.info("data: stage=%s rank %d/%d, %d worker(s), kinds %s, start_step=%d", self.stage, stream.rank,
                 stream.world_size, self.cfg.num_workers, {k: len(v) for k, v in stream.sources.items()},
                 self.start_step)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, worker_init_fn=_worker_init,
                          persistent_workers=self.cfg.num_workers > 0 and self.epochs is None)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals (SIGTERM / SIGUSR1 reach the whole process group):
    the main process writes the checkpoint and shuts them down; a worker killed first would crash the run."""
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
