"""ConversationPool: which conversation a request continues, and switching the Engine to it.

A client of an OpenAI-compatible server sends the whole chat with every request. Like llama-server's slots, the pool
keeps one record per conversation (the token ids its KV holds) and gives a request to the conversation whose tokens
share the longest prefix with the request's rendered prompt; that conversation's cache then decodes only the rest.

What is done and what is not (issue 14, item 3):
- done: the choice (longest token prefix; a request that shares too little starts a new conversation; records past
  `max_conversations` are forgotten, least recently used first) and the switch, in one method, `_switch`.
- not done: keeping an idle conversation's KV. Today an Engine holds one conversation, so `_switch` empties the
  cache and the conversation switched to is prefilled from its start: a switch costs a prefill of that whole chat.
  Keeping the prefix the two chats share (the system prompt) would save a few tokens, but with it the new chat
  would inherit the other one's controller state (which of those cells are frozen, their scores), and its replies
  would depend on what another client said; emptied, a switched-to chat replies exactly as that chat prefilled
  alone (tests/test_server.py). Requests that continue the active conversation keep its KV and decode only the
  new tokens, from the first one that differs (the Engine's prefix match).
  With several chats per Engine (idle ones in host memory, past --host-budget on disk under --cache-dir, least
  recently used first), `_switch` becomes "park the active chat, bring `conv`'s back", `Conversation.chat` holds
  the Engine's handle for it, and `_forget` frees it; nothing else here or in the server changes.

Every method runs on the model thread (the server's one worker), so the pool takes no lock.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from ..engine import common_prefix


@dataclass
class Conversation:
    id: int
    # the token ids this conversation's KV holds, position by position, as of its last request
    tokens: List[int] = field(default_factory=list)
    last_used: float = 0.0
    n_requests: int = 0
    # the Engine's handle for this conversation's KV once an Engine holds several (None today: see the module doc)
    chat: Any = None


class ConversationPool:
    """Conversations over one Engine; `acquire` picks and switches, `release` records what the cache holds after."""

    def __init__(self, engine, *, max_conversations: int = 16, similarity: float = 0.5):
        """similarity: a request continues a conversation when the prefix they share covers at least this fraction
        of the conversation's tokens (llama-server's --slot-prompt-similarity, 0.5 there too); otherwise it
        starts a new conversation, so that an unrelated chat does not take over another's KV."""
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be positive, got {max_conversations}")
        if not 0 <= similarity <= 1:
            raise ValueError(f"similarity is a fraction in [0, 1], got {similarity}")
        self.engine = engine
        self.max_conversations = max_conversations
        self.similarity = similarity
        self.conversations: List[Conversation] = []
        self.active: Optional[Conversation] = None  # the conversation whose KV the Engine holds
        self.n_switches = 0
        self._ids = itertools.count(1)

    # ---- choice (no Engine involved)

    def pick(self, tokens: Sequence[int]) -> Conversation:
        """The conversation `tokens` continues: the longest shared prefix (the most recently used among equals),
        if it covers `similarity` of that conversation or the whole request (a retry of an earlier prompt); else a
        new one (the least recently used record goes when the pool is full)."""
        best, best_n = None, -1
        for conv in self.conversations:
            n = common_prefix(conv.tokens, tokens)
            if n > best_n or (n == best_n and conv.last_used > best.last_used):
                best, best_n = conv, n
        if best is not None and best_n > 0 and (best_n >= self.similarity * len(best.tokens)
                                                or best_n == len(tokens)):  # the same prompt again: a retry
            return best
        if len(self.conversations) >= self.max_conversations:
            self._forget(min(self.conversations, key=lambda c: c.last_used))
        conv = Conversation(id=next(self._ids))
        self.conversations.append(conv)
        return conv

    # ---- switching (the Engine)

    def acquire(self, tokens: Sequence[int]) -> Conversation:
        """Pick the conversation for a request's prompt and make it the Engine's."""
        conv = self.pick(tokens)
        if conv is not self.active:
            self._switch(conv)
            self.n_switches += 1
            self.active = conv
        conv.last_used = time.monotonic()
        conv.n_requests += 1
        return conv

    def release(self, conv: Conversation) -> None:
        """After a request: record the tokens the cache holds for `conv` (a cancelled reply's tokens included)."""
        conv.tokens = self.engine.cached_tokens()
        conv.last_used = time.monotonic()

    def take_raw(self) -> None:
        """A raw-prompt request (/v1/completions) takes the Engine: Engine.generate(text) empties the cache, so no
        conversation is active afterwards (with host swap the active one would be parked first, as in a switch)."""
        self.active = None

    def _switch(self, conv: Conversation) -> None:
        """Make `conv`'s KV the Engine's. THE swap hook: today there is one KV, so the cache is emptied and the
        request prefills `conv`'s chat from its start (see the module doc for why not from the shared prefix);
        the conversation switched away from keeps its record (its tokens), not its KV."""
        self.engine.reset()

    def _forget(self, conv: Conversation) -> None:
        """Drop a conversation's record (and, with host swap, its parked KV)."""
        self.conversations.remove(conv)
        if conv is self.active:
            self.active = None

    def snapshot(self) -> dict:
        """Figures for /health (read from the event loop: plain values only)."""
        return {"conversations": len(self.conversations), "active": self.active.id if self.active else None,
                "switches": self.n_switches}
