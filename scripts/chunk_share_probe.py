"""Issue 12: what the prompt chunk's share of the budget (ControllerConfig.chunk_share) does to asrkf at 25% on
RULER-style tasks at 4k tokens. Per case (6 depths x seeds 0 and 1), asrkf once per share; n_batch 512, so at
1,024 cells a share of 0.125 / 0.25 / 1.0 gives chunks of 128 / 256 / 512 tokens.

    python scripts/chunk_share_probe.py niah-multivalue,vartrack 0.25,1.0 OUT.json

Qwen2.5-Coder-0.5B-Instruct Q4_K_M on the CPU (2 threads); results in docs/evaluation.md (session 11)."""
import json
import sys

from asrkf_gguf.evaluation import runner
from asrkf_gguf.evaluation.grid import Tokenizer
from asrkf_gguf.evaluation.tasks import make_case
from asrkf_gguf.models import fetch_haystack_essays, fetch_qwen_coder_model

model = str(fetch_qwen_coder_model(progress=False))
essays = [p.read_text(encoding="utf-8", errors="replace") for p in fetch_haystack_essays(progress=False)]
pairs = [(d, s) for s in (0, 1) for d in (0.05, 0.23, 0.41, 0.59, 0.77, 0.95)]
tasks = sys.argv[1].split(",")
shares = [float(x) for x in sys.argv[2].split(",")]
out = []
with Tokenizer(model) as tok:
    cases = [(t, make_case(t, 4096, d, s, tok.count, essays=essays)) for t in tasks for d, s in pairs]
for task, case in cases:
    rec = {"task": task, "depth": case.depth, "seed": case.seed, "answers": list(case.answers)}
    for share in shares:
        setting = runner.Setting("asrkf", "asrkf", params=(("chunk_share", share),))
        e = runner.engine_for(model, case, setting, 0.25, 2)
        try:
            reply = "".join(e.chat(case.turns[-1], max_tokens=case.max_tokens[-1]))
        finally:
            e.close()
        rec[f"share{share}"] = {"reply": reply[:100], "score": case.score(reply)}
        print(task, case.depth, case.seed, share, case.score(reply), reply[:60].replace("\n", " "), flush=True)
    out.append(rec)
    with open(sys.argv[3], "w") as f:  # after every case: a long run keeps what it did
        json.dump(out, f, indent=1)
for task in tasks:
    for share in shares:
        sc = [r[f"share{share}"]["score"] for r in out if r["task"] == task]
        print(task, share, "mean", round(sum(sc) / len(sc), 3), sc)
