"""offload -> thaw must give back exactly the computation that never offloaded."""

import llama_cpp
import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache
from conftest import KV_CASES, TINY_SPECS, random_tokens, session

SCATTERED = [1, 5, 6, 7, 20, 33, 50, 51, 52, 90, 97]


def reference_and_roundtrip(path, tokens, offload, force_gather=False, stats=None, scratch_bytes=0, **opts):
    n = len(tokens)
    with session(path, **opts) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], n - 1)
    with session(path, **opts) as s, KVCache(ctx=s.context, force_gather=force_gather, scratch_bytes=scratch_bytes) as kv:
        s.decode(tokens[:-1], 0)
        before = kv.cells()
        kv.offload(offload)
        if stats is not None:
            stats["offload"] = kv.info()
        assert np.array_equal(kv.offloaded(), np.sort(offload))
        pos, _, _ = kv.cells()
        assert set(pos.tolist()).isdisjoint(offload)
        assert kv.info().n_offloaded == len(offload)
        kv.thaw(offload)
        if stats is not None:
            stats["thaw"] = kv.info()
        kv.check()
        after = kv.cells()
        for a, b in zip(before, after):
            assert np.array_equal(a, b)
        assert kv.info().n_offloaded == 0 and kv.info().host_bytes_used == 0
        got = s.decode(tokens[-1:], n - 1)
    return expected, got


@pytest.mark.parametrize("kv_type,fa", KV_CASES)
@pytest.mark.parametrize("model", sorted(TINY_SPECS))
def test_roundtrip_bit_identical(tiny_paths, model, kv_type, fa):
    tokens = random_tokens(100, seed=3)
    expected, got = reference_and_roundtrip(tiny_paths[model], tokens, SCATTERED,
                                            n_ctx=256, kv_type=kv_type, flash_attn=fa, n_batch=64, n_ubatch=64)
    assert np.array_equal(expected, got)


@pytest.mark.parametrize("kv_type,fa", KV_CASES)
@pytest.mark.parametrize("layout", ["scattered", "one-run"])
def test_roundtrip_through_the_device_gather_path(tiny_paths, kv_type, fa, layout):
    # the get_rows gather that device caches use, forced on the CPU cache: same bytes as the per-run copies
    tokens = random_tokens(100, seed=20)
    offload = SCATTERED if layout == "scattered" else list(range(30, 70))
    stats = {}
    expected, got = reference_and_roundtrip(tiny_paths["llama-hd128"], tokens, offload, force_gather=True, stats=stats,
                                            n_ctx=256, kv_type=kv_type, flash_attn=fa, n_batch=64, n_ubatch=64)
    assert np.array_equal(expected, got)
    info = stats["offload"]
    assert info.n_gathers == 1
    # one copy back per gathered tensor: K of both layers, and V too unless it is stored transposed
    n_tensors = 2 if fa == "off" else 4
    n_channel_copies = 0 if fa == "on" else 2 * 128 * (len(offload) if layout == "scattered" else 1)
    assert info.n_copies <= n_tensors + n_channel_copies


@pytest.mark.parametrize("kv_type,fa", [("f16", "on"), ("q4_0", "on")])
def test_roundtrip_in_many_gather_passes(tiny_paths, kv_type, fa):
    # a scratch of one row: every row is its own pass, queued back to back on one scratch buffer; what lands
    # must still be each row's own bytes, and the checksums hashed pass by pass must match at thaw
    tokens = random_tokens(100, seed=21)
    stats = {}
    expected, got = reference_and_roundtrip(tiny_paths["llama-hd128"], tokens, SCATTERED, force_gather=True,
                                            stats=stats, scratch_bytes=1, n_ctx=256, kv_type=kv_type, flash_attn=fa,
                                            n_batch=64, n_ubatch=64)
    assert np.array_equal(expected, got)
    assert stats["offload"].n_gathers == len(SCATTERED)
    assert stats["thaw"].n_gathers == 2 * len(SCATTERED)


def test_roundtrip_with_k_and_v_of_different_types(tiny_paths):
    # K f16 and V q8_0 have rows of different sizes: every tensor is gathered on its own (no common stride), in
    # many passes; same bytes back
    tokens = random_tokens(100, seed=22)
    stats = {}
    expected, got = reference_and_roundtrip(tiny_paths["llama-hd128"], tokens, SCATTERED, force_gather=True,
                                            stats=stats, scratch_bytes=1, n_ctx=256, kv_type="f16",
                                            kv_type_v="q8_0", flash_attn="on", n_batch=64, n_ubatch=64)
    assert np.array_equal(expected, got)
    assert stats["offload"].type_k != stats["offload"].type_v
    assert stats["offload"].n_gathers == len(SCATTERED)


