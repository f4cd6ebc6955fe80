"""The model thread: every Engine call of the server runs on one worker thread, one request at a time.

llama.cpp's context is not thread safe and an Engine serves one turn at a time, so requests queue for the worker;
the event loop only waits on queues (it never blocks on the model). A request's events come back through an
asyncio queue: ("start", info), ("piece", text)..., then ("end", info) or ("error", ApiError).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..engine import EngineError
from ..errors import ClosedError, HostBudgetError
from .pool import ConversationPool

log = logging.getLogger("asrkf_gguf.server")


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "code", "param"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


@dataclass
class GenerationRequest:
    """A validated request: a chat (messages, the last one the user's) or a raw text prompt."""

    messages: Optional[List[dict]]
    prompt: Optional[str]
    max_tokens: Optional[int]  # None: up to the end of the context
    temperature: float
    seed: int
    stop: Tuple[str, ...] = ()  # the reply ends before the first of these strings
    sampling: dict = field(default_factory=dict)  # top_p, top_k, min_p, penalties, as the Engine names them


class _Cancelled(Exception):
    """Raised in the prefill callback of a cancelled job."""


class Job:
    """One request on its way through the worker; cancel() may come from the event loop at any time."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop

    def emit(self, *event) -> None:  # from the worker thread
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class ModelWorker:
    def __init__(self, engine, pool: ConversationPool, *, save_seconds: float = 10.0):
        """save_seconds: at close, how long the pool may go on writing conversations to its cache directory."""
        self.engine = engine
        self.pool = pool
        self.save_seconds = save_seconds
        self._closing = threading.Lock()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asrkf-model")
        self._lock = threading.Lock()  # guards _current against cancel(): engine.cancel() hits only that job
        self._current: Optional[Job] = None
        self.stopping = False
        self.n_requests = 0
        self.n_generated_tokens = 0
        self.last: dict = {}  # the last finished request: tokens, cancelled (for /health and the tests)

    def submit(self, job: Job) -> None:
        self._executor.submit(self._run, job)

    def cancel(self, job: Job) -> None:
        """Stop a job: before it starts it is skipped, while it runs the Engine stops after the current token."""
        with self._lock:
            job.cancelled.set()
            if self._current is job:
                self.engine.cancel()

    def stop(self) -> None:
        """Shutting down: refuse the jobs not started yet (503), stop the running one after its current token or
        prefill chunk (its client gets an error)."""
        with self._lock:
            self.stopping = True
            if self._current is not None:
                self._current.cancelled.set()
                self.engine.cancel()

    def close(self) -> None:
        """Stop, wait for the job in progress to end, write the conversations in memory to the cache directory
        (if any, within save_seconds), close the Engine. Safe to call twice, from two threads."""
        self.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._closing:  # the lifespan's close and serve()'s: the first one writes, the second finds it done
            if self._closed:
                return
            self._closed = True
            try:
                self.pool.persist(self.save_seconds)  # the model thread has ended: nothing else uses the Engine
            except Exception:
                log.exception("writing the conversations to the cache directory failed")
            finally:
                self.engine.close()

    @property
    def busy(self) -> bool:
        return self._current is not None

    # ---- on the worker thread

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        if self.stopping:
            job.emit("error", ApiError(503, "the server is shutting down", type="server_error"))
            return
        with self._lock:
            self._current = job
        self.last = {"completion_tokens": 0, "cancelled": False}
        try:
            self._generate(job)
        except _Cancelled:  # during the prefill: the turn was taken back out of the cache
            self.last["cancelled"] = True
            job.emit("error", ApiError(503, "the server is shutting down" if self.stopping else "cancelled",
                                       type="server_error"))
        except ApiError as err:
            job.emit("error", err)
        except EngineError as err:  # bad input the Engine refused (nothing changed)
            job.emit("error", ApiError(400, str(err)))
        except HostBudgetError as err:
            job.emit("error", ApiError(507, str(err), type="server_error", code="host_budget_exceeded"))
        except ClosedError:
            job.emit("error", ApiError(503, "the server is shutting down", type="server_error"))
        except Exception as err:  # a runtime failure: the request fails, the server goes on
            log.exception("request failed")
            job.emit("error", ApiError(500, f"{type(err).__name__}: {err}", type="server_error"))
        finally:
            if not self.stopping:  # at shutdown close() writes them all
                self._tidy()
            self.n_requests += 1
            with self._lock:
                self._current = None

    def _tidy(self) -> None:
        """After the reply went out, before the next request (still busy in /health): idle conversations past the
        pool's limits go to disk. A failure here is logged; the request has been answered already."""
        try:
            self.pool.tidy()
        except Exception:
            log.exception("moving idle conversations to disk failed")

    def _generate(self, job: Job) -> None:
        e, req = self.engine, job.request
        s = e.session
        if req.messages is not None:
            try:
                tokens = e.chat_tokens(req.messages)  # what the Engine decodes: the same template, the same tokens
            except EngineError as err:
                raise ApiError(400, f"{err}; start the server with --chat-template") from None
        else:
            tokens = s.tokenize(req.prompt, add_special=True)
        room = e.ctx - len(tokens)
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            raise ApiError(400, f"the prompt is {len(tokens)} tokens"
                                + (f" and max_tokens {req.max_tokens}" if req.max_tokens is not None else "")
                                + f": more than the context of {e.ctx} tokens", code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else room

        def on_prefill(done: int, total: int) -> None:
            if job.cancelled.is_set():  # a long prompt stops between two chunks (the Engine takes the turn back)
                raise _Cancelled()

        conv = None
        if req.messages is not None:
            conv = self.pool.acquire(tokens)
            e.messages = list(req.messages[:-1])  # the chat as the client has it; the Engine keeps the shared prefix
            turn = e.chat(req.messages[-1]["content"], max_tokens=max_tokens, temperature=req.temperature,
                          seed=req.seed, on_prefill=on_prefill, **req.sampling)
        else:
            self.pool.take_raw()
            turn = e.generate(req.prompt, max_tokens=max_tokens, temperature=req.temperature, seed=req.seed,
                              on_prefill=on_prefill, **req.sampling)
        prompt_before, generated_before = e.n_prompt_tokens, e.n_generated_tokens
        job.emit("start", {"prompt_tokens": len(tokens), "conversation": conv.id if conv else None})
        stop = StopStrings(req.stop)
        try:
            for piece in turn:
                if not stop.hit:
                    text = stop.feed(piece)
                    if text:
                        job.emit("piece", text)
                    if stop.hit:
                        e.cancel()  # the tokens after the stop string are generated (the held-back few) but not sent
                if job.cancelled.is_set():
                    e.cancel()  # the reply so far stays in the conversation, as the client may have seen it
            text = stop.flush()
            if text:
                job.emit("piece", text)
        except BaseException:
            turn.close()  # taken back out of the cache
            raise
        finally:
            if conv is not None:
                self.pool.release(conv)
        n_out = e.n_generated_tokens - generated_before
        self.n_generated_tokens += n_out
        self.last = {"completion_tokens": n_out, "cancelled": job.cancelled.is_set()}
        # the Engine counts an end-of-generation token but does not decode it: the cache is one token short then
        ended_by_eog = len(e.cached_tokens()) < len(tokens) + n_out
        if self.stopping and job.cancelled.is_set():
            raise ApiError(503, "the server is shutting down: the reply was cut", type="server_error")
        job.emit("end", {"prompt_tokens": len(tokens), "completion_tokens": n_out,
                         "cached_tokens": len(tokens) - (e.n_prompt_tokens - prompt_before),
                         "finish_reason": ("length" if n_out >= max_tokens and not ended_by_eog and not stop.hit
                                           else "stop"),
                         "conversation": conv.id if conv else None})


class StopStrings:
    """Cut a stream of text pieces before the first stop string: feed() returns what can be sent, holding back an
    end that could be the start of a stop string; flush() the rest when the stream ends without one."""

    def __init__(self, stops: Tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        self.pending += piece
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            out, self.pending = self.pending[:min(cuts)], ""
            return out
        n = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out
