"""The user's path as the benchmark: `python -m asrkf_gguf run ... --json` with the full cache and under a budget,
side by side, interleaved over rounds, in one run. Reports the time before the first token (the CLI's prompt
phase: chunked prefill, scoring, moves, recall and the question decoded again), decode as the CLI reports it
(controller, sampling and everything per token included), the controller's time per token and the prompt phase
broken down (model decodes, offloads, thaws, score folds, recall scoring), as medians with min-max over rounds.

  python scripts/gpu_user_path.py --model M.gguf [--tokens 30000 --ctx 32768 --rounds 3] [--json OUT.json]

On the CPU (--n-gpu-layers 0, --threads N) it is the CPU's user path: scripts/cpu_user_path.sh runs it on
Qwen2.5-Coder-0.5B with a 4k-token prompt.

The model needs a real vocabulary and chat template (scripts/write_bench_model.py --vocab). The prompt is
ordinary text (the Python standard library's reference documentation and source, which every Python ships), cut
to --tokens tokens of that model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "full": ["--policy", "full"],
    "asrkf-25%": ["--kv-budget", "0.25"],                                  # the defaults (GPU: every 4th layer)
    "asrkf-25%-all-layers": ["--kv-budget", "0.25", "--importance-every", "1"],
    "asrkf-25%-pageable": ["--kv-budget", "0.25", "--host-memory", "pageable"],  # the GPU default since 2026-11-30
    "asrkf-25%-pinned": ["--kv-budget", "0.25", "--host-memory", "pinned"],
    "asrkf-25%-host-recall": ["--kv-budget", "0.25", "--recall-scoring", "host"],  # numpy, the GPU default until 2026-11-30
    # what scoring costs a decode step: every 4th step scored, and none after the prompt (the step's graph then
    # has no importance nodes; switching them on and off changes the graph)
    "asrkf-25%-score4": ["--kv-budget", "0.25", "--score-every", "4"],
    "asrkf-25%-noscore": ["--kv-budget", "0.25", "--score-every", "100000"],
    # the importance and entropy read with a synchronous copy each, as before they were copied behind the logits
    "asrkf-25%-syncout": ["--kv-budget", "0.25", "ENV:ASRKF_OUTPUTS_SYNC=1"],
    "asrkf-25%-layers8": ["--kv-budget", "0.25", "--importance-every", "8"],
    # what the prompt phase costs without asrkf's work: eviction at the same budget attends the same number of cells
    # (window: no scoring, no moves; h2o: scoring, no moves), so the difference to asrkf is the moves and recall
    "window-25%": ["--policy", "window", "--kv-budget", "0.25"],
    "h2o-25%": ["--policy", "h2o", "--kv-budget", "0.25"],
    # the staged offload's gather in passes of at most 64 MiB, as before one pass could take up to 256 MiB
    "asrkf-25%-scratch64": ["--kv-budget", "0.25", "ENV:ASRKF_DEFERRED_SCRATCH_MB=64"],
    # prompt calls of 2048 tokens (llama.cpp's default -b), graphs of 512 or of 2048
    "full-b2048": ["--policy", "full", "-b", "2048"],
    "asrkf-25%-b2048": ["--kv-budget", "0.25", "-b", "2048"],
    "full-ub2048": ["--policy", "full", "-b", "2048", "-ub", "2048"],
    "asrkf-25%-ub2048": ["--kv-budget", "0.25", "-b", "2048", "-ub", "2048"],
    # the card people have (--ballast-free-gib 8): what llama.cpp offers when the full cache does not fit beside the
    # weights, against a budget that does. -nkvo: the KV cache and attention in host memory, on the CPU; -ngl N: the
    # last N layers (and their KV) on the GPU, the rest on the CPU. The slow ones generate 32 tokens
    "full-nkvo": ["--policy", "full", "-nkvo", "--max-tokens", "32"],
    **{f"full-ngl{n}": ["--policy", "full", "-ngl", str(n)] for n in (28, 26, 24, 20, 16)},
    "asrkf-50%": ["--kv-budget", "0.5"],
}


def make_prompt(model: str, n_tokens: int) -> str:
    import sysconfig
    from pathlib import Path

    from pydoc_data.topics import topics

    from asrkf_gguf.evaluation.grid import Tokenizer

    parts = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    parts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:200]]
    text = "\n\n".join(parts)
    with Tokenizer(model) as tok:
        ids = tok.tokenize(text)
        if len(ids) < n_tokens:
            raise SystemExit(f"only {len(ids)} tokens of text")
        cut = text[: int(len(text) * n_tokens / len(ids))]
        while tok.count(cut) > n_tokens - 40:
            cut = cut[: int(len(cut) * 0.99)]
    return cut + "\n\nWhat is the text above about? Answer in one sentence."


def move_trace(stderr: str) -> dict:
    """The native core's ASRKF_TRACE_MOVES lines summed per operation: moves, tokens, MB, ms of each part, and
    paths taken (llama-kv-freeze-cells.cpp writes one line per offload and thaw); "largest" keeps the line of the
    operation's largest move as it was (a recall's swap moves thousands of tokens at once, a prompt chunk's offload
    hundreds: the sum hides which costs what)."""
    out: dict = {}
    for line in stderr.splitlines():
        if not line.startswith("asrkf-trace "):
            continue
        fields = line.split()
        op = fields[1]
        agg = out.setdefault(op, {"moves": 0})
        agg["moves"] += 1
        this: dict = {}
        for kv in fields[2:]:
            k, _, v = kv.partition("=")
            try:
                this[k] = float(v)
                agg[k] = round(agg.get(k, 0) + float(v), 3)
            except ValueError:  # path=...
                paths = agg.setdefault("paths", {})
                paths[v] = paths.get(v, 0) + 1
        if this.get("n", 0) > agg.get("largest", {}).get("n", -1):
            agg["largest"] = this
    for agg in out.values():
        if agg.get("total_ms"):
            agg["GB_per_s"] = round(agg.get("MB", 0) / agg["total_ms"], 2)
    return out


def hold_ballast(free_gib: float):
    """Allocate device memory in this process until only free_gib GiB of the first visible GPU are free (the card
    a user has); returns what keeps it (the allocation lives as long as this process)."""
    import ctypes
    import glob

    names = ["libcudart.so"] + sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*")) + \
        sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libcudart.so*"))
    for name in names:
        try:
            rt = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise SystemExit("--ballast-free-gib: no libcudart found")
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        raise SystemExit("--ballast-free-gib: cudaMemGetInfo failed")
    want = free.value - int(free_gib * 2**30)
    ptr = ctypes.c_void_p()
    if want <= 0 or rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(want)) != 0:
        raise SystemExit(f"--ballast-free-gib: cannot hold {want / 2**30:.1f} GiB")
    rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    print(f"ballast: {want / 2**30:.1f} GiB held, {free.value / 2**30:.2f} of {total.value / 2**30:.1f} GiB free",
          flush=True)
    return rt, ptr, free.value


def run_once(model: str, prompt_file: str, args, extra) -> dict:
    env = {k: v for k, v in (e[4:].split("=", 1) for e in extra if e.startswith("ENV:"))}
    extra = [e for e in extra if not e.startswith("ENV:")]
    cmd = [sys.executable, "-m", "asrkf_gguf", "run", model, "--prompt-file", prompt_file, "--ctx", str(args.ctx),
           "--max-tokens", str(args.max_tokens), "--temperature", "0", "--ignore-eos", "--n-gpu-layers", str(args.n_gpu_layers),
           "--json", *(["--threads", str(args.threads)] if args.threads else []), *extra]
    t0 = time.perf_counter()
    # the trace costs one line per move (a few hundred in a run): on in every run, so that each carries its breakdown
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ASRKF_TRACE_MOVES": "1", **env},
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        if not args.keep_going:
            raise SystemExit(f"{' '.join(cmd)} ran past {args.timeout} s")
        return {"failed": f"did not finish within {args.timeout} s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        if args.keep_going:  # e.g. a setting that does not fit the card: its error line is the result
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            return {"failed": lines[-1][:300] if lines else f"exit {p.returncode}"}
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout)
    t = out["timing"]
    return {"wall_s": wall, "n_prompt": out["n_prompt_tokens"], "n_generated": out["n_generated_tokens"],
            "ttft_s": out["n_prompt_tokens"] / t["prefill_tokens_per_s"] if t["prefill_tokens_per_s"] else 0.0,
            "decode_tps": t["decode_tokens_per_s"], "controller_us_per_token": t["controller_us_per_token"],
            "prompt_phase_ms": t.get("prompt_phase_ms", {}), "decode_phase_ms": t.get("decode_phase_ms", {}),
            "events": out["events"], "kv": out["kv"], "move_trace": move_trace(p.stderr)}


def med(xs):
    return statistics.median(xs), min(xs), max(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=30000)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--threads", type=int, default=None, help="run's --threads (default: run's own)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    ap.add_argument("--json")
    ap.add_argument("--ballast-free-gib", type=float, default=None,
                    help="hold GPU memory so that only this much is free (the card a user has), e.g. 8")
    ap.add_argument("--timeout", type=float, default=None, help="seconds a run may take")
    ap.add_argument("--keep-going", action="store_true",
                    help="a run that fails or times out is recorded as such (a setting that does not fit); "
                         "a setting that failed is not run again in later rounds")
    ap.add_argument("--first-fitting", action="store_true",
                    help="of the full-ngl<N> settings (largest N first), run only the first that does not fail")
    args = ap.parse_args()
    ballast = hold_ballast(args.ballast_free_gib) if args.ballast_free_gib else None
    names = [s for s in args.settings.split(",") if s]
    prompt = make_prompt(args.model, args.tokens)
    runs = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        pf = os.path.join(tmp, "prompt.txt")
        with open(pf, "w", encoding="utf-8") as f:
            f.write(prompt)
        for r in range(args.rounds):
            for n in names:  # interleaved: a drift of the machine falls on every setting alike
                if any("failed" in x for x in runs[n]):
                    continue
                if args.first_fitting and n.startswith("full-ngl") and any(
                        m.startswith("full-ngl") and m != n and runs[m] and "failed" not in runs[m][0] for m in names):
                    continue  # a larger -ngl already fits
                res = run_once(args.model, pf, args, SETTINGS[n])
                runs[n].append(res)
                if "failed" in res:
                    print(f"round {r + 1} {n}: {res['failed']}", flush=True)
                    continue
                print(f"round {r + 1} {n}: ttft {res['ttft_s']:.2f} s, decode {res['decode_tps']:.1f} t/s, "
                      f"controller {res['controller_us_per_token']:.0f} us/token, prompt {res['prompt_phase_ms']}, "
                      f"decode {res['decode_phase_ms']}, moves {res['move_trace']}",
                      flush=True)
    failed = {n: runs[n][0]["failed"] for n in names if runs[n] and "failed" in runs[n][0]}
    names_ok = [n for n in names if n not in failed and runs[n]]
    names = [n for n in names if runs[n]]
    full_dec = statistics.median(x["decode_tps"] for x in runs["full"]) if "full" in names_ok else None
    print(f"\n{args.tokens}-token prompt, ctx {args.ctx}, {args.max_tokens} tokens, {args.rounds} rounds "
          "(median [min-max])\n")
    print("| setting | time to first token (s) | decode t/s | vs full | controller us/token | generated |")
    print("|---|---|---|---|---|---|")
    for n, why in failed.items():
        print(f"| {n} | {why} | | | | |")
    for n in names_ok:
        tt, dd, cc = (med([x[k] for x in runs[n]]) for k in ("ttft_s", "decode_tps", "controller_us_per_token"))
        ratio = f"{dd[0] / full_dec:.2f}x" if full_dec else "-"
        gen = "/".join(str(x["n_generated"]) for x in runs[n])
        print(f"| {n} | {tt[0]:.2f} [{tt[1]:.2f}-{tt[2]:.2f}] | {dd[0]:.1f} [{dd[1]:.1f}-{dd[2]:.1f}] | {ratio} | "
              f"{cc[0]:.0f} [{cc[1]:.0f}-{cc[2]:.0f}] | {gen} |")
    for phase in ("prompt_phase_ms", "decode_phase_ms"):
        keys = sorted({k for n in names_ok for x in runs[n] for k in x[phase]})
        print(f"\n{phase[:-3].replace('_', ' ')}, ms (median)\n")
        print("| setting | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for n in names_ok:
            print(f"| {n} | " + " | ".join(f"{statistics.median(x[phase].get(k, 0) for x in runs[n]):.0f}"
                                            for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "ballast_free_bytes": ballast[2] if ballast else None},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
