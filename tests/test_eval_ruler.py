"""Issue 12's grid in bounded calls and its RULER-style tasks: niah multivalue / multiquery, cwe, fwe (their cases
fit, hold every answer and are scored with partial credit), --seeds, the run order, --time-limit (stops starting
runs, results resumable), --n-gpu-layers (reaches every Engine, recorded) and the report's intervals."""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from asrkf_gguf import _lib
from asrkf_gguf.evaluation import grid as grid_mod
from asrkf_gguf.evaluation import runner
from asrkf_gguf.evaluation.grid import GridError, GridSpec, ResultsFile, Tokenizer, estimate_wall, run_grid
from asrkf_gguf.evaluation.report import interval_table, wilson, write_report
from asrkf_gguf.evaluation.runner import run_chat
from asrkf_gguf.evaluation.tasks import DEPTHLESS, TASKS, Case, fit_excess, make_case

RULER_NEW = ("niah-multivalue", "niah-multiquery", "niah-multivalue-code", "niah-multiquery-docs", "cwe", "fwe")


@pytest.fixture(scope="module")
def essays():
    from asrkf_gguf.models import fetch_haystack_essays

    if os.environ.get("ASRKF_TEST_NO_FETCH"):
        pytest.skip("ASRKF_TEST_NO_FETCH is set: no essays")
    return [p.read_text(errors="replace") for p in fetch_haystack_essays(progress=False)[:8]]


@pytest.fixture(scope="module")
def tok(real_demo_model_path):
    with Tokenizer(real_demo_model_path) as t:
        yield t


def _list_words(doc: str):
    """cwe's numbered list -> its words."""
    return re.findall(r"\d+\. ([a-z]+)", doc)


@pytest.mark.parametrize("task", RULER_NEW)
def test_ruler_cases_are_seeded_fit_their_context_and_hold_every_answer(task, tok, essays):
    ctx = 2048
    depths = (None,) if task in DEPTHLESS else (0.1, 0.9)
    made = []
    for depth in depths:
        for seed in (0, 1):
            case = make_case(task, ctx, depth, seed, tok.count, essays)
            assert case == make_case(task, ctx, depth, seed, tok.count, essays)  # deterministic
            assert case.task == task and case.seed == seed and case.depth == depth and len(case.turns) == 1
            n = tok.count("".join(case.turns)) + sum(case.max_tokens)
            assert 0.85 * ctx < n and fit_excess(case, tok.count) <= 0, (task, n)
            doc = case.turns[0]
            assert all(case.found(a, doc) for a in case.answers)  # every answer is in the document
            made.append(case)
            if task.startswith("niah-multi"):
                assert len(case.answers) == len(set(case.answers)) == 4 and case.max_tokens == (96,)
                assert all(doc.count(a) == 1 for a in case.answers)  # each number said once
                at = doc.find(case.answers[0]) / len(doc)  # the first value / first asked key at the depth
                assert abs(at - depth) < 0.06, (task, depth, at)
                question = doc[doc.rindex("\n\n"):]
                keys = [re.search(rf"magic numbers for (\w+) is: {a}\.", doc).group(1) for a in case.answers]
                if "multivalue" in task:
                    assert len(set(keys)) == 1 and keys[0] in question
                else:
                    assert len(set(keys)) == 4 and all(k in question for k in keys)
                if task.endswith("-code"):
                    assert f"# One of the special magic numbers for {keys[0]} is: {case.answers[0]}." in doc
            elif task == "cwe":
                words = Counter(_list_words(doc))
                top = [w for w, _ in words.most_common(11)]
                # the 10 answers are the 10 most common words, strictly more common than any other
                assert set(top[:10]) == set(case.answers) and words[top[9]] > words[top[10]]
                assert case.max_tokens == (120,) and case.match == "word"
            else:  # fwe
                words = Counter(w for w in doc.split("\n")[1].split(" ") if w)
                ranked = [w for w, _ in words.most_common(5)]
                assert ranked[0] == "..." and ranked[1:4] == list(case.answers)
                assert words[ranked[3]] > words[ranked[4]] and case.max_tokens == (50,)
    assert len({c.answers for c in made}) == len(made)  # every depth and seed: another case


