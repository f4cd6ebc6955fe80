"""Entropy recovery's restore rules (issue 16): the paper's (best running scores) and "fresh" (what the spiking
step's queries attend, scored on the host), on the real library; and the evaluation's per-step trigger records."""

import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache
from asrkf_gguf.controller import Controller, ControllerConfig, pooled_max
from asrkf_gguf.entropy import EntropyMonitor, Recovery
from asrkf_gguf.evaluation.runner import SETTINGS, controller_params, spikes_by_step
from asrkf_gguf.generate import generate
from asrkf_gguf.policies import make_policy
from asrkf_gguf.recall import recall_mass
from conftest import random_tokens, session


def _under_pressure(s, kv, restore, **config):
    ctl = Controller(kv, make_policy("asrkf", recent=16, period=2),
                     ControllerConfig(budget_cells=150, recovery_restore=restore, recovery_under_budget=True,
                                      **config))
    generate(s, ctl, random_tokens(300, seed=43), 16, check_every_step=True)
    assert ctl.budget_binding() and ctl.table.count(CellState.OFFLOADED) > 100
    return ctl


@pytest.mark.parametrize("level", [Recovery.FR, Recovery.RR])
def test_fresh_restore_brings_back_the_offloaded_tokens_the_spiking_query_attends(tiny_path, level):
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = _under_pressure(s, kv, "fresh", offload_batch=16)
        t, pol = ctl.table, ctl.policy
        # what the step's query attends, computed here on its own: movable tokens resident or offloaded, the fixed
        # ones (sinks, recent window) in the softmax too, pooled like recall
        active = pol.candidates(t, CellState.ACTIVE)
        off = t.positions(CellState.OFFLOADED)
        movable = np.concatenate([active, off])
        fixed = np.setdiff1d(t.positions(CellState.ACTIVE), active)
        mass = pooled_max(movable, recall_mass(kv, movable, ctl.layers, others=fixed).astype(np.float32),
                          ctl.config.recall_pool, t.n)
        best = movable[np.argsort(-mass, kind="stable")[:16]]
        want_back = np.intersect1d(best, off)
        assert want_back.size > 0  # the case exercises a swap
        before = t.counts()
        score_before = t.score[: t.n].copy()
        ctl._recover(level)
        t.check(kv)
        after = t.counts()
        # a swap of as many as came back: the device holds what it held, nothing is lost
        assert after == before and ctl.stats.thaws == want_back.size
        assert (t.state[want_back] == CellState.ACTIVE).all()
        assert (t.state[np.intersect1d(best, active)] == CellState.ACTIVE).all()  # the step's best stay
        left = np.intersect1d(active, t.positions(CellState.OFFLOADED))
        assert left.size == want_back.size
        # those that left are the lowest running scores among the others
        others = np.setdiff1d(active, best)
        assert score_before[left].max() <= np.sort(score_before[others])[left.size]
        # brought back with this step's view as their score, not the one they left with
        by_pos = dict(zip(movable.tolist(), mass.tolist()))
        np.testing.assert_allclose(t.score[want_back], [by_pos[p] for p in want_back], rtol=1e-6)
        ctl.make_room(1)
        s.decode([5], t.n)
        ctl.on_decoded(1, entropy=ctl.graph_entropy())
        t.check(kv)


def test_paper_restore_keeps_the_best_running_scores(tiny_path):
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = _under_pressure(s, kv, "score")
        ctl._recover(Recovery.FR)
        t = ctl.table
        t.check(kv)
        on_device = ctl.policy.candidates(t, CellState.ACTIVE)
        assert t.score[t.positions(CellState.OFFLOADED)].max() <= t.score[on_device].min()
        assert ctl.stats.recall_score_seconds == 0  # no host scoring in the paper's rule


def test_fresh_restore_on_escalating_spikes_keeps_decoding_consistent(tiny_path):
    # four spikes in a row escalate SR, WR, FR, RR on a decode loop under a binding budget: the last two restore
    # with the step's queries, and every step leaves the table and the native cells in agreement
    calm = np.zeros(64)
    calm[0] = 30.0
    spike = np.zeros(64)
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = _under_pressure(s, kv, "fresh", offload_batch=16)
        ctl.entropy = EntropyMonitor()  # statistics of our entropies only (the model's are far above log 64)
        levels = []
        for i in range(30):
            ctl.make_room(1)
            s.decode([5 + i], ctl.table.n)
            levels.append(ctl.on_decoded(1, spike if 20 <= i < 24 else calm))
            ctl.table.check(kv)
        assert levels[20:24] == [Recovery.SR, Recovery.WR, Recovery.FR, Recovery.RR]
        assert ctl.stats.recall_score_seconds > 0 and ctl.stats.thaws > 0
        log = ctl.stats.recovery_log
        assert [e["level"] for e in log] == ["SR", "WR", "FR", "RR"] and log[2]["restored"] > 0
        assert log[0]["restored"] == log[1]["restored"] == 0  # "fresh": SR/WR have nothing frozen to act on


