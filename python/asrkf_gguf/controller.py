"""The ASR-KF-EGR controller: between token steps, decide what to freeze, offload and bring back.

One batched native call per kind of change and step; the decisions are numpy operations on the TokenTable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from .entropy import EntropyMonitor, Recovery, entropy_of
from .errors import HostBudgetError
from .kv import AsrkfError, CellState, KVCache
from .policies import AsrkfPolicy, Policy
from .schedule import TokenTable, freeze_durations


@dataclass(frozen=True)
class ControllerConfig:
    budget_cells: int               # device cells for ACTIVE + FROZEN tokens (at most the context's n_ctx)
    ema: float = 0.3                # weight of the newest importance in the running score
    n_q: int = 32                   # queries scored per step (the last tokens of a prompt: the question)
    importance_layers: Optional[tuple] = None  # model layers scored (None: all full-attention layers)
    # with importance_layers None: score every k-th full-attention layer, counting back from the last. Each scored
    # layer costs a pass over its K on the device (docs/gpu.md); on a GPU, 4 gives most of the decode speed back
    importance_every: int = 1
    wr_window: int = 32             # WR unfreezes what was frozen in the last wr_window steps
    rr_tokens: int = 4              # RR regenerates this many tokens (the generator does it)
    # recall ranks a token by the best mass within +-recall_pool positions (SnapKV's pooling): the question
    # attends to the start of a number or name, not to each of its tokens, and a half-recalled number reads wrong.
    # 8 measured better than 3 on ordinary text (docs/evaluation.md): a fact is a phrase, not a token
    recall_pool: int = 8
    # recall keeps or leaves whole spans (a sentence, a line of code: the tokens up to one that ends with ". ! ?" or
    # holds a newline, at most recall_span_max tokens) when the caller gives where spans end (generate_tokens'
    # span_ends, from the token texts; the Engine does): a span ranks by its best pooled token, and the budget's
    # cut never falls inside one. Ranked token by token, the cut split a needle whose value came after its key
    # ("... is: 56108|28", "Oluwaseun| Fairweather") and the model read half of it (docs/evaluation.md, round 7)
    recall_spans: bool = True
    recall_span_max: int = 48
    # recall's scoring in native code on the backend that holds K (KVCache.recall_mass: the GPU's products and
    # softmax, no K rows copied into numpy); False: numpy on the host (recall.recall_mass). The Engine turns it on
    # when the cache is on a GPU (engine.device_defaults)
    recall_native: bool = False
    # after recall, the prompt's last recall_redecode tokens (the question) are decoded again, so that their keys
    # and values are computed with what recall brought back: computed before, they saw a cache without it
    recall_redecode: int = 32
    # recall again after the question is decoded again, up to recall_rounds times in all: the question's queries
    # then see what the previous round brought back (a chain's next link, VAR B = VAR A, is found once VAR A is
    # there). A token's rank is its best mass over the rounds, so a later round does not give up an earlier one's
    recall_rounds: int = 1
    # under a budget a prompt chunk takes at most this share of it (at least 64 tokens): the rest holds what the
    # chunk attends besides itself, and every chunk after the budget fills computes its keys and values attending
    # only that. At 4k tokens and 1,024 cells, 256-token chunks instead of 512 found more of niah-multivalue's four
    # values (docs/evaluation.md, session 11). 1.0: chunks of n_batch, limited by the budget alone
    chunk_share: float = 0.25
    # entropy recovery SR/WR/FR/RR on spikes; False keeps watching the entropy (stats, traces) but never acts,
    # which is the "asrkf without recovery" ablation
    recovery: bool = True
    # what FR/RR bring back to the device. "score": the paper's rule, the best running scores, offloaded or not
    # (an offloaded token's score is the one it had when it left). "fresh": the offloaded tokens the spiking step's
    # own queries attend most (scored on the host like recall), when they rank among the offload_batch best movable
    # tokens; the lowest-scored resident ones make room (docs/controller.md, issue 16). "fresh-all": the same, and
    # while the budget binds SR and WR do it too (they have nothing frozen to act on then)
    recovery_restore: str = "score"
    # recovery while the device budget is binding (budget_binding()). False (ours): the entropy is still watched
    # (stats, traces) but no level acts once the budget binds; while it has room SR/WR/FR/RR act as in the paper.
    # Under a binding budget nothing is frozen, so only FR/RR can act: on 9 texts of 3 kinds (docs/evaluation.md,
    # round 5) neither the paper's FR/RR nor "fresh" lowered the KL median at both 25% and 12.5% without losing on
    # a kind, and the paper's rule swaps ~40-90 tokens and rewalks ~11 times per 1k tokens. True: the paper's method
    recovery_under_budget: bool = False
    # freeze (mask) low tokens while the device budget is binding. A frozen cell holds device memory and gives the
    # model nothing, and under a full budget the same low tokens are the ones the next offloads move out anyway:
    # freezing them first only shrinks the context the model attends (issue 16; h2o attends the whole budget).
    # False (ours): freeze only while the budget has room, and thaw the frozen ones when it fills. True: the
    # paper's rule, which had no hard budget: freeze every period whatever the budget
    freeze_under_budget: bool = False
    # host memory for offloaded K/V rows, in bytes (0: no limit). An offload past it is refused with
    # HostBudgetError before anything moves; nothing is ever dropped to make room
    host_budget_bytes: int = 0
    # when the budget is full, offload at least this many tokens at once (0: budget_cells // 32): one batched
    # move every few dozen steps instead of a one-token move per step, which costs a device round trip each
    offload_batch: int = 0
    # a batch is copied to the host at once (one device round trip) but its cells are freed one new token at a
    # time (KVCache.offload_ahead): the budget stays full instead of half a batch short on average. False: the
    # whole batch leaves at once (asrkf attended 1,008 of 1,024 cells against h2o's 1,024, issue 16)
    offload_ahead: bool = True
    # score (run the importance node) on every score_every-th decode step; prompt chunks are always scored.
    # Scoring costs about a second attention pass on a GPU (docs/gpu.md); 1 keeps the paper's per-step scores
    score_every: int = 1
    # before a prompt, have the host memory its offloads need allocated on a native background thread while the
    # device computes (KVCache.reserve_host). For pageable host memory (Engine host_memory="pageable"): on the
    # H200, reserving pinned memory that way slowed the prompt by about the time it saved (CUDA serializes pinning
    # with the launches)
    reserve_ahead: bool = False
    # compute each decode's entropy in the graph, where the logits are (graph_entropy()): one float comes back
    # instead of a numpy pass over the vocabulary, which next to a GPU decode step costs a tenth of it
    entropy_in_graph: bool = True

    def __post_init__(self):
        if self.budget_cells < 1 or not 0 < self.ema <= 1 or self.n_q < 1 or self.wr_window < 1 or self.rr_tokens < 0 \
                or self.recall_pool < 0 or self.recall_redecode < 1 or self.recall_rounds < 1 or self.offload_batch < 0 or self.host_budget_bytes < 0 or self.score_every < 1 or self.importance_every < 1 \
                or not 0 < self.chunk_share <= 1 \
                or self.recall_span_max < 1:
            raise ValueError("ControllerConfig: budget_cells >= 1, 0 < ema <= 1, n_q >= 1, wr_window >= 1, "
                             "rr_tokens >= 0, recall_pool >= 0, recall_redecode >= 1, recall_rounds >= 1, offload_batch >= 0, host_budget_bytes >= 0, score_every >= 1, "
                             "importance_every >= 1, recall_span_max >= 1, 0 < chunk_share <= 1 are required")
        if self.recovery_restore not in ("score", "fresh", "fresh-all"):
            raise ValueError("ControllerConfig: recovery_restore is 'score', 'fresh' or 'fresh-all', not "
                             f"{self.recovery_restore!r}")
        if self.importance_layers is not None and self.importance_every != 1:
            raise ValueError("ControllerConfig: give importance_layers or importance_every, not both")


@dataclass
class ControllerStats:
    freezes: int = 0
    unfreezes: int = 0
    offloads: int = 0
    # tokens copied to the host ahead of their offload (ControllerConfig.offload_ahead), still resident then
    offloads_ahead: int = 0
    thaws: int = 0
    drops: int = 0
    recalls: int = 0
    recoveries: Dict[str, int] = field(default_factory=lambda: {r.name: 0 for r in Recovery})
    # one entry per recovery: step, level, entropy, threshold, tokens brought back to attention, cost
    recovery_log: List[dict] = field(default_factory=list)
    active_peak: int = 0
    active_sum: int = 0
    resident_peak: int = 0
    host_bytes_peak: int = 0
    steps: int = 0
    seconds: float = 0.0
    # where the controller's time goes (docs/gpu.md breaks a prompt down with these): moves, the native fold of
    # the importance output into the running scores, and recall's host scoring of every movable token
    offload_seconds: float = 0.0
    thaw_seconds: float = 0.0
    fold_seconds: float = 0.0
    recall_score_seconds: float = 0.0
    # recall's scoring by part, seconds summed over its threads (recall.recall_mass)
    recall_parts: Dict[str, float] = field(default_factory=dict)


def span_select(pos: np.ndarray, score: np.ndarray, n_keep: int, span_ends: np.ndarray, max_len: int) -> np.ndarray:
    """The positions (of pos, ascending) to keep: whole spans, best span score first, as many as fit n_keep; a span
    that does not fit is passed over for later, smaller ones. A span ends at a position whose span_ends is True (or
    after max_len positions); its score is the best of its positions in pos. Positions past span_ends' length each
    form their own span."""
    if n_keep <= 0 or pos.size == 0:
        return pos[:0]
    n = int(pos.max()) + 1
    ends = np.zeros(n, bool)
    m = min(n, span_ends.size)
    ends[:m] = span_ends[:m]
    ends[m:] = True
    idx = np.arange(n)
    starts = np.ones(n, bool)
    starts[1:] = ends[:-1]
    start_of = np.maximum.accumulate(np.where(starts, idx, 0))
    # span number: spans counted from the start, each cut in pieces of max_len
    sid = (np.cumsum(starts) - 1) * (n // max(1, max_len) + 1) + (idx - start_of) // max(1, max_len)
    spans, inv, sizes = np.unique(sid[pos], return_inverse=True, return_counts=True)
    best = np.full(spans.size, -np.inf, score.dtype if score.dtype.kind == "f" else np.float64)
    np.maximum.at(best, inv, score)
    order = np.argsort(-best, kind="stable")  # ties: the earlier span first
    take = np.zeros(spans.size, bool)
    total = np.cumsum(sizes[order])
    k = int(np.searchsorted(total, n_keep, side="right"))  # the leading spans that fit all together
    take[order[:k]] = True
    room = n_keep - (int(total[k - 1]) if k else 0)
    for j in order[k:]:  # then smaller ones into what is left
        if room <= 0:
            break
        if sizes[j] <= room:
            take[j] = True
            room -= int(sizes[j])
    return pos[take[inv]]


def pooled_max(pos: np.ndarray, value: np.ndarray, half: int, n: int) -> np.ndarray:
    """value[i] -> the largest value at positions within +-half of pos[i] (positions not in pos count as 0)."""
    if half == 0 or pos.size == 0:
        return value
    full = np.zeros(n + 2 * half, value.dtype)
    full[pos + half] = value
    windows = np.lib.stride_tricks.sliding_window_view(full, 2 * half + 1)  # window j covers positions j-half..j+half
    return windows[pos].max(axis=1)


class Controller:
    """Owns the token table of one sequence and keeps the KV cache within budget through a KVCache."""

    def __init__(self, kv: KVCache, policy: Policy, config: ControllerConfig, *, seq_id: int = 0):
        info = kv.info()
        if policy.uses_budget and config.budget_cells > info.n_cells:
            raise ValueError(f"budget of {config.budget_cells} cells exceeds the context's {info.n_cells} cells")
        if policy.uses_budget and config.budget_cells <= policy.n_sinks + policy.recent:
            raise ValueError(f"budget of {config.budget_cells} cells leaves no room beyond the protected "
                             f"{policy.n_sinks} sink and {policy.recent} recent tokens")
        self.kv = kv
        self.policy = policy
        self.config = config
        self.seq_id = seq_id
        self.table = TokenTable()
        self.entropy = EntropyMonitor()
        self.stats = ControllerStats()
        self.step = 0
        self._n_queries = 1  # queries behind the latest importance output
        self.bytes_per_token = info.kv_bytes_per_token
        # called after every step with what the step did (an evaluation traces the freeze/thaw curve with it)
        self.on_step: Optional[Callable[[dict], None]] = None
        self.offload_batch = config.offload_batch or max(1, config.budget_cells // 32)
        # tokens of the last batch copied ahead (offload_ahead) still queued to leave, at most: the native handle keeps
        # the queue in leaving order (KVCache.release_ahead) and may find fewer, when recall or a removal moved some
        self._ahead_left = 0
        self._scoring = False
        # the queries of the scored layers are exported for recall, which reads a prompt's (generating() turns the
        # export off for generated tokens)
        self._export_q = policy.reversible
        self._exporting = False
        self._recall_best: Optional[np.ndarray] = None  # per position, the best recall mass of this prompt's rounds
        if config.entropy_in_graph:
            kv.set_entropy(True)
        if policy.uses_importance:
            if config.importance_layers:
                self.layers = list(config.importance_layers)
            else:
                self.layers = kv.layers().tolist()[::-1][::config.importance_every][::-1]
            self._set_scoring(True)

    def _set_scoring(self, on: bool) -> None:
        if on != self._scoring or (on and self._export_q != self._exporting):
            # the queries are exported too: recall scores offloaded tokens with them on the host
            self.kv.set_importance(on, n_q=self.config.n_q, layers=self.layers, export_q=self._export_q)
            self._scoring = on
            self._exporting = on and self._export_q

    def generating(self, on: bool) -> None:
        """on: the next decodes are generated tokens, whose queries nothing reads, so their export is switched off
        (each scored layer's query copied out every step: up to ~22 us of an 8B model's decode step on the H200,
        docs/gpu.md session 12); off: a prompt follows, and recall reads its queries. Each switch rebuilds the
        graph once, where the change between a prompt chunk and a one-token step rebuilds it anyway. A "fresh"
        recovery restore ranks with the spiking step's queries: it keeps them exported."""
        if self.policy.uses_importance and self.policy.reversible:
            self._export_q = not on or (self.config.recovery and self.config.recovery_restore != "score")
            self._set_scoring(self._scoring)

    def reset(self) -> None:
        """Forget the sequence (after it was cleared from the cache); the statistics keep counting."""
        self.table = TokenTable()
        self.entropy = EntropyMonitor()
        self.step = 0
        self._ahead_left = 0  # the removal released the native copies too

    # ---- per step

    def on_decoded(self, n_new: int, logits: Optional[np.ndarray] = None, *,
                   entropy: Optional[float] = None) -> Optional[Recovery]:
        """Account for n_new tokens just decoded at the next positions; returns the recovery level applied
        (None when no recovery ran: no spike, a policy without recovery, or ControllerConfig.recovery off).

        The step's entropy is `entropy` when given (graph_entropy() of the decode), else that of `logits`; with
        neither (prompt chunks) the entropy monitor skips the step."""
        t0 = time.perf_counter()
        self.table.append(n_new)
        if self._scoring:
            # the native output sums over the last min(n_q, tokens decoded) queries (chunks fit one ubatch)
            self._n_queries = min(self.config.n_q, n_new)
            t = self.table
            t1 = time.perf_counter()
            self.kv.importance_fold(t.score, t.mass, t.n, ema=self.config.ema, n_queries=self._n_queries,
                                    seq_id=self.seq_id)
            self.stats.fold_seconds += time.perf_counter() - t1
        level = None
        if entropy is None and logits is not None:
            entropy = entropy_of(logits)
        if entropy is not None:
            level = self.entropy.update(entropy)
        spike = level  # what the monitor judged, acted on or not (recovery off: the trigger's would-be events)
        self.step += 1
        if not (isinstance(self.policy, AsrkfPolicy) and self.config.recovery) or \
                (not self.config.recovery_under_budget and self.budget_binding()):
            level = None
        if isinstance(self.policy, AsrkfPolicy):
            if level is not None:
                t1 = time.perf_counter()
                before = self.stats.unfreezes + self.stats.thaws
                self._recover(level)
                self.stats.recovery_log.append({
                    "step": self.step, "level": level.name, "entropy": round(entropy, 4),
                    "threshold": round(self.entropy.threshold, 4),
                    "restored": self.stats.unfreezes + self.stats.thaws - before,
                    "us": round(1e6 * (time.perf_counter() - t1), 1)})
            if self.step % self.policy.period == 0:
                self._reevaluate()
        self._account()
        self.stats.seconds += time.perf_counter() - t0
        if self.on_step is not None:
            self.on_step({"step": self.step, "n_new": n_new, "n": self.table.n, **self.table.counts(),
                          "entropy": entropy, "spike": spike.name if spike is not None else None,
                          "threshold": self.entropy.threshold if entropy is not None else None,
                          "recovery": level.name if level is not None else None})
        return level

    def graph_entropy(self) -> Optional[float]:
        """The entropy of the latest decode's last logits row, computed in the graph; None when
        ControllerConfig.entropy_in_graph is off or that decode produced no logits."""
        if not self.config.entropy_in_graph:
            return None
        try:
            return self.kv.entropy()
        except AsrkfError as e:
            if e.code != -2:
                raise
            return None

    def make_room(self, n_next: int) -> None:
        """Before decoding n_next tokens: move or drop tokens so that resident + n_next fits the budget, and
        switch scoring on or off for this decode (score_every)."""
        t0 = time.perf_counter()
        if self.policy.uses_importance and self.config.score_every > 1:
            self._set_scoring(n_next > 1 or (self.step + 1) % self.config.score_every == 0)
        if self.policy.uses_budget:
            t = self.table
            excess = t.count(CellState.ACTIVE) + t.count(CellState.FROZEN) + n_next - self.config.budget_cells
            if excess > 0:
                if self.policy.reversible:
                    # a whole batch at once, as far as movable tokens allow (copied ahead: only excess leave now)
                    if not self._release_ahead(excess):
                        self._offload(max(excess, min(self.offload_batch, self._n_movable())), excess)
                else:
                    self._drop(excess)
        self.stats.seconds += time.perf_counter() - t0

    def expect(self, n_next: int) -> None:
        """n_next tokens are about to be decoded (a prompt): with reserve_ahead, have the host memory of their
        offloads, and of one offload batch beyond, allocated ahead on a native background thread."""
        if not (self.config.reserve_ahead and self.policy.uses_budget and self.policy.reversible):
            return
        t = self.table
        n_out = max(0, t.count(CellState.ACTIVE) + t.count(CellState.FROZEN) + n_next - self.config.budget_cells)
        n_bytes = (n_out + self.offload_batch) * self.bytes_per_token
        if self.config.host_budget_bytes:  # never hold more than the host budget allows
            n_bytes = min(n_bytes, max(0, self.config.host_budget_bytes
                                       - t.count(CellState.OFFLOADED) * self.bytes_per_token))
        self.kv.reserve_host(n_bytes)

    def _n_movable(self) -> int:
        t = self.table
        return sum(self.policy.candidates(t, st).size for st in (CellState.ACTIVE, CellState.FROZEN))

    def recall(self, span_ends: Optional[np.ndarray] = None, *, again: bool = False) -> int:
        """After a prompt (a new turn): score every movable token, resident or offloaded, with the newest queries
        and give the movable device cells to the best: whole spans when span_ends (per position: a span ends there)
        is given and ControllerConfig.recall_spans is on. Returns how many tokens were brought back to attention:
        thawed from the host or unfrozen. again: a further round of the same prompt's recall (recall_rounds): a
        token ranks by its best mass over the rounds."""
        # without scoring on the last decode (score_every > 1 and a one-token prompt), or after generated tokens (their
        # queries are not exported), there are no queries to rank by
        if not (self.policy.uses_importance and self.policy.reversible and self._scoring and self._exporting):
            return 0
        t0 = time.perf_counter()
        from .recall import recall_mass

        t = self.table
        movable = np.concatenate([self.policy.candidates(t, s) for s in
                                  (CellState.ACTIVE, CellState.FROZEN, CellState.OFFLOADED)])
        off = t.positions(CellState.OFFLOADED)
        # nothing offloaded but tokens frozen (the budget has room: the paper's masking) is a case for recall too: a
        # masked fact is out of the question's sight as much as an offloaded one (multi-turn needles at a 100%
        # budget: 15 of 36 against the full cache's 33, docs/evaluation.md round 9). Scored here, they all fit
        if movable.size == 0 or (off.size == 0 and t.count(CellState.FROZEN) == 0):
            return 0
        fixed = np.setdiff1d(np.concatenate([t.positions(CellState.ACTIVE), t.positions(CellState.FROZEN)]), movable)
        t1 = time.perf_counter()
        mass = recall_mass(self.kv, movable, self.layers, self.seq_id, others=fixed, timing=self.stats.recall_parts,
                           native=self.config.recall_native).astype(np.float32)
        self.stats.recall_score_seconds += time.perf_counter() - t1
        mass = pooled_max(movable, mass, self.config.recall_pool, t.n)
        if again and self._recall_best is not None and self._recall_best.size == t.n:
            mass = np.maximum(mass, self._recall_best[movable])
        best = np.zeros(t.n, np.float32)
        best[movable] = mass
        self._recall_best = best
        t.score[movable] = mass / self._n_queries  # the new question's view replaces the running score, per query
        n_resident = int(np.count_nonzero(t.state[movable] != CellState.OFFLOADED))
        if span_ends is not None and self.config.recall_spans:
            keep = span_select(movable, mass, n_resident, span_ends, self.config.recall_span_max)
        else:
            keep = movable[np.argsort(-mass, kind="stable")[:n_resident]]
        resident = movable[t.state[movable] != CellState.OFFLOADED]
        out = np.setdiff1d(resident, keep)
        back = np.intersect1d(off, keep)
        unmask = np.intersect1d(t.positions(CellState.FROZEN), keep)
        self._unfreeze(unmask)
        self._swap(out, back)
        # the rest of the last batch was chosen before the question was known: recall's keep set replaces it
        self._ahead_left = 0
        self.stats.recalls += 1
        self.stats.seconds += time.perf_counter() - t0
        return int(back.size + unmask.size)

    # ---- decisions

    def budget_binding(self) -> bool:
        """The logical context fills the device budget within the next period: from then on every low token leaves
        by offloading. Counted on the logical tokens, not the resident ones: right after a batched offload the
        resident count is a batch below the budget, and judged on it the budget looked free for a period every
        batch, so a quarter of the resident tokens froze (masked) that often (2k-token KL run: 891 of 1,024 cells
        attended on average, h2o 1,024)."""
        return self.policy.uses_budget and self.table.n + self.policy.period >= self.config.budget_cells

    def _reevaluate(self) -> None:
        """Expired freezes come back; frozen tokens whose shadow score rose come back early; low ones freeze
        (while the budget has room: ControllerConfig.freeze_under_budget)."""
        t = self.table
        frozen = t.positions(CellState.FROZEN)
        if not self.config.freeze_under_budget and self.budget_binding():
            self._unfreeze(frozen)  # attended until an offload needs their cells: lowest scores leave first
            return
        back = t.frozen_until[frozen] <= self.step  # expired
        if frozen.size and t.count(CellState.ACTIVE):
            back |= t.score[frozen] >= np.median(t.score[t.positions(CellState.ACTIVE)])  # risen
        self._unfreeze(frozen[back])
        low = self.policy.judged_low(t)
        if low.size:
            self.kv.freeze(low, self.seq_id)
            t.freeze(low, self.step, self.policy.k, self.policy.period)
            self.stats.freezes += int(low.size)

    def _recover(self, level: Recovery) -> None:
        t = self.table
        self.stats.recoveries[level.name] += 1
        frozen = t.positions(CellState.FROZEN)
        fresh = self.config.recovery_restore != "score" and self._scoring and self.policy.reversible
        if level == Recovery.SR:
            self._unfreeze(frozen[freeze_durations(t.low_count[frozen], self.policy.k) > 1])
            if fresh and self.config.recovery_restore == "fresh-all" and self.budget_binding():
                self._restore_fresh()
        elif level == Recovery.WR:
            self._unfreeze(frozen[t.frozen_at[frozen] >= self.step - self.config.wr_window])
            if fresh and self.config.recovery_restore == "fresh-all" and self.budget_binding():
                self._restore_fresh()
        else:  # FR, RR: forget every judgement; the best-scored tokens, offloaded or not, take the device cells
            t.low_count[: t.n] = 0
            self._ahead_left = 0  # as at recall: the new placement decides
            self._unfreeze(frozen)
            if fresh:
                self._restore_fresh()
                return
            movable = self.policy.candidates(t, CellState.ACTIVE)
            off = t.positions(CellState.OFFLOADED)
            counts = t.counts()
            room = max(0, self.config.budget_cells - counts["active"] - counts["frozen"] - self.config.rr_tokens - 1)
            pool = np.concatenate([movable, off])
            keep = pool[np.argsort(-t.score[pool], kind="stable")[: movable.size + room]]
            self._swap(np.setdiff1d(movable, keep), np.intersect1d(off, keep))

    def _restore_fresh(self) -> None:
        """FR/RR with recovery_restore "fresh": score every movable token, resident or offloaded, with the queries of
        the step that spiked (recall_mass, on the host, pooled like recall) and bring back the offloaded ones among
        the offload_batch best; as many resident tokens leave, the lowest running scores outside that best set.

        The paper's rule ranks offloaded tokens by the running score they had when they left, which no query has
        updated since (the importance output sees resident cells only), against resident scores that kept decaying:
        under a binding budget it swapped stale tokens in for live ones (issue 16). A spike with no offloaded token
        among the best brings nothing back."""
        from .recall import recall_mass

        t = self.table
        off = t.positions(CellState.OFFLOADED)
        active = self.policy.candidates(t, CellState.ACTIVE)
        if off.size == 0 or active.size == 0:
            return
        movable = np.concatenate([active, off])
        fixed = np.setdiff1d(np.concatenate([t.positions(CellState.ACTIVE), t.positions(CellState.FROZEN)]), active)
        t1 = time.perf_counter()
        mass = recall_mass(self.kv, movable, self.layers, self.seq_id, others=fixed,
                           timing=self.stats.recall_parts).astype(np.float32)
        self.stats.recall_score_seconds += time.perf_counter() - t1
        mass = pooled_max(movable, mass, self.config.recall_pool, t.n)
        best = np.argsort(-mass, kind="stable")[: self.offload_batch]
        is_off = best >= active.size
        back_i = best[is_off]
        if back_i.size == 0:
            return
        stay = np.zeros(active.size, bool)
        stay[best[~is_off]] = True
        rest = active[~stay]
        out = np.sort(rest[np.argsort(t.score[rest], kind="stable")[: back_i.size]])
        back = movable[back_i]
        # observed now: their score is this step's view (per query), not the one they left with
        t.score[back] = mass[back_i] / self._n_queries
        order = np.argsort(back)
        self._swap(out, back[order][: out.size])

    def bring_back(self, pos: np.ndarray) -> None:
        """Thaw offloaded positions into free cells, active (make_room first when the budget is full)."""
        self._swap(pos[:0], np.asarray(pos))

    def _swap(self, out: np.ndarray, back: np.ndarray) -> None:
        """Offload `out`, then thaw `back` into the cells that freed: one batched native call each."""
        t = self.table
        if out.size and self.config.host_budget_bytes:
            need = (t.count(CellState.OFFLOADED) + out.size - back.size) * self.bytes_per_token
            if need > self.config.host_budget_bytes:
                raise HostBudgetError(
                    f"the host budget of {self.config.host_budget_bytes / 2**20:.1f} MiB is full: "
                    f"{t.count(CellState.OFFLOADED)} tokens are offloaded and {out.size - back.size} more would need "
                    f"{need / 2**20:.1f} MiB ({self.bytes_per_token} bytes a token); raise the host budget or start "
                    "a new conversation")
        if out.size:
            t0 = time.perf_counter()
            self.kv.offload(out, self.seq_id)
            t.set_state(out, CellState.OFFLOADED)
            self.stats.offloads += int(out.size)
            self.stats.offload_seconds += time.perf_counter() - t0
        if back.size:
            t0 = time.perf_counter()
            self.kv.thaw(back, self.seq_id)
            t.set_state(back, CellState.ACTIVE)
            self.stats.thaws += int(back.size)
            self.stats.thaw_seconds += time.perf_counter() - t0

    def _unfreeze(self, pos: np.ndarray) -> None:
        if pos.size:
            self.kv.unfreeze(pos, self.seq_id)
            self.table.set_state(pos, CellState.ACTIVE)
            self.stats.unfreezes += int(pos.size)

    def _offload(self, n: int, n_needed: Optional[int] = None) -> None:
        """Longest-frozen first (ties: lowest score), then the lowest-scored active tokens: n of them, or at
        least n_needed when fewer are movable. With offload_ahead the n are copied to the host in one pass and
        n_needed of them leave now, frozen first, then the lowest scores; the others stay attended until later
        steps need their cells (_release_ahead)."""
        n_needed = n if n_needed is None else n_needed
        t = self.table
        frozen = self.policy.candidates(t, CellState.FROZEN)
        order = np.lexsort((t.score[frozen], t.frozen_at[frozen]))
        pick = frozen[order[:n]]
        if pick.size < n:
            pick = np.concatenate([pick, self.policy.lowest(t, CellState.ACTIVE, n - pick.size)])
        if pick.size < n_needed:
            raise RuntimeError(f"cannot make room for {n_needed} tokens: only {pick.size} are movable within the budget "
                               f"({self.config.budget_cells} cells)")
        if self.config.offload_ahead and pick.size > n_needed:
            pick = pick[self._leaving_order(pick)]
            if self.config.host_budget_bytes:  # the copies made ahead hold host memory too
                room = int(self.config.host_budget_bytes // self.bytes_per_token) - t.count(CellState.OFFLOADED)
                pick = pick[: max(n_needed, room)]
            if pick.size > n_needed:
                t0 = time.perf_counter()
                self.kv.offload_ahead(pick, self.seq_id)  # queued natively in leaving order
                self.stats.offloads_ahead += int(pick.size)
                self.stats.offload_seconds += time.perf_counter() - t0
                self._ahead_left = int(pick.size)
                if not self._release_ahead(n_needed):
                    raise RuntimeError("the batch copied ahead could not free its first cells")  # a bug, not input
                return
        self._swap(np.sort(pick), pick[:0])

    def _leaving_order(self, pos: np.ndarray) -> np.ndarray:
        """Indices of pos in the order they should leave the device: frozen first, then the lowest scores."""
        t = self.table
        return np.lexsort((t.score[pos], t.state[pos] != CellState.FROZEN))

    def _release_ahead(self, n: int) -> bool:
        """Offload the next n tokens copied ahead, in their leaving order, that are still resident and movable (their
        cells are freed, nothing is copied); False, doing nothing, when fewer than n are left. Once per decode step:
        one native call (KVCache.release_ahead keeps the queue and skips what recall or a removal moved; as numpy
        here it cost ~60 us a step on the H200's host, docs/gpu.md session 9)."""
        if self._ahead_left < n:
            return False
        t0 = time.perf_counter()
        out = self.kv.release_ahead(n, self.seq_id, lo=self.policy.n_sinks, hi=self.table.n - self.policy.recent)
        if out.size < n:
            self._ahead_left = 0
            return False
        self._ahead_left -= n
        self.table.set_state(out, CellState.OFFLOADED)
        self.stats.offloads += n
        self.stats.offload_seconds += time.perf_counter() - t0
        return True

    def ahead_queue(self) -> np.ndarray:
        """The tokens still queued to leave from the last batch copied ahead, in order (an Engine parks them with a
        chat: KVCache.park releases the copies)."""
        return self.kv.ahead_queued(self.seq_id) if self._ahead_left else np.empty(0, np.int32)

    def set_ahead_queue(self, pos: np.ndarray) -> None:
        """Copy pos ahead again as the queue to leave next (a chat back from parking: the same leaving order)."""
        self._ahead_left = 0
        if len(pos):
            self.kv.offload_ahead(pos, self.seq_id)
            self._ahead_left = len(pos)

    def _drop(self, n: int) -> None:
        t = self.table
        pick = self.policy.lowest(t, CellState.ACTIVE, n)
        if pick.size < n:
            raise RuntimeError(f"cannot make room for {n} tokens within the budget ({self.config.budget_cells} cells)")
        self.kv.drop(pick, self.seq_id)
        t.set_state(pick, CellState.DROPPED)
        self.stats.drops += int(pick.size)

    def _account(self) -> None:
        t = self.table
        active, frozen, offloaded = (t.count(st) for st in (CellState.ACTIVE, CellState.FROZEN, CellState.OFFLOADED))
        s = self.stats
        s.steps += 1
        s.active_peak = max(s.active_peak, active)
        s.active_sum += active
        s.resident_peak = max(s.resident_peak, active + frozen)
        # the host store holds exactly kv_bytes_per_token per offloaded token (asrkf_kv_check verifies it)
        s.host_bytes_peak = max(s.host_bytes_peak, offloaded * self.bytes_per_token)
