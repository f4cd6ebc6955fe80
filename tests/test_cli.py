"""python -m asrkf_gguf run: JSON output, multi-turn, and one clear line for every bad input."""

import json
import os
import subprocess
import sys

import pytest

from asrkf_gguf import _lib


def cli(*args, timeout=300):
    env = dict(os.environ)
    env["ASRKF_GGUF_LIB_DIR"] = str(_lib.lib_dir())
    return subprocess.run([sys.executable, "-m", "asrkf_gguf", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_run_json_on_the_demo_model(demo_model_path, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Write a long story about a lighthouse keeper. " * 40)
    r = cli(demo_model_path, "--prompt-file", str(prompt), "--max-tokens", "24", "--ctx", "2048",
            "--kv-budget", "0.125", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    kv = out["kv"]
    assert out["n_generated_tokens"] == 24 and out["policy"] == "asrkf" and out["text"]
    assert kv["budget_cells"] == 256 and kv["resident_cells_peak"] <= 256
    assert kv["logical_tokens"] == out["n_prompt_tokens"] + 24 > 256
    assert kv["offloaded_tokens_final"] > 0 and kv["host_bytes_peak"] > 0
    assert set(out["events"]["recoveries"]) == {"SR", "WR", "FR", "RR"}
    log = out["recovery_log"]
    assert len(log) == sum(out["events"]["recoveries"].values())
    assert all(e["entropy"] > e["threshold"] and e["level"] in ("SR", "WR", "FR", "RR") for e in log)
    assert set(out["timing"]) == {"prefill_tokens_per_s", "decode_tokens_per_s", "controller_us_per_token"}


def test_turns_file_runs_one_session(demo_model_path, tmp_path):
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(["My name is Ada. Say hello.", "What is my name?"]))
    r = cli(demo_model_path, "--turns-file", str(turns), "--max-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["turns"]) == 2 and out["text"] == out["turns"][-1]
    assert out["kv"]["logical_tokens"] >= out["n_prompt_tokens"] + 2


@pytest.mark.parametrize("make_args,words", [
    (lambda d: [str(d / "missing.gguf")], "not found"),
    (lambda d: [str(d / "text.gguf")], "not a GGUF"),
    (lambda d: [str(d / "truncated.gguf")], "cannot load"),
    (lambda d: ["DEMO", "--kv-budget", "40"], "too small"),
    (lambda d: ["DEMO", "--policy", "full", "--ctx", "64", "--max-tokens", "60"], "more than ctx"),
    (lambda d: ["DEMO", "--turns-file", str(d / "bad.json")], "not valid JSON"),
    (lambda d: ["DEMO", "--turns-file", str(d / "notlist.json")], "list of non-empty strings"),
    (lambda d: ["DEMO", "--kv-budget", "lots"], "kv_budget"),
    (lambda d: ["DEMO", "--importance-every", "0"], "importance_every >= 1"),
])
def test_bad_input_is_one_line_and_nonzero(demo_model_path, tmp_path, make_args, words):
    (tmp_path / "text.gguf").write_text("hello")
    with open(demo_model_path, "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(1 << 20))
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "notlist.json").write_text('{"a": 1}')
    args = [demo_model_path if a == "DEMO" else a for a in make_args(tmp_path)]
    r = cli(*args, "--max-tokens", "4") if "--max-tokens" not in args else cli(*args)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
