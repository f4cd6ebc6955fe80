"""Bad input gets a clear error and leaves the cache exactly as it was."""

import llama_cpp
import numpy as np
import pytest

from asrkf_gguf import AsrkfError, KVCache
from conftest import random_tokens, session


def snapshot(kv):
    pos, state, cell = kv.cells()
    return pos.tolist(), state.tolist(), cell.tolist(), kv.offloaded().tolist(), kv.info().host_bytes_used


@pytest.fixture
def filled(tiny_path):
    with session(tiny_path, n_ctx=256, flash_attn="on", kv_type="q4_0", n_batch=64, n_ubatch=64) as s, \
            KVCache(ctx=s.context) as kv:
        s.decode(random_tokens(100, seed=14), 0)
        kv.offload([10, 11, 12])
        yield s, kv


@pytest.mark.parametrize("op,args,code,words", [
    ("offload", ([99],), -2, "newest"),
    ("offload", ([5, 6, 5],), -1, "twice"),
    ("offload", ([500],), -1, "not in sequence"),
    ("offload", ([10],), -1, "offloaded"),
    ("offload", ([5], 3), -1, "not in sequence 3"),
    ("freeze", ([1, 500],), -1, "not in sequence"),
    ("freeze", ([11],), -1, "offloaded"),
    ("thaw", ([10, 10],), -1, "twice"),
    ("thaw", ([20],), -1, "resident"),
    ("thaw", ([700],), -1, "not offloaded"),
])
def test_bad_positions_change_nothing(filled, op, args, code, words):
    s, kv = filled
    before = snapshot(kv)
    with pytest.raises(AsrkfError) as err:
        getattr(kv, op)(*args)
    assert err.value.code == code and words in err.value.message
    assert snapshot(kv) == before
    kv.check()


def test_negative_positions_are_rejected_in_python(filled):
    _, kv = filled
    with pytest.raises(ValueError):
        kv.offload([-1])


@pytest.mark.parametrize("op", ["freeze", "unfreeze", "offload", "thaw"])
@pytest.mark.parametrize("pos,words", [
    ([1.7], "whole numbers, got 1.7"),
    ([2, 3.5], "whole numbers, got 3.5"),
    ([float("nan")], "whole numbers, got nan"),
    ([float("inf")], "whole numbers, got inf"),
    (np.array([4.25]), "whole numbers"),
    (["3"], "must be integers"),
    ([True], "must be integers"),
    ([1e12], "[0, 2^31)"),
])
def test_non_integral_positions_are_refused(filled, op, pos, words):
    # a silent int() cast used to freeze position 1 for 1.7
    _, kv = filled
    before = snapshot(kv)
    with pytest.raises(ValueError) as err:
        getattr(kv, op)(pos)
    assert words in str(err.value)
    assert snapshot(kv) == before


def test_whole_float_positions_are_positions(filled):
    _, kv = filled
    kv.freeze([5.0, 6.0])
    pos, state, _ = kv.cells()
    assert state[np.isin(pos, [5, 6])].tolist() == [2, 2]


def test_thaw_without_free_cells_is_refused(filled):
    s, kv = filled
    s.decode(random_tokens(156, seed=15), 100)  # 97 + 156 + 3 offloaded: the 256 cells are full
    assert kv.info().n_cells_used == 256 - 3
    s.decode([7, 8, 9], 256)
    assert kv.info().n_cells_used == 256
    before = snapshot(kv)
    with pytest.raises(AsrkfError) as err:
        kv.thaw([10])
    assert err.value.code == -2 and "free cells" in err.value.message
    assert snapshot(kv) == before
    kv.offload([50])
    kv.thaw([10])  # now there is room
    kv.check()


def test_corrupted_host_copy_is_detected_and_nothing_restored(filled):
    s, kv = filled
    kv.debug_corrupt(11, byte=3)
    before = snapshot(kv)
    with pytest.raises(AsrkfError) as err:
        kv.thaw([10, 11, 12])
    assert err.value.code == -3 and "position 11" in err.value.message
    assert snapshot(kv) == before
    with pytest.raises(AsrkfError):
        kv.check()
    kv.thaw([10, 12])  # the intact ones still come back


def test_edits_that_would_skip_offloaded_positions_are_refused(filled):
    s, kv = filled
    mem = s.context.memory
    before = snapshot(kv)
    llama_cpp.llama_memory_seq_add(mem, 0, 0, -1, 5)  # a context shift over offloaded positions
    assert snapshot(kv) == before
    assert llama_cpp.llama_state_seq_get_size(s.ctx, 0) == 0  # a snapshot would lose them
    # removing positions removes their host copies too, and the rest stays consistent
    assert s.seq_rm(11, 12)
    assert kv.offloaded().tolist() == [10, 12]
    kv.thaw([10, 12])
    kv.check()
    assert llama_cpp.llama_state_seq_get_size(s.ctx, 0) > 0


