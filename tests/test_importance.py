"""The in-graph importance output against a numpy reference built from the exported q and the stored K."""

import numpy as np
import pytest

from asrkf_gguf import AsrkfError, KVCache
from conftest import random_tokens, session

N = 70
N_Q = 4


def scores_and_reference(path, fa, n_q=N_Q):
    tokens = random_tokens(N + 1, seed=11)
    with session(path, n_ctx=256, kv_type="f16", flash_attn=fa, n_batch=32, n_ubatch=32) as s, \
            KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=n_q, export_q=True)
        if n_q == 1:  # a decode step's graph (one query), as generation scores
            s.decode(tokens[:N - 1], 0)
            s.decode(tokens[N - 1:N], N - 1)
        else:
            s.decode(tokens[:N], 0)
        pos, score = kv.importance()
        info = kv.info()
        q = {il: kv.query(il)[0] for il in range(info.n_layer)}
        assert kv.query(0)[1] == pytest.approx(1 / np.sqrt(info.n_embd_head_k))
        # one more token so that every scored position can be offloaded, then read K from the host copy
        kv.set_importance(False)
        s.decode(tokens[N:], N)
        kv.offload(range(N))
        d = info.n_embd_head_k
        k = {il: kv.k_rows(il, range(N)).view(np.float16).astype(np.float64)
             .reshape(N, info.n_head_kv, d) for il in range(info.n_layer)}
        kv.thaw(range(N))

    ref = np.zeros(N)
    group = info.n_head // info.n_head_kv
    for il in range(info.n_layer):
        for t in range(n_q):
            qpos = N - n_q + t
            for h in range(info.n_head):
                logits = k[il][: qpos + 1, h // group, :] @ q[il][t, h].astype(np.float64) / np.sqrt(d)
                p = np.exp(logits - logits.max())
                ref[: qpos + 1] += p / p.sum()
    return pos, score, ref


@pytest.mark.parametrize("n_q,together", [(N_Q, False), (1, False), (1, True)])  # 1: a decode step's graph
@pytest.mark.parametrize("model", ["llama-gqa", "qwen2"])
def test_importance_matches_numpy_and_fa_on_off_agree(tiny_paths, model, n_q, together, monkeypatch):
    # together: a decode step scores its layers in one product (the GPU's path; ASRKF_SCORE_TOGETHER=1 takes it
    # where K is in host memory, as here)
    monkeypatch.setenv("ASRKF_SCORE_TOGETHER", "1" if together else "0")
    pos_off, s_off, ref = scores_and_reference(tiny_paths[model], "off", n_q)
    pos_on, s_on, ref_on = scores_and_reference(tiny_paths[model], "on", n_q)
    assert np.array_equal(pos_off, np.arange(N)) and np.array_equal(pos_on, np.arange(N))
    # total mass: one per query, head and layer
    assert s_off.sum() == pytest.approx(2 * 4 * n_q, rel=1e-4)
    np.testing.assert_allclose(s_off, ref, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(s_on, ref_on, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(s_on, s_off, rtol=5e-3, atol=5e-4)


def test_frozen_cells_keep_their_shadow_score_and_logits_do_not_change(tiny_path):
    tokens = random_tokens(50, seed=12)
    opts = dict(n_ctx=128, flash_attn="on", n_batch=64, n_ubatch=64)
    with session(tiny_path, **opts) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], 49)
    with session(tiny_path, **opts) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=1, layers=[0])  # layer 0: its query does not depend on the freeze
        s.decode(tokens[:-1], 0)
        kv.freeze([5, 6, 7])
        kv.unfreeze([5, 6, 7])
        got = s.decode(tokens[-1:], 49)
        # the extra nodes read the cache, they do not change what the model computes
        assert np.array_equal(got, expected)
        pos, score = kv.importance()
        kv.freeze([5, 6, 7])
        s.seq_rm(49, -1)
        s.decode(tokens[-1:], 49)
        pos2, score2 = kv.importance()
        assert np.array_equal(pos, pos2)
        # the shadow mask still scores the frozen cells, with the same values as before they were frozen
        np.testing.assert_allclose(score2, score, rtol=1e-5, atol=1e-7)
        assert np.all(score2[[5, 6, 7]] > 0)


