"""python -m asrkf_gguf serve: an OpenAI-compatible HTTP server over one Engine (Starlette on uvicorn).

    python -m asrkf_gguf serve [MODEL] [--host 127.0.0.1] [--port 8080] [--cache-dir DIR] [run's Engine options]

Parts: pool.py (which conversation a request continues; the swap hook), worker.py (the model thread),
app.py (the HTTP API). docs/server.md says what is honoured and what is not done yet.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import uvicorn

from ..cli import UsageError, check_engine_args, check_gguf, make_engine
from ..engine import EngineError, size_bytes
from .app import create_app
from .pool import ConversationPool
from .worker import ModelWorker

log = logging.getLogger("asrkf_gguf.server")

# at SIGINT / SIGTERM, how long the server may go on writing the conversations in memory to --cache-dir before it
# exits (after the at most 5 s it gives open connections): within the 10 s a container runtime waits before it
# kills a process, when the connections close at once
SHUTDOWN_SAVE_SECONDS = 5.0


def serve(args) -> int:
    """Load the model, serve until SIGINT / SIGTERM, close the Engine; 0 after a signal."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_conversations < 1:
        raise UsageError(f"--max-conversations must be positive, got {args.max_conversations}")
    check_engine_args(args)
    if args.model:
        check_gguf(args.model)
    if args.cache_dir is not None:
        _check_cache_dir(args.cache_dir)
    disk_budget = None
    if args.disk_budget is not None:
        if args.cache_dir is None:
            raise UsageError("--disk-budget needs --cache-dir")
        try:
            disk_budget = size_bytes(args.disk_budget)
        except EngineError as err:
            raise UsageError(f"--disk-budget: {err}") from None
    sock = _listen(args.host, args.port)  # before loading the model: a port in use fails at once, in one line
    try:
        engine = make_engine(args)
    except BaseException:
        sock.close()
        raise
    try:
        if args.cache_dir is not None and engine.kv.info().iswa:
            raise UsageError("--cache-dir: this model's conversations cannot be saved (sliding-window layers, iSWA, "
                             "e.g. Gemma-3)")
        pool = ConversationPool(engine, max_conversations=args.max_conversations, cache_dir=args.cache_dir,
                                host_budget=size_bytes(args.host_budget) if args.host_budget is not None else None,
                                disk_budget=disk_budget)
        n_found = pool.index()  # the conversations a previous run left on disk, before the first request
    except BaseException:
        engine.close()
        sock.close()
        raise
    if args.cache_dir is not None:
        log.info("%d conversations found in %s", n_found, args.cache_dir)
    worker = ModelWorker(engine, pool, save_seconds=SHUTDOWN_SAVE_SECONDS)
    name = args.alias or os.path.basename(engine.model_path)
    try:
        config = uvicorn.Config(create_app(worker, name), ws="none", log_level="info" if args.verbose else "warning",
                                timeout_graceful_shutdown=5)
        server = _Server(config, worker)
        # uvicorn raises a captured signal again once it has shut down: with Python's default handlers SIGTERM
        # would then kill the process (-15) and SIGINT raise KeyboardInterrupt after a clean stop. These handlers
        # take it instead (a stop by signal is a clean stop, exit 0), and a signal that comes before uvicorn has
        # installed its own stops the server as soon as it has started
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        server.run(sockets=[sock])
        # a second signal while the Engine closes: the default (Ctrl-C: exit 130, SIGTERM: killed)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    finally:
        worker.close()  # the lifespan shutdown closed it already unless startup failed or the exit was forced
        sock.close()
    return 0


def _check_cache_dir(path: str) -> None:
    """--cache-dir: made if missing; UsageError when it is not a directory this process can write."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--cache-dir {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--cache-dir {path}: not writable")


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or RuntimeError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise RuntimeError(f"cannot listen on {host}:{port}: {err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's Server that stops the model when it shuts down (SIGINT, SIGTERM): the reply in progress ends
    after its current token (its client gets an error), queued requests get 503, so the graceful shutdown does not
    wait for them; and that prints one line once it listens (the port, when --port 0 picked one)."""

    def __init__(self, config: uvicorn.Config, worker: ModelWorker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None) -> None:
        self.worker.stop()  # before uvicorn waits for the open connections: the reply streaming now ends
        await super().shutdown(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            for s in self.servers:
                for sock in s.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"serving {self.worker.engine.model_path} on http://{host}:{port}", flush=True)