@pytest.mark.parametrize("kv_type,fa", [("f16", "off"), ("q8_0", "on")])
def test_roundtrip_demo_model(real_demo_model_path, kv_type, fa):
    tokens = random_tokens(300, seed=4, vocab=40000)
    offload = sorted(set(np.random.default_rng(5).choice(np.arange(4, 290), 120, replace=False).tolist()))
    expected, got = reference_and_roundtrip(real_demo_model_path, tokens, offload,
                                            n_ctx=512, kv_type=kv_type, flash_attn=fa, n_batch=128, n_ubatch=128)
    assert np.array_equal(expected, got)


def test_thaw_elsewhere_when_the_cells_were_reused(tiny_path):
    # the original cells are taken by new tokens: the rows go to other free cells and still compute the same
    tokens = random_tokens(160, seed=6)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=32, n_ubatch=32) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:100], 0)
        kv.offload(range(10, 40))
        cells_before = dict(zip(*kv.cells()[::2]))
        s.decode(tokens[100:140], 100)  # reuses cells 10..39 first
        kv.thaw(range(10, 40), frozen=True)
        pos, state, cell = kv.cells()
        moved = {p: c for p, c in zip(pos.tolist(), cell.tolist()) if 10 <= p < 40}
        assert len(moved) == 30 and all(state[(pos >= 10) & (pos < 40)] == CellState.FROZEN)
        assert not any(cells_before.get(p) == c for p, c in moved.items())
        # contiguous run of free cells when one exists
        assert sorted(moved.values()) == list(range(min(moved.values()), min(moved.values()) + 30))
        kv.check()


def test_iswa_model_manages_the_full_attention_cache(iswa_model):
    # Gemma 3 (and its written stand-in): window layers keep their own window; freeze/offload act on the
    # full-attention layers' cache
    path, vocab = iswa_model
    tokens = random_tokens(200, seed=19, vocab=vocab)
    offload = list(range(8, 60, 3)) + list(range(100, 140))
    expected, got = reference_and_roundtrip(path, tokens, offload,
                                            n_ctx=512, kv_type="f16", flash_attn="on", n_batch=64, n_ubatch=64)
    assert np.array_equal(expected, got)
    with session(path, n_ctx=512, n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        info = kv.info()
        assert info.iswa and info.n_layer_kv < info.n_layer
        s.decode(tokens[:100], 0)
        kv.offload([20, 21])
        # a refused shift must not reach the window layers' cache either
        llama_cpp.llama_memory_seq_add(s.context.memory, 0, 50, -1, -35)
        assert s.pos_max() == 99 and kv.offloaded().tolist() == [20, 21]
        kv.thaw([20, 21])
        kv.check()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_roundtrip_of_one_long_run_spread_over_threads(kv_type):
    # a contiguous move of host-resident K/V is one run per tensor; past 8 MiB it is copied by the store's threads,
    # one tensor each (Llama-3-8B's K/V rows, 4 layers: 16 KiB a token in f16, 640 tokens = 10 MiB)
    from asrkf_gguf.testmodels import TinyModelSpec, tiny_model

    path = str(tiny_model(TinyModelSpec(arch="llama", n_layer=4, n_embd=1024, n_head=8, n_head_kv=8, head_dim=128,
                                        n_ff=256, n_vocab=512, n_ctx_train=4096, dtype="f16")))
    tokens = random_tokens(800, seed=21, vocab=500)
    expected, got = reference_and_roundtrip(path, tokens, list(range(100, 740)), n_ctx=1024, kv_type=kv_type,
                                            flash_attn="on", n_batch=256, n_ubatch=256, n_gpu_layers=0)
    assert np.array_equal(expected, got)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("layout", ["scattered", "one-run"])
def test_roundtrip_with_part_of_the_model_on_the_gpu(tiny_paths, kv_type, layout):
    # -ngl below the layer count: one layer's K/V on the GPU (gathered), the other in host memory (copied while the
    # device's copies run). On a CPU build both are host memory: the same check of the per-run path
    tokens = random_tokens(100, seed=22)
    offload = SCATTERED if layout == "scattered" else list(range(30, 70))
    expected, got = reference_and_roundtrip(tiny_paths["llama-hd128"], tokens, offload, n_ctx=256, kv_type=kv_type,
                                            flash_attn="on", n_batch=64, n_ubatch=64, n_gpu_layers=1)
    assert np.array_equal(expected, got)
