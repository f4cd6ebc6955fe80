"""ConversationPool: which conversation a request continues, and switching the Engine to it.

A client of an OpenAI-compatible server sends the whole chat with every request. Like llama-server's slots, the pool
keeps one record per conversation (the token ids its KV holds) and gives a request to the conversation whose tokens
share the longest prefix with the request's rendered prompt; that conversation's cache then decodes only the rest.

Switching (issue 14, item 3): every conversation is one of the Engine's chats (Engine.new_chat / switch /
drop_chat). The active one's KV is in the cache; an idle one is parked in host memory as an in-memory session
blob (its cells, host tier and controller table), and switching back restores it instead of prefilling it again,
so a conversation replies exactly as it would alone, whatever other clients asked in between. Requests that
continue the active conversation decode only the new tokens, from the first one that differs (the Engine's
prefix match). Not done: moving parked chats to disk past --host-budget (--cache-dir, least recently used
first), and keeping them across restarts; `max_conversations` bounds the host memory they hold.

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
    # the Engine's chat id holding this conversation's KV (current or parked); None until its first request
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
        # the conversation whose KV the Engine's current chat holds; None: the current chat belongs to none (empty,
        # or a raw prompt's)
        self.active: Optional[Conversation] = None
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
        """A raw-prompt request (/v1/completions) takes the Engine's current chat (Engine.generate(text) empties
        it): the active conversation is parked first, so no conversation is active afterwards."""
        if self.active is not None:
            self.engine.new_chat()
            self.active = None

    def _switch(self, conv: Conversation) -> None:
        """Make `conv`'s KV the Engine's current chat: the active conversation's is parked in host memory, and
        `conv`'s is restored from its parked blob (or a new, empty chat for a new conversation)."""
        e = self.engine
        if conv.chat is None:  # a new conversation: the current chat if nobody owns it, else a fresh one
            if self.active is None:
                e.reset()  # an unowned current chat may hold a raw prompt
                conv.chat = e.chat_id
            else:
                conv.chat = e.new_chat()
            return
        unowned = e.chat_id if self.active is None else None
        e.switch(conv.chat)
        if unowned is not None:  # parked by the switch, but nobody's: free it
            e.drop_chat(unowned)

    def _forget(self, conv: Conversation) -> None:
        """Drop a conversation's record and its KV (parked, or the current chat's, which is emptied)."""
        self.conversations.remove(conv)
        if conv is self.active:
            self.engine.reset()
            self.active = None
        elif conv.chat is not None:
            self.engine.drop_chat(conv.chat)

    def snapshot(self) -> dict:
        """Figures for /health (read from the event loop: plain values only)."""
        return {"conversations": len(self.conversations), "active": self.active.id if self.active else None,
                "switches": self.n_switches}