def test_importance_refuses_stale_or_missing_data(tiny_path):
    tokens = random_tokens(40, seed=13)
    with session(tiny_path, n_ctx=128, n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        with pytest.raises(AsrkfError) as err:
            kv.importance()
        assert err.value.code == -2
        with pytest.raises(AsrkfError) as err:
            kv.set_importance(True, layers=[7])
        assert err.value.code == -1 and "layer 7" in err.value.message
        with pytest.raises(AsrkfError):
            kv.set_importance(True, n_q=0)
        kv.set_importance(True, n_q=2)
        with pytest.raises(AsrkfError):
            kv.importance()  # no decode yet
        s.decode(tokens, 0)
        assert len(kv.importance()[0]) == 40
        kv.offload([3])
        with pytest.raises(AsrkfError) as err:
            kv.importance()
        assert "moved" in err.value.message


def test_importance_fold_equals_the_numpy_update(tiny_path):
    """The native fold writes what TokenTable.observe computes from (pos, score), and refuses short arrays."""
    from asrkf_gguf.schedule import TokenTable

    tokens = random_tokens(60, seed=17)
    with session(tiny_path, n_ctx=128, n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=8)
        s.decode(tokens[:50], 0)
        kv.offload([4, 9])  # holes: offloaded positions keep their scores
        s.decode(tokens[50:52], 50)
        pos, score = kv.importance()
        ref, got = TokenTable(capacity=64), TokenTable(capacity=64)
        for t in (ref, got):
            t.append(52)
            t.score[:52] = np.linspace(0, 1, 52, dtype=np.float32)
            t.mass[:52] = 0.5
        ref.observe(pos, score, ema=0.3, n_queries=2)
        kv.importance_fold(got.score, got.mass, got.n, ema=0.3, n_queries=2)
        np.testing.assert_allclose(got.score, ref.score, rtol=1e-6)
        np.testing.assert_allclose(got.mass, ref.mass, rtol=1e-6)
        assert got.score[4] == np.float32(4 / 51) and got.mass[9] == 0.5

        before = got.score.copy()
        with pytest.raises(AsrkfError) as err:
            kv.importance_fold(got.score, got.mass, 40, ema=0.3)
        assert err.value.code == -1 and "nothing was changed" in err.value.message
        assert np.array_equal(got.score, before)
        with pytest.raises(ValueError):
            kv.importance_fold(got.score.astype(np.float64), got.mass, got.n, ema=0.3)


@pytest.mark.parametrize("fa", ["off", "on"])
def test_in_graph_entropy_equals_the_entropy_of_the_logits(tiny_path, fa):
    from asrkf_gguf.entropy import entropy_of

    tokens = random_tokens(40, seed=19)
    with session(tiny_path, n_ctx=128, n_batch=32, n_ubatch=32, flash_attn=fa) as s, \
            KVCache(ctx=s.context) as kv:
        with pytest.raises(AsrkfError) as err:
            kv.entropy()
        assert err.value.code == -2 and "off" in err.value.message
        kv.set_entropy(True)
        kv.set_importance(True, n_q=4)  # both outputs in one graph
        got, want = [], []
        logits = s.decode(tokens[:33], 0)  # two ubatches: the entropy is of the last row
        got.append(kv.entropy())
        want.append(entropy_of(logits))
        for i in range(33, 40):
            logits = s.decode([tokens[i]], i)
            got.append(kv.entropy())
            want.append(entropy_of(logits))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert len(set(np.round(want, 4))) > 1  # the steps differ, so the test would see a stale value
        kv.set_entropy(False)
        s.decode([tokens[0]], 40)
        with pytest.raises(AsrkfError) as err:
            kv.entropy()
        assert err.value.code == -2
