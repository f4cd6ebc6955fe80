"""Greedy generation under a controller: prefill in chunks that fit the budget, then one token per step.

The sampling Engine of the next milestone builds on the same loop; greedy keeps this one deterministic, which is
what the tests and the quality comparisons need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from .controller import Controller
from .entropy import Recovery
from .llama import LlamaSession


@dataclass
class GreedyResult:
    tokens: List[int]
    logits: List[np.ndarray]  # the distribution each generated token was taken from
    rewalks: int


def generate_greedy(session: LlamaSession, controller: Controller, prompt: Sequence[int], max_tokens: int,
                    *, check_every_step: bool = False) -> GreedyResult:
    if not prompt:
        raise ValueError("the prompt is empty")
    if max_tokens < 0:
        raise ValueError("max_tokens cannot be negative")
    chunk = session.options.n_batch
    if controller.policy.uses_budget:
        # the protected recent window must leave room for a chunk
        chunk = max(1, min(chunk, controller.config.budget_cells - controller.policy.n_protected(controller.table) - 1))
    pos = 0
    logits = None
    for start in range(0, len(prompt), chunk):
        part = list(prompt[start:start + chunk])
        controller.make_room(len(part))
        logits = session.decode(part, pos)
        pos += len(part)
        controller.on_decoded(len(part), None)
        if check_every_step:
            controller.table.check(controller.kv, controller.seq_id)

    tokens: List[int] = []
    history: List[np.ndarray] = []
    rewalks = 0
    k = controller.config.rr_tokens
    while len(tokens) < max_tokens:
        token = int(np.argmax(logits))
        tokens.append(token)
        history.append(logits)
        controller.make_room(1)
        logits = session.decode([token], pos)
        pos += 1
        level = controller.on_decoded(1, logits)
        if level == Recovery.RR and k > 0 and len(tokens) > k:
            # rewalk: the cache was just restored (FR); take back the last k tokens and decode again from there
            keep = len(tokens) - k
            pos -= k + 1
            session.seq_rm(pos, -1)
            controller.table.truncate(pos)
            del tokens[keep:], history[keep:]
            logits = session.decode([tokens[-1]], pos)
            pos += 1
            controller.on_decoded(1, None)
            rewalks += 1
        if check_every_step:
            controller.table.check(controller.kv, controller.seq_id)
    return GreedyResult(tokens=tokens, logits=history, rewalks=rewalks)
