"""The controller on the real library: invariants at every step, baselines, budget, recovery paths."""

import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache
from asrkf_gguf.controller import Controller, ControllerConfig
from asrkf_gguf.entropy import Recovery, entropy_of
from asrkf_gguf.generate import generate
from asrkf_gguf.policies import make_policy
from conftest import random_tokens, session


def run(path, policy, prompt, max_tokens, budget, n_ctx, config=None, **policy_params):
    with session(path, n_ctx=n_ctx, flash_attn="on", n_batch=128, n_ubatch=128) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy(policy, **policy_params),
                         ControllerConfig(budget_cells=budget, **(config or {})))
        res = generate(s, ctl, prompt, max_tokens, check_every_step=True, keep_logits=True)
        return res, ctl.stats, ctl.table.counts()


def test_full_policy_reproduces_plain_greedy(real_demo_model_path):
    prompt = random_tokens(200, seed=40, vocab=40000)
    with session(real_demo_model_path, n_ctx=512, flash_attn="on", n_batch=128, n_ubatch=128) as s:
        logits = s.decode(prompt, 0)
        plain = []
        for i in range(24):
            plain.append(int(np.argmax(logits)))
            logits = s.decode([plain[-1]], len(prompt) + i)
    res, stats, counts = run(real_demo_model_path, "full", prompt, 24, budget=512, n_ctx=512)
    assert res.tokens == plain
    assert stats.freezes == stats.offloads == stats.drops == 0


def test_asrkf_at_a_quarter_budget_accounts_for_every_position(real_demo_model_path):
    prompt = random_tokens(1500, seed=41, vocab=40000)
    budget = 1500 // 4
    # the paper's rule (freeze every period whatever the budget) exercises every state under pressure
    res, stats, counts = run(real_demo_model_path, "asrkf", prompt, 48, budget=budget, n_ctx=budget,
                             config={"freeze_under_budget": True}, recent=64, period=8)
    assert len(res.tokens) == 48 and all(np.isfinite(l).all() for l in res.logits)
    assert counts["dropped"] == 0
    assert sum(counts.values()) == 1500 + 48   # nothing lost
    assert counts["offloaded"] >= 1500 - budget
    assert counts["active"] + counts["frozen"] <= budget
    assert stats.freezes > 0 and stats.offloads > 0 and stats.resident_peak <= budget


def test_under_a_binding_budget_nothing_is_frozen_and_the_whole_budget_is_attended(tiny_path):
    # a frozen cell holds device memory and is masked: with the budget full, asrkf attends as many cells as h2o
    # (frozen tokens from before the budget filled are thawed back to attention, offloads take the lowest first)
    prompt = random_tokens(200, seed=47)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16, period=4), ControllerConfig(budget_cells=240))
        generate(s, ctl, prompt, 12, check_every_step=True)  # room left: low tokens freeze as in the paper
        assert ctl.table.count(CellState.FROZEN) > 0
        generate(s, ctl, random_tokens(100, seed=48), 40, check_every_step=True)  # the budget fills
        c = ctl.table.counts()
        assert ctl.budget_binding() and c["offloaded"] > 0
        # full but for the last batched offload (a few cells that the next tokens take)
        assert c["frozen"] == 0 and c["active"] >= 240 - ctl.offload_batch
        assert not (kv.cells()[1] == CellState.FROZEN).any()  # no cell masked
        # and at no step in between: an offload batch (7 cells here) larger than the period (4) leaves the resident
        # count a batch below the budget, which must not read as room to freeze in
        assert ctl.offload_batch > 4
        frozen_seen = []
        ctl.on_step = lambda step: frozen_seen.append(step["frozen"])
        freezes = ctl.stats.freezes
        generate(s, ctl, random_tokens(20, seed=49), 60, check_every_step=True)
        assert ctl.stats.freezes == freezes and max(frozen_seen) == 0


@pytest.mark.parametrize("policy", ["window", "h2o"])
def test_eviction_baselines_drop_for_good_within_budget(tiny_path, policy):
    prompt = random_tokens(600, seed=42)
    res, stats, counts = run(tiny_path, policy, prompt, 32, budget=200, n_ctx=256, recent=32)
    assert counts["offloaded"] == 0 and counts["dropped"] >= 600 + 32 - 200
    assert counts["active"] <= 200 and stats.drops == counts["dropped"]


