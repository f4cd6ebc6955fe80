"""How offload, thaw and the host reads of recall move rows, checked on the CPU cache with the device paths
forced (force_gather): slots in one run go straight to and from host memory, slots spread out are staged, and the
host store keeps a move's slots in one run; every path gives back the same bytes."""

import numpy as np
import pytest

from asrkf_gguf import KVCache
from asrkf_gguf.kv import AsrkfError
from conftest import random_tokens, session

OPTS = dict(n_ctx=256, kv_type="f16", flash_attn="on", n_batch=64, n_ubatch=64)
N_TENSORS = 4  # K and V of the tiny model's two layers (V is not transposed with flash attention on)


def logits_after(path, tokens, moves, **kv_opts):
    """Decode tokens[:-1], run moves(kv), decode the last token: its logits."""
    n = len(tokens)
    with session(path, **OPTS) as s, KVCache(ctx=s.context, **kv_opts) as kv:
        s.decode(tokens[:-1], 0)
        moves(kv)
        kv.check()
        return s.decode(tokens[-1:], n - 1)


def test_thaw_of_spread_slots_is_staged_and_exact(tiny_paths):
    # offload 40 positions (one run of slots), thaw every other one, then the rest: the second thaw reads 20 slots
    # that are all apart, so it stages them (one upload per tensor) instead of an upload per slot and tensor
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(100, seed=31)
    span = np.arange(20, 60)
    copies = {}

    def moves(kv):
        kv.offload(span)
        kv.thaw(span[::2])
        before = kv.info().n_copies
        kv.thaw(span[1::2])
        copies["spread"] = kv.info().n_copies - before

    with session(path, **OPTS) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    got = logits_after(path, tokens, moves, force_gather=True)
    assert np.array_equal(expected, got)
    assert copies["spread"] == N_TENSORS


def test_thaw_of_few_slot_runs_goes_straight_from_the_slots(tiny_paths):
    # two runs of slots: one upload per run and tensor, nothing staged
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(100, seed=32)
    copies = {}

    def moves(kv):
        kv.offload(np.arange(10, 80))
        before = kv.info().n_copies
        kv.thaw(np.r_[np.arange(10, 30), np.arange(50, 70)])
        copies["two_runs"] = kv.info().n_copies - before
        kv.thaw(np.r_[np.arange(30, 50), np.arange(70, 80)])

    with session(path, **OPTS) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    assert np.array_equal(expected, logits_after(path, tokens, moves, force_gather=True))
    assert copies["two_runs"] == 2 * N_TENSORS


def test_an_offload_larger_than_the_free_slots_gets_one_run(tiny_paths):
    # chunks of 8 slots: 6 offloaded leave 2 free; 12 more do not fit, so they take one new chunk of 12 slots
    # (one run: one device copy per tensor straight into host memory) instead of 2 free slots + 10 new ones
    path = tiny_paths["llama-hd128"]
    with session(path, **OPTS) as s, KVCache(ctx=s.context, host_chunk_cells=8, force_gather=True) as kv:
        s.decode(random_tokens(100, seed=33), 0)
        kv.offload(np.arange(10, 16))
        per_token = kv.info().kv_bytes_per_token
        assert kv.info().host_bytes == 8 * per_token
        before = kv.info().n_copies
        kv.offload(np.arange(40, 52))
        assert kv.info().n_copies - before == N_TENSORS
        assert kv.info().host_bytes == (8 + 12) * per_token
        # 2 free slots are left in the first chunk: a move of 2 takes them, no new chunk
        kv.offload([60, 61])
        assert kv.info().host_bytes == (8 + 12) * per_token
        kv.thaw(np.r_[np.arange(10, 16), np.arange(40, 52), [60, 61]])
        kv.check()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_k_rows_gathered_equal_k_rows_copied_per_run(tiny_paths, kv_type):
    # recall reads every movable position's K; resident ones in many runs are gathered on the device into staging
    # (forced here on the CPU): the bytes must be those the per-run copies read, offloaded positions included
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(120, seed=34)
    rng = np.random.default_rng(35)
    pos = rng.permutation(np.arange(0, 119))[:90]  # no order: many runs of cells
    out = {}
    for force in (False, True):
        with session(path, **{**OPTS, "kv_type": kv_type}) as s, KVCache(ctx=s.context, force_gather=force) as kv:
            s.decode(tokens, 0)
            kv.offload(np.arange(30, 50))
            gathers = kv.info().n_gathers
            out[force] = [kv.k_rows(il, pos) for il in kv.layers().tolist()]
            if force:
                assert kv.info().n_gathers - gathers == len(kv.layers())
    for a, b in zip(out[False], out[True]):
        assert np.array_equal(a, b)


