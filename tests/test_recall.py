"""Recall: host-side scoring of any token (resident or offloaded) with the exported queries."""

import numpy as np
import pytest

from asrkf_gguf import AsrkfError, CellState, KVCache
from asrkf_gguf.controller import Controller, ControllerConfig
from asrkf_gguf.generate import generate
from asrkf_gguf.policies import make_policy
from asrkf_gguf.recall import GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, dequantize_rows, recall_mass
from conftest import random_tokens, session


@pytest.mark.parametrize("ggml_type,name", [(GGML_TYPE_Q8_0, "Q8_0"), (GGML_TYPE_Q4_0, "Q4_0")])
def test_dequantize_matches_gguf(ggml_type, name):
    gguf = pytest.importorskip("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, name)
    x = np.random.default_rng(1).standard_normal((5, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    np.testing.assert_allclose(dequantize_rows(raw, ggml_type, 128), gguf.quants.dequantize(raw, qtype), rtol=0, atol=0)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_host_scores_equal_the_in_graph_importance(tiny_paths, kv_type):
    # with every token resident, the host's q.k over the stored K must give what the graph computed
    tokens = random_tokens(80, seed=50)
    with session(tiny_paths["llama-hd128"], n_ctx=256, kv_type=kv_type, flash_attn="on", n_batch=64,
                 n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=4, export_q=True)
        s.decode(tokens, 0)
        pos, score = kv.importance()
        host = recall_mass(kv, pos, kv.layers())
    # with quantized K the CPU matmul also quantizes q (to q8_0) for its dot products; the host keeps q in f32
    rtol = 2e-3 if kv_type == "f16" else 2e-2
    np.testing.assert_allclose(host, score, rtol=rtol, atol=2e-4)
    assert host.sum() == pytest.approx(score.sum(), rel=1e-4)


def test_recall_gives_the_device_cells_to_the_best_scored_tokens(tiny_path):
    prompt = random_tokens(400, seed=51)
    question = random_tokens(24, seed=52)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        policy = make_policy("asrkf", recent=32)
        ctl = Controller(kv, policy, ControllerConfig(budget_cells=160))
        generate(s, ctl, prompt, 8, check_every_step=True)
        generate(s, ctl, question, 0)  # prefill the new turn only
        t = ctl.table
        before = t.counts()
        assert before["offloaded"] > 0
        n_back = ctl.recall()
        t.check(kv)
        after = t.counts()
        # a swap: as many tokens left the device as came back; kept frozen tokens are thawed from their freeze
        assert after["offloaded"] == before["offloaded"] and after["frozen"] == 0
        assert after["active"] == before["active"] + before["frozen"]
        on_device = np.concatenate([policy.candidates(t, CellState.ACTIVE), policy.candidates(t, CellState.FROZEN)])
        off = policy.candidates(t, CellState.OFFLOADED)
        assert t.score[on_device].min() >= t.score[off].max()
        assert n_back == ctl.stats.thaws > 0
        res = generate(s, ctl, [7], 8, check_every_step=True)  # and generation goes on
        assert len(res.tokens) == 8


def test_only_a_prompts_queries_are_exported(tiny_path):
    # recall reads the queries of a prompt's last decode; a generated token's are copied out for nothing
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=32), ControllerConfig(budget_cells=160))
        layer = ctl.layers[0]
        generate(s, ctl, random_tokens(100, seed=54), 0)  # a prompt alone: its queries are there for recall
        assert kv.query(layer)[0].shape[0] == ctl.config.n_q
        generate(s, ctl, random_tokens(10, seed=55), 4)  # then generated tokens: not exported
        with pytest.raises(AsrkfError, match="query export is off"):
            kv.query(layer)
        assert ctl.recall() == 0  # nothing to rank by: refused quietly, nothing moved
        ctl.table.check(kv)
        generate(s, ctl, random_tokens(300, seed=56), 0)  # the next turn's prompt exports them again
        assert kv.query(layer)[0].shape[0] == ctl.config.n_q
        assert ctl.recall() > 0
        ctl.table.check(kv)


def test_recall_mass_counts_the_heads_attention_to_tokens_that_stay(tiny_path):
    # sinks and the recent window are keys of the softmax too: the mass left for the movable tokens is what the
    # heads really give them (less than a softmax over the movable tokens alone), and every head's row sums to 1
    tokens = random_tokens(120, seed=53)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=4, export_q=True)
        s.decode(tokens, 0)
        movable, fixed = np.arange(4, 88), np.concatenate([np.arange(4), np.arange(88, 120)])
        alone = recall_mass(kv, movable, kv.layers())
        shared = recall_mass(kv, movable, kv.layers(), others=fixed)
        rest = recall_mass(kv, fixed, kv.layers(), others=movable)
        info = kv.info()
    assert np.all(shared < alone)
    n_rows = 4 * info.n_head * info.n_layer
    assert shared.sum() + rest.sum() == pytest.approx(n_rows, rel=1e-4)
    assert alone.sum() == pytest.approx(n_rows, rel=1e-4)


