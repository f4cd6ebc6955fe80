"""Speed, memory and exactness of the patched llama.cpp on a GPU (issue 5), each side by side in one run.

  python scripts/gpu_bench.py --model M.gguf --stock-lib DIR --json out.json        # the H200 run
  python scripts/gpu_bench.py --model small.gguf --scale 0.0625 --n-gpu-layers 0   # a dry run on a CPU

scripts/gpu_bench.sh builds everything and calls this; --scale shrinks every context length for dry runs.
Sections (each a function returning plain dicts; stock-vs-patched ones run in subprocesses, one libllama each):
  exactness  offload -> thaw logits bit-identical, freeze == seq_rm, per KV type and flash-attention setting
  decode     stock vs patched (no handle) vs patched (handle attached, controller off): decode t/s per depth
  budget     asrkf at 32k logical tokens with 50/25/12.5% device budgets vs the full cache: t/s, KV bytes
  moves      offload / thaw GB/s vs host<->device copy bandwidth (PyTorch pinned copies, when importable)
  importance per-step cost of the importance node per layer selection (flash attention on)
  long       64k logical tokens through a 16k-cell device budget, with its memory curve
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N_WARMUP = 8  # first decode steps of a context: CUDA graph capture and allocator growth


def _tokens(n: int, seed: int) -> list:
    # random ids below 30000: inside the vocabulary of every model this is run with (the benchmark model's and
    # the dry-run models'); the text means nothing, only the shapes and the cache traffic count here
    return np.random.default_rng(seed).integers(16, 30000, size=n).tolist()


def _session(model: str, n_ctx: int, kv_type: str = "f16", fa: str = "on", n_gpu_layers: int = 99, **kw):
    from asrkf_gguf.llama import ContextOptions, LlamaSession

    return LlamaSession(model, ContextOptions(n_ctx=n_ctx, kv_type=kv_type, flash_attn=fa, n_gpu_layers=n_gpu_layers,
                                              n_batch=kw.pop("n_batch", 2048), n_ubatch=kw.pop("n_ubatch", 512), **kw))


def _loaded_libraries() -> list:
    """The libllama / libggml files this process mapped: proves which build a variant ran."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libllama" in line or "libggml" in line}
    return sorted(paths)