def test_budget_that_leaves_no_room_is_refused(tiny_path):
    with session(tiny_path, n_ctx=128) as s, KVCache(ctx=s.context) as kv:
        with pytest.raises(ValueError, match="protected"):
            Controller(kv, make_policy("asrkf", n_sinks=4, recent=64), ControllerConfig(budget_cells=60))
        with pytest.raises(ValueError, match="exceeds"):
            Controller(kv, make_policy("asrkf"), ControllerConfig(budget_cells=4096))


@pytest.mark.parametrize("level", list(Recovery))
def test_every_recovery_level_keeps_the_cache_consistent(tiny_path, level):
    prompt = random_tokens(300, seed=43)
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16, period=2),
                         ControllerConfig(budget_cells=150, freeze_under_budget=True))
        generate(s, ctl, prompt, 16, check_every_step=True)
        before = ctl.table.counts()
        assert before["frozen"] + before["offloaded"] > 0
        ctl._recover(level)
        ctl.table.check(kv)
        after = ctl.table.counts()
        assert sum(after.values()) == sum(before.values())
        if level >= Recovery.FR:
            # nothing frozen; the movable tokens on the device are the best-scored of all movable ones
            t = ctl.table
            assert after["frozen"] == 0 and after["active"] <= 150
            on_device = ctl.policy.candidates(t, CellState.ACTIVE)
            off = t.positions(CellState.OFFLOADED)
            assert t.score[off].max() <= t.score[on_device].min()
        assert ctl.stats.recoveries[level.name] == 1
        # and decoding goes on
        ctl.make_room(1)
        logits = s.decode([5], ctl.table.n)
        # the generator's entropy comes from the graph: the same as the numpy pass over the row
        assert ctl.graph_entropy() == pytest.approx(entropy_of(logits), rel=1e-4, abs=1e-5)
        ctl.on_decoded(1, logits, entropy=ctl.graph_entropy())
        ctl.table.check(kv)


def test_a_prompt_many_times_the_budget_prefills_in_fitting_chunks(tiny_path):
    # chunks must leave room beside the protected tokens at every step, not only at the first
    prompt = random_tokens(1500, seed=44)
    res, stats, counts = run(tiny_path, "asrkf", prompt, 4, budget=150, n_ctx=256, recent=64)
    assert counts["active"] + counts["frozen"] <= 150 and sum(counts.values()) == 1504


@pytest.mark.parametrize("share,expected", [(0.25, 100), (1.0, 256)])
def test_prompt_chunks_take_at_most_their_share_of_the_budget(tiny_path, share, expected):
    # a chunk leaves most of the budget to what it attends besides itself (ControllerConfig.chunk_share): 400 cells,
    # -b 256: calls of 100 tokens at a quarter; with the whole budget allowed, calls of n_batch
    prompt = random_tokens(700, seed=47)
    with session(tiny_path, n_ctx=1024, flash_attn="on", n_batch=256, n_ubatch=256) as s, \
            KVCache(ctx=s.context) as kv:
        calls = []
        decode = s.decode
        s.decode = lambda tokens, pos: calls.append(len(tokens)) or decode(tokens, pos)
        ctl = Controller(kv, make_policy("asrkf", recent=64), ControllerConfig(budget_cells=400, chunk_share=share))
        generate(s, ctl, prompt, 0)
        assert max(calls) == expected and sum(calls) >= len(prompt)
        ctl.table.check(kv)
    with pytest.raises(ValueError):
        ControllerConfig(budget_cells=400, chunk_share=0)


def test_bringing_everything_back_reproduces_the_full_logits(real_demo_model_path):
    # the controller moves tokens only after their K/V were computed (prompt within budget, then pressure):
    # thawing and unfreezing everything must then give the full cache's logits exactly
    prompt = random_tokens(600, seed=45, vocab=40000)
    nxt = random_tokens(1, seed=46, vocab=40000)
    opts = dict(n_ctx=1024, flash_attn="on", n_batch=128, n_ubatch=128)
    with session(real_demo_model_path, **opts) as ref:
        ref.decode(prompt, 0)
        expected = ref.decode(nxt, len(prompt))
    with session(real_demo_model_path, **opts) as s, KVCache(ctx=s.context) as kv:
        # no re-evaluation during the prompt: a freeze there would change the K/V of the later chunks
        ctl = Controller(kv, make_policy("asrkf", period=10**6),
                         ControllerConfig(budget_cells=620, freeze_under_budget=True))
        generate(s, ctl, prompt, 0)
        ctl.make_room(300)  # budget pressure: ~280 tokens go to host memory
        ctl._reevaluate()   # and the low ones among the rest freeze
        counts = ctl.table.counts()
        assert counts["offloaded"] > 200 and counts["frozen"] > 0
        kv.thaw(ctl.table.positions(CellState.OFFLOADED))
        kv.unfreeze(ctl.table.positions(CellState.FROZEN))
        got = s.decode(nxt, len(prompt))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("recovery", [True, False])