def test_fresh_all_restores_on_every_spike_level_while_the_budget_binds(tiny_path):
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = _under_pressure(s, kv, "fresh-all", offload_batch=16)
        assert ctl.table.count(CellState.FROZEN) == 0
        ctl._recover(Recovery.SR)
        ctl.table.check(kv)
        assert ctl.stats.thaws > 0 and ctl.stats.recovery_log == []  # (the log is on_decoded's)
        thaws = ctl.stats.thaws
        ctl._recover(Recovery.WR)
        ctl.table.check(kv)
        # the step's best are on the device already: a second look with the same queries brings nothing back
        assert ctl.stats.thaws == thaws


def test_restore_rule_is_validated_and_the_eval_settings_pin_it():
    with pytest.raises(ValueError, match="recovery_restore"):
        ControllerConfig(budget_cells=10, recovery_restore="best")
    assert controller_params(SETTINGS["asrkf-paper"])["recovery_restore"] == "score"
    assert controller_params(SETTINGS["asrkf-fresh"])["recovery_restore"] == "fresh"
    assert controller_params(SETTINGS["asrkf-fresh-all"])["recovery_restore"] == "fresh-all"
    assert controller_params(SETTINGS["asrkf-norec"])["recovery"] is False
    # the default: recovery on, but not acting once the budget binds; the paper's settings pin it acting
    assert ControllerConfig(budget_cells=10).recovery and not ControllerConfig(budget_cells=10).recovery_under_budget
    for name in ("asrkf-paper", "asrkf-fresh", "asrkf-fresh-all"):
        assert controller_params(SETTINGS[name])["recovery_under_budget"] is True
    assert "recovery_under_budget" not in controller_params(SETTINGS["asrkf"])


def test_a_settings_policy_params_reach_the_engines_policy(demo_model_path):
    # asrkf-norec-q15 (issue 16: recovery against freezing less) freezes below the 15% quantile, without recovery
    from asrkf_gguf.evaluation.runner import engine_for
    from asrkf_gguf.evaluation.tasks import Case

    case = Case(task="kl", ctx=512, depth=None, seed=0)
    with engine_for(demo_model_path, case, SETTINGS["asrkf-norec-q15"], 1.0, n_threads=2) as e:
        assert e.policy.low_quantile == 0.15 and e.controller.config.recovery is False
    with engine_for(demo_model_path, case, SETTINGS["asrkf"], 1.0, n_threads=2) as e:
        assert e.policy.low_quantile == 0.25 and e.controller.config.recovery is True


def test_spikes_are_indexed_by_the_step_whose_distribution_spiked():
    # prompt of 10 in two chunks, then decodes; a decode leaving n tokens gave the distribution of forced n - 10.
    # A rewalk (logical count going back) measures steps again: only the first measurement counts
    trace = {"n_new": [5, 5, 1, 1, 1, 1, 1, 1],
             "n": [5, 10, 11, 12, 13, 11, 12, 13],
             "entropy": [None, None, 1.0, 3.0, 2.0, None, 3.5, 1.0],
             "spike": [None, None, None, "SR", "WR", None, "FR", None],
             "recovery": [None, None, None, None, "WR", None, "FR", None]}
    assert spikes_by_step(trace, n_prompt=10, n_continuation=3) == [[2, "SR", False]]
    assert spikes_by_step(trace, n_prompt=10, n_continuation=4) == [[2, "SR", False], [3, "WR", True]]


@pytest.mark.parametrize("n_ctx,budget,acts", [(160, 150, False), (512, 500, True)])
def test_recovery_under_budget_off_watches_but_acts_only_while_the_budget_has_room(tiny_path, n_ctx, budget, acts):
    calm = np.zeros(64)
    calm[0] = 30.0
    spike = np.zeros(64)
    with session(tiny_path, n_ctx=n_ctx, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16, period=2),
                         ControllerConfig(budget_cells=budget, recovery_under_budget=False))
        steps = []
        ctl.on_step = steps.append
        generate(s, ctl, random_tokens(200, seed=46), 0)
        assert ctl.budget_binding() is not acts
        levels = []
        for i in range(24):
            ctl.make_room(1)
            s.decode([5], ctl.table.n)
            levels.append(ctl.on_decoded(1, spike if i == 20 else calm))
        assert steps[-4]["spike"] == "SR"  # judged either way
        if acts:
            assert levels[20] == Recovery.SR and ctl.stats.recoveries["SR"] == 1
        else:
            assert levels == [None] * 24 and not ctl.stats.recovery_log and steps[-4]["recovery"] is None
        ctl.table.check(kv)
