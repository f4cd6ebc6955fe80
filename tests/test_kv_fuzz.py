"""Stateful fuzz of the KVCache API and of the llama.cpp calls the patched library guards, on a tiny model, over two
sequences of one unified cache: decode, freeze / unfreeze, offload, thaw, seq_rm (of one sequence or of all),
seq_cp, seq_keep, the state save / load of one sequence, the session save / load of one sequence (asrkf_kv_session_*:
frozen flags and host copies included), and close / re-attach of the handle.

A Python model of the cache (every resident cell: position, the sequences sharing it, frozen or not; every
offloaded position of each sequence) predicts which calls the patched llama.cpp refuses (the model then asserts the
refusal and that nothing changed) and what the others leave. After every step the native cells, offloaded lists
and cell sharing of both sequences equal the model, kv.check() passes and every offloaded position is below its
sequence's newest resident one (asrkf.h: positions 0..newest are each resident or offloaded unless the caller
removed some below the newest).

Logits: a reference context without a KVCache mirrors every operation that changes what a sequence holds (decode,
seq_rm, seq_cp, seq_keep, save / load, the positions a forced close loses), never a freeze or an offload. A cell is
"clean" when it was decoded with every position of its sequence resident, active and itself clean (a token decoded
while others were offloaded or frozen has rightly different K/V in the upper layers); a copy or a load carries the
flag along. A decode into a sequence whose positions are all resident, active and clean must give the reference's
logits, for either sequence.
"""

import ctypes
import os

import llama_cpp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test  # noqa: E402,E501

from asrkf_gguf import AsrkfError, KVCache  # noqa: E402
from asrkf_gguf._cffi import ffi, lib  # noqa: E402
from asrkf_gguf.errors import ClosedError  # noqa: E402
from asrkf_gguf.states import CellState  # noqa: E402
from conftest import session  # noqa: E402

N_CELLS = 256      # device cells for both sequences (llama.cpp pads a cache to 256 cells): offloading makes room
MAX_POS = 300      # logical positions of one sequence
VOCAB = 500
# the logits of a thawed cache against the reference, which decoded the same chunks at the same positions: cells in
# another order, so equal up to float summation order (up to ~1e-4 here; a token decoded without some of its
# context, the mildest error there is, moves them by ~7e-3)
LOGITS_ATOL = 1e-3
# the suite's share; scripts/fuzz.py runs more (ASRKF_FUZZ_EXAMPLES / ASRKF_FUZZ_STEPS / ASRKF_FUZZ_SEED)
EXAMPLES = int(os.environ.get("ASRKF_FUZZ_EXAMPLES", 60))
STEPS = int(os.environ.get("ASRKF_FUZZ_STEPS", 80))
SEQS = (0, 1)


class Cell:
    """A resident cell of the model: its position, the sequences holding it, frozen, clean (K/V equal to the
    reference's)."""

    def __init__(self, pos, seqs, clean, frozen=False):
        self.pos, self.seqs, self.clean, self.frozen = pos, set(seqs), clean, frozen


def last_error():
    return ffi.string(lib.asrkf_last_error()).decode("utf-8", "replace"), lib.asrkf_last_error_code()


@pytest.fixture(scope="module")
def sessions(tiny_path):
    # one thread: a tiny model's decode is ~1 ms, and on a busy machine the threads' barriers cost 40 times that.
    # Flash attention off: ggml's CPU flash attention accumulates V in f16, so the cells' order would show more
    with session(tiny_path, n_ctx=N_CELLS, n_batch=16, n_ubatch=16, flash_attn="off", n_threads=1, n_seq_max=2) as s, \
            session(tiny_path, n_ctx=2 * MAX_POS + 16, n_batch=16, n_ubatch=16, flash_attn="off", n_threads=1,
                    n_seq_max=2) as ref:
        holder = {"kv": KVCache(ctx=s.context)}
        assert holder["kv"].info().n_cells == N_CELLS  # the model's count of free cells depends on it
        yield s, holder, ref
        holder["kv"].close()