def test_recovery_switch_watches_entropy_but_acts_only_when_on(tiny_path, recovery):
    # "asrkf without recovery" is a configuration, not a different policy: the entropy is still monitored
    # (statistics, traces) but no level is applied or returned, so the generator never rewalks either
    prompt = random_tokens(200, seed=46)
    calm = np.zeros(64)
    calm[0] = 30.0                     # one token certain: entropy ~ 0
    spike = np.zeros(64)               # uniform: entropy log(64)
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16, period=2),
                         ControllerConfig(budget_cells=150, recovery=recovery, recovery_under_budget=True))
        steps = []
        ctl.on_step = steps.append
        generate(s, ctl, prompt, 0)  # the prompt only: every entropy the monitor sees is ours
        levels = []
        for i in range(24):
            ctl.make_room(1)
            s.decode([5], ctl.table.n)
            levels.append(ctl.on_decoded(1, spike if i == 20 else calm))
        assert ctl.entropy.steps == 24 and steps[-1]["entropy"] is not None
        if recovery:
            assert levels[20] == Recovery.SR and ctl.stats.recoveries["SR"] == 1 and len(ctl.stats.recovery_log) == 1
            assert steps[-4]["recovery"] == "SR"
        else:
            assert levels == [None] * 24 and sum(ctl.stats.recoveries.values()) == 0 and not ctl.stats.recovery_log
            assert all(st["recovery"] is None for st in steps)
        ctl.table.check(kv)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_full_budget_offloads_a_batch_at_a_time(tiny_path, ahead):
    # one move of offload_batch tokens every few dozen steps, not a one-token device round trip per step: copied
    # ahead in one pass, then one cell freed per new token (offload_ahead), or the whole batch freed at once
    prompt = random_tokens(140, seed=47)
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, \
            KVCache(ctx=s.context, force_gather=True) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16),
                         ControllerConfig(budget_cells=150, offload_batch=20, offload_ahead=ahead))
        generate(s, ctl, prompt, 0)
        moves, copied, gathers = [], [], []
        for _ in range(40):
            before, before_ahead, before_gathers = ctl.stats.offloads, ctl.stats.offloads_ahead, kv.info().n_gathers
            ctl.make_room(1)
            moves.append(ctl.stats.offloads - before)
            copied.append(ctl.stats.offloads_ahead - before_ahead)
            gathers.append(kv.info().n_gathers - before_gathers)
            s.decode([5], ctl.table.n)
            ctl.on_decoded(1, None)
            c = ctl.table.counts()
            assert c["active"] + c["frozen"] <= 150
        if ahead:
            assert [m for m in copied if m] == [20, 20]
            assert moves[moves.index(1):] == [1] * (40 - moves.index(1))  # one token leaves per token decoded
        else:
            assert [m for m in moves if m] == [20, 20]
        assert sum(gathers) == 2  # one device copy per batch either way
        ctl.table.check(kv)


def test_score_every_scores_only_every_kth_step(tiny_path):
    prompt = random_tokens(100, seed=48)
    with session(tiny_path, n_ctx=256, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16, period=64), ControllerConfig(budget_cells=200, score_every=3))
        generate(s, ctl, prompt, 0)  # prompt chunks are always scored
        assert ctl.table.mass[: len(prompt)].sum() > 0
        scored = []
        for _ in range(9):
            ctl.make_room(1)
            s.decode([5], ctl.table.n)
            before = ctl.table.mass.copy()
            ctl.on_decoded(1, None)
            scored.append(bool(np.any(ctl.table.mass != before)))
        # two prompt chunks were steps 1 and 2; the decodes are steps 3..11, and steps 3, 6 and 9 are scored
        assert ctl.step == 11
        assert scored == [True, False, False] * 3
        ctl.table.check(kv)