def test_cwe_keeps_ruler_repeats_from_4k_and_fewer_in_a_short_context(tok, essays):
    for ctx, c_want in ((4096, 30), (1024, None)):
        case = make_case("cwe", ctx, None, 0, tok.count, essays)
        words = Counter(_list_words(case.turns[0]))
        reps = {words[a] for a in case.answers}
        assert len(reps) == 1
        (c,) = reps
        assert c == c_want if c_want else 2 <= c < 30
        assert max(n for w, n in words.items() if w not in case.answers) < c


def _fake_engine(reply: str):
    class Table:
        n = 10

        def counts(self):
            return {"active": 10}

    class Controller:
        table = Table()

    class Engine:
        controller = Controller()

        def chat(self, message, max_tokens):
            yield reply

    return Engine()


def test_partial_credit_scoring_through_run_chat(tok, essays):
    for task in ("niah-multivalue", "niah-multiquery", "cwe", "fwe"):
        case = make_case(task, 1024, 0.5, 0, tok.count, essays)
        k = len(case.answers)
        full = run_chat(_fake_engine("Here: " + ", ".join(case.answers) + "."), case)
        assert full["passed"] and full["score"] == 1.0
        part = run_chat(_fake_engine(", ".join(case.answers[1:])), case)
        assert not part["passed"] and part["score"] == pytest.approx((k - 1) / k)
        none = run_chat(_fake_engine("I do not know."), case)
        assert not none["passed"] and none["score"] == 0
    # whole words, any case, for the word tasks; as written for the numbers
    words = Case("cwe", ctx=512, depth=None, seed=0, answers=("rain", "sky"), match="word")
    assert words.score("Training, skyline") == 0 and words.score("RAIN; Sky") == 1.0
    assert Case("niah", ctx=512, depth=0.5, seed=0, answers=("123",)).score("x123y") == 1.0


def test_seeds_make_depths_x_seeds_cases_in_case_order():
    depths = (0.05, 0.23, 0.41, 0.59, 0.77, 0.95)
    spec = GridSpec(tasks=("niah-multiquery", "cwe", "kl"), ctxs=(8192, 4096), budgets=(0.125, 0.25),
                    depths=depths, settings=("h2o", "full", "asrkf"), seeds=(0, 1), kl_tokens=512)
    runs = list(spec.runs())
    keys = [grid_mod.case_key(r.task, r.ctx, r.depth, r.seed, 512) for r in runs]
    per_cell = Counter((r.task, r.ctx) for r, k in zip(runs, keys) if r.setting.name == "full")
    assert per_cell[("niah-multiquery", 4096)] == 12 == per_cell[("niah-multiquery", 8192)]  # 6 depths x 2 seeds
    assert per_cell[("cwe", 4096)] == 2 and per_cell[("kl", 8192)] == 2  # depthless: one case per seed
    assert len(runs) == (12 + 2 + 2) * 2 * 5  # cases x contexts x (full + 2 policies x 2 budgets)
    # task by task, context by context (smallest first), each case's runs together, settings as given (KL: full
    # first, the reference)
    cells = [(r.task, r.ctx) for r in runs]
    assert [c for i, c in enumerate(cells) if i == 0 or c != cells[i - 1]] == [
        ("niah-multiquery", 4096), ("niah-multiquery", 8192), ("cwe", 4096), ("cwe", 8192), ("kl", 4096),
        ("kl", 8192)]
    blocks = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    assert len(blocks) == len(set(blocks))  # a case's runs are contiguous
    first = [(r.setting.name, r.budget) for r, k in zip(runs, keys) if k == keys[0]]
    assert first == [("h2o", 0.25), ("h2o", 0.125), ("full", 1.0), ("asrkf", 0.25), ("asrkf", 0.125)]
    assert [r.setting.name for r in runs if r.task == "kl"][0] == "full"
    assert [(r.seed, r.depth) for r in runs if r.task == "niah-multiquery" and r.ctx == 4096
            and r.setting.name == "full"] == [(s, d) for s in (0, 1) for d in depths]  # seed by seed
    assert GridSpec(tasks=("passkey",), ctxs=(512,), budgets=(), depths=(0.5,), settings=("full",),
                    seed=3).seeds == (3,)
    with pytest.raises(GridError, match="twice"):
        GridSpec(tasks=("passkey",), ctxs=(512,), budgets=(), depths=(0.5,), settings=("full",), seeds=(1, 1))


