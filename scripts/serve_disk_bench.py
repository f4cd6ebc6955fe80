"""`serve --cache-dir`: a conversation continued from disk against the same conversation prefilled again.

    python scripts/serve_disk_bench.py [--runs 3] [--doc-chars 3000] [--json OUT] [-- MODEL serve options]

Three servers in turn on the demo model (or the MODEL after --). Two with --max-conversations 1, so that a second
conversation pushes the first one out of memory: "disk" with --cache-dir (the first conversation is written to a
session file and loaded back), "prefill" without (it is forgotten and its prompt prefilled again); and "memory",
--max-conversations 16 without --cache-dir (it stays parked in host memory: the switch of issue 14, item 3).

In each run a conversation gets a document and a question (its first turn), a short unrelated conversation runs,
and the first one's follow-up is timed once the server is idle (the write to disk after the short reply is not
counted): the whole request, streamed, max_tokens 1 (the time to the first token: the load or the prefill, plus
one decode). Printed: per mode, the follow-up's milliseconds as median [min-max] over the runs, its prompt and
cached tokens, and the session files' sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

import httpx
import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import start_server  # noqa: E402  (the same server start as the load test)


def stop_server(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def document(n_chars: int) -> str:
    from asrkf_gguf.models import fetch_haystack_essays

    text = ""
    for path in fetch_haystack_essays(progress=False):
        text += path.read_text(encoding="utf-8", errors="replace") + "\n\n"
        if len(text) > n_chars:
            break
    return text[:n_chars]


def timed(client, messages, max_tokens):
    """One greedy streamed request: (seconds, reply text, usage)."""
    t0 = time.perf_counter()
    text, usage = [], None
    for chunk in client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    return time.perf_counter() - t0, "".join(text), usage


def idle(url):
    """Wait until the model thread is idle: the server writes idle conversations to disk after a reply went out."""
    while httpx.get(url.removesuffix("/v1") + "/health").json()["busy"]:
        time.sleep(0.01)


def run_mode(serve_args, runs, doc):
    proc, url = start_server(serve_args)
    out = []
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        for i in range(runs):
            chat = [{"role": "system", "content": f"Run {i}. Answer briefly."},
                    {"role": "user", "content": f"{doc}\n\nWhat is this text about?"}]
            _, reply, first = timed(client, chat, 8)
            timed(client, [{"role": "user", "content": f"Run {i}: name a color."}], 4)  # pushes `chat` out
            idle(url)  # the write of `chat` to disk (after that reply) is not in the timed request
            chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Say it in one word."}]
            seconds, _, usage = timed(client, chat, 1)
            out.append({"ms": seconds * 1e3, "prompt_tokens": usage.prompt_tokens,
                        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                        "first_turn_prompt_tokens": first.prompt_tokens})
    finally:
        code = stop_server(proc)
    if code != 0:
        raise SystemExit(f"the server exited with {code}")
    return out


def summary(rows):
    ms = [r["ms"] for r in rows]
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
            "prompt_tokens": [r["prompt_tokens"] for r in rows], "cached_tokens": [r["cached_tokens"] for r in rows]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--doc-chars", type=int, default=3000, help="characters of essay text in the first turn")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("serve_args", nargs="*", help="after --: MODEL and serve options (e.g. --ctx 1024 --threads 1)")
    args = ap.parse_args()
    doc = document(args.doc_chars)
    common = [*args.serve_args, "--max-conversations", "1"]
    result = {"serve_args": common, "runs": args.runs, "doc_chars": args.doc_chars,
              "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="serve-disk-bench-") as cache_dir:
        disk = run_mode([*common, "--cache-dir", cache_dir], args.runs, doc)
        sizes = sorted(os.path.getsize(os.path.join(cache_dir, n)) for n in os.listdir(cache_dir))
    prefill = run_mode(common, args.runs, doc)
    memory = run_mode([*args.serve_args, "--max-conversations", "16"], args.runs, doc)
    result["load_average_end"] = os.getloadavg()[0]
    result.update(disk=summary(disk), prefill=summary(prefill), memory=summary(memory), session_file_bytes=sizes,
                  raw={"disk": disk, "prefill": prefill, "memory": memory})
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    for mode in ("disk", "prefill", "memory"):
        s = result[mode]
        print(f"{mode:8s} follow-up {s['ms_median']:.0f} ms [{s['ms_min']:.0f}-{s['ms_max']:.0f}], prompt "
              f"{s['prompt_tokens']} tokens, cached {s['cached_tokens']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
