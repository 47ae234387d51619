"""Write the tiny world's training shards (every sample kind) through the project's own shard writer.

    python -m kosmos_g.tinyworld.data --out runs/tiny/data [--samples 3000] [--seed 0] [--size 32]

`data=tiny` reads them from `data.root` (default `runs/<run_name>/data`); `make demo` writes its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from kosmos_g.data.shards import write_shards
from kosmos_g.tinyworld import world

DONE = "tinyworld.json"
# Recorded in DONE: bump it when a generator's output changes, so roots written before are rewritten
# (2: edit samples carry their source's caption as an InputCaption; 3: a third of subject samples show two).
VERSION = 3
# Relative sample counts per kind (interleaved documents hold several images each).
KIND_SHARE = {"text": 1.0, "caption": 1.0, "interleaved": 0.5, "subject": 1.0, "edit": 1.0}
_GENERATORS = {
    "text": lambda n, seed, size: world.text_samples(n, seed),
    "caption": lambda n, seed, size: world.caption_samples(n, seed, size=size),
    "interleaved": lambda n, seed, size: world.interleaved_samples(n, seed, size=size),
    "subject": lambda n, seed, size: world.subject_samples(n, seed, size=size),
    "edit": lambda n, seed, size: world.edit_samples(n, seed, size=size),
}


def write_world_shards(root: str | Path, seed: int = 0, samples: int = 3000, size: int = 32,
                       per_shard: int = 250) -> Path:
    """Write `<root>/<kind>/*.tar` for every kind (train split), once: a finished root is reused as is."""
    root = Path(root)
    counts = {kind: max(1, int(samples * share)) for kind, share in KIND_SHARE.items()}
    wanted = {"version": VERSION, "seed": seed, "counts": counts, "size": size}
    done = root / DONE
    if done.is_file() and json.loads(done.read_text()) == wanted:
        return root
    t0 = time.perf_counter()
    for kind, n in counts.items():
        tmp = root / f"{kind}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        summary = write_shards(_GENERATORS[kind](n, seed, size), str(tmp), f"tiny-{kind}", kind,
                               max_samples_per_shard=per_shard, progress=False, image_format="png")
        shutil.rmtree(root / kind, ignore_errors=True)
        tmp.rename(root / kind)
        print(f"[tinyworld] {kind}: {summary}")
    done.write_text(json.dumps(wanted))
    print(f"[tinyworld] shards in {root} ({time.perf_counter() - t0:.1f} s)")
    return root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kosmos_g.tinyworld.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the shards' root: <out>/<kind>/*.tar (data.root)")
    parser.add_argument("--samples", type=int, default=3000, help="samples per kind (interleaved: half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (data.vae_image_size)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write_world_shards(args.out, seed=args.seed, samples=args.samples, size=args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
