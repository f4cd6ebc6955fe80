"""Copies made ahead of an offload (KVCache.offload_ahead): rows copied to the host while their cells stay resident
and attended; a later offload only frees the cells. A batch is copied at once and leaves one cell per new token, so
asrkf attends the whole budget as h2o does (issue 16)."""

import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache
from asrkf_gguf.controller import Controller, ControllerConfig
from asrkf_gguf.generate import generate
from asrkf_gguf.policies import make_policy
from conftest import KV_CASES, random_tokens, session

AHEAD = [1, 5, 6, 7, 20, 33, 50, 51, 52, 60, 75]
OPTS = dict(n_ctx=256, n_batch=64, n_ubatch=64)


@pytest.mark.parametrize("kv_type,fa", KV_CASES)
def test_copies_made_ahead_survive_decodes_and_thaw_bit_identical(tiny_paths, kv_type, fa):
    tokens = random_tokens(100, seed=60)
    with session(tiny_paths["llama-hd128"], kv_type=kv_type, flash_attn=fa, **OPTS) as ref:
        ref.decode(tokens[:80], 0)
        for i in range(80, 99):  # decoded as below: one token at a time
            ref.decode(tokens[i:i + 1], i)
        expected = ref.decode(tokens[-1:], 99)
    # force_gather: the device path's gather, so that its passes can be counted
    with session(tiny_paths["llama-hd128"], kv_type=kv_type, flash_attn=fa, **OPTS) as s, \
            KVCache(ctx=s.context, force_gather=True) as kv:
        s.decode(tokens[:80], 0)
        before = kv.cells()
        kv.offload_ahead(AHEAD)
        assert kv.ahead(0) == len(AHEAD) and kv.info().n_offloaded == 0
        for a, b in zip(before, kv.cells()):  # nothing left the cache
            assert np.array_equal(a, b)
        assert kv.info().host_bytes_used == len(AHEAD) * kv.info().kv_bytes_per_token
        kv.check()
        # the copies stay valid while later tokens decode into other cells
        for i in range(80, 99):
            s.decode(tokens[i:i + 1], i)
        gathers = kv.info().n_gathers
        kv.offload(AHEAD[:4])
        kv.offload(AHEAD[4:] + [90])  # one position without a copy: copied now
        assert kv.info().n_gathers == gathers + 1  # only position 90 was gathered
        assert kv.ahead(0) == 0 and np.array_equal(kv.offloaded(), np.array(sorted(AHEAD + [90])))
        kv.check()
        kv.thaw(AHEAD + [90])
        kv.check()
        got = s.decode(tokens[-1:], 99)
    assert np.array_equal(expected, got)


def test_offload_ahead_replaces_the_set_and_keeps_the_host_store_exact(tiny_path):
    tokens = random_tokens(100, seed=61)
    with session(tiny_path, **OPTS) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens, 0)
        per = kv.info().kv_bytes_per_token
        kv.offload_ahead(AHEAD)
        kv.offload_ahead(AHEAD[5:] + [80, 81])  # the first five are released, two are new
        assert kv.ahead(0) == len(AHEAD) - 5 + 2
        assert kv.info().host_bytes_used == kv.ahead(0) * per
        kv.check()
        kv.offload_ahead([])
        assert kv.ahead(0) == 0 and kv.info().host_bytes_used == 0
        kv.check()


def test_offload_ahead_refuses_what_offload_refuses_and_changes_nothing(tiny_path):
    tokens = random_tokens(50, seed=62)
    with session(tiny_path, **OPTS) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens, 0)
        kv.offload_ahead([3, 4])
        kv.offload([10])
        for bad in ([3, 3], [10], [70]):  # twice, offloaded, never decoded
            with pytest.raises(Exception):
                kv.offload_ahead(bad)
            assert kv.ahead(0) == 2 and kv.ahead_queued(0).tolist() == [3, 4]  # the queue too
        kv.check()


def test_a_removal_releases_its_copies_and_the_new_rows_are_the_ones_offloaded(tiny_path):
    # the copies of positions that were removed and decoded again hold the old rows: thawing them would give the
    # new positions the old keys and values. The removal must release them, so that offload copies the new rows
    tokens = random_tokens(100, seed=63)
    other = random_tokens(40, seed=64)
    with session(tiny_path, **OPTS) as ref:  # the same decodes, nothing moved
        ref.decode(tokens[:99], 0)
        assert ref.seq_rm(60, -1)
        ref.decode(other[:39], 60)
        expected = ref.decode(other[39:40], 99)
    with session(tiny_path, **OPTS) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:99], 0)
        kv.offload_ahead(AHEAD)
        assert s.seq_rm(60, -1)
        assert kv.ahead(0) == len([p for p in AHEAD if p < 60])
        kv.check()
        s.decode(other[:39], 60)
        kv.offload([p for p in AHEAD if p < 60] + [62, 75])  # 62 and 75 hold new rows
        kv.check()
        kv.thaw([p for p in AHEAD if p < 60] + [62, 75])
        got = s.decode(other[39:40], 99)
    assert np.array_equal(expected, got)


