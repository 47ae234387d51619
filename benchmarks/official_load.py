"""Loading a released Kosmos-G checkpoint never reads its optimizer state: memory with and without one.

    python -m benchmarks.official_load [--optimizer-mib 1024]

Two fake fairseq checkpoints hold the same small `model` dict; one also carries a `last_optimizer_state` of
`--optimizer-mib` MiB (the released files carry several GB). Each is loaded and converted in a fresh process
(`kosmos_g.official.load_fairseq_checkpoint` + `convert_state_dict`, as `python -m kosmos_g.convert official`
does), and a third process loads the big one the naive way (`torch.load(weights_only=True)` without mmap)
for contrast. Measured: resident memory added by load + convert (after the imports, references kept alive).
Ratio on the last line: (RSS added with the optimizer state - without) / its size; goal <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

MODEL = {"gpt_model.decoder.embed_tokens.weight": (64007, 64), "gpt_model.decoder.layer_norm.weight": (64,),
         "gpt_model.decoder.layers.0.ffn.fc1.weight": (256, 64)}


def write(path: Path, optimizer_mib: int) -> None:
    model = {k: torch.randn(shape).half() for k, shape in MODEL.items()}
    numel = optimizer_mib * 2**20 // 4 // 2
    optimizer = {"state": {0: {"exp_avg": torch.full((numel,), 0.5), "exp_avg_sq": torch.full((numel,), 0.25)}}}
    torch.save({"model": model, "cfg": {"model": {"decoder_attention_heads": 4}}, "optimizer_history": [],
                "extra_state": {}, "last_optimizer_state": optimizer if optimizer_mib else None}, path)


def child(path: str, how: str) -> dict:
    from kosmos_g.official import convert_state_dict, load_fairseq_checkpoint

    before = common.rss_mib()  # after the imports, whose transient peak would hide everything else
    if how == "naive":
        kept = torch.load(path, map_location="cpu", weights_only=True)  # the whole dict stays alive, as a naive loader's
        sd = kept["model"]
    else:
        kept = load_fairseq_checkpoint(path)
        sd = kept.model
    conv = convert_state_dict(sd, progress=False)
    return {"rss_added_mib": common.rss_mib() - before, "tensors": sum(len(p) for p in conv.parts.values())}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--optimizer-mib", type=int, default=1024)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.set_threads(args.threads)
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small, big = Path(tmp) / "small.pt", Path(tmp) / "big.pt"
        write(small, 0)
        write(big, args.optimizer_mib)
        runs = {}
        for name, path, how in (("safe, no optimizer state", small, "safe"), ("safe", big, "safe"),
                                ("naive torch.load", big, "naive")):
            out = subprocess.run([sys.executable, "-m", "benchmarks.official_load", "--threads", str(args.threads),
                                  "--child", str(path), how], capture_output=True, text=True, check=True)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = runs["safe, no optimizer state"]["rss_added_mib"]
    print(f"threads {args.threads}; {common.machine_line(common.machine())}; optimizer state {args.optimizer_mib} MiB")
    print(common.table(["load + convert", "RSS added MiB", "extra vs no optimizer state MiB"],
                       [[n, r["rss_added_mib"], r["rss_added_mib"] - base] for n, r in runs.items()]))
    ratio = (runs["safe"]["rss_added_mib"] - base) / args.optimizer_mib
    common.write_json("official_load", {"runs": runs, "optimizer_mib": args.optimizer_mib, "ratio": ratio}, args.out)
    print(f"extra RSS / optimizer state size: {ratio:.3f} (goal <= 0.05)")


if __name__ == "__main__":
    main()