class KVMachine(RuleBasedStateMachine):
    s = holder = ref = None  # set by the test: one model load for every example

    def __init__(self):
        super().__init__()
        if self.holder["kv"].handle is None:  # an earlier example failed between a close and the re-attach
            self.holder["kv"] = KVCache(ctx=self.s.context)
        self.s.clear()  # every example starts from an empty cache (host copies go too)
        self.ref.clear()
        self.cells = []                       # resident cells (model)
        self.off = {s: {} for s in SEQS}      # offloaded positions of each sequence: pos -> clean
        self.snaps = []                       # (main bytes, reference bytes, [(pos, clean)], seq it was taken from)
        self.sessions = []                    # (session bytes, reference bytes, {pos: (frozen, clean)}, {pos: clean}, cells)
        self.ops = self.compared = self.refused = 0

    @property
    def kv(self):
        return self.holder["kv"]

    # ---- model helpers

    def res(self, s):
        return {c.pos: c for c in self.cells if s in c.seqs}

    def newest(self, s):
        return max(self.res(s), default=-1)

    def free_cells(self):
        return N_CELLS - len(self.cells)

    def pick(self, data, pool, max_size=8):
        return sorted(data.draw(st.lists(st.sampled_from(sorted(pool)), unique=True, min_size=1, max_size=max_size)))

    def native(self):
        """Everything the model predicts, read from the native side (for 'nothing changed' after a refusal)."""
        out = []
        for s in SEQS:
            pos, state, cell = self.kv.cells(s)
            out.append((pos.tolist(), state.tolist(), cell.tolist(), self.kv.offloaded(s).tolist()))
        info = self.kv.info()
        return out, info.n_cells_used, info.n_frozen, info.n_offloaded, info.host_bytes_used

    def assert_refused(self, before, op):
        why, code = last_error()
        assert code == -2 and op in why, (op, code, why)
        assert self.native() == before
        self.refused += 1

    def drop_positions(self, s, p0, p1):
        """seq_rm of the model: sequence s (or every one for -1) loses [p0, p1)."""
        p1 = p1 if p1 >= 0 else 1 << 30
        for c in self.cells:
            if p0 <= c.pos < p1:
                c.seqs -= set(SEQS) if s < 0 else {s}
        self.cells = [c for c in self.cells if c.seqs]
        for t in (SEQS if s < 0 else (s,)):
            self.off[t] = {p: cl for p, cl in self.off[t].items() if not p0 <= p < p1}

    def seq_rm_refused(self, s, p0, p1):
        """The patched llama.cpp's rule: a removal is refused when it would leave an offloaded position of a
        sequence above that sequence's newest resident position."""
        p1 = p1 if p1 >= 0 else 1 << 30
        for t in (SEQS if s < 0 else (s,)):
            off = [p for p in self.off[t] if not p0 <= p < p1]
            res = [p for p in self.res(t) if not p0 <= p < p1]
            if off and max(off) > max(res, default=-1):
                return True
        return False

    # ---- rules

    @rule(data=st.data(), s=st.sampled_from(SEQS), k=st.integers(1, 24))
    def decode(self, data, s, k):
        pos0 = self.newest(s) + 1  # llama.cpp continues a sequence right after its newest resident position
        k = min(k, self.free_cells(), MAX_POS - pos0)
        if k < 1:
            return
        new = data.draw(st.lists(st.integers(3, VOCAB), min_size=k, max_size=k))
        res = self.res(s)
        exact = not self.off[s] and all(c.clean and not c.frozen for c in res.values())
        logits = self.s.decode(new, pos0, seq_id=s)
        expected = self.ref.decode(new, pos0, seq_id=s)  # the same chunk on the full cache
        self.cells += [Cell(pos0 + i, {s}, exact) for i in range(k)]
        self.ops += 1
        if exact:
            # every earlier position is attended to, whatever offloads, thaws, copies and loads it went through
            np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_ATOL)
            self.compared += 1

    @precondition(lambda self: self.cells)
    @rule(data=st.data(), s=st.sampled_from(SEQS), frozen=st.booleans())
    def freeze(self, data, s, frozen):
        res = self.res(s)
        if not res:
            return
        pos = self.pick(data, res)
        before = self.native()
        # the flag is per cell: a cell shared with the other sequence is refused
        if any(len(res[p].seqs) > 1 for p in pos):
            with pytest.raises(AsrkfError) as err:
                (self.kv.freeze if frozen else self.kv.unfreeze)(pos, seq_id=s)
            assert err.value.code == -2 and "shared" in err.value.message
            assert self.native() == before
            self.refused += 1
        else:
            (self.kv.freeze if frozen else self.kv.unfreeze)(pos, seq_id=s)
            for p in pos:
                res[p].frozen = frozen
        self.ops += 1

    @precondition(lambda self: self.cells)
    @rule(data=st.data(), s=st.sampled_from(SEQS), bad=st.integers(0, 9))
    def offload(self, data, s, bad):
        res = self.res(s)
        if len(res) < 2:
            return
        newest = max(res)
        pool = [p for p in res if p != newest] if bad > 2 else list(res)  # now and then the newest is in
        pos = self.pick(data, pool)
        if bad == 0 and self.off[s]:  # now and then a position that is not resident
            pos = sorted(set(pos) | {min(self.off[s])})
        before = self.native()
        if any(p not in res for p in pos):
            with pytest.raises(AsrkfError) as err:
                self.kv.offload(pos, seq_id=s)
            assert err.value.code == -1
            assert self.native() == before
        elif newest in pos or any(len(res[p].seqs) > 1 for p in pos):
            with pytest.raises(AsrkfError) as err:
                self.kv.offload(pos, seq_id=s)
            assert err.value.code == -2 and ("newest" in err.value.message or "shared" in err.value.message)
            assert self.native() == before
            self.refused += 1
        else:
            self.kv.offload(pos, seq_id=s)
            for p in pos:
                self.off[s][p] = res[p].clean
                self.cells.remove(res[p])
        self.ops += 1

    @precondition(lambda self: self.off[0] or self.off[1])
    @rule(data=st.data(), s=st.sampled_from(SEQS), frozen=st.booleans(), over=st.booleans())
    def thaw(self, data, s, frozen, over):
        if not self.off[s]:
            return
        pos = self.pick(data, self.off[s], max_size=12)
        if not over:
            pos = pos[: self.free_cells()]
        if not pos:
            return
        before = self.native()
        if len(pos) > self.free_cells():
            with pytest.raises(AsrkfError) as err:
                self.kv.thaw(pos, seq_id=s, frozen=frozen)
            assert err.value.code == -2 and "free cells" in err.value.message
            assert self.native() == before
            self.refused += 1
        else:
            self.kv.thaw(pos, seq_id=s, frozen=frozen)
            for p in pos:
                self.cells.append(Cell(p, {s}, self.off[s].pop(p), frozen))
        self.ops += 1

    @precondition(lambda self: self.cells)
    @rule(data=st.data(), s=st.sampled_from((0, 1, -1)), to_end=st.booleans())
    def seq_rm(self, data, s, to_end):
        top = max([self.newest(t) for t in SEQS])
        p0 = data.draw(st.integers(0, top))
        p1 = -1 if to_end else data.draw(st.integers(p0 + 1, top + 1))
        before = self.native()
        mem = self.s.context.memory
        if self.seq_rm_refused(s, p0, p1):
            assert not llama_cpp.llama_memory_seq_rm(mem, s, p0, p1)
            self.assert_refused(before, "seq_rm")
        else:
            assert llama_cpp.llama_memory_seq_rm(mem, s, p0, p1)
            assert llama_cpp.llama_memory_seq_rm(self.ref.context.memory, s, p0, p1)
            self.drop_positions(s, p0, p1)
        self.ops += 1

    @precondition(lambda self: self.cells)
    @rule(data=st.data(), src=st.sampled_from(SEQS), whole=st.booleans())
    def seq_cp(self, data, src, whole):
        dst = 1 - src
        res, dres = self.res(src), self.res(dst)
        if not res:
            return
        top = max(res)
        p0, p1 = (-1, -1) if whole else (data.draw(st.integers(0, top)), data.draw(st.integers(0, top + 1)))
        lo, hi = max(p0, 0), (p1 if p1 >= 0 else 1 << 30)
        # a copy onto a position the target holds in a cell of its own would give it two cells at one position
        # (llama.cpp's seq_cp adds, it does not replace): copy only above the last such position
        clash = [p for p in dres if lo <= p < hi and dres[p] is not res.get(p)]
        if clash:
            p0 = lo = max(clash) + 1
        if lo >= hi:
            return
        before = self.native()
        self.kv.info()  # a successful asrkf call clears the last error: seq_cp says nothing else
        llama_cpp.llama_memory_seq_cp(self.s.context.memory, src, dst, p0, p1)
        offl = any(lo <= p < hi for t in (src, dst) for p in self.off[t])
        frozen = any(lo <= p < hi and c.frozen for p, c in res.items())
        if offl or frozen:
            self.assert_refused(before, "seq_cp")
        else:
            assert last_error()[1] == 0, last_error()
            llama_cpp.llama_memory_seq_cp(self.ref.context.memory, src, dst, p0, p1)
            for p, c in res.items():
                if lo <= p < hi:
                    c.seqs.add(dst)
        self.ops += 1

    @precondition(lambda self: self.cells)
    @rule(s=st.sampled_from(SEQS))
    def seq_keep(self, s):
        # never refused: the other sequence goes, its offloaded positions with it
        llama_cpp.llama_memory_seq_keep(self.s.context.memory, s)
        llama_cpp.llama_memory_seq_keep(self.ref.context.memory, s)
        self.drop_positions(1 - s, 0, -1)
        self.ops += 1

    @rule(s=st.sampled_from(SEQS))
    def save(self, s):
        before = self.native()
        n = llama_cpp.llama_state_seq_get_size(self.s.ctx, s)
        res = self.res(s)
        if self.off[s] or any(c.frozen for c in res.values()):
            # a snapshot holds neither host rows nor frozen flags
            assert n == 0
            self.assert_refused(before, "state_write")
        else:
            assert n > 0
            buf = (ctypes.c_uint8 * n)()
            assert llama_cpp.llama_state_seq_get_data(self.s.ctx, buf, n, s) == n
            rn = llama_cpp.llama_state_seq_get_size(self.ref.ctx, s)
            rbuf = (ctypes.c_uint8 * rn)()
            assert llama_cpp.llama_state_seq_get_data(self.ref.ctx, rbuf, rn, s) == rn
            self.snaps = (self.snaps + [(buf, rbuf, sorted((p, c.clean) for p, c in res.items()), s)])[-3:]
            assert self.native() == before
        self.ops += 1

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), dst=st.sampled_from(SEQS))
    def load(self, data, dst):
        buf, rbuf, saved, _ = data.draw(st.sampled_from(self.snaps))
        before = self.native()
        n = llama_cpp.llama_state_seq_set_data(self.s.ctx, buf, len(buf), dst)
        if self.off[dst]:
            assert n == 0
            self.assert_refused(before, "state_read")
            self.ops += 1
            return
        if not saved:
            # an empty snapshot restores nothing and removes nothing (llama.cpp skips a stream without cells)
            assert n == len(buf) and self.native() == before
            assert llama_cpp.llama_state_seq_set_data(self.ref.ctx, rbuf, len(rbuf), dst) == len(rbuf)
            self.ops += 1
            return
        # the load removes the target's cells first; it then needs a free cell for every saved one
        self.drop_positions(dst, 0, -1)
        if len(saved) > self.free_cells():
            assert n == 0  # and the target is left empty
            assert llama_cpp.llama_memory_seq_rm(self.ref.context.memory, dst, -1, -1)
        else:
            assert n == len(buf)
            assert llama_cpp.llama_state_seq_set_data(self.ref.ctx, rbuf, len(rbuf), dst) == len(rbuf)
            self.cells += [Cell(p, {dst}, clean) for p, clean in saved]  # restored active
        self.ops += 1

    # one rule for both directions: the session calls take one rule's share of the steps, so that the others (and
    # the refusals they provoke) keep theirs
    @rule(data=st.data(), s=st.sampled_from(SEQS), load=st.booleans())
    def session(self, data, s, load):
        if load and self.sessions:
            self.session_load(data, s)
        else:
            self.session_save(s)

    def session_save(self, s):
        before = self.native()
        res = self.res(s)
        if any(len(c.seqs) > 1 for c in res.values()):
            with pytest.raises(AsrkfError) as err:
                self.kv.session_save(s)
            assert err.value.code == -2 and "shared" in err.value.message
            assert self.native() == before
            self.refused += 1
            self.ops += 1
            return
        blob = bytes(self.kv.session_save(s))
        assert self.native() == before  # a save changes nothing
        rn = llama_cpp.llama_state_seq_get_size(self.ref.ctx, s)
        rbuf = (ctypes.c_uint8 * rn)()
        assert llama_cpp.llama_state_seq_get_data(self.ref.ctx, rbuf, rn, s) == rn
        _, _, cells = self.kv.cells(s)
        # kept for a load only when it holds what llama.cpp's own snapshot cannot (frozen cells, host copies): a
        # load of a plain one resets a sequence to a simple state and leaves the other rules less to refuse
        if self.off[s] or any(c.frozen for c in res.values()):
            self.sessions = (self.sessions + [(blob, rbuf, {p: (c.frozen, c.clean) for p, c in res.items()},
                                               dict(self.off[s]), set(cells.tolist()))])[-3:]
        self.ops += 1

    def session_load(self, data, dst):
        blob, rbuf, res, off, cells = data.draw(st.sampled_from(self.sessions))
        before = self.native()
        _, _, other = self.kv.cells(1 - dst)
        if cells & set(other.tolist()):
            # the saved cells must be free or the target's own: a cell of the other sequence is refused
            with pytest.raises(AsrkfError) as err:
                self.kv.session_load(blob, dst)
            assert err.value.code == -2 and "another sequence" in err.value.message
            assert self.native() == before
            self.refused += 1
            self.ops += 1
            return
        self.kv.session_load(blob, dst)
        self.drop_positions(dst, 0, -1)
        self.cells += [Cell(p, {dst}, clean, frozen) for p, (frozen, clean) in res.items()]
        self.off[dst] = dict(off)
        assert llama_cpp.llama_memory_seq_rm(self.ref.context.memory, dst, -1, -1)
        if res or off:
            assert llama_cpp.llama_state_seq_set_data(self.ref.ctx, rbuf, len(rbuf), dst) == len(rbuf)
        _, _, got = self.kv.cells(dst)
        assert set(got.tolist()) == cells  # the same cells: the attention sums are those of the saved sequence
        self.ops += 1

    @rule(force=st.booleans())
    def close_and_reattach(self, force):
        before = self.native()
        old = self.kv
        lost = {s: sorted(self.off[s]) for s in SEQS}
        if not force and (lost[0] or lost[1]):
            with pytest.raises(AsrkfError) as err:
                old.close(force=False)  # offloaded positions would be lost
            assert err.value.code == -2
            assert self.native() == before
            self.refused += 1
            self.ops += 1
            return
        old.close(force=force)
        with pytest.raises(ClosedError):
            old.cells(0)
        self.holder["kv"] = KVCache(ctx=self.s.context)
        # frozen cells come back active; offloaded positions are gone (holes below the newest), in the reference too
        for c in self.cells:
            c.frozen = False
        for s in SEQS:
            for p in lost[s]:
                assert llama_cpp.llama_memory_seq_rm(self.ref.context.memory, s, p, p + 1)
            self.off[s] = {}
        self.ops += 1

    @precondition(lambda self: any(c.frozen for c in self.cells) or self.off[0] or self.off[1])
    @rule(s=st.sampled_from(SEQS))
    def thaw_everything(self, s):
        # lets the logits comparison run: everything of s back and active
        if len(self.off[s]) > self.free_cells():
            return
        if self.off[s]:
            self.kv.thaw(sorted(self.off[s]), seq_id=s)
            self.cells += [Cell(p, {s}, clean) for p, clean in self.off[s].items()]
            self.off[s] = {}
        frozen = sorted(p for p, c in self.res(s).items() if c.frozen)
        if frozen:
            self.kv.unfreeze(frozen, seq_id=s)
            for p in frozen:
                self.res(s)[p].frozen = False
        self.ops += 1

    # ---- invariants

    @invariant()
    def native_state_matches_the_model(self):
        self.kv.check()
        cell_of = {}
        for s in SEQS:
            pos, state, cell = self.kv.cells(s)
            off = self.kv.offloaded(s)
            res = self.res(s)
            assert pos.tolist() == sorted(res), (s, pos.tolist(), sorted(res))
            assert state.tolist() == [int(CellState.FROZEN if res[p].frozen else CellState.ACTIVE) for p in sorted(res)]
            assert off.tolist() == sorted(self.off[s])
            # asrkf.h: every offloaded position is below the newest resident one (where the next decode goes)
            newest = int(pos[-1]) if len(pos) else -1
            assert not len(off) or off.max() < newest, (s, off.tolist(), newest)
            assert llama_cpp.llama_memory_seq_pos_max(self.s.context.memory, s) == newest
            # no position twice; with nothing removed below the newest, 0..newest are each exactly one of the three
            allpos = pos.tolist() + off.tolist()
            assert len(set(allpos)) == len(allpos)
            if newest >= 0 and set(range(newest + 1)) <= set(res) | set(self.off[s]):
                assert len(allpos) == newest + 1
            for p, c in zip(pos.tolist(), cell.tolist()):
                cell_of[s, p] = c
        # cells shared by both sequences are the cells the model shares, and no others
        for (s, p), c in cell_of.items():
            if s == 0 and (1, p) in cell_of:
                assert (c == cell_of[1, p]) == (self.res(0)[p] is self.res(1).get(p)), p
        info = self.kv.info()
        assert info.n_cells_used == len(self.cells)
        assert info.n_frozen == sum(c.frozen for c in self.cells)
        assert info.n_offloaded == len(self.off[0]) + len(self.off[1])

    def teardown(self):
        KVMachine.total_ops += self.ops
        KVMachine.total_compared += self.compared
        KVMachine.total_refused += self.refused