def test_estimate_wall_uses_the_same_cell_then_guesses():
    rec = lambda task, ctx, wall, ngl=0, key="": {"task": task, "ctx": ctx, "n_gpu_layers": ngl, "key": key,  # noqa
                                                   "timing": {"wall_s": wall}}
    rs = [rec("niah", 4096, 10), rec("niah", 4096, 30), rec("niah", 4096, 11), rec("cwe", 4096, 50),
          rec("niah", 4096, 99, ngl=99), rec("niah", 8192, 5, key="mine")]
    assert estimate_wall(rs, "niah", 4096, 0) == 11  # the median of its cell, same n_gpu_layers only
    assert estimate_wall(rs, "niah", 4096, 99) == 99
    assert estimate_wall(rs, "fwe", 4096, 0) == 50  # nothing of fwe: the slowest task's median there
    assert estimate_wall(rs, "cwe", 16384, 0) == 200  # its own smaller context (4096: 50 s) scaled, > niah's
    assert estimate_wall(rs, "niah", 16384, 0) == 10  # the largest smaller context (8192: 5 s) scaled
    assert estimate_wall(rs, "fwe", 16384, 0) == 10  # no fwe anywhere: the slowest task there, scaled
    assert estimate_wall(rs, "niah", 8192, 0, prefer=["mine"]) == 5
    assert estimate_wall(rs + [rec("niah", 8192, 7)], "niah", 8192, 0, prefer=["mine"]) == 5  # this call's first
    assert estimate_wall(rs, "fwe", 2048, 0) is None


def test_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    meta = {"model_sha256": "a", "seed": 0, "seeds": [0], "git_commit": "c", "started": "s"}
    results = ResultsFile(tmp_path, dict(meta))
    results.add({"key": "k1", "x": 1})
    before = (tmp_path / "results.json").read_text()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(grid_mod.os, "replace", broken)
    with pytest.raises(OSError):
        results.add({"key": "k2", "x": 2})
    assert (tmp_path / "results.json").read_text() == before  # the old file, whole
    monkeypatch.undo()
    # another seed adds to the same file; another model does not
    again = ResultsFile(tmp_path, {**meta, "seed": 5, "seeds": [5]})
    assert again.meta["seeds"] == [0, 5] and again.meta["seed"] == 0 and "k1" in again
    with pytest.raises(GridError, match="another --out"):
        ResultsFile(tmp_path, {**meta, "model_sha256": "b"})


