"""A frozen cell is out of attention exactly as if it had been removed; unfreezing brings it back."""

import llama_cpp
import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache
from conftest import KV_CASES, random_tokens, session

FROZEN = [2, 3, 10, 11, 12, 40, 77]


@pytest.mark.parametrize("kv_type,fa", KV_CASES)
@pytest.mark.parametrize("gpu_layers", [None, 1])
def test_freeze_equals_seq_rm(tiny_paths, kv_type, fa, gpu_layers):
    # gpu_layers 1 (of 2): one layer's K/V on the GPU, the other in host memory (-ngl below the layer count); on a
    # CPU build the same check again. None: the suite's default placement
    tokens = random_tokens(90, seed=7)
    opts = dict(n_ctx=256, kv_type=kv_type, flash_attn=fa, n_batch=32, n_ubatch=32, n_seq_max=2,
                **({} if gpu_layers is None else {"n_gpu_layers": gpu_layers}))
    for model in ("llama-gqa", "qwen2"):
        with session(tiny_paths[model], **opts) as ref:
            ref.decode(tokens[:-1], 0)
            for p in FROZEN:
                assert ref.seq_rm(p, p + 1)
            # park another sequence in the freed cells so that the next token lands in the same cell as in the
            # frozen run: flash attention's f16 accumulation depends on the order of the cells
            ref.batch.reset()
            ref.batch.add_sequence(tokens[: len(FROZEN)], 1, False)
            assert llama_cpp.llama_decode(ref.ctx, ref.batch.batch) == 0
            expected = ref.decode(tokens[-1:], len(tokens) - 1)
        with session(tiny_paths[model], **opts) as s, KVCache(ctx=s.context) as kv:
            s.decode(tokens[:-1], 0)
            kv.freeze(FROZEN)
            pos, state, _ = kv.cells()
            assert set(pos[state == CellState.FROZEN].tolist()) == set(FROZEN)
            assert kv.info().n_frozen == len(FROZEN)
            got = s.decode(tokens[-1:], len(tokens) - 1)
            assert np.max(np.abs(got - expected)) <= 1e-5


def test_unfreeze_restores_full_attention(tiny_path):
    tokens = random_tokens(60, seed=8)
    opts = dict(n_ctx=128, flash_attn="on", n_batch=64, n_ubatch=64)
    frozen = [p for p in FROZEN if p < len(tokens) - 1]
    with session(tiny_path, **opts) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    with session(tiny_path, **opts) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:-1], 0)
        kv.freeze(frozen)
        frozen_logits = s.decode(tokens[-1:], len(tokens) - 1)
        s.seq_rm(len(tokens) - 1, -1)
        kv.unfreeze(frozen)
        assert kv.info().n_frozen == 0
        got = s.decode(tokens[-1:], len(tokens) - 1)
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert np.max(np.abs(frozen_logits - expected)) > 1e-4  # freezing did change attention


def test_large_batches_find_their_cells_and_refuse_like_small_ones(tiny_path):
    # batches of a sixteenth of the cache or more are resolved by one scan of the cells: same cells, same
    # refusals (duplicate, offloaded, absent), and nothing changes when a batch is refused
    from asrkf_gguf import AsrkfError

    tokens = random_tokens(120, seed=9)
    with session(tiny_path, n_ctx=128, n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens, 0)
        kv.offload([7])
        big = [p for p in range(100, 4, -1) if p != 7]  # descending: the order given is kept
        for bad, why in ((big + [50], "given twice"), (big + [7], "offloaded"), (big + [500], "not in sequence")):
            with pytest.raises(AsrkfError) as err:
                kv.freeze(bad)
            assert err.value.code == -1 and why in err.value.message
            assert kv.info().n_frozen == 0
        kv.freeze(big)
        pos, state, _ = kv.cells()
        assert set(pos[state == CellState.FROZEN].tolist()) == set(big)
        kv.unfreeze(big[::3])
        pos, state, _ = kv.cells()
        assert set(pos[state == CellState.FROZEN].tolist()) == set(big) - set(big[::3])
        kv.check()
