"""Issue 10 (reliability), native half: llama.cpp edits and snapshots that would break the freeze/offload state are
refused with a clear error and change nothing; models whose attention the importance scores do not model are refused
at attach."""

import ctypes

import llama_cpp
import numpy as np
import pytest

from asrkf_gguf import AsrkfError, CellState, KVCache
from asrkf_gguf._cffi import ffi, lib
from conftest import random_tokens, session


def snapshot(kv, seq_id=0):
    pos, state, cell = kv.cells(seq_id)
    return pos.tolist(), state.tolist(), cell.tolist(), kv.offloaded(seq_id).tolist(), kv.info().host_bytes_used


def last_error():
    return ffi.string(lib.asrkf_last_error()).decode()


# ---- 1. a removal must not leave an offloaded position where the next decode goes


def test_seq_rm_that_would_leave_an_offloaded_position_above_the_newest_is_refused(tiny_path):
    tokens = random_tokens(41, seed=40)
    with session(tiny_path, n_ctx=128, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:40], 0)
        kv.offload([36, 37, 38])  # 39 is the newest and stays resident
        mem = s.context.memory
        before = snapshot(kv)
        # removing the newest (or the newest and some of the offloaded ones) would make 38 (or 36) the position
        # the next decode lands on, while its rows wait in host memory
        for seq_id, p0, p1 in ((0, 39, 40), (0, 37, -1), (-1, 39, 40), (0, 38, 40)):
            assert not llama_cpp.llama_memory_seq_rm(mem, seq_id, p0, p1), (seq_id, p0, p1)
            assert "seq_rm" in last_error() and "offloaded" in last_error()
            assert snapshot(kv) == before
            assert s.pos_max() == 39
        kv.check()
        # the sequence goes on where it was
        s.decode(tokens[40:41], 40)
        kv.check()
        assert s.seq_rm(40, 41)

        # a removal that takes the offloaded positions above the new end along is allowed: nothing is left above it
        assert s.seq_rm(36, -1)
        assert kv.offloaded().tolist() == []
        assert s.pos_max() == 35
        kv.check()
        s.decode(tokens[36:38], 36)
        kv.check()
        assert s.pos_max() == 37

        # holes below the newest position are fine: the next decode still goes after the newest
        kv.offload([10, 11])
        assert s.seq_rm(20, 30)
        assert kv.offloaded().tolist() == [10, 11]
        # and so is a removal that leaves a resident position above the offloaded ones
        assert s.seq_rm(12, 20)
        kv.thaw([10, 11])
        kv.check()


def test_refused_seq_rm_reaches_neither_cache_of_an_iswa_model(iswa_model):
    # Gemma 3: the window layers' cache answers seq_pos_max; a removal the full-attention cache refuses must not
    # have happened there either
    path, vocab = iswa_model
    tokens = random_tokens(41, seed=48, vocab=vocab)
    with session(path, n_ctx=512, n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        assert kv.info().iswa
        s.decode(tokens[:40], 0)
        kv.offload([37, 38])
        before = snapshot(kv)
        assert not s.seq_rm(39, 40)
        assert s.pos_max() == 39 and snapshot(kv) == before
        s.decode(tokens[40:41], 40)
        assert s.seq_rm(37, -1)
        assert s.pos_max() == 36 and kv.offloaded().tolist() == []
        kv.check()


# ---- 2. a copy must not share a frozen cell (the flag is per cell)


def test_seq_cp_of_frozen_cells_is_refused(tiny_path):
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64, n_seq_max=2) as s, \
            KVCache(ctx=s.context) as kv:
        s.decode(random_tokens(40, seed=42), 0)
        kv.freeze([5, 6])
        mem = s.context.memory
        before0, before1 = snapshot(kv, 0), snapshot(kv, 1)
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, 0, 20)
        why = last_error()  # before the next asrkf call clears it
        assert len(kv.cells(1)[0]) == 0
        assert snapshot(kv, 0) == before0 and snapshot(kv, 1) == before1
        assert "seq_cp" in why and "frozen" in why
        kv.check()
        # a range without frozen cells is copied
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, 10, 20)
        assert kv.cells(1)[0].tolist() == list(range(10, 20))
        assert np.all(kv.cells(1)[1] == CellState.ACTIVE)
        # unfrozen, the rest goes too, and sequence 1 sees no mask
        kv.unfreeze([5, 6])
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, 0, 10)
        assert kv.cells(1)[0].tolist() == list(range(20))
        assert np.all(kv.cells(1)[1] == CellState.ACTIVE)
        assert kv.info().n_frozen == 0
        kv.check()


# ---- 3. a snapshot without the frozen flags is refused; what a load restores matches what was saved


def test_state_save_is_refused_while_cells_are_frozen(tiny_path):
    tokens = random_tokens(30, seed=43)
    with session(tiny_path, n_ctx=128, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens, 0)
        kv.freeze([3, 4])
        before = snapshot(kv)
        assert llama_cpp.llama_state_seq_get_size(s.ctx, 0) == 0
        assert "frozen" in last_error()
        assert llama_cpp.llama_state_get_size(s.ctx) == 0
        buf = (ctypes.c_uint8 * (1 << 22))()
        assert llama_cpp.llama_state_seq_get_data(s.ctx, buf, len(buf), 0) == 0
        assert llama_cpp.llama_state_get_data(s.ctx, buf, len(buf)) == 0
        assert snapshot(kv) == before  # the refusal changed nothing
        kv.check()

        # unfrozen, the save goes through; a later freeze does not leak into what a load restores
        kv.unfreeze([3, 4])
        n = llama_cpp.llama_state_seq_get_data(s.ctx, buf, len(buf), 0)
        assert n > 0
        saved = snapshot(kv)
        kv.freeze([7, 8, 9])
        assert llama_cpp.llama_state_seq_set_data(s.ctx, buf, n, 0) == n
        assert kv.info().n_frozen == 0
        pos, state, _ = kv.cells()
        assert pos.tolist() == saved[0] and np.all(state == CellState.ACTIVE)
        kv.check()