def _gpu_memory_used_mib() -> float | None:
    """Whole-GPU memory in use (nvidia-smi): this benchmark is alone on the GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _timed_steps(session, tokens: list, pos0: int) -> np.ndarray:
    times = []
    for i, t in enumerate(tokens):
        t0 = time.perf_counter()
        session.decode([t], pos0 + i)
        times.append(time.perf_counter() - t0)
    return np.array(times[N_WARMUP:])


# ---- exactness


def exactness(model: str, kv_type: str, fa: str, n_tokens: int, n_gpu_layers: int) -> dict:
    """Same checks as tests/test_roundtrip.py and tests/test_freeze.py, on the benchmark model."""
    from asrkf_gguf import KVCache

    import llama_cpp

    n_ctx = n_tokens + 64
    probe_at = n_tokens - 1
    tokens = _tokens(n_tokens, 11)
    rng = np.random.default_rng(12)
    # f16 with flash attention off stores V transposed: one copy per channel and run, so fewer runs there
    n_scattered = 8 if fa == "off" else n_tokens // 4
    run_len = n_tokens // 16
    scattered = rng.choice(np.arange(4, probe_at - 2 * run_len), n_scattered, replace=False)
    run = np.arange(probe_at - 2 * run_len, probe_at - run_len)
    moved = np.unique(np.concatenate([scattered, run]))
    frozen = np.sort(rng.choice(np.arange(4, probe_at - 1), 64, replace=False))

    with _session(model, n_ctx, kv_type, fa, n_gpu_layers, n_seq_max=2) as s:
        s.decode(tokens[:-1], 0)
        expected = s.decode(tokens[-1:], probe_at)
    with _session(model, n_ctx, kv_type, fa, n_gpu_layers, n_seq_max=2) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:-1], 0)
        t0 = time.perf_counter()
        kv.offload(moved)
        t1 = time.perf_counter()
        kv.thaw(moved)
        t2 = time.perf_counter()
        kv.check()
        got = s.decode(tokens[-1:], probe_at)
        gathers = kv.info().n_gathers
    roundtrip_identical = bool(np.array_equal(expected, got))

    with _session(model, n_ctx, kv_type, fa, n_gpu_layers, n_seq_max=2) as ref:
        ref.decode(tokens[:-1], 0)
        for p in frozen:
            ref.seq_rm(int(p), int(p) + 1)
        # refill the freed cells with another sequence, so the probe lands in the same cell as in the frozen run
        ref.batch.reset()
        ref.batch.add_sequence(tokens[: len(frozen)], 1, False)
        if llama_cpp.llama_decode(ref.ctx, ref.batch.batch) != 0:
            raise RuntimeError("could not park the reference's second sequence")
        removed = ref.decode(tokens[-1:], probe_at)
    with _session(model, n_ctx, kv_type, fa, n_gpu_layers, n_seq_max=2) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:-1], 0)
        kv.freeze(frozen)
        masked = s.decode(tokens[-1:], probe_at)
    return {"kv_type": kv_type, "flash_attn": fa, "n_tokens": n_tokens, "n_moved": int(moved.size),
            "roundtrip_bit_identical": roundtrip_identical, "offload_s": t1 - t0, "thaw_s": t2 - t1,
            "gathers": gathers, "logits_finite": bool(np.isfinite(expected).all()),
            "freeze_vs_seq_rm_max_abs": float(np.max(np.abs(masked - removed))),
            "logit_scale": float(np.std(expected))}


# ---- decode: stock vs patched


def decode_depths(model: str, depths: list, n_gen: int, attach: bool, n_gpu_layers: int) -> dict:
    n_ctx = max(depths) + n_gen + 16
    with _session(model, n_ctx, n_gpu_layers=n_gpu_layers) as s:
        kv = None
        if attach:
            from asrkf_gguf import KVCache

            kv = KVCache(ctx=s.context)
        tokens = _tokens(max(depths) + n_gen, 21)
        filled, out = 0, {}
        for depth in sorted(depths):
            if depth > filled:
                s.decode(tokens[filled:depth], filled)
            filled = depth
            steps = _timed_steps(s, tokens[depth:depth + n_gen], depth)
            s.seq_rm(depth, -1)
            # step_s: every timed step (seconds, after the N_WARMUP warm-up steps), for the report's pooled
            # medians and bootstrap intervals
            out[str(depth)] = {"tokens_per_s": 1.0 / float(np.median(steps)), "ms_p90": 1e3 * float(np.percentile(steps, 90)),
                               "step_s": [float(x) for x in steps]}
        if kv:
            kv.close()
    return {"depths": out, "libraries": _loaded_libraries()}


# ---- asrkf under a device budget vs the full cache


def _controller(s, policy_name: str, budget_cells: int, controller_params=None):
    from asrkf_gguf import KVCache
    from asrkf_gguf.controller import Controller, ControllerConfig
    from asrkf_gguf.policies import make_policy

    kv = KVCache(ctx=s.context)
    ctrl = Controller(kv, make_policy(policy_name), ControllerConfig(budget_cells=budget_cells,
                                                                      **(controller_params or {})))
    return kv, ctrl


def _prefill(s, ctrl, tokens: list, on_chunk=None) -> float:
    chunk = s.options.n_batch
    if ctrl.policy.uses_budget:
        chunk = min(chunk, ctrl.config.budget_cells - ctrl.policy.n_sinks - ctrl.policy.recent - 1)
    t0 = time.perf_counter()
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        ctrl.make_room(len(part))
        s.decode(part, start)
        ctrl.on_decoded(len(part), None)
        if on_chunk:
            on_chunk(start + len(part), time.perf_counter() - t0)
    return time.perf_counter() - t0


def _decode_with_controller(s, ctrl, tokens: list, pos0: int):
    """Returns per-step decode seconds and controller seconds (make_room + on_decoded with the entropy check)."""
    t_dec, t_ctl = [], []
    for i, tok in enumerate(tokens):
        t0 = time.perf_counter()
        ctrl.make_room(1)
        t1 = time.perf_counter()
        logits = s.decode([tok], pos0 + i)
        t2 = time.perf_counter()
        ctrl.on_decoded(1, logits, entropy=ctrl.graph_entropy())
        t3 = time.perf_counter()
        t_dec.append(t2 - t1)
        t_ctl.append((t1 - t0) + (t3 - t2))
    return np.array(t_dec[N_WARMUP:]), np.array(t_ctl[N_WARMUP:])


def budget_run(model: str, policy: str, logical: int, budget_cells: int, n_gen: int, n_gpu_layers: int,
               controller_params=None) -> dict:
    n_ctx = budget_cells if policy != "full" else logical + n_gen + 16
    with _session(model, n_ctx, n_gpu_layers=n_gpu_layers) as s:
        kv, ctrl = _controller(s, policy, min(budget_cells, n_ctx), controller_params)
        tokens = _tokens(logical + n_gen, 31)
        prefill_s = _prefill(s, ctrl, tokens[:logical])
        gpu_mib = _gpu_memory_used_mib()
        t_dec, t_ctl = _decode_with_controller(s, ctrl, tokens[logical:], logical)
        info = kv.info()
        st = ctrl.stats
        counts = ctrl.table.counts()
        out = {"policy": policy, "logical": logical, "budget_cells": budget_cells, "n_ctx": n_ctx,
               "prefill_s": prefill_s, "decode_tokens_per_s": 1.0 / float(np.median(t_dec)),
               "decode_ms": 1e3 * float(np.median(t_dec)), "controller_ms": 1e3 * float(np.median(t_ctl)),
               "controller_ms_mean": 1e3 * float(np.mean(t_ctl)),
               # every step counted, the batched offloads included: what a user sees over a generation
               "end_to_end_tokens_per_s": len(t_dec) / float(np.sum(t_dec + t_ctl)),
               "decode_ms_mean": 1e3 * float(np.mean(t_dec)),
               "device_kv_bytes": info.device_kv_bytes, "host_bytes": info.host_bytes,
               "host_bytes_used": info.host_bytes_used, "kv_bytes_per_token": info.kv_bytes_per_token,
               "gpu_memory_used_mib": gpu_mib, "counts": counts,
               "freezes": st.freezes, "offloads": st.offloads, "thaws": st.thaws, "recoveries": st.recoveries,
               "controller_params": controller_params or {}}
        kv.close()
    return out


# ---- offload / thaw throughput and the importance node


def copy_bandwidth(nbytes: int = 256 << 20) -> dict:
    """Pinned host <-> device copy bandwidth through PyTorch: the ceiling offload and thaw are compared with."""
    try:
        import torch
    except ImportError:
        return {"error": "torch not importable"}
    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name + "_GBps"] = nbytes / float(np.median(times[1:])) / 1e9
    return out


def moves(model: str, kv_type: str, fa: str, n_tokens: int, n_move: int, reps: int, n_gpu_layers: int) -> dict:
    from asrkf_gguf import KVCache
    from bench_native import time_moves

    with _session(model, n_tokens + 64, kv_type, fa, n_gpu_layers) as s, KVCache(ctx=s.context) as kv:
        s.decode(_tokens(n_tokens, 41), 0)
        res = {"kv_type": kv_type, "flash_attn": fa, "bytes_per_token": kv.info().kv_bytes_per_token, "n_move": n_move}
        # f16 with flash attention off stores V transposed: scattered moves copy per channel and run, far too slow
        layouts = ("contiguous",) if fa == "off" else ("contiguous", "scattered")
        before = kv.info()
        res.update(time_moves(kv, n_tokens, n_move, reps, np.random.default_rng(42), layouts))
        after = kv.info()
        # the host checksum's share: bytes hashed and the time the moves spent in it (overlapped with copies)
        hashed, hash_s = after.hashed_bytes - before.hashed_bytes, (after.hash_us - before.hash_us) / 1e6
        res["hash_GBps"] = hashed / hash_s / 1e9 if hash_s > 0 else None
        kv.check()
    return res


def importance_cost(model: str, depth: int, n_gen: int, selections: dict, n_gpu_layers: int) -> dict:
    """Decode step time at `depth` with the importance node off and on for each layer selection."""
    from asrkf_gguf import KVCache

    with _session(model, depth + n_gen + 16, n_gpu_layers=n_gpu_layers) as s, KVCache(ctx=s.context) as kv:
        tokens = _tokens(depth + n_gen, 51)
        s.decode(tokens[:depth], 0)
        out = {}
        for name, layers in [("off", None)] + list(selections.items()):
            if name == "off":
                kv.set_importance(False)
            else:
                kv.set_importance(True, n_q=32, layers=layers, export_q=True)
            steps = _timed_steps(s, tokens[depth:depth + n_gen], depth)
            s.seq_rm(depth, -1)
            out[name] = {"ms": 1e3 * float(np.median(steps)), "n_layers": 0 if layers is None else len(layers)}
    return out


# ---- the memory-constrained case


def long_context(model: str, logical: int, budget_cells: int, n_gen: int, n_gpu_layers: int) -> dict:
    with _session(model, budget_cells, n_gpu_layers=n_gpu_layers) as s:
        kv, ctrl = _controller(s, "asrkf", budget_cells)
        tokens = _tokens(logical + n_gen, 61)
        curve = []
        every = max(1, logical // 64)

        def on_chunk(n_done, elapsed):
            if n_done % every < s.options.n_batch or n_done == logical:
                c = ctrl.table.counts()
                i = kv.info()
                curve.append({"logical": n_done, "resident": c["active"] + c["frozen"], "offloaded": c["offloaded"],
                              "device_kv_bytes": i.device_kv_bytes, "host_bytes_used": i.host_bytes_used,
                              "host_bytes": i.host_bytes, "seconds": round(elapsed, 3)})

        prefill_s = _prefill(s, ctrl, tokens[:logical], on_chunk)
        gpu_mib = _gpu_memory_used_mib()
        t_dec, t_ctl = _decode_with_controller(s, ctrl, tokens[logical:], logical)
        kv.check()
        info = kv.info()
        counts = ctrl.table.counts()
        out = {"logical": logical + n_gen, "budget_cells": budget_cells, "prefill_s": prefill_s,
               "decode_ms": 1e3 * float(np.median(t_dec)), "controller_ms": 1e3 * float(np.median(t_ctl)),
               "device_kv_bytes": info.device_kv_bytes, "host_bytes_used": info.host_bytes_used,
               "full_cache_kv_bytes": (logical + n_gen) * info.kv_bytes_per_token, "counts": counts,
               "nothing_lost": counts["active"] + counts["frozen"] + counts["offloaded"] == logical + n_gen,
               "gpu_memory_used_mib": gpu_mib, "curve": curve}
        kv.close()
    return out


# ---- driver


def in_subprocess(func: str, lib_dir: str | None = None, **kwargs) -> dict:
    env = dict(os.environ)
    if lib_dir:
        env["ASRKF_GGUF_LIB_DIR"] = lib_dir
        # the stock libllama finds its ggml (the CUDA build's, linked beside it) through this
        env["LD_LIBRARY_PATH"] = lib_dir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import asrkf_gguf, gpu_bench as g; "
            f"print('@@' + json.dumps(g.{func}(**json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], env=env, stdout=subprocess.PIPE, text=True)
    if r.returncode:
        return {"error": f"{func} exited with {r.returncode}"}
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("@@")][-1][2:])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_all(args) -> dict:
    scale = args.scale
    k = lambda n: max(256, int(n * scale) // 256 * 256)  # noqa: E731  context lengths, scaled for dry runs
    ngl = args.n_gpu_layers
    model = args.model
    res = {"model": model, "model_bytes": os.path.getsize(model), "scale": scale, "sections": args.sections}
    t_start = time.perf_counter()
    sections = set(args.sections.split(","))

    if "exactness" in sections:
        res["exactness"] = []
        for kv_type, fa in (("f16", "off"), ("f16", "on"), ("q8_0", "on"), ("q4_0", "on")):
            r = in_subprocess("exactness", model=model, kv_type=kv_type, fa=fa, n_tokens=k(4096), n_gpu_layers=ngl)
            res["exactness"].append(r)
            log(f"exactness {kv_type} fa={fa}: {r}")

    if "decode" in sections:
        depths = [0] + [k(d) for d in (4096, 8192, 16384, 32768)]
        variants = [("patched", None, False), ("patched+handle", None, True)]
        if args.stock_lib:
            variants.insert(0, ("stock", args.stock_lib, False))
        res["decode"] = []
        for rnd in range(args.rounds):
            for name, lib, attach in variants:
                # steps are cheap next to a process's load and prefill: 128 timed steps per depth
                r = in_subprocess("decode_depths", lib_dir=lib, model=model, depths=depths,
                                  n_gen=max(args.n_gen, N_WARMUP + 128), attach=attach, n_gpu_layers=ngl)
                r.update(variant=name, round=rnd)
                res["decode"].append(r)
                log(f"decode {name} round {rnd}: " + ", ".join(
                    f"{d}: {v['tokens_per_s']:.1f}" for d, v in r.get("depths", {}).items()) + f" {r.get('error', '')}")

    if "budget" in sections:
        logical = k(32768)
        # enough steps for several batched offloads at every budget (a batch is budget/32 tokens)
        n_gen = max(args.n_gen, 512)
        every_4th = list(range(3, args.n_layer, 4))
        runs = [("full", 1.0, {}), ("asrkf", 0.5, {}), ("asrkf", 0.25, {}), ("asrkf", 0.125, {}),
                ("asrkf", 0.25, {"importance_layers": every_4th}), ("asrkf", 0.25, {"importance_layers": [args.n_layer - 1]}),
                ("asrkf", 0.25, {"score_every": 4}),
                ("asrkf", 0.25, {"importance_layers": every_4th, "score_every": 4})]
        res["budget"] = []
        for policy, frac, params in runs:
            r = in_subprocess("budget_run", model=model, policy=policy, logical=logical,
                              budget_cells=int(logical * frac), n_gen=n_gen, n_gpu_layers=ngl, controller_params=params)
            res["budget"].append(r)
            log(f"budget {policy} {frac} {params if len(str(params)) < 40 else '...'}: "
                f"decode {r.get('decode_tokens_per_s', 0):.1f} t/s, end-to-end {r.get('end_to_end_tokens_per_s', 0):.1f} t/s, "
                f"controller {r.get('controller_ms', 0):.2f} ms (mean {r.get('controller_ms_mean', 0):.2f}), "
                f"device KV {r.get('device_kv_bytes', 0) / 2**20:.0f} MiB {r.get('error', '')}")

    if "moves" in sections:
        res["copy_bandwidth"] = copy_bandwidth() if ngl else {"error": "CPU run"}
        log(f"copy bandwidth: {res['copy_bandwidth']}")
        res["moves"] = []
        for kv_type, fa in (("f16", "on"), ("q8_0", "on"), ("q4_0", "on"), ("f16", "off")):
            r = in_subprocess("moves", model=model, kv_type=kv_type, fa=fa, n_tokens=k(8192), n_move=k(2048),
                              reps=5, n_gpu_layers=ngl)
            res["moves"].append(r)
            log(f"moves {kv_type} fa={fa}: {r}")

    if "importance" in sections:
        n_layer = args.n_layer
        sel = {"last": [n_layer - 1], "every 4th": list(range(3, n_layer, 4)), "all": list(range(n_layer))}
        res["importance"] = {}
        for depth in (k(8192), k(32768)):
            r = in_subprocess("importance_cost", model=model, depth=depth, n_gen=args.n_gen, selections=sel,
                              n_gpu_layers=ngl)
            res["importance"][str(depth)] = r
            log(f"importance at {depth}: {r}")

    if "long" in sections:
        r = in_subprocess("long_context", model=model, logical=k(65536), budget_cells=k(16384), n_gen=args.n_gen,
                          n_gpu_layers=ngl)
        res["long"] = r
        log("long: " + json.dumps({x: y for x, y in r.items() if x != "curve"}))
    res["seconds"] = time.perf_counter() - t_start
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n-layer", type=int, default=32, help="the model's layer count (importance selections)")
    ap.add_argument("--stock-lib", help="folder with an unpatched libllama of the same commit beside the ggml libraries")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--n-gen", type=int, default=72, help="decode steps per measurement (the first 8 are warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="stock/patched decode rounds, interleaved")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every context length (dry runs)")
    ap.add_argument("--sections", default="exactness,decode,budget,moves,importance,long")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run_all(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    log(f"done in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