def test_recall_after_an_unscored_one_token_prompt_does_nothing(tiny_path):
    # score_every > 1: a one-token turn may land on an unscored step; recall then has no queries and must not fail
    prompt = random_tokens(180, seed=49)
    with session(tiny_path, n_ctx=160, flash_attn="on", n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy("asrkf", recent=16), ControllerConfig(budget_cells=120, score_every=4))
        generate(s, ctl, prompt, 0, recall=True)
        assert ctl.stats.offloads > 0
        while (ctl.step + 1) % 4 == 0:  # the next decode must be an unscored one
            ctl.make_room(1)
            s.decode([5], ctl.table.n)
            ctl.on_decoded(1, None)
        generate(s, ctl, [7], 2, recall=True)
        assert ctl.stats.recalls == 1  # the first prompt's recall ran; the one-token turn's did not
        ctl.table.check(kv)


def test_importance_every_scores_every_kth_layer_from_the_last(tiny_paths):
    # the GPU setting: fewer scored layers, counted back from the last; the scores are those of those layers only
    path = tiny_paths["llama-hd128"]
    tokens = random_tokens(60, seed=50)
    with session(path, n_ctx=128, n_batch=64, n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        n_layer = kv.info().n_layer
        ctl = Controller(kv, make_policy("asrkf"), ControllerConfig(budget_cells=128, importance_every=2))
        assert ctl.layers == list(range(n_layer - 1, -1, -2))[::-1]
        s.decode(tokens, 0)
        one = kv.importance()[1].sum()
        kv.set_importance(True, n_q=ctl.config.n_q)  # all layers
        s.seq_rm(0, -1)
        s.decode(tokens, 0)
        # every query head's probabilities sum to 1 in every scored layer: the totals count the layers
        info = kv.info()
        assert one == pytest.approx(ctl.config.n_q * info.n_head * len(ctl.layers), rel=1e-4)
        assert kv.importance()[1].sum() == pytest.approx(ctl.config.n_q * info.n_head * n_layer, rel=1e-4)
    with pytest.raises(ValueError):
        ControllerConfig(budget_cells=8, importance_every=0)
    with pytest.raises(ValueError):
        ControllerConfig(budget_cells=8, importance_every=2, importance_layers=(0,))


def test_logits_are_kept_only_when_asked(tiny_path):
    # a full vocabulary row per token used to pile up in every result; now only keep_logits=True keeps them
    prompt = random_tokens(40, seed=50)
    results = {}
    for keep in (False, True):
        with session(tiny_path, n_ctx=128, flash_attn="on") as s, KVCache(ctx=s.context) as kv:
            ctl = Controller(kv, make_policy("asrkf", recent=16), ControllerConfig(budget_cells=100))
            results[keep] = generate(s, ctl, prompt, 20, keep_logits=keep)
    assert results[False].logits == [] and len(results[False].tokens) == 20
    kept = results[True]
    assert results[True].tokens == results[False].tokens
    assert len(kept.logits) == 20 and all(int(np.argmax(l)) == t for l, t in zip(kept.logits, kept.tokens))


@pytest.mark.parametrize("policy", ["asrkf", "h2o"])
def test_rewind_to_just_after_a_moved_position_can_decode_on(tiny_path, policy):
    # llama.cpp decodes position p only when p - 1 is the newest resident position: a rewind (a template that
    # rewrote an earlier turn, a taken-back turn) to just after an offloaded or dropped position used to leave
    # the next decode failing
    from asrkf_gguf.generate import rewind

    prompt = random_tokens(150, seed=51)
    with session(tiny_path, n_ctx=100, flash_attn="on", n_batch=32, n_ubatch=32) as s, KVCache(ctx=s.context) as kv:
        ctl = Controller(kv, make_policy(policy, recent=16), ControllerConfig(budget_cells=80))
        generate(s, ctl, prompt, 0)
        moved = CellState.OFFLOADED if policy == "asrkf" else CellState.DROPPED
        gone = ctl.table.positions(moved)
        assert gone.size > 0
        p = int(gone[-1]) + 1
        at = rewind(s, ctl, p)
        if policy == "asrkf":
            assert at == p and ctl.table.state[p - 1] == CellState.ACTIVE  # brought back
        else:
            assert at < p and ctl.table.state[at - 1] != CellState.DROPPED  # rewound past the dropped run
        assert ctl.table.n == at
        res = generate(s, ctl, prompt[at:at + 20], 4, check_every_step=True)
        assert len(res.tokens) == 4 and ctl.table.n == at + 20 + 4
        ctl.table.check(kv)