def test_recall_decodes_the_question_again_with_what_it_brought_back(tiny_path):
    # the question's keys were computed while the recalled tokens were on the host: after recall, the last
    # recall_redecode positions are decoded again (their keys in an upper layer change), the ones before are not
    prompt = random_tokens(400, seed=54)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=32), ControllerConfig(budget_cells=160, recall_redecode=12))
        layer = int(kv.layers()[-1])
        n = len(prompt)
        seen = {}
        recall = ctl.recall

        def spy(span_ends=None):
            seen["before"] = kv.k_rows(layer, np.arange(n - 16, n))
            return recall(span_ends)

        ctl.recall = spy
        generate(s, ctl, prompt, 0, recall=True)
        assert ctl.stats.thaws > 0
        after = kv.k_rows(layer, np.arange(n - 16, n))
        ctl.table.check(kv)
    assert np.array_equal(after[:4], seen["before"][:4])
    changed = [not np.array_equal(a, b) for a, b in zip(after[4:], seen["before"][4:])]
    assert all(changed)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_native_recall_mass_equals_the_host_scoring(tiny_paths, kv_type):
    # asrkf_kv_recall_mass computes on the backend holding K what recall.recall_mass computes in numpy from the
    # exported queries and K rows: with tokens offloaded (rows from the host store) and resident (from their cells),
    # the masses agree for every key, and the mass over all keys is one per (layer, head, query)
    tokens = random_tokens(300, seed=54)
    with session(tiny_paths["llama-hd128"], n_ctx=256, kv_type=kv_type, flash_attn="on", n_batch=64,
                 n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=8, export_q=True)
        s.decode(tokens[:200], 0)
        kv.offload(np.arange(10, 150, 2))  # spread over the context: resident and offloaded keys interleave
        s.decode(tokens[200:230], 200)
        movable = np.concatenate([np.arange(4, 150), np.arange(150, 200)[::-1]])  # any order
        fixed = np.concatenate([np.arange(4), np.arange(200, 230)])
        layers = kv.layers()
        host = recall_mass(kv, movable, layers, others=fixed)
        native = recall_mass(kv, movable, layers, others=fixed, native=True)
        rest = kv.recall_mass(layers, np.concatenate([fixed, movable]), len(fixed))
        info = kv.info()
        # refused: a position the sequence does not have, a layer without K/V, more outputs than keys
        with pytest.raises(AsrkfError):
            kv.recall_mass(layers, [0, 1, 5000], 3)
        with pytest.raises(AsrkfError):
            kv.recall_mass([info.n_layer + 3], movable, 4)
        with pytest.raises(AsrkfError):
            kv.recall_mass(layers, [0, 1], 3)
        with pytest.raises(AsrkfError):
            kv.recall_mass(layers, [0, 1, 1], 2)
        kv.check()
    assert native.shape == host.shape == movable.shape
    # quantized K: the CPU backend's matmul quantizes q to q8_0 for its dot products, numpy keeps q in f32
    rtol = 2e-3 if kv_type == "f16" else 5e-2
    np.testing.assert_allclose(native, host, rtol=rtol, atol=2e-4)
    assert np.argmax(native) == np.argmax(host)
    n_rows = 8 * info.n_head * len(layers)
    assert native.sum() + rest.sum() == pytest.approx(n_rows, rel=1e-4)


def test_with_room_recall_unmasks_what_the_last_turn_froze_and_decodes_the_question_again(tiny_path):
    # nothing offloaded, the paper's freezing masks low tokens while the budget has room: a new question must see
    # them (they are the facts a later turn asks about), and its keys must be computed with them in sight
    with session(tiny_path, n_ctx=512, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16, period=4), ControllerConfig(budget_cells=512))
        generate(s, ctl, random_tokens(200, seed=56), 24)  # a turn and its reply: low tokens freeze
        frozen = ctl.table.positions(CellState.FROZEN)
        assert frozen.size > 0 and ctl.table.count(CellState.OFFLOADED) == 0
        got = {}
        recall = ctl.recall

        def spy(span_ends=None):
            got["n"] = recall(span_ends)
            got["frozen_after"] = ctl.table.count(CellState.FROZEN)
            return got["n"]

        ctl.recall = spy
        before = ctl.stats.steps
        generate(s, ctl, random_tokens(20, seed=57), 0, recall=True)
        ctl.table.check(kv)
    assert got["n"] > 0 and got["frozen_after"] == 0
    assert ctl.stats.steps == before + 2  # the prompt's chunk, then the question decoded again


def test_recall_rounds_rank_by_the_best_mass_over_the_rounds(tiny_path):
    # a second round recalls with the queries of the question decoded again after the first; a token keeps the best
    # mass of the two rounds, so the first round's picks compete with their own mass, not with zero
    prompt = random_tokens(400, seed=51) + random_tokens(24, seed=52)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=32), ControllerConfig(budget_cells=160, recall_rounds=2))
        recall = ctl.recall
        masses, back = [], []

        def spy(span_ends=None, **kw):
            back.append(recall(span_ends, **kw))
            masses.append(ctl._recall_best.copy())
            return back[-1]

        ctl.recall = spy
        before = ctl.stats.steps
        generate(s, ctl, prompt, 0, recall=True)
        ctl.table.check(kv)
        n_again = ctl.stats.steps - before - -(-len(prompt) // 64)  # decodes after the prompt's 64-token chunks
    assert len(masses) == 2 and ctl.stats.recalls == 2 and back[0] > 0
    assert n_again == sum(n > 0 for n in back)  # each round that brought tokens back decoded the question again
    first, second = masses
    movable = first > 0
    assert np.all(second[movable] >= first[movable]) and np.any(second[movable] > first[movable])
    with pytest.raises(ValueError, match="recall_rounds"):
        ControllerConfig(budget_cells=160, recall_rounds=0)