def test_reserved_host_memory_is_allocated_ahead_and_taken_by_the_offloads(tiny_paths):
    # reserve_host allocates on a background thread; the offloads then take the reserved chunks (host bytes do
    # not grow) and the rows come back exact
    import time

    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(100, seed=36)
    with session(path, **OPTS) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    with session(path, **OPTS) as s, KVCache(ctx=s.context, host_chunk_cells=16, force_gather=True) as kv:
        s.decode(tokens[:-1], 0)
        per_token = kv.info().kv_bytes_per_token
        assert kv.info().host_bytes == 0
        kv.reserve_host(40 * per_token)  # 3 chunks of 16
        deadline = time.monotonic() + 30
        while kv.info().host_bytes < 48 * per_token and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kv.info().host_bytes == 48 * per_token
        kv.offload(np.arange(10, 50))
        assert kv.info().host_bytes == 48 * per_token and kv.info().host_bytes_used == 40 * per_token
        kv.reserve_host(0)
        kv.thaw(np.arange(10, 50))
        kv.check()
        assert np.array_equal(expected, s.decode(tokens[-1:], len(tokens) - 1))
        with pytest.raises(ValueError):
            kv.reserve_host(-1)


@pytest.mark.parametrize("kv_type,fa", [("f16", "on"), ("q8_0", "on"), ("f16", "off")])
def test_pageable_store_stages_every_move_and_is_exact(tiny_paths, kv_type, fa):
    # pinned_host=False: the rows live in pageable memory and every device move goes through the handle's staging
    # (forced on the CPU cache with force_gather): offload in several rounds of passes, a spread thaw and a
    # one-run thaw, the same logits as never offloading, and one gather per pass, not a copy per run
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(100, seed=39)
    opts = {**OPTS, "kv_type": kv_type, "flash_attn": fa}
    with session(path, **opts) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    with session(path, **opts) as s, KVCache(ctx=s.context, pinned_host=False, force_gather=True,
                                             scratch_bytes=4096) as kv:
        s.decode(tokens[:-1], 0)
        kv.offload(np.arange(5, 90, 2))
        assert kv.info().n_gathers > 1  # passes of a few rows
        kv.thaw(np.arange(5, 90, 4))
        kv.thaw(np.arange(7, 90, 4))
        kv.offload(np.arange(30, 60))
        kv.debug_corrupt(44, byte=3)  # the staged checksums still catch a corrupted host copy
        with pytest.raises(AsrkfError, match="checksum"):
            kv.thaw(np.arange(30, 60))
        kv.debug_corrupt(44, byte=3)  # flipped back
        kv.thaw(np.arange(30, 60))
        kv.check()
        assert kv.info().n_offloaded == 0
        assert np.array_equal(expected, s.decode(tokens[-1:], len(tokens) - 1))


def test_staged_offload_gathers_in_one_pass_up_to_four_scratches(tiny_paths):
    # a staged offload returns while its last pass still copies to the host: its gather takes one pass where the
    # rows fit 4 x scratch_bytes (earlier passes' copies would be waited for), and a thaw keeps scratch-sized passes
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(100, seed=41)
    with session(path, **OPTS) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    with session(path, **OPTS) as s:
        probe = KVCache(ctx=s.context)
        per_token = probe.info().kv_bytes_per_token
        probe.close()
        with KVCache(ctx=s.context, pinned_host=False, force_gather=True, scratch_bytes=4 * per_token) as kv:
            s.decode(tokens[:-1], 0)
            before = kv.info().n_gathers
            kv.offload(np.arange(10, 50, 3))  # 14 tokens: 4 passes of the scratch, one of 4 scratches
            assert kv.info().n_gathers - before == 1
            before = kv.info().n_gathers
            kv.offload(np.arange(51, 85))  # 34 tokens: more than 4 scratches hold, passes of 16 tokens
            assert kv.info().n_gathers - before == 3
            kv.thaw(np.arange(10, 50, 3))
            kv.thaw(np.arange(51, 85))
            kv.check()
            assert np.array_equal(expected, s.decode(tokens[-1:], len(tokens) - 1))


