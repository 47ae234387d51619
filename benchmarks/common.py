"""What every benchmark shares: threads, machine facts, interleaved timing, tables, JSON, tiny stages.

Rules the scripts follow (BENCHMARKS.md explains why):
  * one `torch.set_num_threads(N)` for the whole process, N = `--threads` (default 1), stated in every
    table header and JSON file: the tiny models are too small for intra-op parallelism to pay, and a
    fixed count keeps runs comparable between machines and leaves cores to DataLoader workers;
  * comparisons run interleaved (A B, B A, A B, ...) after a warm-up, and report medians, so a noisy
    neighbour or a frequency change hits both sides alike; ratios, not absolute times, are the claim;
  * every script prints a table with its ratio on the LAST line and writes `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

# Nothing is downloaded: benchmarks build every model from config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_THREADS = 1


# ---------------------------------------------------------------------------------------------
# set-up and machine facts


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch.set_num_threads for the whole run (default {DEFAULT_THREADS})")
    p.add_argument("--out", type=Path, default=None, help="JSON output path (default benchmarks/results/<name>.json)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where tiny worlds / assets go (default: a fresh temporary folder)")
    return p


def quiet() -> None:
    """No progress bars or load-time warnings from transformers/diffusers/Lightning in the tables."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "kosmos_g"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def set_threads(n: int) -> int:
    """One thread count for the whole process (intra-op); inter-op stays at 1, nothing here uses it."""
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel region
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The facts a number needs next to it: cores, CPU, threads, library versions, GPU."""
    import diffusers
    import transformers

    info = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "gpu": None,
            "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    load = info.get("loadavg_1min_at_start")
    load = f", load average {load:.1f} at start" if load is not None else ""
    return (f"{info['nproc']} cores ({info['cpu']}), torch {info['torch']} with "
            f"{info['torch_threads']} thread(s){gpu}{load}")


# ---------------------------------------------------------------------------------------------
# timing


def sync(device: Optional[torch.device] = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device=None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn` (CUDA work included in wall)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


class Timings:
    """Per name, the wall and the process-CPU seconds of each timed call.

    On a CPU run with one torch thread, CPU time is the cost of the work itself: unlike wall time, it does
    not grow when another process takes the core for a while (shared machines), so CPU-time ratios are the
    headline there, with wall-time ratios next to them. On a GPU, wall time is the only meaningful clock.
    """

    def __init__(self, names: Iterable[str]):
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name].append(wall)
        self.cpu[name].append(cpu)

    def median(self, name: str, clock: str = "wall") -> float:
        return median(getattr(self, clock)[name])

    def ratio(self, a: str, b: str, clock: str = "wall") -> float:
        """median(a) / median(b) on `clock`."""
        return self.median(a, clock) / self.median(b, clock)

    def paired_ratio(self, a: str, b: str, clock: str = "wall") -> float:
        """Median of per-round a/b: robust to slow drifts that a ratio of medians would absorb."""
        xs, ys = getattr(self, clock)[a], getattr(self, clock)[b]
        return median([x / y for x, y in zip(xs, ys)])

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2, device=None) -> Timings:
    """Time each of `fns` `reps` times, alternating after `warmup` untimed rounds.

    The order flips every round (A B, B A, A B, ...) so neither side always runs right after the other.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = Timings(names)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            times.add(name, *clock(fns[name], device))
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def headline_clock(device) -> str:
    """The clock the headline ratios use: process CPU time for a one-thread CPU run, else wall time."""
    return "cpu" if torch.device(device).type == "cpu" and torch.get_num_threads() == 1 else "wall"


class Sections:
    """Named timed sections, each also a `torch.profiler.record_function` range (visible in a trace).

        sections = Sections()
        with sections("unet"):
            ...
        sections.totals  -> {"unet": seconds, ...}

    Nested sections are allowed; a parent's time includes its children's (the tables say which are nested).
    """

    def __init__(self, device=None):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)  # wall seconds
        self.cpu: dict[str, float] = defaultdict(float)  # process CPU seconds
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.profiler.record_function(name):
            yield
        sync(self.device)
        self.totals[name] += time.perf_counter() - w0
        self.cpu[name] += time.process_time() - c0
        self.calls[name] += 1

    def get(self, clock: str = "wall") -> dict[str, float]:
        return dict(self.totals if clock == "wall" else self.cpu)

    def reset(self) -> None:
        self.totals.clear()
        self.cpu.clear()
        self.calls.clear()

    def wrap(self, obj, attr: str, name: str) -> None:
        """Time every call of `obj.<attr>` as section `name` (an instance attribute shadows the method)."""
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)

        setattr(obj, attr, timed)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------------------------------------
# output


def fmt(x) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        if abs(x) >= 0.01:
            return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.2f}"
        return f"{x:.2e}"
    return str(x)


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown pipe table (pastes into BENCHMARKS.md as is)."""
    rows = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def write_json(name: str, payload: dict, out: Optional[Path] = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# ---------------------------------------------------------------------------------------------
# tiny stages, built directly (no Lightning Trainer): what the benchmarks time


STAGES = ("mllm", "align", "instruct")


def tiny_config(stage: str, workdir: Path, *overrides: str):
    """The tiny preset's config of `stage`, with its run (world, assets, exports) under `workdir`."""
    from kosmos_g.config import load_config

    return load_config([f"stage={stage}", f"runs_dir={workdir}", "run_name=bench", "model=tiny", "data=tiny",
                        *overrides])


def tiny_world(cfg, samples: int = 300) -> Path:
    """The tiny world's shards for `cfg` (written once per workdir; PNG, `data.vae_image_size` px)."""
    from kosmos_g.tinyworld.data import write_world_shards

    return write_world_shards(cfg.data.root, seed=cfg.seed, samples=samples, size=cfg.data.vae_image_size)


def build_stage(stage: str, workdir: Path, *overrides: str, samples: int = 300):
    """(cfg, LightningModule, DataModule) of a tiny stage, as `train.py` builds them.

    instruct starts from an align export, written here (untrained weights: timing does not need trained ones).
    The module's `log_dict`/`log` are silenced: there is no Trainer attached.
    """
    from kosmos_g.run import RunPaths, write_export

    cfg = tiny_config(stage, workdir, *overrides)
    tiny_world(cfg, samples)
    paths = RunPaths.create(cfg.runs_dir, cfg.run_name, stage)
    init = None
    if stage == "instruct":
        init = paths.root / "align" / "export"
        if not (init / "manifest.json").is_file():
            _, align_module, _ = build_stage("align", workdir, "init_from=none", samples=samples)
            write_export(init, "align", 0, "benchmark", align_module.export_parts())
    module, data = _stage_module(stage).build(cfg, paths.assets, init)
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    return cfg, module, data


def _stage_module(stage: str):
    import importlib

    return importlib.import_module(f"kosmos_g.stages.{stage}")


def batches(data, n: int, workers: int = 0) -> list[dict]:
    """`n` batches from a DataModule (endless stream), with `skipped` dropped."""
    data.cfg.num_workers = workers
    it = iter(data.train_dataloader())
    out = []
    for _ in range(n):
        b = next(it)
        b.pop("skipped", None)
        out.append(b)
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
