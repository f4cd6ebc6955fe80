"""Issue 10.4: one handle used from two threads, and a context freed while a call runs (asrkf.h, "Threads").

Each scenario runs in a child process: a race that corrupts memory may crash rather than fail, and a crash must
fail the test, not end the test run.
"""

import os
import subprocess
import sys
import textwrap

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

PRELUDE = textwrap.dedent("""
    import sys, threading, time
    sys.path.insert(0, {tests!r})
    from asrkf_gguf import AsrkfError, CellState, KVCache
    from conftest import random_tokens, session
    import numpy as np
""")


def run_child(body, tiny_path, seconds):
    code = PRELUDE.format(tests=TESTS_DIR) + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code, tiny_path, str(seconds)], capture_output=True, text=True,
                         timeout=120, env=os.environ.copy())
    assert res.returncode == 0, f"child exited with {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr[-4000:]}"
    assert res.stdout.strip().endswith("OK"), res.stdout + res.stderr[-4000:]
    return res.stdout


HAMMER = """
    path, seconds = sys.argv[1], float(sys.argv[2])
    n = 120
    s = session(path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64)
    kv = KVCache(ctx=s.context)
    s.decode(random_tokens(n, seed=60), 0)
    errors, counts = [], {"move": 0, "flip": 0}
    stop = time.monotonic() + seconds

    def mover():
        # offload and thaw one block (thaw finds its original cells free: the other thread never takes cells)
        try:
            while time.monotonic() < stop:
                kv.offload(range(0, 30))
                kv.thaw(range(0, 30))
                counts["move"] += 1
        except Exception as e:
            errors.append(("move", repr(e)))

    def flipper():
        # freeze and unfreeze another block, reading the state and checking the invariants in between
        try:
            while time.monotonic() < stop:
                kv.freeze(range(40, 80))
                info = kv.info()
                assert info.n_frozen == 40, info
                assert (info.n_offloaded, info.n_cells_used) in ((0, n), (30, n - 30)), info
                pos, state, cell = kv.cells()  # a separate call: the other thread may have moved in between
                assert len(pos) in (n, n - 30) and len(set(cell.tolist())) == len(pos), (pos, cell)
                assert int(np.sum(state == CellState.FROZEN)) == 40, state
                kv.check()
                kv.unfreeze(range(40, 80))
                kv.offloaded()
                counts["flip"] += 1
        except Exception as e:
            errors.append(("flip", repr(e)))

    threads = [threading.Thread(target=mover), threading.Thread(target=flipper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert counts["move"] > 5 and counts["flip"] > 5, counts
    kv.check()
    pos, state, _ = kv.cells()
    assert pos.tolist() == list(range(n)) and np.all(state == CellState.ACTIVE)
    assert kv.offloaded().tolist() == [] and kv.info().n_frozen == 0
    # the cache still decodes as one consistent sequence
    s.decode(random_tokens(4, seed=61), n)
    kv.check()
    kv.close()
    s.close()
    print(counts, "OK")
"""


def test_two_threads_on_one_handle_keep_the_invariants(tiny_path):
    run_child(HAMMER, tiny_path, 3)


FREE_RACE = """
    path, seconds = sys.argv[1], float(sys.argv[2])
    for round in range(6):
        s = session(path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64)
        kv = KVCache(ctx=s.context)
        s.decode(random_tokens(100, seed=62 + round), 0)
        freed, errors, calls = threading.Event(), [], [0]

        def worker():
            # offload / thaw / freeze / check until the context is gone; then every call must say so (-4)
            try:
                while True:
                    kv.offload(range(0, 40))
                    kv.freeze(range(50, 90))
                    kv.info()
                    kv.check()
                    kv.thaw(range(0, 40))
                    kv.unfreeze(range(50, 90))
                    calls[0] += 1
            except AsrkfError as e:
                if e.code != -4:
                    errors.append(repr(e))
            except Exception as e:
                errors.append(repr(e))
            for call in (kv.info, kv.check, lambda: kv.thaw([1])):
                try:
                    call()
                    errors.append("a call after llama_free succeeded")
                except AsrkfError as e:
                    if e.code != -4:
                        errors.append(repr(e))

        t = threading.Thread(target=worker)
        t.start()
        time.sleep(0.05 + 0.1 * round)
        s.close()  # llama_free while the worker is inside a call (or between two)
        t.join()
        assert not errors, errors
        kv.close()
    print("OK")
"""


def test_freeing_the_context_while_a_call_runs(tiny_path):
    run_child(FREE_RACE, tiny_path, 0)
