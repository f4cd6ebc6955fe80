"""NVIDIA kvpress on the same model and the same cases as `python -m asrkf_gguf eval` (issue 4's peer side by side).

Runs in its own environment (torch, transformers, kvpress, gguf); it imports nothing of asrkf_gguf, so the patched
libllama is not needed. The cases come from DIR/cases/ (written by `eval`, or by `eval --cases-only`), the model is
the same GGUF, loaded by transformers' gguf_file= (dequantized to --dtype). Results go to DIR/kvpress-results.json
(of the first DIR; --results elsewhere), written after every run and resumed by the same command; `eval-report DIR`
adds them.

  python scripts/kvpress_side_by_side.py DIR [DIR ...] --model PATH.gguf [--tasks all] [--ctx all]
      [--presses none,snapkv] [--budgets 0.25] [--mt-budgets 0.25,0.125] [--device cuda|cpu]
      [--dtype float32|bfloat16|float16] [--time-limit S] [--results PATH]

Runs go press by press, budget by budget (largest first), case by case (DIRs in the given order, each sorted by
file name), so a --time-limit leaves the later presses and smaller budgets out, not a part of every one.
`none` is the same path with no press (the full cache): the check that the transformers path finds what our full
cache finds.

The steps are those of kvpress's pipeline ("kv-press-text-generation"): the chat template split at the end of the
first message, that context prefilled under the press, the rest fed at positions that go on from the uncompressed
length, greedy decoding. They are written out here because the pipeline takes each answer back out of the cache, so
it has no second turn; on a single-turn case both give the same reply.

Single-turn tasks put the question inside the compressed context (query-aware: the press sees it): the case's one
message is kvpress's context, the template's end (`<|im_end|>` and the assistant header) its question. Multi-turn
tasks (-mt) replay the case's chat: turn 1's message (the document and an unrelated question) is the compressed
context, the reply to it is decoded on the compressed cache and kept, then turn 2 (the real question) is added
uncompressed and answered, as our harness runs them (the press sees only turn 1, as our policies do). Budget b keeps
a fraction b of the compressed context (compression_ratio = 1 - b); kvpress does not count the template's end, the
questions after it and the replies against it, our harness counts everything (b of the whole ctx).

Scoring is the eval's (asrkf_gguf.evaluation.tasks.Case.score, copied in `score` below, not imported): the
fraction of the case's `answers` found in the last reply, found as a substring, or, where the case's `match` is
"word" (cwe, fwe), as a whole word in any case; passed when all are found. Decoding is greedy, at most the case's
`max_tokens` per turn, stopping at the tokenizer's end-of-turn tokens.

kvpress 0.5.5 pins transformers < 5.3; with transformers 5.17 (installed with `pip install --no-deps kvpress`)
two things are filled in here: transformers 5.17 no longer passes `cache_position` to the attention layers, which
kvpress's hook reads to tell the prefill from decoding (it is given the layer's position_ids, equal to it in these
runs), and kvpress's top-level imports of `datasets` and `fire` (used only by DuoAttention's and
ExpectedAttentionStats' downloads) get a placeholder module where they are missing or fail to import (a note says
so). Without torch, transformers or kvpress the script prints "kvpress not installed (... missing): skipped" and
exits with 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path

STARTED = time.monotonic()
PRESSES = {"none": None, "snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress",
           "expected": "ExpectedAttentionPress", "knorm": "KnormPress", "tova": "TOVAPress"}
EXTRA_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


# ---- cases and scoring (no asrkf_gguf import)


def load_cases(dirs, tasks=None, ctxs=None):
    """The chat cases of DIR/cases/*.json (or DIR itself holding *.json) for tasks and ctxs (None: all)."""
    cases, seen = [], set()
    for d in dirs:
        d = Path(d)
        folder = d / "cases" if (d / "cases").is_dir() else d
        for path in sorted(folder.glob("*.json")):
            c = json.loads(path.read_text(encoding="utf-8"))
            if "turns" not in c or not c["turns"] or c["task"].startswith("kl") or c["key"] in seen:
                continue
            if (tasks is None or c["task"] in tasks) and (ctxs is None or c["ctx"] in ctxs):
                cases.append(c)
                seen.add(c["key"])
    return cases


def found(case: dict, answer: str, reply: str) -> bool:
    """Case.found of asrkf_gguf.evaluation.tasks: a substring, or with match "word" a whole word in any case."""
    if case.get("match", "substring") == "word":
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", reply, re.IGNORECASE) is not None
    return answer in reply


def score(case: dict, reply: str) -> float:
    """Case.score: the fraction of the expected answers found in the reply; passed when 1."""
    answers = case["answers"]
    return sum(found(case, a, reply) for a in answers) / len(answers) if answers else 0.0


def is_multi_turn(case: dict) -> bool:
    return len(case["turns"]) > 1


def planned_runs(cases, presses, budgets, mt_budgets):
    """(case, press, budget) in run order: press, then budget (largest first), then case."""
    runs = []
    for p in presses:
        if p == "none":
            runs += [(c, p, 1.0) for c in cases]
            continue
        for b in sorted(set(budgets) | set(mt_budgets), reverse=True):
            runs += [(c, p, b) for c in cases if b in (mt_budgets if is_multi_turn(c) else budgets)]
    return runs


def run_key(case: dict, press: str, budget: float) -> str:
    return f"{case['key']}|kvpress-{press}|budget={budget:g}"


def summary(records) -> str:
    """passes/cases per task, ctx, press and budget."""
    cells = {}
    for r in records:
        k = (r["task"], r["ctx"], r["press"], r["budget"])
        p, n = cells.get(k, (0, 0))
        cells[k] = (p + bool(r["pass"]), n + 1)
    lines = ["| task | ctx | press | budget | pass |", "|---|---|---|---|---|"]
    for (t, c, p, b), (ok, n) in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], -kv[0][3])):
        lines.append(f"| {t} | {c} | {p} | {b:g} | {ok}/{n} |")
    return "\n".join(lines)


# ---- kvpress


def _placeholder_modules(names):
    """A stand-in module for each of names that cannot be imported (kvpress imports them at its top level)."""
    import importlib
    import types

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # missing, or failing against this image's packages (e.g. pyarrow)
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[k]
            mod = types.ModuleType(name)
            why = f"{type(err).__name__}: {err}"

            def missing(attr, _name=name, _why=why):
                if attr.startswith("__"):
                    raise AttributeError(attr)

                def fail(*a, **k):
                    raise RuntimeError(f"{_name}.{attr} is a placeholder here ({_why})")
                return fail
            mod.__getattr__ = missing
            sys.modules[name] = mod
            print(f"note: {name} not importable ({why}); a placeholder stands in (kvpress uses it only for "
                  "presses this script does not run)", file=sys.stderr)


def _fill_cache_position(BasePress):
    """transformers 5.17 passes position_ids, not cache_position, to the attention layers; kvpress's hook reads
    cache_position to tell the prefill (positions 0..q_len-1) from decoding. Here they are the same numbers."""
    hook = BasePress.forward_hook
    if getattr(hook, "_fills_cache_position", False):
        return

    def forward_hook(self, module, input, kwargs, output):
        if "cache_position" not in kwargs:
            kwargs = dict(kwargs)
            kwargs["cache_position"] = kwargs["position_ids"][0]
        return hook(self, module, input, kwargs, output)

    forward_hook._fills_cache_position = True
    BasePress.forward_hook = forward_hook


class Runner:
    def __init__(self, model, tok, torch, kvpress, device):
        self.model, self.tok, self.torch, self.kvpress, self.device = model, tok, torch, kvpress, device
        ids = model.generation_config.eos_token_id
        ends = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if tok.eos_token_id is not None:
            ends.add(tok.eos_token_id)
        vocab = tok.get_vocab()
        ends |= {vocab[t] for t in EXTRA_END_TOKENS if t in vocab}
        self.ends = ends

    def template(self, messages, generation_prompt=True) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def encode(self, text: str):
        return self.tok.encode(text, return_tensors="pt", add_special_tokens=False).to(self.device)

    def decode_greedy(self, ids, cache, position: int, max_tokens: int):
        """Feed ids at positions position.., then greedy-decode up to max_tokens; the tokens fed stay in the cache
        (the last generated one is not fed). Returns (token ids, next position)."""
        torch, model = self.torch, self.model
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1,
                    position_ids=torch.arange(position, position + ids.shape[1], device=self.device).unsqueeze(0))
        position += ids.shape[1]
        new = [int(out.logits[0, -1].argmax())]
        while len(new) < max_tokens and new[-1] not in self.ends:
            out = model(input_ids=torch.tensor([[new[-1]]], device=self.device), past_key_values=cache,
                        position_ids=torch.tensor([[position]], device=self.device))
            position += 1
            new.append(int(out.logits[0, -1].argmax()))
        return new, position

    def run(self, case: dict, press_name: str, budget: float) -> dict:
        torch, kvpress = self.torch, self.kvpress
        from transformers import DynamicCache

        turns, max_tokens = case["turns"], case["max_tokens"]
        # kvpress's pipeline split: the context is the template up to the end of the first message's text
        sep = "#" * (len(turns[0]) + 10)
        head, tail = self.template([{"role": "user", "content": turns[0] + sep}]).split(sep)
        context_ids = self.encode(head)
        n_context = context_ids.shape[1]
        press = None
        if press_name != "none":
            press = getattr(kvpress, PRESSES[press_name])(compression_ratio=1 - budget)
        cache = DynamicCache()
        with torch.inference_mode():
            if press is not None:
                with press(self.model):
                    self.model.model(input_ids=context_ids, past_key_values=cache)
            else:
                self.model.model(input_ids=context_ids, past_key_values=cache)
            n_kept = cache.get_seq_length(0)
            # positions go on from the uncompressed length, as kvpress's pipeline does
            feed, position = self.encode(tail), n_context
            messages, replies = [{"role": "user", "content": turns[0]}], []
            rendered = head + tail  # the chat so far as the template writes it
            for i, n_max in enumerate(max_tokens):
                new, position = self.decode_greedy(feed, cache, position, n_max)
                reply = self.tok.decode(new, skip_special_tokens=True)
                replies.append(reply)
                if i + 1 == len(turns):
                    break
                # the next turn is what the template writes after this reply; the reply's last token was not fed
                messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": turns[i + 1]}]
                full = self.template(messages)
                at = full.find(reply, len(rendered)) if full.startswith(rendered) else -1
                if at < 0:
                    raise RuntimeError(f"{case['key']}: the chat template does not continue the chat as it was fed")
                feed = self.encode(full[at + len(reply):])
                if new[-1] not in self.ends:
                    feed = torch.cat([torch.tensor([[new[-1]]], device=self.device), feed], dim=1)
                rendered = full
        return {"replies": replies, "n_context": n_context, "n_kept": n_kept}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="eval --out directories holding cases/ (or case folders)")
    ap.add_argument("--model", required=True, help="the GGUF the eval ran on")
    ap.add_argument("--tasks", default="all", help="comma list, or all (every chat task of the cases)")
    ap.add_argument("--ctx", default="all", help="comma list, or all")
    ap.add_argument("--presses", default="none,snapkv",
                    help=f"comma list of {', '.join(PRESSES)} (none: no press, the full cache), run in this order")
    ap.add_argument("--budgets", default="0.25", help="fractions of the context kept (single-turn tasks)")
    ap.add_argument("--mt-budgets", help="fractions for the multi-turn (-mt) tasks (default: --budgets)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--time-limit", type=float, help="seconds from the start: no run starts after them (exit 0; "
                                                     "the same command continues)")
    ap.add_argument("--results", help="results file (default: DIR/kvpress-results.json of the first DIR)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of torch")
    args = ap.parse_args()

    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    for p in presses:
        if p not in PRESSES:
            print(f"error: unknown press {p!r}; choose from {', '.join(PRESSES)}", file=sys.stderr)
            return 2
    tasks = None if args.tasks == "all" else {t.strip() for t in args.tasks.split(",") if t.strip()}
    ctxs = None if args.ctx == "all" else {int(c) for c in args.ctx.split(",")}
    cases = load_cases(args.dirs, tasks, ctxs)
    if not cases:
        print(f"error: no chat cases for tasks {args.tasks}, ctx {args.ctx} in {', '.join(args.dirs)} "
              "(run eval --cases-only)", file=sys.stderr)
        return 2
    budgets = [float(b) for b in args.budgets.split(",")]
    mt_budgets = [float(b) for b in args.mt_budgets.split(",")] if args.mt_budgets else budgets
    if not all(0 < b < 1 for b in budgets + mt_budgets):
        print("error: budgets are fractions between 0 and 1", file=sys.stderr)
        return 2

    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (the GGUF dequantization's bar)
    try:
        import torch
        import transformers
        _placeholder_modules(("datasets", "fire"))
        import kvpress
        from kvpress.presses.base_press import BasePress
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        print(f"kvpress not installed ({err.name} missing): skipped. Install torch, transformers, kvpress and gguf "
              "in a separate environment to run the peer comparison.", file=sys.stderr)
        return 0
    _fill_cache_position(BasePress)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    res_path = Path(args.results) if args.results else Path(args.dirs[0]) / "kvpress-results.json"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(res_path.read_text()) if res_path.is_file() else {"meta": {}, "records": []}
    keys = {r["key"] for r in done["records"]}
    runs = [r for r in planned_runs(cases, presses, budgets, mt_budgets) if run_key(*r) not in keys]
    print(f"{len(runs)} runs to do ({len(cases)} cases, {len(keys)} runs in {res_path} before)", file=sys.stderr)

    if runs:
        t0 = time.perf_counter()
        model_dir, model_file = os.path.split(os.path.abspath(args.model))
        tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
        model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=dtype).to(device).eval()
        done["meta"] = {"model": os.path.basename(args.model), "torch": torch.__version__,
                        "transformers": transformers.__version__, "kvpress": metadata.version("kvpress"),
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype_name,
                        "attn_implementation": model.config._attn_implementation}
        print(f"model loaded in {time.perf_counter() - t0:.0f} s ({device}, {dtype_name})", file=sys.stderr)
        runner = Runner(model, tok, torch, kvpress, device)

    for i, (case, press_name, budget) in enumerate(runs, 1):
        elapsed = time.monotonic() - STARTED
        if args.time_limit is not None and elapsed >= args.time_limit:
            print(f"stopped: time limit {args.time_limit:g} s ({elapsed:.0f} s passed); {len(runs) - i + 1} runs not "
                  "run (the same command continues)", file=sys.stderr)
            break
        t1 = time.perf_counter()
        out = runner.run(case, press_name, budget)
        if device == "cuda":
            torch.cuda.synchronize()
        reply = out["replies"][-1]
        s = score(case, reply)
        rec = {"key": run_key(case, press_name, budget), "case": case["key"], "task": case["task"],
               "ctx": case["ctx"], "depth": case["depth"], "seed": case["seed"], "press": press_name,
               "setting": f"kvpress-{press_name}", "budget": budget, "pass": s == 1.0, "passed": s == 1.0,
               "score": s, "reply": reply, "replies": out["replies"], "expected": case["answers"],
               "match": case.get("match", "substring"), "n_context": out["n_context"], "n_kept": out["n_kept"],
               "seconds": round(time.perf_counter() - t1, 2)}
        done["records"].append(rec)
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, res_path)
        print(f"[{i}/{len(runs)}] {rec['key']}: {'PASS' if rec['pass'] else 'fail'} {reply[:40]!r} "
              f"(kept {out['n_kept']}/{out['n_context']}, {rec['seconds']:.1f} s)", file=sys.stderr)

    print(summary(done["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