def test_time_limit_stops_starting_runs_and_the_grid_resumes(real_demo_model_path, tmp_path, monkeypatch):
    seen = []

    class Engine(runner.Engine):  # the real Engine; says what it was given
        def __init__(self, *a, **kw):
            seen.append(kw["n_gpu_layers"])
            super().__init__(*a, **kw)

    monkeypatch.setattr(runner, "Engine", Engine)
    spec = GridSpec(tasks=("passkey",), ctxs=(512,), budgets=(0.5,), depths=(0.5,), settings=("full", "asrkf"),
                    seeds=(0, 1))
    now = [0.0]
    lines = []

    def log(i, n, text, t0, done):
        lines.append(text)
        if "skipped" not in text and "stopped" not in text:
            now[0] += 100.0  # every run "takes" 100 s of the clock

    # the first run starts (nothing known yet); then 100 s have passed, and the second run, as long as the first
    # one (its real wall time), would end after the limit: stop
    res = run_grid(real_demo_model_path, spec, str(tmp_path), n_threads=1, n_gpu_layers=1, time_limit=100 + 1e-6,
                   clock=lambda: now[0], log=log)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in data["records"]] == ["passkey|ctx=512|depth=0.5|seed=0|full|budget=1"]
    plan = data["meta"]["plan"]
    assert plan["planned"] == 4 and plan["ran"] == 1 and plan["not_run"] == 3 and "would take" in plan["stopped"]
    assert plan["not_run_by_cell"] == {"passkey 512": 3} and res.meta["plan"] == plan
    assert seen == [1] and data["records"][0]["n_gpu_layers"] == 1  # --n-gpu-layers reached the Engine
    assert "importance_every" in data["records"][0]["controller_chosen"]
    assert not list(tmp_path.glob("*.tmp"))
    text = write_report(tmp_path).read_text()
    assert "**3 did not run**" in text and "passkey 512: 3" in text

    # past the limit: nothing starts
    lines.clear()
    run_grid(real_demo_model_path, spec, str(tmp_path), n_threads=1, n_gpu_layers=1, time_limit=50, started=-60,
             clock=lambda: now[0], log=log)
    assert len(seen) == 1 and any("stopped" in line for line in lines)
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["plan"]["not_run"] == 3

    # no limit: the other three run, the first is not run again
    lines.clear()
    run_grid(real_demo_model_path, spec, str(tmp_path), n_threads=1, n_gpu_layers=1, log=log)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["records"]) == 4 and seen == [1] * 4 and sum("skipped" in line for line in lines) == 1
    assert data["meta"]["plan"]["not_run"] == 0 and data["meta"]["plan"]["stopped"] is None
    assert {(r["seed"], r["setting"]) for r in data["records"]} == {(s, p) for s in (0, 1) for p in ("full", "asrkf")}
    text = write_report(tmp_path).read_text()
    assert "**0 did not run**" in text and "3 ran" in text
    k = sum(r["passed"] for r in data["records"] if r["setting"] == "full")
    lo, hi = wilson(k, 2)
    assert f"| passkey | 512 | full | - | {k} / 2 | {100 * lo:.0f}-{100 * hi:.0f}% | - |" in text


def test_interval_table_counts_and_mean_scores():
    recs = [{"task": "cwe", "ctx": 4096, "setting": "asrkf", "budget": 0.25, "passed": p, "score": s,
             "expected": ["a"] * 10, "seed": i, "depth": None} for i, (p, s) in enumerate([(True, 1.0), (False, 0.9),
                                                                                         (False, 0.5)])]
    table = interval_table(recs)
    lo, hi = wilson(1, 3)
    assert f"| cwe | 4096 | asrkf | 25% | 1 / 3 | {100 * lo:.0f}-{100 * hi:.0f}% | 0.800 |" in table
    assert wilson(6, 6)[0] == pytest.approx(0.61, abs=0.01) and wilson(0, 12) == (0.0, pytest.approx(0.2425, abs=1e-3))


def test_eval_cli_time_limit_seeds_and_gpu_layers(real_demo_model_path, tmp_path):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "eval", "--model", real_demo_model_path,
                        "--tasks", "passkey,cwe",
                        "--ctx", "512", "--depths", "0.2,0.8", "--seeds", "0,1", "--policies", "full",
                        "--n-gpu-layers", "0", "--time-limit", "0.001", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "stopped early" in r.stderr and "6 of 6 planned runs not run" in r.stderr
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["seeds"] == [0, 1] and meta["n_gpu_layers"] == 0
    assert meta["plan"]["not_run_by_cell"] == {"passkey 512": 4, "cwe 512": 2}
    assert "**6 did not run**" in (out / "report.md").read_text()
    sha = json.loads((out / "model-sha256.json").read_text())  # the next call does not hash the model again
    assert sha["sha256"] == meta["model_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.mark.parametrize("args,words", [
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "1,1"], "twice"),
    (["--time-limit", "0"], "--time-limit"),
    (["--n-gpu-layers", "-2"], "--n-gpu-layers"),
    (["--tasks", "qa"], "unknown task"),
])
def test_eval_cli_bad_new_flags_are_one_line(tmp_path, args, words):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "eval", "--model", str(tmp_path / "missing.gguf"),
                        *args, "--out", str(tmp_path / "X")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_every_task_is_in_the_report_order():
    from asrkf_gguf.evaluation.report import TASK_ORDER

    assert set(TASKS) <= set(TASK_ORDER)
