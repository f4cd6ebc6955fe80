"""The evaluation harness, smoke size: the demo model, two runs, a resumed grid, the report; plus the parts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from asrkf_gguf import _lib
from asrkf_gguf.evaluation.grid import GridError, GridSpec, Tokenizer, run_grid
from asrkf_gguf.evaluation.report import write_report
from asrkf_gguf.evaluation.runner import kl_topk, log_softmax
from asrkf_gguf.evaluation.tasks import make_case


def test_smoke_grid_runs_resumes_and_reports(real_demo_model_path, tmp_path):
    spec = GridSpec(tasks=("passkey",), ctxs=(1024,), budgets=(0.5,), depths=(0.5,), settings=("full", "asrkf"))
    lines = []
    log = lambda i, n, text, t0, done: lines.append(text)  # noqa: E731
    results = run_grid(real_demo_model_path, spec, str(tmp_path), n_threads=2, log=log)

    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    assert meta["model_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert meta["seed"] == 0 and meta["git_commit"] and meta["machine"]["cpu_count"]
    recs = {r["setting"]: r for r in data["records"]}
    assert set(recs) == {"full", "asrkf"}
    full, asrkf = recs["full"], recs["asrkf"]
    # the full cache finds a pass key in the middle of ~900 tokens of filler
    assert full["passed"] and full["expected"][0] in full["answer"]
    assert full["kv"]["resident_cells_peak"] == full["kv"]["logical_tokens"] > 800
    # asrkf stayed within its budget of half the context, and moved tokens to the host to do so
    assert asrkf["budget"] == 0.5 and asrkf["budget_cells"] == 512
    assert asrkf["kv"]["resident_cells_peak"] <= 512 and asrkf["events"]["offloads"] > 0
    for r in (full, asrkf):
        for field in ("answer", "passed", "score", "kv", "events", "recovery_log", "timing", "trace", "key"):
            assert field in r
        assert r["timing"]["wall_s"] > 0 and len(r["trace"]["active"]) == len(r["trace"]["step"]) > 0

    # the case itself is kept as text, for peers that run the same cases (scripts/kvpress_side_by_side.py)
    (case_file,) = (tmp_path / "cases").glob("*.json")
    case = json.loads(case_file.read_text())
    assert case["key"] == full["case"] and case["answers"] == full["expected"] and case["answers"][0] in case["turns"][0]

    # resume: nothing is run again, the file is unchanged
    before = (tmp_path / "results.json").read_text()
    lines.clear()
    run_grid(real_demo_model_path, spec, str(tmp_path), n_threads=2, log=log)
    assert len(lines) == 2 and all("skipped" in line for line in lines)
    assert json.loads((tmp_path / "results.json").read_text())["records"] == json.loads(before)["records"]
    assert len(results.records) == 2

    report = write_report(tmp_path)
    text = report.read_text()
    assert "| full | 1/1 |" in text and "budget 50%" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in text
    else:
        assert (tmp_path / "accuracy.png").stat().st_size > 1000 and "accuracy.png" in text


def test_results_of_another_seed_are_refused(demo_model_path, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"model_sha256": "x", "seed": 0}, "records": []}))
    spec = GridSpec(tasks=("passkey",), ctxs=(1024,), budgets=(0.5,), depths=(0.5,), settings=("full",))
    with pytest.raises(GridError, match="another --out"):
        run_grid(demo_model_path, spec, str(tmp_path))


def test_cases_fit_their_context_and_put_the_needle_at_its_depth(real_demo_model_path):
    from asrkf_gguf.models import fetch_haystack_essays

    essays = [p.read_text(errors="replace") for p in fetch_haystack_essays(progress=False)[:8]]
    with Tokenizer(real_demo_model_path) as tok:
        for task in ("passkey", "passkey-mt", "niah", "multikey", "vartrack"):
            for depth in (0.1, 0.9):
                case = make_case(task, 2048, depth, 0, tok.count, essays)
                assert case == make_case(task, 2048, depth, 0, tok.count, essays)  # seeded
                doc = case.turns[0]
                n = tok.count("".join(case.turns)) + sum(case.max_tokens)
                assert 0.85 * 2048 < n < 2048 - 40, (task, n)
                at = doc.find(case.answers[0]) / len(doc)
                assert abs(at - depth) < 0.06, (task, depth, at)
        kl = make_case("kl", 2048, None, 0, tok.count, essays, n_continuation=256)
        assert len(tok.tokenize(kl.text, add_special=True)) >= 2048
    assert make_case("passkey", 2048, 0.5, 1, len, essays).answers != make_case("passkey", 2048, 0.5, 0, len,
                                                                              essays).answers


def test_kl_topk_is_exact_on_full_support_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(0)
    p, q = log_softmax(rng.normal(size=500) * 3), log_softmax(rng.normal(size=500) * 3)
    exact = float(np.sum(np.exp(p) * (p - q)))
    all_idx = np.arange(500)
    assert kl_topk(all_idx, p, q) == pytest.approx(exact, rel=1e-9)
    top = np.argsort(-p)[:50]
    assert 0 <= kl_topk(top, p[top], q) <= exact + 1e-12
    assert kl_topk(top, p[top], p) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("args,words", [
    (["--tasks", "nope", "--out", "X"], "unknown task"),
    (["--policies", "full,lru", "--out", "X"], "unknown policy"),
    (["--budgets", "0,0.5", "--out", "X"], "fractions"),
    (["--ctx", "4k", "--out", "X"], "--ctx"),
    (["--model", "missing.gguf", "--out", "X"], "not found"),
])
def test_eval_bad_input_is_one_line_and_nonzero(tmp_path, args, words):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    args = [str(tmp_path / a) if a in ("X", "missing.gguf") else a for a in args]
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "eval", *args], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and words in r.stderr
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "eval-report", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2 and "no results.json" in r.stderr