def test_a_shift_releases_the_copies_of_its_sequence(tiny_path):
    import llama_cpp

    with session(tiny_path, **OPTS) as s, KVCache(ctx=s.context) as kv:
        s.decode(random_tokens(60, seed=65), 0)
        kv.offload_ahead([5, 6, 40])
        llama_cpp.llama_memory_seq_add(s.context.memory, 0, 30, -1, 10)  # moves 40 (keys re-rotated)
        assert kv.ahead(0) == 0
        kv.check()


def test_a_batch_copied_ahead_keeps_the_budget_attended_as_h2o_does(tiny_path):
    # h2o drops one token per new token and attends the whole budget; a batched offload that frees its cells at once
    # left asrkf a batch short right after each batch (1,008 of 1,024 cells on average at 25%)
    budget = 160
    prompt = random_tokens(300, seed=66)
    seen = {}
    for ahead in (True, False):
        with session(tiny_path, n_ctx=budget, flash_attn="on", n_batch=64, n_ubatch=64) as s, \
                KVCache(ctx=s.context) as kv:
            ctl = Controller(kv, make_policy("asrkf", recent=16, period=4),
                             ControllerConfig(budget_cells=budget, offload_batch=16, offload_ahead=ahead))
            resident = []
            ctl.on_step = lambda st: resident.append(st["active"] + st["frozen"])
            generate(s, ctl, prompt, 48, check_every_step=True)
            seen[ahead] = resident[-48:]  # the decode steps, all under the full budget
            assert ctl.table.count(CellState.OFFLOADED) == 300 + 48 - budget
            if ahead:
                assert ctl.stats.offloads_ahead >= 48 - 16
                assert kv.ahead(0) < 16
    assert min(seen[True]) == budget
    assert min(seen[False]) < budget  # the measure sees the difference


def test_release_ahead_frees_cells_in_the_order_given_and_skips_what_moved(tiny_path):
    # the controller hands its leaving order over once per batch; each decode step frees the next cells natively
    tokens = random_tokens(100, seed=67)
    order = [50, 7, 33, 1, 60, 20, 75, 5]  # not sorted: the order is the caller's
    with session(tiny_path, **OPTS) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens, 0)
        kv.offload_ahead(order)
        assert np.array_equal(kv.ahead_queued(0), order)
        gathers = kv.info().n_gathers
        assert kv.release_ahead(2).tolist() == [50, 7]
        kv.offload([33])  # moved by someone else (recall): it no longer has its copy, skipped
        assert kv.release_ahead(1, lo=2).tolist() == [60]  # 1 is below lo: skipped too
        assert kv.info().n_gathers == gathers  # nothing was copied again
        assert np.array_equal(kv.offloaded(), np.array([7, 33, 50, 60]))
        assert kv.ahead_queued(0).tolist() == [20, 75, 5]
        kv.check()
        # fewer left than asked: nothing changes and the queue is emptied (the copies stay until replaced)
        assert kv.release_ahead(4).size == 0
        assert kv.ahead_queued(0).size == 0 and kv.release_ahead(1).size == 0
        assert np.array_equal(kv.offloaded(), np.array([7, 33, 50, 60])) and kv.ahead(0) == 4
        kv.check()
        kv.thaw([7, 33, 50, 60])
        kv.offload_ahead([5, 75])
        assert kv.release_ahead(1, hi=70).tolist() == [5]  # 75 is outside [lo, hi): not freed
        assert kv.release_ahead(1, hi=70).size == 0
        kv.check()


def test_release_ahead_skips_positions_a_removal_released(tiny_path):
    tokens = random_tokens(100, seed=68)
    with session(tiny_path, **OPTS) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens, 0)
        kv.offload_ahead([80, 10, 90, 11])
        assert s.seq_rm(85, -1)  # 90's copy is released with its position
        assert kv.release_ahead(3).tolist() == [80, 10, 11]
        with pytest.raises(Exception):
            kv.release_ahead(-1)
        kv.check()
