"""What the controller's graph outputs cost a decode step on the GPU, part by part (issue 11).

One context of `--cells` cells on the GPU, filled to `--depth` tokens; then decode steps with the outputs switched
on one at a time, each variant measured from the same depth (the steps it decoded are removed again), rounds
interleaved. Variants: `base` (no output), `entropy` (the entropy of the last logits row), `score` (entropy +
importance of every `--importance-every`-th layer, as the GPU default), `score+q` (the same with the queries
exported, as the controller runs it: recall reads them).

  python scripts/gpu_score_cost.py --model M.gguf --json out.json
  # kernel by kernel, one step of one variant, under Nsight Compute:
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \\
      python scripts/gpu_score_cost.py --model M.gguf --ncu score > score.csv
  python scripts/gpu_score_cost.py --parse score.csv
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


VARIANTS = ("base", "entropy", "score", "score+q")


def parse(path: str) -> None:
    """Sum ncu's per-kernel durations by kernel name (the first 60 characters)."""
    rows = [r for r in csv.reader(line for line in open(path) if line.startswith('"'))]
    head, body = rows[0], rows[1:]
    name, value, unit = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
    by = defaultdict(lambda: [0, 0.0])
    total = 0.0
    for r in body:
        us = float(r[value].replace(",", "")) / (1000.0 if r[unit] in ("ns", "nsecond") else 1.0)
        by[r[name][:60]][0] += 1
        by[r[name][:60]][1] += us
        total += us
    print(f"{len(body)} kernels, {total:.1f} us")
    for k, (n, us) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{us:9.1f} us {n:5d}  {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--cells", type=int, default=8448)
    ap.add_argument("--depth", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--importance-every", type=int, default=4)
    ap.add_argument("--n-q", type=int, default=32)
    ap.add_argument("--ncu", choices=VARIANTS, help="profile one step of this variant (cuProfilerStart/Stop)")
    ap.add_argument("--parse", metavar="CSV", help="sum an ncu --csv output by kernel")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.parse:
        parse(args.parse)
        return

    import numpy as np

    from asrkf_gguf import KVCache
    from asrkf_gguf.llama import ContextOptions, LlamaSession

    opts = ContextOptions(n_ctx=args.cells, n_batch=512, n_ubatch=512, n_gpu_layers=99, flash_attn="on")
    rng = np.random.default_rng(0)
    with LlamaSession(args.model, opts) as s, KVCache(ctx=s.context) as kv:
        toks = rng.integers(100, min(s.n_vocab, 30000), size=args.depth + args.steps + 16).tolist()
        s.decode(toks[:args.depth], 0)
        layers = kv.layers().tolist()[::-1][::args.importance_every][::-1]
        score = np.zeros(len(toks), np.float32)
        mass = np.zeros(len(toks), np.float32)

        def setup(v: str) -> None:
            kv.set_entropy(v != "base")
            kv.set_importance(v in ("score", "score+q"), n_q=args.n_q, layers=layers, export_q=v == "score+q")

        def run(v: str, steps: int, profile: bool = False) -> list:
            setup(v)
            pos = args.depth
            for i in range(8):  # the graph is built and the CUDA graph captured on these
                s.decode(toks[pos + i:pos + i + 1], pos + i)
            pos += 8
            cuda = ctypes.CDLL("libcuda.so.1") if profile else None
            if cuda is not None:
                cuda.cuProfilerStart()
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                s.decode(toks[pos + i:pos + i + 1], pos + i)
                if v != "base":
                    kv.entropy()
                if v in ("score", "score+q"):  # the controller's per-step read: folded into its arrays
                    kv.importance_fold(score, mass, pos + i + 1, ema=0.1)
                times.append(time.perf_counter() - t0)
            if cuda is not None:
                cuda.cuProfilerStop()
            if not s.seq_rm(args.depth, -1):
                raise RuntimeError("seq_rm refused")
            return times

        if args.ncu:
            run(args.ncu, 1, profile=True)
            return
        res = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                t = run(v, args.steps)
                res[v].append(1e3 * statistics.median(t))
        out = {"args": vars(args), "layers": layers, "step_ms": res,
               "median_ms": {v: statistics.median(r) for v, r in res.items()}}
        base = out["median_ms"]["base"]
        for v in VARIANTS:
            r = res[v]
            print(f"{v:8s} step {statistics.median(r):.3f} ms [{min(r):.3f}-{max(r):.3f}]  "
                  f"+{1e3 * (statistics.median(r) - base):.0f} us over base")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
