"""How a desktop app embeds the Engine: generation on a worker thread, text pushed to a UI callback, a Stop button.

  python scripts/engine_callback_example.py [MODEL] [--budget 0.25] [--stop-after 2.0]

The callback here prints; in a GUI it would post the text to the UI thread (Qt signal, Tk after(), ...).
"""

from __future__ import annotations

import argparse
import threading
import time

from asrkf_gguf.engine import Engine


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--budget", default="0.25", help="device KV cells or a fraction of --ctx")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--stop-after", type=float, default=2.0, help="seconds before pressing Stop on the second turn")
    args = ap.parse_args()

    def on_text(piece: str) -> None:  # the UI callback
        print(piece, end="", flush=True)

    with Engine(args.model, ctx=args.ctx, kv_budget=args.budget) as engine:
        def worker(message: str, max_tokens: int) -> None:
            for piece in engine.chat(message, max_tokens=max_tokens):
                on_text(piece)
            on_text("\n")

        t = threading.Thread(target=worker, args=("Give me three tips for writing clear code.", 120))
        t.start()
        t.join()

        t = threading.Thread(target=worker, args=("Now explain each tip at length.", 1000))
        t.start()
        time.sleep(args.stop_after)
        engine.cancel()  # the Stop button, from the UI thread
        t.join()
        print("[stopped]")
        kv = engine.stats()["kv"]
        print(f"logical tokens {kv['logical_tokens']}, device budget {kv['budget_cells']} cells, "
              f"offloaded {kv['offloaded_tokens_final']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
