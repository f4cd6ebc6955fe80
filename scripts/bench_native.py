"""Native-core benchmarks (CPU here; the GPU numbers belong to the CUDA issue).

  python scripts/bench_native.py                       # offload/thaw throughput + decode with/without handle
  python scripts/bench_native.py --stock-lib DIR       # also decode t/s of an unpatched libllama of the same commit
  python scripts/bench_native.py --kv-shape-model 8 --rpc 127.0.0.1:50052 --n-gpu-layers 99 --moves-only
                                                       # moves with the KV on ggml-rpc-servers (docs/placement.md)

Decode runs in subprocesses so that each one loads its own libllama.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def bench_moves(model: str, kv_type: str, fa: str, n_tokens: int, n_move: int, reps: int, n_gpu_layers: int = 0,
                rpc: tuple = (), n_threads=None) -> dict:
    from asrkf_gguf import KVCache
    from asrkf_gguf.llama import ContextOptions, LlamaSession

    with LlamaSession(model, ContextOptions(n_ctx=n_tokens + 256, kv_type=kv_type, flash_attn=fa, n_batch=512,
                                            n_ubatch=512, n_gpu_layers=n_gpu_layers, rpc=rpc,
                                            n_threads=n_threads)) as s, KVCache(ctx=s.context) as kv:
        tokens = np.random.default_rng(0).integers(3, min(s.n_vocab, 30000), size=n_tokens).tolist()
        s.decode(tokens, 0)
        res = {"kv_type": kv_type, "flash_attn": fa, "bytes_per_token": kv.info().kv_bytes_per_token}
        before = kv.info().n_copies
        res.update(time_moves(kv, n_tokens, n_move, reps, np.random.default_rng(1)))
        # device copy calls per move (over RPC: a get is one round trip, a set is sent without waiting)
        res["copies_per_move"] = (kv.info().n_copies - before) / (2 * 2 * reps)
        kv.check()
        return res


def kv_shape_model(n_layer: int) -> str:
    """A random-weight model whose K/V rows are Llama-3-8B's (8 KV heads of 128: 4 KiB of f16 K+V per token and
    layer) with n_layer layers and small matrices elsewhere: moves of an 8B-shaped cache per layer, quick to load."""
    from asrkf_gguf.testmodels import TinyModelSpec, tiny_model

    return str(tiny_model(TinyModelSpec(arch="llama", n_layer=n_layer, n_embd=1024, n_head=8, n_head_kv=8,
                                        head_dim=128, n_ff=256, n_vocab=512, n_ctx_train=16384, dtype="f16")))


def time_moves(kv, n_tokens: int, n_move: int, reps: int, rng, layouts=("contiguous", "scattered")) -> dict:
    """Median offload and thaw of n_move of the first n_tokens positions, per layout: GB/s and us per token."""
    bytes_per_token = kv.info().kv_bytes_per_token
    res = {}
    for layout in layouts:
        t_off, t_thaw = [], []
        for _ in range(reps):
            if layout == "contiguous":
                start = int(rng.integers(4, n_tokens - n_move - 1))
                pos = np.arange(start, start + n_move)
            else:
                pos = np.sort(rng.choice(np.arange(4, n_tokens - 1), n_move, replace=False))
            t0 = time.perf_counter()
            kv.offload(pos)
            t1 = time.perf_counter()
            kv.thaw(pos)
            t2 = time.perf_counter()
            t_off.append(t1 - t0)
            t_thaw.append(t2 - t1)
        nbytes = n_move * bytes_per_token
        for name, t in (("offload", t_off), ("thaw", t_thaw)):
            med = float(np.median(t))
            res[f"{layout}_{name}_GBps"] = nbytes / med / 1e9
            res[f"{layout}_{name}_us_per_token"] = med / n_move * 1e6
    return res


def bench_decode(model: str, depth: int, n_gen: int, attach: bool) -> dict:
    from asrkf_gguf.llama import ContextOptions, LlamaSession

    tokens = np.random.default_rng(0).integers(100, 30000, size=depth + n_gen).tolist()
    with LlamaSession(model, ContextOptions(n_ctx=depth + n_gen + 16, n_batch=512, n_ubatch=512,
                                            flash_attn="on")) as s:
        kv = None
        if attach:
            from asrkf_gguf import KVCache

            kv = KVCache(ctx=s.context)
        if depth:
            s.decode(tokens[:depth], 0)
        times = []
        for i in range(n_gen):
            t0 = time.perf_counter()
            s.decode([tokens[depth + i]], depth + i)
            times.append(time.perf_counter() - t0)
        if kv:
            kv.close()
    return {"depth": depth, "tokens_per_s": 1.0 / float(np.median(times))}


def decode_in_subprocess(lib_dir: str | None, model: str, depth: int, n_gen: int, attach: bool) -> dict:
    env = dict(os.environ)
    if lib_dir:
        env["ASRKF_GGUF_LIB_DIR"] = lib_dir
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_native as b; print(json.dumps(b.bench_decode({model!r}, {depth}, {n_gen}, {attach})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="GGUF (default: the SmolLM2 demo model)")
    ap.add_argument("--stock-lib", help="folder with an unpatched libllama of llama.cpp 0c1e570")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--move", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers (and their KV) on the GPU")
    ap.add_argument("--moves-only", action="store_true", help="skip the decode comparison")
    ap.add_argument("--rpc", help="HOST:PORT[,HOST:PORT]: llama.cpp RPC servers for the --n-gpu-layers layers and "
                                  "their KV (moves only)")
    ap.add_argument("--kv-shape-model", type=int, metavar="N_LAYER",
                    help="instead of --model: a random model of N_LAYER layers with Llama-3-8B's K/V rows")
    ap.add_argument("--threads", type=int, help="CPU threads of the context (default: the physical cores)")
    ap.add_argument("--kv-cases", default="f16:off,f16:on,q8_0:on,q4_0:on", help="KV type:flash attention pairs")
    args = ap.parse_args()

    import asrkf_gguf  # noqa: F401
    from asrkf_gguf.models import fetch_demo_model

    if args.kv_shape_model:
        model = kv_shape_model(args.kv_shape_model)
    else:
        model = args.model or str(fetch_demo_model(progress=False))
    rpc = tuple(args.rpc.split(",")) if args.rpc else ()
    if rpc:
        args.moves_only = True
    results = {"model": model, "rpc": list(rpc), "n_gpu_layers": args.n_gpu_layers, "moves": [], "decode": []}
    for case in args.kv_cases.split(","):
        kv_type, fa = case.split(":")
        results["moves"].append(bench_moves(model, kv_type, fa, args.tokens, args.move, args.reps, args.n_gpu_layers,
                                            rpc, args.threads))
    variants = [("patched, no handle", None, False), ("patched, handle attached", None, True)]
    if args.stock_lib:
        variants.insert(0, ("stock", args.stock_lib, False))
    for depth in (() if args.moves_only else (0, 1024)):
        for name, lib, attach in variants:
            r = decode_in_subprocess(lib, model, depth, args.gen, attach)
            r["variant"] = name
            results["decode"].append(r)

    print(f"model: {model}\n")
    print("| KV | FA | bytes/token | layout | offload GB/s | offload us/token | thaw GB/s | thaw us/token "
          "| copies/move |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["moves"]:
        for layout in ("contiguous", "scattered"):
            print(f"| {r['kv_type']} | {r['flash_attn']} | {r['bytes_per_token']} | {layout} "
                  f"| {r[layout + '_offload_GBps']:.2f} | {r[layout + '_offload_us_per_token']:.2f} "
                  f"| {r[layout + '_thaw_GBps']:.2f} | {r[layout + '_thaw_us_per_token']:.2f} "
                  f"| {r['copies_per_move']:.0f} |")
    print("\n| variant | depth | decode tok/s |")
    print("|---|---|---|")
    for r in results["decode"]:
        print(f"| {r['variant']} | {r['depth']} | {r['tokens_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