def test_state_save_of_another_sequence_is_not_refused_by_frozen_cells(tiny_path):
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64, n_seq_max=2) as s, \
            KVCache(ctx=s.context) as kv:
        s.decode(random_tokens(20, seed=44), 0)
        s.batch.reset()
        s.batch.add_sequence(random_tokens(10, seed=45), 1, False)
        assert llama_cpp.llama_decode(s.ctx, s.batch.batch) == 0
        kv.freeze([2], seq_id=0)
        assert llama_cpp.llama_state_seq_get_size(s.ctx, 1) > 0
        assert llama_cpp.llama_state_seq_get_size(s.ctx, 0) == 0
        assert llama_cpp.llama_state_get_size(s.ctx) == 0  # the whole state holds sequence 0 too


# ---- 5. attention the importance scores do not model is refused at attach


def _write_model(path, arch, extra_meta, tensors):
    import gguf

    from asrkf_gguf.testmodels import _spm_vocab

    n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff = 512, 128, 2, 4, extra_meta.pop("n_head_kv"), 32, 256
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    for key, (kind, value) in extra_meta.items():
        getattr(w, "add_" + kind)(f"{arch}.{key}", value)
    toks, scores, types = _spm_vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    dims = dict(V=n_vocab, E=n_embd, Q=n_head * head_dim, K=n_head_kv * head_dim, F=n_ff)
    for name, shape in tensors(n_layer):
        shape = tuple(dims[d] if isinstance(d, str) else d for d in shape)
        arr = np.ones(shape, np.float32) if len(shape) == 1 else \
            (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _gemma2_tensors(n_layer):
    yield "token_embd.weight", ("V", "E")
    yield "output_norm.weight", ("E",)
    for i in range(n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", ("E",)
        yield b + "attn_q.weight", ("Q", "E")
        yield b + "attn_k.weight", ("K", "E")
        yield b + "attn_v.weight", ("K", "E")
        yield b + "attn_output.weight", ("E", "Q")
        yield b + "post_attention_norm.weight", ("E",)
        yield b + "ffn_norm.weight", ("E",)
        yield b + "ffn_gate.weight", ("F", "E")
        yield b + "ffn_up.weight", ("F", "E")
        yield b + "ffn_down.weight", ("E", "F")
        yield b + "post_ffw_norm.weight", ("E",)


def _mpt_tensors(n_layer):
    yield "token_embd.weight", ("V", "E")
    yield "output_norm.weight", ("E",)
    for i in range(n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", ("E",)
        yield b + "attn_qkv.weight", (128 + 2 * 128, "E")
        yield b + "attn_output.weight", ("E", "E")
        yield b + "ffn_norm.weight", ("E",)
        yield b + "ffn_up.weight", ("F", "E")
        yield b + "ffn_down.weight", ("E", "F")


@pytest.fixture(scope="module")
def softcap_path(tmp_path_factory):
    # Gemma-2: attention logits soft-capped at 50 (metadata), iSWA cache
    meta = {"n_head_kv": 2, "attention.layer_norm_rms_epsilon": ("float32", 1e-6),
            "attention.sliding_window": ("uint32", 64), "attn_logit_softcapping": ("float32", 50.0),
            "final_logit_softcapping": ("float32", 30.0)}
    return _write_model(tmp_path_factory.mktemp("gemma2") / "tiny-gemma2.gguf", "gemma2", meta, _gemma2_tensors)


@pytest.fixture(scope="module")
def alibi_path(tmp_path_factory):
    # MPT: ALiBi with max bias 8 (metadata), plain cache
    meta = {"n_head_kv": 4, "attention.layer_norm_epsilon": ("float32", 1e-5),
            "attention.max_alibi_bias": ("float32", 8.0)}
    return _write_model(tmp_path_factory.mktemp("mpt") / "tiny-mpt.gguf", "mpt", meta, _mpt_tensors)


@pytest.mark.parametrize("which,words", [("softcap", "soft-capping"), ("alibi", "ALiBi")])
def test_attention_the_scores_do_not_model_is_refused_at_attach(which, words, softcap_path, alibi_path):
    path = {"softcap": softcap_path, "alibi": alibi_path}[which]
    prompt, more = random_tokens(12, seed=46), random_tokens(4, seed=47)
    with session(path, n_ctx=256, flash_attn="off") as s:
        s.decode(prompt, 0)  # the model loads and runs
        with pytest.raises(AsrkfError) as err:
            KVCache(ctx=s.context)
        assert err.value.code == -5 and words in err.value.message
        after = s.decode(more, len(prompt))  # nothing was left attached
    with session(path, n_ctx=256, flash_attn="off") as ref:
        ref.decode(prompt, 0)
        expected = ref.decode(more, len(prompt))
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
