"""Stateful fuzz of Engine on a tiny written model (a real SentencePiece vocabulary, chatml template): random chat,
generate (raw prompt), reset, a turn abandoned after one piece, cancel, and close (after which every call raises
ClosedError and the example ends).

After every step the controller's table matches the KV cache (table.check) and the cache its own invariants
(kv.check); the cache holds exactly the cached tokens; a finished turn adds its user message and the reply, an
abandoned one leaves the messages and the cached tokens as they were. The budget is small next to the context, so
turns offload and recall.
"""

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

from asrkf_gguf.engine import Engine  # noqa: E402
from asrkf_gguf.errors import ClosedError  # noqa: E402
from test_kv_fuzz import run_machine  # noqa: E402

EXAMPLES = int(os.environ.get("ASRKF_FUZZ_ENGINE_EXAMPLES", 20))
STEPS = int(os.environ.get("ASRKF_FUZZ_ENGINE_STEPS", 30))
CTX, BUDGET = 512, 48
WORDS = ["the", "cat", "sat", "on", "a", "mat", "hello", "world", "why", "blue", "42", "é", "ok", "run"]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


class EngineMachine(RuleBasedStateMachine):
    path = None

    def __init__(self):
        super().__init__()
        self.e = Engine(self.path, ctx=CTX, kv_budget=BUDGET, n_threads=1, chat_template="chatml",
                        policy_params={"n_sinks": 4, "recent": 8})
        self.closed = False
        self.ops = 0

    def room(self):
        # a long conversation would outgrow ctx (EngineError, checked before anything is decoded): start anew
        if len(self.e.cached_tokens()) > CTX - 200:
            self.e.reset()

    def taken_back(self, before, cached):
        # the messages are as before; the cache keeps what the turn shared with it (a reply whose last token
        # re-tokenizes differently in the next prompt is decoded again by the next turn: engine.py keeps the
        # common prefix), never a token of the abandoned turn
        assert self.e.messages == before
        now = self.e.cached_tokens()
        assert now == cached[:len(now)], (len(now), len(cached))

    def cache_positions(self):
        pos, _, _ = self.e.kv.cells()
        return len(pos) + len(self.e.kv.offloaded())

    # ---- rules

    @precondition(lambda self: not self.closed and not self.e._raw)
    @rule(msg=text, n=st.integers(1, 4))
    def chat(self, msg, n):
        self.room()
        before = list(self.e.messages)
        reply = "".join(self.e.chat(msg, max_tokens=n))
        assert self.e.messages == before + [{"role": "user", "content": msg}, {"role": "assistant", "content": reply}]
        self.ops += 1

    @precondition(lambda self: not self.closed)
    @rule(prompt=text, n=st.integers(1, 4))
    def generate(self, prompt, n):
        "".join(self.e.generate(prompt, max_tokens=n))
        assert self.e.messages == [] and self.e._raw
        self.ops += 1

    @precondition(lambda self: not self.closed)
    @rule()
    def reset(self):
        self.e.reset()
        assert self.e.messages == [] and self.e.cached_tokens() == [] and self.cache_positions() == 0
        self.ops += 1

    @precondition(lambda self: not self.closed and not self.e._raw)
    @rule(msg=text, how=st.sampled_from(["close", "next_turn", "reset"]))
    def abandon(self, msg, how):
        self.room()
        before, cached = list(self.e.messages), self.e.cached_tokens()
        turn = self.e.chat(msg, max_tokens=4)
        next(turn, None)  # one piece (or none: an immediate end of generation)
        if how == "close":
            turn.close()
            self.taken_back(before, cached)
        elif how == "reset":
            self.e.reset()
            assert self.e.messages == [] and self.e.cached_tokens() == []
        else:
            nxt = self.e.chat(msg, max_tokens=1)  # a newer turn ends the first one, which is taken back
            self.taken_back(before, cached)
            "".join(nxt)
            assert len(self.e.messages) == len(before) + 2
        self.ops += 1

    @precondition(lambda self: not self.closed and not self.e._raw)
    @rule(msg=text)
    def cancel(self, msg):
        # cancel before the first piece: the turn ends after at most one token, as a finished turn
        self.room()
        before = list(self.e.messages)
        turn = self.e.chat(msg, max_tokens=4)
        self.e.cancel()
        "".join(turn)
        assert self.e.messages[:len(before)] == before and len(self.e.messages) == len(before) + 2
        self.ops += 1

    @precondition(lambda self: not self.closed)
    @rule(mid_turn=st.booleans())
    def close(self, mid_turn):
        turn = None
        if mid_turn and not self.e._raw:
            turn = self.e.chat("hello", max_tokens=4)
            next(turn, None)
        self.e.close()
        self.closed = True
        for call in (lambda: self.e.chat("hi"), lambda: self.e.generate("hi"), self.e.reset, self.e.stats):
            with pytest.raises(ClosedError):
                call()
        if turn is not None:
            with pytest.raises(ClosedError):
                next(turn)
        self.e.close()  # twice is fine
        self.ops += 1

    @precondition(lambda self: self.closed)
    @rule()
    def after_close(self):
        with pytest.raises(ClosedError):
            self.e.chat("hi")

    # ---- invariants

    @invariant()
    def cache_matches_the_conversation(self):
        if self.closed:
            return
        self.e.kv.check()
        self.e.controller.table.check(self.e.kv)
        # the cache holds the cached tokens, position by position: resident or offloaded, nothing lost
        assert self.cache_positions() == len(self.e.cached_tokens()) == self.e.controller.table.n
        assert all(m["role"] in ("user", "assistant") for m in self.e.messages)
        assert [m["role"] for m in self.e.messages] == ["user", "assistant"] * (len(self.e.messages) // 2)

    def teardown(self):
        EngineMachine.total_ops += self.ops
        self.e.close()


def run_engine_machine(path, examples=EXAMPLES, steps=STEPS, seed=None):
    EngineMachine.path = path
    EngineMachine.total_ops = 0
    run_machine(EngineMachine, settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                        database=None, print_blob=True), seed)
    return EngineMachine.total_ops


def test_random_engine_calls_keep_the_conversation_and_the_cache_consistent(tiny_path):
    seed = os.environ.get("ASRKF_FUZZ_SEED")
    ops = run_engine_machine(tiny_path, seed=int(seed) if seed else None)
    print(f"Engine fuzz: {ops} operations")
    # hypothesis draws each run's length: 20 runs of up to 30 steps did 195 operations in one CI run (a floor of
    # 200 failed it); 100 still says the machine exercised the Engine rather than stopping at once
    assert ops >= 100, ops
