"""ConversationPool: which conversation a request continues, and switching the Engine to it.

A client of an OpenAI-compatible server sends the whole chat with every request. Like llama-server's slots, the pool
keeps one record per conversation (the token ids its KV holds) and gives a request to the conversation whose tokens
share the longest prefix with the request's rendered prompt; that conversation's cache then decodes only the rest.

Switching (issue 14, item 3): every conversation is one of the Engine's chats (Engine.new_chat / switch /
drop_chat). The active one's KV is in the cache; an idle one is parked in the host store (its resident rows copied
there, its offloaded ones left where they are, its controller table kept), and switching back restores it instead
of prefilling it again, so a conversation replies exactly as it would alone, whatever other clients asked in
between. Requests that continue the active conversation decode only the new tokens, from the first one that
differs (the Engine's prefix match).

On disk (cache_dir, `serve --cache-dir`): past `max_conversations` in memory, or when the parked conversations' K/V
plus the current chat's offloaded rows pass `host_budget`, tidy() writes the least recently used parked conversations to
session files (Engine.save_chat: atomic, checksummed, with the model's fingerprint) and drops them from memory; a
request that continues one loads it back (Engine.load, which verifies the whole file first) instead of prefilling
it. A file that load refuses (damaged: checksum, KV checks) is logged and deleted, and its conversation is prefilled
from scratch. index() makes records of the files a previous run left, from their headers only (token ids; a file
of another model or other cache settings is skipped with a log line and left alone); persist() writes the
conversations in memory at shutdown, most recently used first, within a time limit. Without a
cache_dir, `max_conversations` bounds the conversations and the least recently used one is forgotten. With
disk_budget (`--disk-budget`), the session files of the least recently used conversations are deleted whenever
the files pass it (trim_disk): a conversation that was only on disk is then forgotten (prefilled again if it comes
back), one in memory only loses its file.

Every method runs on the model thread (the server's one worker), or before it starts (index) or after it stopped
(persist), so the pool takes no lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from ..engine import EngineError, common_prefix
from ..errors import ClosedError, SessionError

log = logging.getLogger("asrkf_gguf.server")

SESSION_SUFFIX = ".asrkf-session"  # the files index() reads; anything else in the directory is left alone


@dataclass
class Conversation:
    id: int
    # the token ids this conversation's KV holds, position by position, as of its last request
    tokens: List[int] = field(default_factory=list)
    last_used: float = 0.0
    n_requests: int = 0
    # the Engine's chat id holding this conversation's KV (current or parked); None when it is not in memory (new,
    # or on disk)
    chat: Any = None
    # its session file in the cache directory (None without one). With chat None and the file there, the
    # conversation is on disk; while in memory the file may hold an older state of it (a prefix: still valid)
    path: Optional[str] = None
    # the file holds exactly what memory holds (just written or loaded): persist() need not write it again
    file_current: bool = False

    @property
    def on_disk(self) -> bool:
        return self.chat is None and self.path is not None and os.path.exists(self.path)


class ConversationPool:
    """Conversations over one Engine; `acquire` picks and switches, `release` records what the cache holds after,
    `tidy` moves idle ones to disk past the limits (with a cache_dir)."""

    def __init__(self, engine, *, max_conversations: int = 16, similarity: float = 0.5,
                 cache_dir: Optional[str] = None, host_budget: Optional[int] = None,
                 disk_budget: Optional[int] = None):
        """similarity: a request continues a conversation when the prefix they share covers at least this fraction
        of the conversation's tokens (llama-server's --slot-prompt-similarity, 0.5 there too); otherwise it
        starts a new conversation, so that an unrelated chat does not take over another's KV.
        cache_dir: where idle conversations go past max_conversations in memory or host_budget bytes (parked
        conversations' K/V plus the current chat's offloaded rows); None: nothing goes to disk, and past max_conversations the
        least recently used conversation is forgotten.
        disk_budget: bytes of this pool's session files in cache_dir (None: no limit; other files there are not
        counted); past it the least recently used conversations' files are deleted (trim_disk)."""
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be positive, got {max_conversations}")
        if not 0 <= similarity <= 1:
            raise ValueError(f"similarity is a fraction in [0, 1], got {similarity}")
        self.engine = engine
        self.max_conversations = max_conversations
        self.similarity = similarity
        self.cache_dir = cache_dir
        self.host_budget = host_budget
        if disk_budget is not None and disk_budget < 0:
            raise ValueError(f"disk_budget cannot be negative, got {disk_budget}")
        self.disk_budget = disk_budget
        self.conversations: List[Conversation] = []
        # the conversation whose KV the Engine's current chat holds; None: the current chat belongs to none (empty,
        # or a raw prompt's)
        self.active: Optional[Conversation] = None
        self.n_switches = 0
        self.n_written = 0   # conversations written to disk (tidy, persist)
        self.n_loaded = 0    # conversations loaded back from disk instead of prefilled
        self.n_refused = 0   # files load refused: those conversations were prefilled from scratch
        self.n_trimmed = 0   # files deleted to stay within disk_budget
        self._ids = itertools.count(1)

    # ---- choice (no Engine involved)

    def pick(self, tokens: Sequence[int]) -> Conversation:
        """The conversation `tokens` continues: the longest shared prefix (the most recently used among equals),
        if it covers `similarity` of that conversation or the whole request (a retry of an earlier prompt); else a
        new one (without a cache directory the least recently used record goes when the pool is full; with one,
        tidy() moves idle conversations to disk after the request)."""
        best, best_n = None, -1
        for conv in self.conversations:
            n = common_prefix(conv.tokens, tokens)
            if n > best_n or (n == best_n and conv.last_used > best.last_used):
                best, best_n = conv, n
        if best is not None and best_n > 0 and (best_n >= self.similarity * len(best.tokens)
                                                or best_n == len(tokens)):  # the same prompt again: a retry
            return best
        if self.cache_dir is None and len(self.conversations) >= self.max_conversations:
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
        conv.file_current = False

    def take_raw(self) -> None:
        """A raw-prompt request (/v1/completions) takes the Engine's current chat (Engine.generate(text) empties
        it): the active conversation is parked first, so no conversation is active afterwards."""
        if self.active is not None:
            self.engine.new_chat()
            self.active = None

    def _switch(self, conv: Conversation) -> None:
        """Make `conv`'s KV the Engine's current chat: the active conversation's is parked in host memory, and
        `conv`'s is restored from the host store or its file (or a new, empty chat for a new conversation)."""
        e = self.engine
        if conv.chat is None:  # new or on disk: the current chat if nobody owns it, else a fresh one
            on_disk = conv.on_disk
            if self.active is None:
                e.reset()  # an unowned current chat may hold a raw prompt
                conv.chat = e.chat_id
            else:
                conv.chat = e.new_chat()
            if on_disk:
                self._load(conv)
            return
        unowned = e.chat_id if self.active is None else None
        e.switch(conv.chat)
        if unowned is not None:  # parked by the switch, but nobody's: free it
            e.drop_chat(unowned)

    def _load(self, conv: Conversation) -> None:
        """Fill the current (empty) chat from conv's file. A file load refuses leaves the chat empty (load checks
        everything before it changes anything): logged, deleted, and the conversation prefilled from scratch."""
        try:
            self.engine.load(conv.path)
        except ClosedError:
            raise
        except Exception as err:  # SessionError, OSError; a native failure clears the chat: the same remedy
            self.n_refused += 1
            log.warning("conversation %d: the session file %s was refused (%s); its prompt is prefilled from "
                        "scratch", conv.id, conv.path, err)
            self.engine.reset()
            conv.tokens, conv.file_current = [], False
            try:
                os.unlink(conv.path)
            except OSError:
                pass
            return
        self.n_loaded += 1
        conv.tokens = self.engine.cached_tokens()  # what the file held (the header's tokens, as index() read them)
        conv.file_current = True

    def _forget(self, conv: Conversation) -> None:
        """Drop a conversation's record and its KV (parked, or the current chat's, which is emptied)."""
        self.conversations.remove(conv)
        if conv is self.active:
            self.engine.reset()
            self.active = None
        elif conv.chat is not None:
            self.engine.drop_chat(conv.chat)

    # ---- disk (a cache directory)

    def tidy(self) -> None:
        """Between requests: while more than max_conversations are in memory, or the parked K/V plus the current
        chat's offloaded rows pass host_budget, write the least recently used parked conversation to its file and
        drop it from memory. Nothing without a cache directory. A write that fails (a full disk) is logged and the
        conversation stays in memory."""
        if self.cache_dir is None:
            return
        while True:
            parked = [c for c in self.conversations if c.chat is not None and c is not self.active]
            if not parked:
                break
            in_memory = len(parked) + (self.active is not None)
            over_budget = False
            if self.host_budget is not None:
                memory = self.engine.chat_memory()
                over_budget = sum(m["host_bytes"] for m in memory.values()) > self.host_budget
            if in_memory <= self.max_conversations and not over_budget:
                break
            if not self._write(min(parked, key=lambda c: c.last_used), drop=True):
                break
        self.trim_disk()

    def trim_disk(self) -> int:
        """While this pool's session files pass disk_budget, delete the file of the least recently used
        conversation that has one: a conversation that was only on disk is forgotten (prefilled from scratch if a
        request continues it), one in memory keeps its KV and is written again when it leaves memory. Returns the
        number of files deleted. Nothing without a cache directory or a disk budget."""
        if self.cache_dir is None or self.disk_budget is None:
            return 0
        files = []
        for conv in self.conversations:
            if conv.path is not None:
                try:
                    files.append((conv, os.path.getsize(conv.path)))
                except OSError:  # not written yet, or deleted by someone else
                    pass
        total, n = sum(size for _, size in files), 0
        for conv, size in sorted(files, key=lambda t: t[0].last_used):
            if total <= self.disk_budget:
                break
            try:
                os.unlink(conv.path)
            except OSError as err:
                log.warning("conversation %d: its session file %s could not be deleted (%s)", conv.id, conv.path, err)
                continue
            total -= size
            n += 1
            if conv.chat is None:  # nothing of it is left in memory
                log.info("conversation %d forgotten: its session file was the least recently used past the disk "
                         "budget", conv.id)
                self.conversations.remove(conv)
            else:
                conv.path, conv.file_current = None, False
        self.n_trimmed += n
        return n

    def _write(self, conv: Conversation, *, drop: bool) -> bool:
        """Write conv's chat to its file (a new name the first time); drop: free its memory after. False (logged)
        when it could not be written."""
        if conv.path is None:
            conv.path = os.path.join(self.cache_dir, f"chat-{uuid.uuid4().hex}{SESSION_SUFFIX}")
        if not conv.file_current:
            try:
                self.engine.save_chat(conv.chat, conv.path)
            except (OSError, EngineError, SessionError) as err:
                log.warning("conversation %d could not be written to %s (%s); it stays in memory", conv.id,
                            conv.path, err)
                return False
            self.n_written += 1
            conv.file_current = True
        if drop:
            self.engine.drop_chat(conv.chat)
            conv.chat = None
        return True

    def index(self) -> int:
        """At start: a record for every session file in the cache directory that this Engine can load, as far as
        its header says (its tokens; the most recently written counts as the most recently used). Files of another
        model or other cache settings, or not sessions at all, are skipped with a log line and left where they
        are. Returns the number of records made."""
        if self.cache_dir is None:
            return 0
        found = []
        for name in sorted(os.listdir(self.cache_dir)):
            path = os.path.join(self.cache_dir, name)
            if not name.endswith(SESSION_SUFFIX) or not os.path.isfile(path):
                continue
            try:
                tokens = self.engine.saved_tokens(path)
                mtime = os.path.getmtime(path)
            except (SessionError, OSError) as err:
                log.warning("skipped %s: %s", path, err)
                continue
            if not tokens:
                continue
            found.append((mtime, path, tokens))
        now_wall, now = time.time(), time.monotonic()
        for mtime, path, tokens in sorted(found):
            self.conversations.append(Conversation(id=next(self._ids), tokens=tokens, path=path, file_current=True,
                                                   last_used=now - (now_wall - mtime)))
        self.trim_disk()  # a smaller budget than the last run's
        return len(found)

    def persist(self, seconds: float) -> int:
        """At shutdown (the model thread has stopped): write the conversations in memory to the cache directory,
        the most recently used first, starting no new write after `seconds`; returns how many are on disk now
        from memory. Those left unwritten (time up, or a failed write) are logged."""
        if self.cache_dir is None:
            return 0
        deadline = time.monotonic() + seconds
        todo = sorted((c for c in self.conversations if c.chat is not None and c.tokens),
                      key=lambda c: c.last_used, reverse=True)
        done = 0
        for i, conv in enumerate(todo):
            if time.monotonic() > deadline:
                log.warning("%d conversations were not written to %s: the %.0f s for it at shutdown are up",
                            len(todo) - i, self.cache_dir, seconds)
                break
            done += self._write(conv, drop=False)
        self.trim_disk()
        return done

    def snapshot(self) -> dict:
        """Figures for /health (read from the event loop: plain values only)."""
        out = {"conversations": len(self.conversations), "active": self.active.id if self.active else None,
               "switches": self.n_switches}
        if self.cache_dir is not None:
            out.update(on_disk=sum(c.chat is None and c.path is not None for c in self.conversations),
                       written_to_disk=self.n_written, loaded_from_disk=self.n_loaded,
                       refused_files=self.n_refused, trimmed_files=self.n_trimmed)
        return out
