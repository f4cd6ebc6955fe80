"""Recall: host-side scoring of any token (resident or offloaded) with the exported queries."""

import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache
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
