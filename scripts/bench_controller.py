"""Controller overhead per generated token at 1k / 8k / 32k logical tokens (issue 3's target: <= 2% of a decode
step of the 0.5B quality model on CPU).

  python scripts/bench_controller.py [--reference-model GGUF]

The controller's work grows with the logical length (numpy over the token table) and with the device budget
(importance read back per resident cell), not with the model's size, so it runs on a tiny written model at a
4,096-cell budget; the decode step it is compared with is measured on the reference model (default: Qwen2.5-Coder
0.5B Q4_K_M, fetched with pip) at the same budget.
"""

from __future__ import annotations

import argparse

import numpy as np

import asrkf_gguf  # noqa: F401
from asrkf_gguf.controller import Controller, ControllerConfig
from asrkf_gguf.generate import generate
from asrkf_gguf.kv import KVCache
from asrkf_gguf.llama import ContextOptions, LlamaSession
from asrkf_gguf.policies import make_policy
from asrkf_gguf.testmodels import TinyModelSpec, tiny_model
from bench_native import bench_decode  # scripts/ is on the path when this runs as a script

BUDGET = 4096


def controller_us_per_token(n_logical: int, n_gen: int) -> float:
    path = str(tiny_model(TinyModelSpec(n_ctx_train=65536)))
    tokens = np.random.default_rng(0).integers(3, 500, size=n_logical).tolist()
    budget = min(BUDGET, n_logical + n_gen + 64)
    with LlamaSession(path, ContextOptions(n_ctx=budget, n_batch=512, n_ubatch=512, flash_attn="on")) as s, \
            KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf"), ControllerConfig(budget_cells=budget))
        generate(s, ctl, tokens, 0)
        before = ctl.stats.seconds
        generate(s, ctl, [7], n_gen)
        return 1e6 * (ctl.stats.seconds - before) / n_gen


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-model")
    ap.add_argument("--gen", type=int, default=64)
    args = ap.parse_args()
    if args.reference_model:
        ref = args.reference_model
    else:
        from asrkf_gguf.models import fetch_qwen_coder_model

        ref = str(fetch_qwen_coder_model(progress=False))
    step_ms = 1e3 / bench_decode(ref, BUDGET, 32, attach=False)["tokens_per_s"]
    print(f"reference decode step ({ref.split('/')[-1]}, depth {BUDGET}, CPU): {step_ms:.2f} ms\n")
    print("| logical tokens | controller µs/token | share of a decode step |")
    print("|---|---|---|")
    for n in (1024, 8192, 32768):
        us = controller_us_per_token(n, args.gen)
        print(f"| {n} | {us:.0f} | {100 * us / (1e3 * step_ms):.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
