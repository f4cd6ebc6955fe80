"""Issue 12 item 3, niah-multivalue: is the short answer the cache's doing or the model's with a quarter of the
text? Per case: asrkf at 25% (which positions are attended after recall), then the full cache with exactly asrkf's
non-attended positions removed after the prompt (the rest keep the keys and values the whole prompt gave them; the
question's last 32 tokens are decoded again, as asrkf does), then the full cache itself.

    python scripts/multivalue_probe.py 0.05:0,0.41:0,0.77:0,0.23:1,0.59:1,0.95:1 OUT.json   # depth:seed,...
    python scripts/multivalue_probe.py 0.05:0,0.05:1,0.23:1 OUT.json vartrack                 # another task

Qwen2.5-Coder-0.5B-Instruct Q4_K_M on the CPU (2 threads), 4,096 tokens; results in docs/evaluation.md round 9."""
import json, sys, time
import numpy as np
from asrkf_gguf import CellState
from asrkf_gguf.models import fetch_haystack_essays, fetch_qwen_coder_model as fetch_quality_model
from asrkf_gguf.evaluation.tasks import make_case
from asrkf_gguf.evaluation.runner import engine_for, SETTINGS
from asrkf_gguf.evaluation.grid import Tokenizer

model = str(fetch_quality_model(progress=False))
essays = [p.read_text(encoding="utf-8", errors="replace") for p in fetch_haystack_essays(progress=False)]
out = []
with Tokenizer(model) as tok:
    task = sys.argv[3] if len(sys.argv) > 3 else "niah-multivalue"
    cases = [make_case(task, 4096, d, s, tok.count, essays=essays) for d, s in
             [(float(x), int(y)) for x, y in (a.split(":") for a in sys.argv[1].split(","))]]
for case in cases:
    msg, mt = case.turns[-1], case.max_tokens[-1]
    rec = {"depth": case.depth, "seed": case.seed, "answers": list(case.answers)}
    # 1. asrkf at 25%: the positions attended after recall (resident and not frozen)
    e = engine_for(model, case, SETTINGS["asrkf"], 0.25, 2)
    kept = {}
    orig = e.controller.recall
    def spy(span_ends=None, e=e):
        n = orig(span_ends)
        t = e.controller.table
        kept["gone"] = np.flatnonzero(t.state[: t.n] != CellState.ACTIVE)
        kept["n"] = t.n
        return n
    e.controller.recall = spy
    reply = "".join(e.chat(msg, max_tokens=mt)); e.close()
    rec["asrkf"] = {"reply": reply[:120], "score": case.score(reply), "gone": int(kept["gone"].size), "n": kept["n"]}
    # 2. full cache, the same positions removed after the prompt, the question decoded again
    e = engine_for(model, case, SETTINGS["full"], 1.0, 2)
    def cut(span_ends=None, e=e):
        t, s = e.controller.table, e.session
        gone = kept["gone"][kept["gone"] < t.n - 64]  # asrkf's recent window stayed too
        for run in np.split(gone, np.flatnonzero(np.diff(gone) != 1) + 1):
            if run.size:
                assert s.seq_rm(int(run[0]), int(run[-1]) + 1)
        t.set_state(gone, CellState.DROPPED)
        return int(gone.size)  # > 0: generate decodes the question's last tokens again
    e.controller.recall = cut
    # the Engine asks recall only of reversible policies: the full policy's class says so for this one chat
    e.policy.__class__.reversible = True
    try:
        reply = "".join(e.chat(msg, max_tokens=mt))
    finally:
        e.policy.__class__.reversible = False
    e.close()
    rec["full_minus_gone"] = {"reply": reply[:120], "score": case.score(reply)}
    # 3. the full cache
    e = engine_for(model, case, SETTINGS["full"], 1.0, 2)
    reply = "".join(e.chat(msg, max_tokens=mt)); e.close()
    rec["full"] = {"reply": reply[:120], "score": case.score(reply)}
    print(json.dumps(rec), flush=True)
    out.append(rec)
json.dump(out, open(sys.argv[2], "w"), indent=1)