def run_machine(machine, settings_, seed=None):
    """run_state_machine_as_test with a fixed seed when one is given (scripts/fuzz.py prints it)."""
    machine._hypothesis_internal_use_seed = seed
    try:
        run_state_machine_as_test(machine, settings=settings_)
    finally:
        machine._hypothesis_internal_use_seed = None


def run_kv_machine(sessions, examples=EXAMPLES, steps=STEPS, seed=None):
    KVMachine.s, KVMachine.holder, KVMachine.ref = sessions
    KVMachine.total_ops = KVMachine.total_compared = KVMachine.total_refused = 0
    run_machine(KVMachine, settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                                    print_blob=True), seed)
    return KVMachine.total_ops, KVMachine.total_compared, KVMachine.total_refused


def test_random_operation_sequences_over_two_sequences_match_the_model(sessions):
    seed = os.environ.get("ASRKF_FUZZ_SEED")
    ops, compared, refused = run_kv_machine(sessions, seed=int(seed) if seed else None)
    # the fuzz did what it says: thousands of operations, refusals among them, and the logits compared many times
    # (refusals vary from run to run: 36 to 215 seen since session save / load joined the rules, and a floor of 50
    # failed about one run in four, so it is 20)
    print(f"KV fuzz: {ops} operations, {refused} refused as predicted, logits compared {compared} times")
    assert ops >= 2000 and compared >= 50 and refused >= 20, (ops, compared, refused)
