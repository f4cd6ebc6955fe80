"""Run the stateful fuzzers of tests/test_kv_fuzz.py (KVCache + guarded llama.cpp calls, two sequences) and
tests/test_engine_fuzz.py (Engine) for longer than the suite does.

    ASRKF_GGUF_LIB_DIR=... PYTHONPATH=python python scripts/fuzz.py --examples 2000 --steps 200 --seed 7

Rounds of --round examples each, seeds --seed, --seed+1, ... until --examples examples ran or --minutes passed.
Each round's seed is printed before it runs and again on failure (with hypothesis's falsifying steps); replay a
failure with --seed SEED --examples ROUND. Exit code 1 on failure.
"""

import argparse
import logging
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "python"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="KV machine examples in all")
    ap.add_argument("--steps", type=int, default=200, help="steps per KV example")
    ap.add_argument("--engine-examples", type=int, default=None, help="Engine examples in all (default examples/10)")
    ap.add_argument("--engine-steps", type=int, default=40)
    ap.add_argument("--round", type=int, default=100, help="examples per round (one seed each)")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--minutes", type=float, default=None, help="stop starting rounds after this long")
    ap.add_argument("--only", choices=["kv", "engine"], default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"fuzz: seed {seed}", flush=True)
    logging.getLogger("asrkf_gguf").setLevel(logging.CRITICAL)  # the refusals the fuzz provokes log errors

    import asrkf_gguf  # noqa: F401  (loads the patched libllama)
    from conftest import TINY_SPECS, session
    from asrkf_gguf import KVCache
    from asrkf_gguf.testmodels import tiny_model
    import test_kv_fuzz as kvf
    import test_engine_fuzz as ef

    path = str(tiny_model(TINY_SPECS["llama-gqa"]))
    t0 = time.monotonic()
    engine_left = args.engine_examples if args.engine_examples is not None else args.examples // 10
    kv_left = args.examples
    totals = dict(kv_ops=0, compared=0, refused=0, engine_ops=0)
    with session(path, n_ctx=kvf.N_CELLS, n_batch=16, n_ubatch=16, flash_attn="off", n_threads=1, n_seq_max=2) as s, \
            session(path, n_ctx=2 * kvf.MAX_POS + 16, n_batch=16, n_ubatch=16, flash_attn="off", n_threads=1,
                    n_seq_max=2) as ref:
        holder = {"kv": KVCache(ctx=s.context)}
        assert holder["kv"].info().n_cells == kvf.N_CELLS
        r = 0
        while (kv_left > 0 and args.only != "engine") or (engine_left > 0 and args.only != "kv"):
            if args.minutes is not None and time.monotonic() - t0 > 60 * args.minutes:
                break
            rs = seed + r
            r += 1
            which = "kv" if (r % 2 == 1 or engine_left <= 0 or args.only == "kv") and kv_left > 0 \
                and args.only != "engine" else "engine"
            n = min(args.round, kv_left if which == "kv" else engine_left)
            print(f"fuzz: round {r}: {which} machine, seed {rs}, {n} examples ({time.monotonic() - t0:.0f} s in)",
                  flush=True)
            try:
                if which == "kv":
                    ops, compared, refused = kvf.run_kv_machine((s, holder, ref), n, args.steps, rs)
                    totals["kv_ops"] += ops
                    totals["compared"] += compared
                    totals["refused"] += refused
                    kv_left -= n
                else:
                    totals["engine_ops"] += ef.run_engine_machine(path, n, args.engine_steps, rs)
                    engine_left -= n
            except BaseException as err:  # noqa: BLE001  (hypothesis raises the failure, an ExceptionGroup for several)
                import traceback

                traceback.print_exception(err)  # with hypothesis's notes: the falsifying steps of each failure
                print(f"fuzz: FAILED in round {r} ({which} machine), seed {rs}: {type(err).__name__}: {err}",
                      flush=True)
                print(f"fuzz: replay with --only {which} --seed {rs} --examples {n} "
                      f"--{'steps' if which == 'kv' else 'engine-steps'} "
                      f"{args.steps if which == 'kv' else args.engine_steps}", flush=True)
                return 1
        holder["kv"].close()
    print(f"fuzz: passed: {totals['kv_ops']} KV operations ({totals['refused']} refused as predicted, logits "
          f"compared {totals['compared']} times), {totals['engine_ops']} Engine operations in "
          f"{time.monotonic() - t0:.0f} s; seed {seed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