def test_calls_after_the_context_is_freed(tiny_path):
    s = session(tiny_path, n_ctx=128)
    kv = KVCache(ctx=s.context)
    s.decode(random_tokens(20, seed=16), 0)
    kv.offload([3])
    s.close()  # llama_free
    with pytest.raises(AsrkfError) as err:
        kv.info()
    assert err.value.code == -4
    with pytest.raises(AsrkfError):
        kv.thaw([3])
    kv.close()


def test_one_controller_per_context_and_free_refuses_to_lose_rows(tiny_path):
    with session(tiny_path, n_ctx=128) as s:
        kv = KVCache(ctx=s.context)
        with pytest.raises(AsrkfError) as err:
            KVCache(ctx=s.context)
        assert err.value.code == -2 and "already attached" in err.value.message
        s.decode(random_tokens(20, seed=17), 0)
        kv.offload([2])
        with pytest.raises(AsrkfError) as err:
            kv.close(force=False)
        assert err.value.code == -2
        kv.thaw([2])
        kv.close(force=False)
        with pytest.raises(AsrkfError):
            kv.info()
        KVCache(ctx=s.context).close()  # attachable again


def test_frozen_cells_are_released_on_close(tiny_path):
    tokens = random_tokens(30, seed=18)
    with session(tiny_path, n_ctx=128, flash_attn="on") as s:
        s.decode(tokens[:-1], 0)
        with KVCache(ctx=s.context) as kv:
            kv.freeze(range(5, 20))
        with KVCache(ctx=s.context) as kv:
            assert kv.info().n_frozen == 0
            assert np.all(kv.cells()[1] == 1)


def test_shift_onto_offloaded_positions_is_refused(filled):
    s, kv = filled
    before = snapshot(kv)
    # moves [50, end) down onto 5.., where 10..12 are offloaded: a thaw would then give them two cells
    llama_cpp.llama_memory_seq_add(s.context.memory, 0, 50, -1, -45)
    assert snapshot(kv) == before
    llama_cpp.llama_memory_seq_add(s.context.memory, 0, 50, -1, 10)  # away from them: allowed
    assert s.pos_max() == 109
    kv.check()


def two_sequence_session(tiny_path):
    return session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64, n_seq_max=2)


def test_shared_cells_are_neither_frozen_nor_copied_over_offloaded_positions(tiny_path):
    with two_sequence_session(tiny_path) as s, KVCache(ctx=s.context) as kv:
        s.decode(random_tokens(40, seed=21), 0)
        llama_cpp.llama_memory_seq_cp(s.context.memory, 0, 1, 0, 20)  # seq 1 shares the prefix
        with pytest.raises(AsrkfError) as err:
            kv.freeze([5])
        assert err.value.code == -2 and "shared" in err.value.message
        kv.freeze([30])  # not shared
        kv.offload([25])
        before = snapshot(kv)
        llama_cpp.llama_memory_seq_cp(s.context.memory, 0, 1, 20, 30)  # would lose position 25 for seq 1
        assert snapshot(kv) == before
        assert len(kv.cells(1)[0]) == 20


def test_importance_of_another_sequence_is_refused(tiny_path):
    with two_sequence_session(tiny_path) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=1)
        s.decode(random_tokens(30, seed=22), 0)
        assert len(kv.importance(0)[0]) == 30
        with pytest.raises(AsrkfError) as err:
            kv.importance(1)
        assert "sequence 0" in err.value.message


def test_use_after_close_raises_closed_error(tiny_path):
    from asrkf_gguf import ClosedError

    s = session(tiny_path, n_ctx=128)
    kv = KVCache(ctx=s.context)
    s.decode(random_tokens(20, seed=19), 0)
    kv.close()
    kv.close()  # twice is fine
    for call in (kv.info, kv.cells, kv.check, lambda: kv.freeze([1]), lambda: kv.thaw([1]), lambda: kv.drop([1])):
        with pytest.raises(ClosedError, match="closed"):
            call()
    with pytest.raises(AsrkfError):  # what it raised before ClosedError existed
        kv.offloaded()
    s.close()
    s.close()
    # these reached freed llama.cpp objects: a segfault (chat_prompt) or a C++ abort (tokenize)
    for call in (lambda: s.tokenize("hi", add_special=True), lambda: s.decode([1], 20), lambda: s.piece(1),
                 lambda: s.is_eog(1), lambda: s.chat_prompt([{"role": "user", "content": "hi"}]),
                 lambda: s.seq_rm(0, -1), s.clear, s.pos_max, lambda: KVCache(ctx=s)):
        with pytest.raises(ClosedError, match="closed"):
            call()
