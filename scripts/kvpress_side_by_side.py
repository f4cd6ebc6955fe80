"""NVIDIA kvpress on the same model and the same cases as `python -m asrkf_gguf eval` (issue 4's peer side by side).

Runs in its own environment (torch, transformers, kvpress, gguf: `pip install 'asrkf-gguf[kvpress]'` or a separate
venv); it imports nothing of asrkf_gguf, so the patched libllama is not needed. The cases come from DIR/cases/
(written by `eval`, or by `eval --cases-only`), the model is the same GGUF, loaded by transformers' gguf_file=
(dequantized to float32 on the CPU). Results go to DIR/kvpress-results.json; `eval-report DIR` adds them.

  python scripts/kvpress_side_by_side.py DIR --model PATH.gguf [--tasks passkey,passkey-mt] [--ctx 2048]
      [--budgets 0.25] [--presses snapkv,streamingllm,expected,knorm]

Single-turn cases put the question inside the compressed context (query-aware: the press sees it); multi-turn
cases compress the document before the question is known (kvpress's pipeline compresses the context, then reads
the question), which is the situation of turn 2. Budget b keeps a fraction b of the context
(compression_ratio = 1 - b); kvpress does not count the question and the answer against it, our harness does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path

MULTI_TURN = {"passkey-mt", "niah-mt"}
PRESSES = {"snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress", "expected": "ExpectedAttentionPress",
           "knorm": "KnormPress", "tova": "TOVAPress"}


def load_cases(out_dir: Path, tasks, ctxs):
    cases = []
    for path in sorted((out_dir / "cases").glob("*.json")):
        c = json.loads(path.read_text(encoding="utf-8"))
        if c["task"] in tasks and c["ctx"] in ctxs and not c["task"].startswith("kl"):
            cases.append(c)
    return cases


def split(case: dict):
    """(context, question) for kvpress's pipeline."""
    if case["task"] in MULTI_TURN:
        doc = case["turns"][0].rsplit("\n\n", 1)[0]  # the document without turn 1's unrelated question
        return doc, case["turns"][-1]
    return case["turns"][0], ""  # query-aware: the question is part of what the press sees


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", help="an eval --out directory holding cases/")
    ap.add_argument("--model", required=True, help="the GGUF the eval ran on")
    ap.add_argument("--tasks", default="passkey,passkey-mt")
    ap.add_argument("--ctx", default="2048")
    ap.add_argument("--budgets", default="0.25")
    ap.add_argument("--presses", default="snapkv,streamingllm,expected,knorm")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    try:
        import torch
        import transformers
        import kvpress
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    except ImportError as err:
        print(f"kvpress not installed ({err.name} missing): skipped. Install torch, transformers, kvpress and gguf "
              "in a separate environment to run the peer comparison.", file=sys.stderr)
        return 0

    out_dir = Path(args.dir)
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    for p in presses:
        if p not in PRESSES:
            print(f"error: unknown press {p!r}; choose from {', '.join(PRESSES)}", file=sys.stderr)
            return 2
    cases = load_cases(out_dir, set(args.tasks.split(",")), {int(c) for c in args.ctx.split(",")})
    if not cases:
        print(f"error: no cases for {args.tasks} at {args.ctx} in {out_dir}/cases (run eval --cases-only)",
              file=sys.stderr)
        return 2
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    transformers.logging.set_verbosity_error()

    res_path = out_dir / "kvpress-results.json"
    done = json.loads(res_path.read_text()) if res_path.is_file() else {"meta": {}, "records": []}
    keys = {r["key"] for r in done["records"]}
    done["meta"] = {"model": os.path.basename(args.model), "torch": torch.__version__,
                    "transformers": transformers.__version__, "kvpress": metadata.version("kvpress")}

    t0 = time.perf_counter()
    model_dir, model_file = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    print(f"model loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    runs = [(c, None, 1.0) for c in cases] + [(c, p, b) for c in cases for p in presses for b in budgets]
    for i, (case, press_name, budget) in enumerate(runs, 1):
        key = f"{case['key']}|kvpress-{press_name or 'none'}|budget={budget:g}"
        if key in keys:
            continue
        context, question = split(case)
        press = getattr(kvpress, PRESSES[press_name])(compression_ratio=1 - budget) if press_name else None
        t1 = time.perf_counter()
        with torch.inference_mode():
            answer = pipe(context, question=question, press=press,
                          max_new_tokens=case["max_tokens"][-1])["answer"]
        score = sum(a in answer for a in case["answers"]) / len(case["answers"])
        rec = {"key": key, "case": case["key"], "task": case["task"], "ctx": case["ctx"], "depth": case["depth"],
               "setting": f"kvpress-{press_name}" if press_name else "kvpress-none (full)", "budget": budget,
               "answer": answer, "expected": case["answers"], "score": score, "passed": score == 1.0,
               "wall_s": round(time.perf_counter() - t1, 2)}
        done["records"].append(rec)
        keys.add(key)
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, res_path)
        print(f"[{i}/{len(runs)}] {key}: {'PASS' if rec['passed'] else 'fail'} {answer[:40]!r} "
              f"({rec['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
