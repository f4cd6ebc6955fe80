"""Soak: many turns of ordinary text through the Engine on a small device budget, conversation after
conversation, until --tokens tokens have passed. After each turn: resident memory (VmRSS, and VmRSS less the host copies, which live in this
process: their allocated chunks are bounded by --host-budget plus a chunk), host bytes, the
controller's table against the native cells (check), and every host copy's checksum (each conversation ends by
thawing its offloaded tokens back in batches through the free cells, which verifies them). Prints one JSON line a
turn and a summary: RSS growth after warm-up, host bytes peak against --host-budget, tokens dropped.

  python scripts/soak.py [--model PATH] [--tokens 100000] [--budget 512] [--host-budget 64M] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def rss_bytes() -> int:
    # freed heap goes back to the system first (glibc keeps it otherwise): what is left is what is held
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def texts():
    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    i = 0
    while True:
        yield parts[i % len(parts)][:6000]
        i += 1


def verify_host_copies(engine) -> int:
    """Bring every offloaded token back through the device in batches (a thaw verifies each checksum) and send it
    out again: a batch of resident movable tokens steps out to make the room and comes back after. The
    conversation is as it was. Returns the tokens verified."""
    from asrkf_gguf import CellState

    t, kv, pol = engine.controller.table, engine.kv, engine.controller.policy
    off = t.positions(CellState.OFFLOADED)
    room = pol.candidates(t, CellState.ACTIVE)[:64]
    if room.size == 0:
        return 0
    kv.offload(room)
    for i in range(0, off.size, room.size):
        batch = off[i:i + room.size]
        kv.thaw(batch)
        kv.offload(batch)
    kv.thaw(room)
    return int(off.size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--host-budget", default="64M")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    from asrkf_gguf.engine import Engine

    rows = []
    total = 0
    verified = 0
    t_start = time.perf_counter()
    src = texts()
    with Engine(args.model, ctx=args.ctx, kv_budget=args.budget, host_budget=args.host_budget,
                n_threads=args.threads) as e:
        conv = 0
        while total < args.tokens:
            conv += 1
            e.reset()
            while e.controller.table.n < args.ctx - 2600 and total < args.tokens:
                n0 = e.controller.table.n
                reply = "".join(e.chat(next(src) + "\n\nSummarize this in one sentence.", max_tokens=args.max_tokens))
                e.controller.table.check(e.kv)
                e.kv.check()
                total += e.controller.table.n - n0
                info = e.kv.info()
                rows.append({"conversation": conv, "logical": e.controller.table.n, "total_tokens": total,
                             "rss_mib": round(rss_bytes() / 2**20, 1), "host_mib": round(info.host_bytes_used / 2**20, 2),
                             # the host store keeps its chunks for the next offloads (allocated >= used)
                             "host_alloc_mib": round(info.host_bytes / 2**20, 2),
                             # the host copies live in this process: what must stay flat is the rest
                             "rss_minus_host_mib": round((rss_bytes() - info.host_bytes) / 2**20, 1),
                             "offloaded": info.n_offloaded, "reply_chars": len(reply),
                             "s": round(time.perf_counter() - t_start, 1)})
                print(json.dumps(rows[-1]), flush=True)
            verified += verify_host_copies(e)
            e.kv.check()
        stats = e.stats()
    rss = np.array([r["rss_minus_host_mib"] for r in rows])
    warm = max(1, len(rss) // 5)  # the first fifth of the turns: allocator and caches warming up
    after = rss[warm:]
    summary = {"turns": len(rows), "conversations": rows[-1]["conversation"], "tokens": total,
               "rss_minus_host_mib_after_warmup": float(after[0]), "rss_minus_host_mib_max": float(after.max()),
               "rss_growth_after_warmup": float(after.max() / after[0] - 1),
               "rss_mib_max": max(r["rss_mib"] for r in rows),
               "host_mib_peak": max(r["host_mib"] for r in rows), "host_budget": args.host_budget,
               "host_alloc_mib_peak": max(r["host_alloc_mib"] for r in rows),
               "dropped": stats["events"]["drops"], "host_tokens_verified": verified,
               "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "turns": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
