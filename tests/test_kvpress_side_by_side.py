"""scripts/kvpress_side_by_side.py scores as the eval does, on case files written by the eval's own writer."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from asrkf_gguf.evaluation.grid import save_case
from asrkf_gguf.evaluation.tasks import make_case

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kvpress_side_by_side.py"


def _script():
    spec = importlib.util.spec_from_file_location("kvpress_side_by_side", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count(text: str) -> int:  # a stand-in tokenizer: the cases only need a consistent count
    return len(text) // 4 + 1


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("kvp")
    made = [make_case("vartrack", 2048, 0.5, 0, count), make_case("fwe", 4096, None, 1, count),
            make_case("passkey-mt", 2048, 0.3, 0, count), make_case("kl", 2048, None, 0, count, ["essay. " * 2000])]
    for c in made:
        save_case(out, c)
    return out, {c.key: c for c in made}


def test_scoring_matches_the_eval_on_real_case_files(cases):
    kvp = _script()
    out, made = cases
    loaded = {c["key"]: c for c in kvp.load_cases([out])}
    assert set(loaded) == {k for k in made if not k.startswith("kl")}  # the kl case is no chat: left out
    for key, c in loaded.items():
        case = made[key]
        a = list(case.answers)
        replies = [" ".join(a), ", ".join(x.upper() for x in a), a[0], "", "x" + a[0] + "x", " ".join(a[:-1]),
                   "\n".join(x + "s" for x in a), "the answer: " + ", ".join(reversed(a)) + "."]
        for reply in replies:
            assert kvp.score(c, reply) == case.score(reply), (key, reply)
    fwe = loaded["fwe|ctx=4096|depth=-|seed=1"]
    assert fwe["match"] == "word" and kvp.score(fwe, "x" + fwe["answers"][0] + "x") == 0


def test_run_order_and_multi_turn_budgets(cases):
    kvp = _script()
    out, _ = cases
    loaded = kvp.load_cases([out])
    runs = kvp.planned_runs(loaded, ["snapkv", "none"], [0.25], [0.25, 0.125])
    got = [(c["task"], p, b) for c, p, b in runs]
    assert got == [("fwe", "snapkv", 0.25), ("passkey-mt", "snapkv", 0.25), ("vartrack", "snapkv", 0.25),
                   ("passkey-mt", "snapkv", 0.125),
                   ("fwe", "none", 1.0), ("passkey-mt", "none", 1.0), ("vartrack", "none", 1.0)]
    assert kvp.load_cases([out], tasks={"vartrack"}, ctxs={2048})[0]["task"] == "vartrack"


def test_without_kvpress_it_skips(cases):
    if importlib.util.find_spec("kvpress") and importlib.util.find_spec("torch"):
        pytest.skip("kvpress is installed here")
    out, _ = cases
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), "--model", "unused.gguf"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "kvpress not installed" in r.stderr and "skipped" in r.stderr