def test_engine_with_pageable_host_memory_reserves_ahead_and_answers_the_same(demo_model_path):
    # host_memory="pageable" reaches the native store and the controller (which then reserves a prompt's host
    # memory ahead: test_reserved_host_memory_... checks the reservation), and greedy replies are those of pinned
    # host memory
    from asrkf_gguf.engine import Engine, EngineError

    prompt = "Here is a list: " + ", ".join(f"item {i} is {i * 7 % 13}" for i in range(120)) + ". What is item 5?"
    replies = {}
    for memory in ("pinned", "pageable"):
        with Engine(demo_model_path, ctx=2048, kv_budget=256, n_threads=2, host_memory=memory) as e:
            replies[memory] = "".join(e.generate(prompt, max_tokens=12, temperature=0))
            info = e.kv.info()
            assert info.n_offloaded > 0
            assert e.controller.config.reserve_ahead == (memory == "pageable")
    assert replies["pinned"] == replies["pageable"]
    with pytest.raises(EngineError, match="host_memory"):
        Engine(demo_model_path, ctx=2048, kv_budget=256, host_memory="swap")
    with Engine(demo_model_path, ctx=2048, kv_budget=256, n_threads=2, n_gpu_layers=0) as e:  # auto on a CPU: pinned, no reservation
        assert not e.controller.config.reserve_ahead


def test_a_staged_offload_finishes_its_host_copies_while_the_next_tokens_decode(tiny_paths):
    # a staged offload returns once its rows are in the pinned staging; their copy into the slots and their
    # checksums finish on a background thread while the caller decodes on. Tokens decoded right after it (into the
    # freed cells), then every offloaded token thawed back: the same logits, bit for bit, as the same operations on
    # a store that copies before offload returns (pinned host memory), every host copy passes its checksum, and a
    # corrupted one is still caught
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(120, seed=41)
    opts = {**OPTS, "kv_type": "f16", "flash_attn": "on"}
    logits = {}
    for pinned in (True, False):
        with session(path, **opts) as s, KVCache(ctx=s.context, pinned_host=pinned, force_gather=True) as kv:
            s.decode(tokens[:100], 0)
            kv.offload(np.arange(0, 90))  # staged: one round, its host side deferred
            s.decode(tokens[100:-1], 100)  # into the freed cells, while the copies may still run
            kv.debug_corrupt(10, byte=5)
            with pytest.raises(AsrkfError, match="checksum"):
                kv.thaw(np.arange(0, 90))
            kv.debug_corrupt(10, byte=5)  # flipped back
            kv.offload(np.arange(95, 105))
            kv.check()  # every host copy against its recorded checksum
            kv.thaw(np.arange(0, 90))
            kv.thaw(np.arange(95, 105))
            kv.check()
            logits[pinned] = s.decode(tokens[-1:], len(tokens) - 1)
    assert np.array_equal(logits[True], logits[False])


def test_reserving_the_staging_on_a_cpu_cache_allocates_nothing_and_refuses_a_negative_size(tiny_path):
    # the staging is pinned host memory for device moves: a CPU cache has none to pin, and the host store is not
    # the staging (reserve_host is)
    with session(tiny_path, n_ctx=128) as s, KVCache(ctx=s.context) as kv:
        s.decode(random_tokens(40, seed=5), 0)
        before = kv.info()
        kv.reserve_staging(64 << 20)
        after = kv.info()
        assert after.host_bytes == before.host_bytes and after.host_bytes_used == before.host_bytes_used == 0
        with pytest.raises(ValueError):
            kv.reserve_staging(-1)
        kv.offload([3, 4])
        kv.thaw([3, 4])
        kv.check()
