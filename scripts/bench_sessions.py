"""Chats in one Engine: switching to an idle chat (its KV parked in the host store: the resident rows go back into
their cells, the offloaded ones stay where they are) against prefilling it again, and saving / loading it as a file. Prints one JSON object (also written to --json).

One chat holds a document of about --tokens tokens and a question; it is parked (new_chat), a second, short chat
runs, and the first comes back (switch) and answers a follow-up. Reported:
  prefill_s          the first turn's prompt prefill: what a switch saves (re-prefill cost)
  park_ms            new_chat(): the chat parked (its resident rows copied to the host store, its table kept)
  switch_ms          switch() back: the short chat parked, the long one restored
  switch_speedup     prefill_s / switch_ms
  save_ms, load_ms   the same chat as a file (sha256 over the file and the model fingerprint included)
  native_save_ms, native_load_ms  asrkf_kv_session_save / _load alone (the K/V part of a park / switch)
  per chat           device bytes (its resident cells) and host bytes (offloaded rows while current, all of its
                     rows while idle)
  followup_prompt_tokens  tokens decoded for the follow-up after the switch: only the new turn (no re-prefill)

  python scripts/bench_sessions.py [--model PATH] [--tokens 8000] [--ctx 8704] [--kv-budget 0.25]
                                   [--n-gpu-layers 0] [--threads 2] [--text essays|stdlib] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def stdlib_text(n_chars: int) -> str:
    """Python's reference documentation and standard library source: text every Python ships (a machine that
    cannot download the essays has it)."""
    import sysconfig
    from pathlib import Path

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if len(text) > n_chars:
            break
        text += "\n\n" + path.read_text(encoding="utf-8", errors="replace")
    return text


def document(engine, n_tokens: int, kind: str = "essays") -> str:
    """Paul Graham essays (or the stdlib's docs and source) cut to about n_tokens tokens of the engine's model."""
    from asrkf_gguf.models import fetch_haystack_essays

    text = ""
    if kind == "stdlib":
        text = stdlib_text(6 * n_tokens)
    else:
        for path in fetch_haystack_essays(progress=False):
            text += path.read_text(encoding="utf-8", errors="replace") + "\n\n"
            if len(text) > 6 * n_tokens:
                break
    text = text[: 6 * n_tokens]
    tokens = engine.session.tokenize(text, add_special=False)
    if len(tokens) < n_tokens:
        raise SystemExit(f"the {kind} text holds only {len(tokens)} tokens")
    cut = len(text) * n_tokens // len(tokens)
    while len(engine.session.tokenize(text[:cut], add_special=False)) > n_tokens:
        cut -= 200
    return text[:cut]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched)")
    ap.add_argument("--tokens", type=int, default=8000, help="document tokens of the long chat")
    ap.add_argument("--ctx", type=int, default=None, help="logical context (default: --tokens + 704)")
    ap.add_argument("--kv-budget", default=None, help="device cells or a fraction of --ctx (default: all of --ctx)")
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--text", choices=["essays", "stdlib"], default="essays",
                    help="the long chat's document: Paul Graham essays (fetched) or Python's docs and source")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()

    from asrkf_gguf.engine import Engine
    from asrkf_gguf.models import fetch_qwen_coder_model

    model = args.model or str(fetch_qwen_coder_model(progress=False))
    ctx = args.ctx or args.tokens + 704
    t0 = time.perf_counter()
    engine = Engine(model, ctx=ctx, kv_budget=args.kv_budget, kv_type=args.kv_type, n_gpu_layers=args.n_gpu_layers,
                    n_threads=args.threads)
    load_s = time.perf_counter() - t0
    res = {"model": os.path.basename(model), "text": args.text, "tokens": args.tokens, "ctx": ctx, "kv_type": args.kv_type,
           "n_gpu_layers": args.n_gpu_layers, "threads": args.threads, "model_load_s": round(load_s, 2)}
    with engine:
        res["budget_cells"] = engine.controller.config.budget_cells
        doc = document(engine, args.tokens, args.text)
        question = "\n\nIn one sentence: what is the " + ("first essay" if args.text == "essays" else "text") + " about?"
        reply1 = "".join(engine.chat(doc + question, max_tokens=args.max_tokens))
        res["long_chat_tokens"] = engine.controller.table.n
        res["prefill_s"] = round(engine.prefill_seconds, 3)
        res["prefill_tokens_per_s"] = round(engine.n_prompt_tokens / engine.prefill_seconds, 1)
        long_id = engine.chat_id
        mem_active = engine.chat_memory()[long_id]
        counts = engine.controller.table.counts()

        t = time.perf_counter()
        short_id = engine.new_chat()
        res["park_ms"] = round(1e3 * (time.perf_counter() - t), 1)
        mem_idle = engine.chat_memory()[long_id]
        "".join(engine.chat("Say hello in French.", max_tokens=args.max_tokens))

        n_prompt = engine.n_prompt_tokens
        t = time.perf_counter()
        engine.switch(long_id)
        res["switch_ms"] = round(1e3 * (time.perf_counter() - t), 1)
        res["switch_speedup"] = round(res["prefill_s"] * 1e3 / res["switch_ms"], 1)
        reply2 = "".join(engine.chat("And the second essay?", max_tokens=args.max_tokens))
        res["followup_prompt_tokens"] = engine.n_prompt_tokens - n_prompt
        engine.controller.table.check(engine.kv)

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "chat.session")
            t = time.perf_counter()
            size = engine.save(path)
            res["save_ms"] = round(1e3 * (time.perf_counter() - t), 1)
            engine.switch(short_id)
            t = time.perf_counter()
            engine.load(path)
            res["load_ms"] = round(1e3 * (time.perf_counter() - t), 1)
            res["file_bytes"] = size

        # the native part alone: the K/V export and its import (into the same sequence: the content is the same)
        t = time.perf_counter()
        blob = engine.kv.session_save()
        res["native_save_ms"] = round(1e3 * (time.perf_counter() - t), 1)
        t = time.perf_counter()
        engine.kv.session_load(blob)
        res["native_load_ms"] = round(1e3 * (time.perf_counter() - t), 1)
        res["native_bytes"] = len(blob)
        engine.controller.table.check(engine.kv)

        info = engine.kv.info()
        res["per_chat"] = {
            "long_chat_current": mem_active, "long_chat_idle": mem_idle,
            "states_at_park": counts, "kv_bytes_per_token": info.kv_bytes_per_token,
            "context_device_kv_bytes": info.device_kv_bytes,
        }
        res["replies"] = [reply1, reply2]
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
