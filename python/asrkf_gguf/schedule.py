"""Token bookkeeping of the controller: the per-position table and the sublinear freeze schedule.

Everything is a numpy array indexed by logical position; no Python loop runs per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .states import CellState


def freeze_durations(low_counts: np.ndarray, k: float) -> np.ndarray:
    """The paper's schedule: d = floor(sqrt(c) / k) re-evaluation periods, at least one.

    c is how many times a token was judged unimportant, so a token that keeps being unimportant stays frozen
    longer, but only like sqrt(c): a token that becomes important again is never locked out for long.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    c = np.asarray(low_counts, dtype=np.float64)
    if np.any(c < 0):
        raise ValueError("low counts cannot be negative")
    return np.maximum(1, np.floor(np.sqrt(c) / k)).astype(np.int64)


@dataclass
class TokenTable:
    """State, running score and freeze bookkeeping of every logical position of one sequence.

    Invariant: every position in [0, n) is exactly one of ACTIVE, FROZEN, OFFLOADED (nothing is dropped).
    """

    capacity: int = 1024
    n: int = 0  # logical tokens: positions 0..n-1
    state: np.ndarray = field(init=False)
    score: np.ndarray = field(init=False)        # running importance (EMA)
    mass: np.ndarray = field(init=False)         # cumulative importance (what H2O ranks by)
    low_count: np.ndarray = field(init=False)    # times judged unimportant
    frozen_until: np.ndarray = field(init=False)  # step at which a freeze expires
    frozen_at: np.ndarray = field(init=False)     # step at which the token was frozen (-1: never)

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError("capacity must be positive")
        # positions per state, kept up to date by every state change: counts() runs several times a step
        self._per_state = np.zeros(max(CellState) + 1, np.int64)
        self.state = np.zeros(self.capacity, np.uint8)
        self.score = np.zeros(self.capacity, np.float32)
        self.mass = np.zeros(self.capacity, np.float32)
        self.low_count = np.zeros(self.capacity, np.int32)
        self.frozen_until = np.zeros(self.capacity, np.int64)
        self.frozen_at = np.full(self.capacity, -1, np.int64)

    def append(self, n_new: int) -> None:
        """New tokens were decoded at positions n..n+n_new-1: they start ACTIVE."""
        if n_new < 0:
            raise ValueError("n_new cannot be negative")
        need = self.n + n_new
        if need > self.capacity:
            grow = max(need, 2 * self.capacity)
            for name in ("state", "score", "mass", "low_count", "frozen_until", "frozen_at"):
                old = getattr(self, name)
                new = np.zeros(grow, old.dtype) if name != "frozen_at" else np.full(grow, -1, old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
            self.capacity = grow
        self.state[self.n:need] = CellState.ACTIVE
        self._per_state[CellState.ACTIVE] += n_new
        self.n = need

    ARRAYS = ("state", "score", "mass", "low_count", "frozen_until", "frozen_at")

    def arrays(self) -> dict:
        """The per-position arrays of positions 0..n-1 (copies), by name: what a session saves."""
        return {name: getattr(self, name)[: self.n].copy() for name in self.ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "TokenTable":
        """The table of arrays(); ValueError when they are not one (lengths, dtypes, states)."""
        n = len(arrays["state"])
        t = cls(capacity=max(1024, n))
        for name in cls.ARRAYS:
            a = np.asarray(arrays[name])
            if a.shape != (n,) or a.dtype != getattr(t, name).dtype:
                raise ValueError(f"token table array {name}: shape {a.shape} {a.dtype}, expected ({n},) "
                                 f"{getattr(t, name).dtype}")
            getattr(t, name)[:n] = a
        if n and not np.isin(t.state[:n], [int(s) for s in CellState]).all():
            raise ValueError("token table: a position has no valid state")
        t.n = n
        t._per_state = np.bincount(t.state[:n], minlength=t._per_state.size).astype(np.int64)
        return t

    def truncate(self, n: int) -> None:
        """Forget positions n.. (they were removed from the sequence, e.g. to regenerate them)."""
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate {self.n} positions to {n}")
        self._per_state -= np.bincount(self.state[n:self.n], minlength=self._per_state.size)
        for name in ("state", "score", "mass", "low_count", "frozen_until"):
            getattr(self, name)[n:self.n] = 0
        self.frozen_at[n:self.n] = -1
        self.n = n

    def observe(self, pos: np.ndarray, importance: np.ndarray, ema: float, n_queries: int = 1) -> None:
        """Fold one step's attention mass (native importance output, summed over n_queries queries) into the
        running score, per query, and into the total.

        Per query because a prompt chunk is scored by up to n_q queries and a generated token by one: summed, the
        scores of tokens last seen during a prompt (offloaded ones keep theirs) would outrank every token scored
        while generating. The total keeps the sum: H2O accumulates the attention of every query."""
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if n_queries < 1:
            raise ValueError(f"n_queries must be positive, got {n_queries}")
        pos = np.asarray(pos)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise ValueError(f"positions outside [0, {self.n})")
        imp = np.asarray(importance, np.float32)
        self.score[pos] = (1 - ema) * self.score[pos] + ema * (imp / n_queries)
        self.mass[pos] += imp

    def freeze(self, pos: np.ndarray, step: int, k: float, period: int) -> None:
        """Mark positions frozen for floor(sqrt(c)/k) periods, c counting this judgement too."""
        pos = np.asarray(pos)
        self.low_count[pos] += 1
        self.frozen_until[pos] = step + freeze_durations(self.low_count[pos], k) * period
        self.frozen_at[pos] = step
        self.set_state(pos, CellState.FROZEN)

    def set_state(self, pos: np.ndarray, state: CellState) -> None:
        """Move unique positions to `state` (every state change goes through here: counts() stays exact)."""
        pos = np.asarray(pos)
        if pos.size <= 8:
            # a decode step releases one token: a bincount (array conversions, a minlength pad) cost ~12 us of it
            for old in self.state[pos].tolist():
                self._per_state[old] -= 1
        else:
            self._per_state -= np.bincount(self.state[pos], minlength=self._per_state.size)
        self.state[pos] = state
        self._per_state[state] += pos.size

    def expired(self, step: int) -> np.ndarray:
        """Frozen positions whose freeze has run out: they come back and are scored again."""
        frozen = self.positions(CellState.FROZEN)
        return frozen[self.frozen_until[frozen] <= step]

    def positions(self, state: CellState) -> np.ndarray:
        return np.flatnonzero(self.state[: self.n] == state)

    def count(self, state: CellState) -> int:
        return int(self._per_state[state])

    def counts(self) -> dict:
        return {st.name.lower(): int(self._per_state[st]) for st in CellState}

    def check(self, kv=None, seq_id: int = 0) -> None:
        """Every position accounted for exactly once; with a KVCache, the table matches the native cell table."""
        s = self.state[: self.n]
        if not np.isin(s, [CellState.ACTIVE, CellState.FROZEN, CellState.OFFLOADED, CellState.DROPPED]).all():
            raise AssertionError("a position has no state")
        if not np.array_equal(np.bincount(s, minlength=self._per_state.size), self._per_state):
            raise AssertionError("the per-state counts disagree with the states")
        if kv is None:
            return
        pos, cell_state, _ = kv.cells(seq_id)
        off = kv.offloaded(seq_id)
        want_active = self.positions(CellState.ACTIVE)
        want_frozen = self.positions(CellState.FROZEN)
        if not (np.array_equal(np.sort(pos[cell_state == CellState.ACTIVE]), want_active)
                and np.array_equal(np.sort(pos[cell_state == CellState.FROZEN]), want_frozen)
                and np.array_equal(off, self.positions(CellState.OFFLOADED))):
            raise AssertionError("the controller's table and the native cell table disagree")
