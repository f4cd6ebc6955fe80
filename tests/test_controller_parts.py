"""Unit tests of the controller's parts on synthetic data: schedule, token table, entropy levels, policies."""

import numpy as np
import pytest

from asrkf_gguf import CellState
from asrkf_gguf.entropy import EntropyMonitor, Recovery, entropy_of
from asrkf_gguf.policies import POLICIES, AsrkfPolicy, H2OPolicy, WindowPolicy, make_policy
from asrkf_gguf.schedule import TokenTable, freeze_durations


def test_freeze_durations_grow_like_sqrt():
    c = np.array([0, 1, 2, 3, 4, 8, 9, 16, 100])
    np.testing.assert_array_equal(freeze_durations(c, 1.0), [1, 1, 1, 1, 2, 2, 3, 4, 10])
    np.testing.assert_array_equal(freeze_durations(c, 2.0), [1, 1, 1, 1, 1, 1, 1, 2, 5])
    with pytest.raises(ValueError):
        freeze_durations(c, 0)
    with pytest.raises(ValueError):
        freeze_durations(np.array([-1]), 1.0)


def test_table_grows_and_accounts_for_every_position():
    t = TokenTable(capacity=4)
    t.append(10)
    assert t.n == 10 and t.capacity >= 10 and t.counts()["active"] == 10
    t.freeze(np.array([2, 3]), step=5, k=1.0, period=4)
    t.set_state([6], CellState.OFFLOADED)
    assert t.counts() == {"active": 7, "frozen": 2, "offloaded": 1, "dropped": 0}
    t.check()
    # c = 1 -> one period; a second judgement (c = 4 after more) lengthens it like sqrt
    np.testing.assert_array_equal(t.frozen_until[[2, 3]], [9, 9])
    np.testing.assert_array_equal(t.expired(8), [])
    np.testing.assert_array_equal(t.expired(9), [2, 3])
    t.low_count[2] = 3
    t.freeze(np.array([2]), step=20, k=1.0, period=4)
    assert t.frozen_until[2] == 20 + 2 * 4


def test_observe_keeps_a_running_score_and_a_total():
    t = TokenTable()
    t.append(3)
    for _ in range(50):
        t.observe(np.array([0, 1, 2]), np.array([1.0, 0.5, 0.0]), ema=0.2)
    np.testing.assert_allclose(t.score[:3], [1.0, 0.5, 0.0], atol=1e-4)
    np.testing.assert_allclose(t.mass[:3], [50, 25, 0])
    with pytest.raises(ValueError):
        t.observe(np.array([3]), np.array([1.0]), ema=0.2)


def test_entropy_of_matches_the_definition():
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    p = np.exp(logits) / np.exp(logits).sum()
    assert entropy_of(logits) == pytest.approx(-(p * np.log(p)).sum())
    assert entropy_of(np.zeros(8)) == pytest.approx(np.log(8))
    assert entropy_of(np.array([1e4, 0.0])) == pytest.approx(0.0, abs=1e-9)


def test_entropy_spikes_escalate_through_four_levels_and_cool_down():
    m = EntropyMonitor(alpha=0.1, z_spike=3.0, warmup=20, cooldown=5)
    rng = np.random.default_rng(0)
    assert all(m.update(2.0 + 0.05 * rng.standard_normal()) is None for _ in range(40))
    levels = [m.update(6.0) for _ in range(6)]
    # a persisting spike escalates SR -> WR -> FR -> RR and stays at RR (the running stats adapt slowly)
    assert levels[:4] == [Recovery.SR, Recovery.WR, Recovery.FR, Recovery.RR]
    assert all(level in (Recovery.RR, None) for level in levels[4:])
    for _ in range(60):
        m.update(2.0 + 0.05 * rng.standard_normal())
    assert m.level == 0
    assert m.update(9.0) == Recovery.SR  # after a quiet stretch it starts again from the mildest level


def test_a_lasting_entropy_regime_stops_escalating():
    m = EntropyMonitor(alpha=0.1, z_spike=3.0, warmup=10, cooldown=5)
    for _ in range(30):
        m.update(1.0)
    levels = [m.update(4.0) for _ in range(200)]
    assert levels[:4] == [Recovery.SR, Recovery.WR, Recovery.FR, Recovery.RR]
    assert levels[-20:] == [None] * 20 and m.level == 0


def table_with_scores(scores):
    t = TokenTable()
    t.append(len(scores))
    t.observe(np.arange(len(scores)), np.asarray(scores, np.float32), ema=1.0)
    return t


