"""A logical context 4x larger than the cache: offload as it goes, then thaw an old span intact."""

import numpy as np

from asrkf_gguf import KVCache
from conftest import random_tokens, session

N_CELLS = 256
SINKS = 4
KEEP = 128
CHUNK = 32


def test_decode_past_4x_n_ctx_with_rolling_offload(tiny_path):
    n_total = 4 * N_CELLS + 2 * CHUNK
    tokens = random_tokens(n_total, seed=9)
    span = list(range(100, 132))
    opts = dict(flash_attn="on", kv_type="q8_0", n_batch=CHUNK, n_ubatch=CHUNK)

    # reference: a cache that holds everything; the span was computed with full context in both runs
    with session(tiny_path, n_ctx=2048, **opts) as ref, KVCache(ctx=ref.context) as ref_kv:
        for start in range(0, n_total, CHUNK):
            ref.decode(tokens[start:start + CHUNK], start)
        ref_kv.offload(span)
        k_ref = [ref_kv.k_rows(il, span) for il in range(2)]
        ref_kv.thaw(span)

    with session(tiny_path, n_ctx=N_CELLS, **opts) as s, KVCache(ctx=s.context) as kv:
        for start in range(0, n_total, CHUNK):
            info = kv.info()
            if info.n_cells_used + CHUNK > N_CELLS - CHUNK:
                pos, _, _ = kv.cells()
                movable = pos[(pos >= SINKS)][: len(pos) - KEEP]
                kv.offload(movable)
            s.decode(tokens[start:start + CHUNK], start)
            # every position is resident or offloaded, exactly once
            pos, _, _ = kv.cells()
            off = kv.offloaded()
            assert len(pos) + len(off) == start + CHUNK
            assert np.array_equal(np.union1d(pos, off), np.arange(start + CHUNK))
            assert kv.info().n_cells_used <= N_CELLS
        assert s.pos_max() == n_total - 1 >= 4 * N_CELLS
        kv.check()

        assert set(span) <= set(kv.offloaded().tolist())
        k_got = [kv.k_rows(il, span) for il in range(2)]
        for a, b in zip(k_ref, k_got):
            assert np.array_equal(a, b)

        kv.offload(kv.cells()[0][SINKS:SINKS + 64])  # room for the span
        kv.thaw(span)
        pos, _, _ = kv.cells()
        assert set(span) <= set(pos.tolist())
        kv.check()
        # and the thawed rows are the same bytes: send them back and compare
        kv.offload(span)
        for il in range(2):
            assert np.array_equal(kv.k_rows(il, span), k_ref[il])
        logits = s.decode([5], n_total)
        assert np.all(np.isfinite(logits))

