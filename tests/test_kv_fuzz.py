"""Stateful fuzz of the KVCache API on a tiny model: random decode / freeze / unfreeze / offload / thaw / seq_rm.

A Python model of the sequence (the state of every position) is compared with the native cells after every step,
and every position is always exactly one of active, frozen, offloaded: |active| + |frozen| + |offloaded| equals
newest + 1. Whenever everything is thawed and active, and every position was itself decoded with all earlier ones
active (a token decoded while others were offloaded or frozen has rightly different K/V in the upper layers), a
decode's logits must match a full cache that decoded the same chunks (a reference context without a KVCache).
Hypothesis prints the failing steps and how to replay them.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test  # noqa: E402,E501

from asrkf_gguf import KVCache  # noqa: E402
from asrkf_gguf.states import CellState  # noqa: E402
from conftest import session  # noqa: E402

N_CELLS = 48       # device cells: offloading is what makes room
MAX_POS = 160      # logical positions, about 3x the cells
VOCAB = 500
# the logits of a thawed cache against the reference, which decoded the same chunks at the same positions: cells in
# another order, so equal up to float summation order (up to ~1e-4 here; a token decoded without some of its
# context, the mildest error there is, moves them by ~7e-3)
LOGITS_ATOL = 1e-3
EXAMPLES, STEPS = 100, 100  # about 6,000 operations in all (hypothesis ends some runs early), ~15 s


@pytest.fixture(scope="module")
def sessions(tiny_path):
    # one thread: a tiny model's decode is ~1 ms, and on a busy machine the threads' barriers cost 40 times that.
    # Flash attention off: ggml's CPU flash attention accumulates V in f16, so the cells' order would show more
    with session(tiny_path, n_ctx=N_CELLS, n_batch=16, n_ubatch=16, flash_attn="off", n_threads=1) as s, \
            session(tiny_path, n_ctx=MAX_POS + 16, n_batch=16, n_ubatch=16, flash_attn="off", n_threads=1) as ref, \
            KVCache(ctx=s.context) as kv:
        yield s, kv, ref


class KVMachine(RuleBasedStateMachine):
    s = kv = ref = None  # set by the test: one model load for every example

    def __init__(self):
        super().__init__()
        self.s.clear()  # every example starts from an empty sequence (host copies go too)
        self.ref.clear()  # the full cache: the same decodes and seq_rms, never a freeze or an offload
        self.tokens = []  # token of each position 0..n-1
        self.state = []   # CellState of each position
        self.clean = []   # whether the position was decoded with every earlier position active
        self.ops = 0
        self.compared = 0

    # ---- helpers

    def positions(self, *states):
        return [p for p, st_ in enumerate(self.state) if st_ in states]

    def resident(self):
        return self.positions(CellState.ACTIVE, CellState.FROZEN)

    def free_cells(self):
        return N_CELLS - len(self.resident())

    def pick(self, data, pool):
        return sorted(data.draw(st.lists(st.sampled_from(pool), unique=True, min_size=1, max_size=8)))

    # ---- rules

    # llama.cpp continues a sequence only right after its newest resident position: after a seq_rm that leaves
    # an offloaded position newest, that position must be thawed before the next decode
    @precondition(lambda self: not self.state or self.state[-1] != CellState.OFFLOADED)
    @rule(data=st.data(), k=st.integers(1, 6))
    def decode(self, data, k):
        k = min(k, self.free_cells(), MAX_POS - len(self.state))
        if k < 1:
            return
        new = data.draw(st.lists(st.integers(3, VOCAB), min_size=k, max_size=k))
        exact = all(x == CellState.ACTIVE for x in self.state) and all(self.clean)
        logits = self.s.decode(new, len(self.state))
        expected = self.ref.decode(new, len(self.state))  # the same chunk on the full cache
        self.tokens += new
        self.state += [CellState.ACTIVE] * k
        self.clean += [exact] * k
        self.ops += 1
        if exact:
            # every earlier position is attended to, whatever offloads and thaws it went through
            np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_ATOL)
            self.compared += 1

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def freeze(self, data):
        pos = self.pick(data, self.resident())
        self.kv.freeze(pos)
        for p in pos:
            self.state[p] = CellState.FROZEN
        self.ops += 1

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def unfreeze(self, data):
        pos = self.pick(data, self.resident())
        self.kv.unfreeze(pos)
        for p in pos:
            self.state[p] = CellState.ACTIVE
        self.ops += 1

    @precondition(lambda self: len(self.resident()) > 1)
    @rule(data=st.data())
    def offload(self, data):
        newest = max(self.resident())  # the native core refuses to offload the newest resident position
        pos = self.pick(data, [p for p in self.resident() if p != newest])
        self.kv.offload(pos)
        for p in pos:
            self.state[p] = CellState.OFFLOADED
        self.ops += 1

    @precondition(lambda self: self.positions(CellState.OFFLOADED) and self.free_cells() > 0)
    @rule(data=st.data(), frozen=st.booleans())
    def thaw(self, data, frozen):
        pos = self.pick(data, self.positions(CellState.OFFLOADED))[: self.free_cells()]
        self.kv.thaw(pos, frozen=frozen)
        for p in pos:
            self.state[p] = CellState.FROZEN if frozen else CellState.ACTIVE
        self.ops += 1

    @precondition(lambda self: self.state)
    @rule(data=st.data())
    def seq_rm(self, data):
        # the tail goes, offloaded positions in it included (their host copies are dropped)
        p = data.draw(st.integers(0, len(self.state) - 1))
        assert self.s.seq_rm(p, -1)
        self.ref.seq_rm(p, -1)
        del self.tokens[p:], self.state[p:], self.clean[p:]
        self.ops += 1

    @precondition(lambda self: self.positions(CellState.OFFLOADED, CellState.FROZEN)
                  and len(self.positions(CellState.OFFLOADED)) <= self.free_cells())
    @rule()
    def thaw_everything(self):
        # lets the logits comparison run: everything back and active
        off = self.positions(CellState.OFFLOADED)
        if off:
            self.kv.thaw(off)
        frozen = self.positions(CellState.FROZEN)
        if frozen:
            self.kv.unfreeze(frozen)
        self.state = [CellState.ACTIVE] * len(self.state)
        self.ops += 1

    # ---- invariants

    @invariant()
    def native_state_matches_the_model(self):
        self.kv.check()
        pos, state, _ = self.kv.cells()
        off = self.kv.offloaded()
        n = len(self.state)
        # every position 0..newest is exactly one of active, frozen, offloaded
        assert len(pos) + len(off) == n
        assert sorted(pos.tolist() + off.tolist()) == list(range(n))
        assert dict(zip(pos.tolist(), state.tolist())) == {p: int(x) for p, x in enumerate(self.state)
                                                           if x != CellState.OFFLOADED}
        assert off.tolist() == self.positions(CellState.OFFLOADED)
        info = self.kv.info()
        assert info.n_offloaded == len(off) and info.n_frozen == len(self.positions(CellState.FROZEN))

    def teardown(self):
        KVMachine.total_ops += self.ops
        KVMachine.total_compared += self.compared


def test_random_operation_sequences_keep_every_position_accounted_for(sessions):
    KVMachine.s, KVMachine.kv, KVMachine.ref = sessions
    KVMachine.total_ops = KVMachine.total_compared = 0
    run_state_machine_as_test(KVMachine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None, print_blob=True))
    # the fuzz did what it says: thousands of operations, and the logits compared many times
    assert KVMachine.total_ops >= 2000 and KVMachine.total_compared >= 50, (KVMachine.total_ops,
                                                                             KVMachine.total_compared)