def test_policies_protect_sinks_and_recent_and_pick_the_lowest():
    scores = np.array([0.0, 0.0, 5, 1, 4, 2, 3, 0.0, 0.0, 0.0])
    t = table_with_scores(scores)
    asrkf = AsrkfPolicy(n_sinks=2, recent=3)
    np.testing.assert_array_equal(asrkf.candidates(t, CellState.ACTIVE), [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(asrkf.lowest(t, CellState.ACTIVE, 2), [3, 5])
    np.testing.assert_array_equal(WindowPolicy(n_sinks=2, recent=3).lowest(t, CellState.ACTIVE, 2), [2, 3])
    np.testing.assert_array_equal(H2OPolicy(n_sinks=2, recent=3).lowest(t, CellState.ACTIVE, 1), [3])
    assert make_policy("full").lowest(t, CellState.ACTIVE, 5).size == 0
    np.testing.assert_array_equal(asrkf.judged_low(t), [3])  # below the 25% quantile of {5, 1, 4, 2, 3}


@pytest.mark.parametrize("seed", range(6))
def test_lowest_takes_exactly_what_a_stable_sort_takes(seed):
    # lowest() picks by partition, not by sorting every candidate: the set must be the stable argsort's, ties to the
    # lower positions, also with many equal scores and NaNs (a different set offloads other tokens)
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 400).astype(np.float32)  # few distinct values: ties at the cut
    if seed % 2:
        scores[rng.choice(400, 30, replace=False)] = np.nan
    t = table_with_scores(scores)
    p = AsrkfPolicy(n_sinks=4, recent=8)
    pos = p.candidates(t, CellState.ACTIVE)
    for n in (1, 7, 50, 199, 380, 388, 500):
        want = np.sort(pos[np.argsort(scores[pos], kind="stable")[:n]])
        np.testing.assert_array_equal(p.lowest(t, CellState.ACTIVE, n), want)


def test_policy_registry_and_validation():
    assert set(POLICIES) == {"full", "window", "h2o", "asrkf"}
    assert not POLICIES["window"].reversible and not POLICIES["h2o"].reversible and POLICIES["asrkf"].reversible
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ValueError):
        AsrkfPolicy(k=0)
    with pytest.raises(ValueError):
        WindowPolicy(recent=0)


def test_recall_pooling_gives_a_span_the_mass_of_its_best_token():
    from asrkf_gguf.controller import ControllerConfig, pooled_max

    # positions 10..14 are a number: the question attends to its first token only
    pos = np.array([3, 10, 11, 12, 13, 14, 30])
    mass = np.array([0.2, 5.0, 0.1, 0.0, 0.1, 0.3, 1.0])
    out = pooled_max(pos, mass, 3, 40)
    assert out.tolist() == pytest.approx([0.2, 5.0, 5.0, 5.0, 5.0, 0.3, 1.0])
    # positions outside `pos` (not movable) lend nothing; half = 0 is the identity
    assert pooled_max(pos, mass, 0, 40) is mass
    assert pooled_max(np.array([0, 39]), np.array([1.0, 2.0]), 5, 40).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="recall_pool"):
        ControllerConfig(budget_cells=10, recall_pool=-1)


def test_running_score_is_per_query_and_the_total_is_not():
    # a prompt chunk scored by 32 queries and a generated token scored by one must land on one scale, or tokens
    # last scored during a prompt (offloaded ones keep their score) outrank everything scored while generating
    t = TokenTable()
    t.append(2)
    t.observe(np.array([0]), np.array([32.0]), ema=1.0, n_queries=32)  # prompt: 32 queries gave 1.0 each
    t.observe(np.array([1]), np.array([1.0]), ema=1.0, n_queries=1)    # generation: one query gave 1.0
    assert t.score[0] == t.score[1] == 1.0
    assert t.mass[0] == 32.0 and t.mass[1] == 1.0                       # H2O's total counts every query
    with pytest.raises(ValueError, match="n_queries"):
        t.observe(np.array([0]), np.array([1.0]), ema=1.0, n_queries=0)


def test_span_select_keeps_whole_spans_best_first_and_fills_with_smaller_ones():
    from asrkf_gguf.controller import span_select

    # spans (ends marked): [0..3] [4..9] [10..11] [12..19]; position 15 is not movable (a sink, say)
    ends = np.zeros(20, bool)
    ends[[3, 9, 11, 19]] = True
    pos = np.array([p for p in range(20) if p != 15])
    score = np.zeros(pos.size)
    score[pos == 5] = 9.0    # span [4..9] (6 movable) is the best
    score[pos == 13] = 5.0   # span [12..19] (7 movable) next
    score[pos == 1] = 3.0    # span [0..3] (4)
    score[pos == 10] = 1.0   # span [10..11] (2)
    keep = span_select(pos, score, 11, ends, max_len=48)
    # 6 fit, the next (7) does not: passed over for the 4 of [0..3]; 1 cell left, too few for [10..11]
    assert keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert span_select(pos, score, 13, ends, max_len=48).tolist() == [4, 5, 6, 7, 8, 9, 12, 13, 14, 16, 17, 18, 19]
    assert span_select(pos, score, 0, ends, max_len=48).size == 0
    # a span longer than max_len is cut in pieces: 4 positions of one sentence, pieces of 2
    assert span_select(np.arange(4), np.array([0.0, 0.0, 0.0, 1.0]), 2, np.zeros(4, bool), max_len=2).tolist() == [2, 3]
    # positions past span_ends are spans of their own
    assert span_select(np.array([0, 1, 25, 26]), np.array([0.0, 0.0, 2.0, 1.0]), 1, ends, max_len=48).tolist() == [25]
