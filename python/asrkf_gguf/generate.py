"""Generation under a controller: prefill in chunks that fit the budget, then one token per step.

Positions continue from where the sequence stands, so the same call serves every turn of a chat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
import threading
from typing import Callable, Generator, List, Optional, Sequence

import numpy as np

from .controller import Controller
from .entropy import Recovery
from .states import CellState
from .llama import LlamaSession


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


@dataclass
class GenerationResult:
    tokens: List[int]
    # the distribution each generated token was taken from, kept only with keep_logits=True: a full vocabulary
    # row per token (200 KB at 49k entries) would otherwise grow with every token of a long generation
    logits: List[np.ndarray] = field(default_factory=list, repr=False)
    rewalks: int = 0
    # "stop": an end-of-generation token ended it; "length": max_tokens; "cancelled": cancel was set
    finish_reason: str = "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    n_prompt: int = 0
    # the prompt phase in milliseconds: model decodes (chunks and the question again after recall), the controller's
    # moves, score folds and recall scoring, and the rest of the controller
    prompt_phase_ms: dict = field(default_factory=dict)
    # the generation steps in milliseconds: model decodes, controller, and the rest (sampling, rewalks, yields)
    decode_phase_ms: dict = field(default_factory=dict)


def generate(session: LlamaSession, controller: Controller, prompt: Sequence[int], max_tokens: int, *,
             on_token: Optional[Callable[[int], None]] = None, **kwargs) -> GenerationResult:
    """generate_tokens drained: on_token gets each token as it becomes final."""
    it = generate_tokens(session, controller, prompt, max_tokens, **kwargs)
    while True:
        try:
            token = next(it)
        except StopIteration as done:
            return done.value
        if on_token:
            on_token(token)


def rewind(session: LlamaSession, controller: Controller, pos: int) -> int:
    """Take positions pos.. out of the cache and the token table (offloaded ones lose their host copies), so that
    decoding continues at the returned position.

    llama.cpp continues a sequence only right after its newest resident position. So an offloaded position just
    before pos is brought back, and dropped ones (eviction baselines) are rewound too: the returned position is
    then below pos, and the caller decodes from there."""
    t = controller.table
    while pos > 0 and t.state[pos - 1] == CellState.DROPPED:
        pos -= 1
    if 0 < pos < t.n and t.state[pos - 1] == CellState.OFFLOADED:
        # first: llama.cpp (patched) refuses a removal that would leave an offloaded position above the newest
        # resident one, since the next decode would land on it
        controller.make_room(1)
        controller.bring_back(np.array([pos - 1]))
    if pos < t.n and not session.seq_rm(pos, -1):
        raise RuntimeError(f"llama.cpp refused to remove positions {pos}..{t.n - 1}")
    t.truncate(pos)
    return pos


def generate_tokens(session: LlamaSession, controller: Controller, prompt: Sequence[int], max_tokens: int, *,
                    pick: Callable[[np.ndarray], int] = greedy, stop_at_eog: bool = False,
                    on_prefill: Optional[Callable[[int, int], None]] = None,
                    recall: bool = False, cancel: Optional[threading.Event] = None,
                    check_every_step: bool = False, keep_logits: bool = False,
                    span_ends: Optional[np.ndarray] = None
                    ) -> Generator[int, None, GenerationResult]:
    """Decode `prompt` at the next positions of the sequence, then generate up to max_tokens tokens.

    Yields each generated token once it is final (held back rr_tokens steps, since a rewalk can take back the
    last ones; an end-of-generation token is not yielded). Returns the GenerationResult, whose `logits` holds
    each generated token's distribution only with keep_logits. Setting `cancel` stops it between two steps.

    pick(logits) -> token chooses each token. A pick with state (asrkf_gguf.sampling.Sampler: penalties, grammar)
    also has accept(token), called for every token it chose, and take_back(n), called when a rewalk takes the last
    n tokens back.

    span_ends (per position of the sequence, at least up to the prompt's end: a sentence or line ends there) makes
    recall keep or leave whole spans (ControllerConfig.recall_spans).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    if max_tokens < 0:
        raise ValueError("max_tokens cannot be negative")
    chunk = session.options.n_batch
    if controller.policy.uses_budget:
        # a chunk must fit beside the tokens that never move (sinks + recent window), whatever has been decoded
        protected = controller.policy.n_sinks + controller.policy.recent
        chunk = max(1, min(chunk, controller.config.budget_cells - protected - 1,
                           max(64, int(controller.config.budget_cells * controller.config.chunk_share))))

    t0 = time.perf_counter()
    st = controller.stats
    parts_before = (st.seconds, st.offload_seconds, st.thaw_seconds, st.fold_seconds, st.recall_score_seconds)
    recall_parts_before = dict(st.recall_parts)
    t_decode = 0.0
    pos = controller.table.n
    logits = None
    controller.expect(len(prompt))
    controller.generating(False)  # recall reads the prompt's queries
    for start in range(0, len(prompt), chunk):
        part = list(prompt[start:start + chunk])
        controller.make_room(len(part))
        t1 = time.perf_counter()
        logits = session.decode(part, pos)
        t_decode += time.perf_counter() - t1
        pos += len(part)
        controller.on_decoded(len(part), None)
        if on_prefill:
            on_prefill(start + len(part), len(prompt))
        if check_every_step:
            controller.table.check(controller.kv, controller.seq_id)
    rounds = 0
    while recall and rounds < controller.config.recall_rounds and \
            (controller.recall(span_ends, again=True) if rounds else controller.recall(span_ends)) > 0:
        rounds += 1
        # the question must see what it brought back: its keys and values were computed while the answer was on
        # the host, so decode the prompt's last tokens again. They and the token before them are in the recent
        # window (never moved): llama.cpp continues a sequence only right after its last resident position
        n_again = min(len(prompt), controller.config.recall_redecode, max(1, controller.policy.recent - 1))
        pos -= n_again
        rewind(session, controller, pos)
        t1 = time.perf_counter()
        logits = session.decode(list(prompt[-n_again:]), pos)
        t_decode += time.perf_counter() - t1
        pos += n_again
        controller.on_decoded(n_again, None)
        if check_every_step:
            controller.table.check(controller.kv, controller.seq_id)
    res = GenerationResult(tokens=[], n_prompt=len(prompt))
    res.prefill_seconds = time.perf_counter() - t0
    d = [after - before for after, before in zip(
        (st.seconds, st.offload_seconds, st.thaw_seconds, st.fold_seconds, st.recall_score_seconds), parts_before)]
    res.prompt_phase_ms = {k: round(1e3 * v, 1) for k, v in (
        ("total", res.prefill_seconds), ("model_decode", t_decode), ("offload", d[1]), ("thaw", d[2]),
        ("score_fold", d[3]), ("recall_scoring", d[4]), ("controller_other", d[0] - sum(d[1:])))}
    # recall's scoring by part, summed over the threads that score layers side by side (more than its wall time)
    for part, sec in st.recall_parts.items():
        res.prompt_phase_ms[f"recall_{part}_threads"] = round(1e3 * (sec - recall_parts_before.get(part, 0.0)), 1)

    t0 = time.perf_counter()
    controller_before = st.seconds
    moves_before = (st.offload_seconds, st.thaw_seconds, st.fold_seconds)
    t_model = 0.0
    k = controller.config.rr_tokens
    emitted = 0  # tokens yielded: held back k steps, since a rewalk can take back the last k
    eog = False
    accept = getattr(pick, "accept", None)
    take_back = getattr(pick, "take_back", None)
    while len(res.tokens) < max_tokens and not (cancel and cancel.is_set()):
        token = pick(logits)
        if accept is not None:
            accept(token)
        res.tokens.append(token)
        if keep_logits:
            res.logits.append(logits)
        if stop_at_eog and session.is_eog(token):
            eog = True
            break
        while emitted < len(res.tokens) - k:
            yield res.tokens[emitted]
            emitted += 1
        controller.make_room(1)
        if len(res.tokens) == 1:
            controller.generating(True)  # after the prompt's recall: the steps' queries are not exported
        t1 = time.perf_counter()
        logits = session.decode([token], pos)
        t_model += time.perf_counter() - t1
        pos += 1
        level = controller.on_decoded(1, logits, entropy=controller.graph_entropy())
        if level == Recovery.RR and k > 0 and len(res.tokens) > k:
            # rewalk: the cache was just restored (FR); take back the last k tokens and decode again from there
            keep = len(res.tokens) - k
            pos -= k + 1
            rewind(session, controller, pos)
            del res.tokens[keep:], res.logits[keep:]
            if take_back is not None:
                take_back(k)
            logits = session.decode([res.tokens[-1]], pos)
            pos += 1
            controller.on_decoded(1, None)
            res.rewalks += 1
        if check_every_step:
            controller.table.check(controller.kv, controller.seq_id)
    if eog:
        res.finish_reason = "stop"
    elif len(res.tokens) < max_tokens:
        res.finish_reason = "cancelled"
    while emitted < len(res.tokens) - (1 if eog else 0):
        yield res.tokens[emitted]
        emitted += 1
    res.decode_seconds = time.perf_counter() - t0
    t_ctl = st.seconds - controller_before
    # the controller's part broken down like the prompt's: its moves, the native score folds and the rest
    d = [after - before for after, before in zip((st.offload_seconds, st.thaw_seconds, st.fold_seconds), moves_before)]
    res.decode_phase_ms = {k: round(1e3 * v, 1) for k, v in (
        ("total", res.decode_seconds), ("model_decode", t_model), ("controller", t_ctl),
        ("controller_offload", d[0]), ("controller_thaw", d[1]), ("controller_score_fold", d[2]),
        ("other", res.decode_seconds - t_model - t_ctl))}
    return res
