"""A bounded load test of `python -m asrkf_gguf serve`: N concurrent conversations x M turns with the openai client.

    python scripts/serve_load.py --conversations 8 --turns 10 --max-tokens 24 -- --ctx 1024
    python scripts/serve_load.py --base-url http://127.0.0.1:8080/v1 --conversations 8 --turns 10

Without --base-url it starts a server on the demo model (or the MODEL after --) on a free port, with the serve
options after `--`, and stops it with SIGTERM at the end (its exit code is checked). Every request streams (with
include_usage); each conversation sends its whole history, as a chat client does.

Checked for every reply (the run fails, exit 1, on any violation):
- lost: the request raised, or the stream had no finish reason or no usage chunk;
- truncated: finish_reason "length" with fewer than max_tokens tokens, more than max_tokens, or an empty reply
  with more than one token counted (the count includes the end-of-generation token);
- mixed: a conversation's replies came from more than one server conversation, two conversations shared one, or a
  prompt did not grow by at least the previous reply (a reply that belongs to another chat would not match).
Printed: latency percentiles (time to first token, whole reply), throughput, and the server's /health at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai

TOPICS = ["the sea", "mountains", "bread", "rain", "owls", "trains", "copper", "tea", "deserts", "bees", "clocks",
          "glass", "rivers", "moss", "kites", "salt"]


def start_server(serve_args):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "asrkf_gguf", "serve", "--port", "0", *serve_args],
                            stdout=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=300)
    except queue.Empty:
        proc.kill()
        raise SystemExit("the server did not start")
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"unexpected first line from the server: {line!r}")
    return proc, line.split(" on ")[1].strip() + "/v1"


async def conversation(client, i, turns, max_tokens, results):
    history = [{"role": "system", "content": f"You are assistant number {i}. Answer in one sentence."}]
    for t in range(turns):
        topic = TOPICS[(i + t) % len(TOPICS)]
        history.append({"role": "user", "content": f"Conversation {i}, turn {t + 1}: tell me one fact about {topic}."})
        rec = {"conversation": i, "turn": t + 1, "error": None}
        t0 = time.perf_counter()
        text, finish, usage, server_conv, first = [], None, None, None, None
        try:
            stream = await client.chat.completions.create(
                model="any", messages=history, temperature=0, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices:
                    c = chunk.choices[0]
                    if c.delta.content:
                        if first is None:
                            first = time.perf_counter() - t0
                        text.append(c.delta.content)
                    if c.finish_reason:
                        finish = c.finish_reason
                        server_conv = (chunk.model_extra or {}).get("conversation")
                else:
                    usage = chunk.usage
        except Exception as err:  # lost
            rec["error"] = f"{type(err).__name__}: {err}"
        rec.update(seconds=time.perf_counter() - t0, ttft=first, finish=finish, text="".join(text),
                   server_conversation=server_conv,
                   prompt_tokens=usage.prompt_tokens if usage else None,
                   completion_tokens=usage.completion_tokens if usage else None,
                   cached_tokens=(usage.prompt_tokens_details.cached_tokens
                                  if usage and usage.prompt_tokens_details else None))
        results.append(rec)
        if rec["error"]:
            return
        history.append({"role": "assistant", "content": rec["text"]})


def check(results, n_conv, turns, max_tokens):
    problems = []
    by_conv = {i: sorted((r for r in results if r["conversation"] == i), key=lambda r: r["turn"])
               for i in range(n_conv)}
    for i, recs in by_conv.items():
        if len(recs) != turns:
            problems.append(f"conversation {i}: {len(recs)} of {turns} turns answered")
        prev = None
        for r in recs:
            where = f"conversation {i} turn {r['turn']}"
            if r["error"] or r["finish"] is None or r["completion_tokens"] is None:
                problems.append(f"{where}: lost ({r['error'] or 'no finish reason or usage'})")
                continue
            n = r["completion_tokens"]
            if (r["finish"] == "length" and n != max_tokens) or n > max_tokens or (n > 1 and not r["text"]):
                problems.append(f"{where}: truncated ({r['finish']} after {n} tokens, {len(r['text'])} chars)")
            if prev is not None and r["prompt_tokens"] < prev["prompt_tokens"] + prev["completion_tokens"]:
                problems.append(f"{where}: the prompt did not grow by the previous reply")
            prev = r
        ids = {r["server_conversation"] for r in recs if not r["error"]}
        if len(ids) != 1:
            problems.append(f"conversation {i}: replies from server conversations {sorted(ids, key=str)}")
    owners = {}
    for i, recs in by_conv.items():
        for r in recs:
            if r["server_conversation"] is not None:
                owners.setdefault(r["server_conversation"], set()).add(i)
    problems += [f"server conversation {c} answered conversations {sorted(o)}" for c, o in owners.items() if len(o) > 1]
    return problems


def percentiles(values):
    v = sorted(values)
    if not v:
        return {}
    pick = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": v[-1]}


async def load(base_url, n_conv, turns, max_tokens):
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600) as client:
        results = []
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(client, i, turns, max_tokens, results) for i in range(n_conv)))
        return results, time.perf_counter() - t0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", help="a running server's /v1 URL (default: start one with the options after --)")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", help="write the figures and every request's record to this file")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    proc = None
    base_url = args.base_url
    if base_url is None:
        proc, base_url = start_server(serve_args)
    try:
        results, wall = asyncio.run(load(base_url, args.conversations, args.turns, args.max_tokens))
        health = httpx.get(base_url.removesuffix("/v1") + "/health").json()
    finally:
        code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    problems = check(results, args.conversations, args.turns, args.max_tokens)
    if code not in (None, 0):
        problems.append(f"the server exited with {code} after SIGTERM")
    ok = [r for r in results if not r["error"]]
    n_out = sum(r["completion_tokens"] or 0 for r in ok)
    summary = {
        "conversations": args.conversations, "turns": args.turns, "max_tokens": args.max_tokens,
        "serve_args": serve_args, "requests": len(results), "answered": len(ok), "problems": problems,
        "wall_seconds": round(wall, 1), "completion_tokens": n_out,
        "completion_tokens_per_s": round(n_out / wall, 2),
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] or 0 for r in ok) / max(1, len(ok)), 1),
        "cached_tokens_mean": round(sum(r["cached_tokens"] or 0 for r in ok) / max(1, len(ok)), 1),
        "finish": {f: sum(r["finish"] == f for r in ok) for f in ("stop", "length")},
        "ttft_s": {k: round(x, 2) for k, x in percentiles([r["ttft"] for r in ok if r["ttft"] is not None]).items()},
        "latency_s": {k: round(x, 2) for k, x in percentiles([r["seconds"] for r in ok]).items()},
        "server_health": health, "server_exit_code": code,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**summary, "requests_log": results}, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
