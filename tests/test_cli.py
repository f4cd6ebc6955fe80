"""python -m asrkf_gguf run: JSON output, multi-turn, and one clear line for every bad input."""

import json
import os
import signal
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
            "--kv-budget", "0.125", "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["seed"] == 1 and out["finish_reason"] == "length"
    kv = out["kv"]
    assert out["n_generated_tokens"] == 24 and out["policy"] == "asrkf" and out["text"]
    assert kv["budget_cells"] == 256 and kv["resident_cells_peak"] <= 256
    assert kv["logical_tokens"] == out["n_prompt_tokens"] + 24 > 256
    assert kv["offloaded_tokens_final"] > 0 and kv["host_bytes_peak"] > 0
    ev = out["events"]
    # every offloaded token is still offloaded or was thawed back (one turn: nothing removed the host copies)
    assert ev["offloads"] - ev["thaws"] == kv["offloaded_tokens_final"] and ev["drops"] == 0
    log = out["recovery_log"]
    assert len(log) == sum(ev["recoveries"].values())
    assert all(e["entropy"] > e["threshold"] and e["level"] in ("SR", "WR", "FR", "RR") for e in log)
    rates = ("prefill_tokens_per_s", "decode_tokens_per_s", "controller_us_per_token")
    assert all(out["timing"][k] > 0 for k in rates)
    assert out["timing"]["prompt_phase_ms"]["model_decode"] > 0 and out["timing"]["decode_phase_ms"]["total"] > 0


@pytest.mark.parametrize("where,part", [("device", "recall_native_threads"), ("host", "recall_softmax_threads")])
def test_recall_scoring_runs_where_asked(demo_model_path, tmp_path, where, part):
    # --recall-scoring device: recall's products run in native code on the backend holding K (here the CPU's);
    # host: numpy. The prompt phase's breakdown names the path that ran, and recall moved tokens either way
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The harbour code is 5521. " + "Boats come and go in the grey morning. " * 60 +
                      "What is the harbour code?")
    r = cli(demo_model_path, "--prompt-file", str(prompt), "--max-tokens", "4", "--ctx", "2048", "--kv-budget", "0.125",
            "--temperature", "0", "--recall-scoring", where, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    phase = out["timing"]["prompt_phase_ms"]
    assert phase.get(part, 0) > 0 and phase["recall_scoring"] > 0, phase
    other = {"recall_native_threads", "recall_softmax_threads"} - {part}
    assert not other & set(phase), phase
    assert out["kv"]["offloaded_tokens_final"] > 0


def test_turns_file_runs_one_session(demo_model_path, tmp_path):
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(["My name is Ada. Say hello.", "What is my name?"]))
    r = cli(demo_model_path, "--turns-file", str(turns), "--max-tokens", "16", "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["turns"]) == 2 and out["text"] == out["turns"][-1]
    assert out["kv"]["logical_tokens"] >= out["n_prompt_tokens"] + 2


def one_error_line(r):
    """The CLI's error contract: stderr is exactly one `error: ...` line, no traceback, no llama.cpp log."""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("make_args,words", [
    (lambda d: [str(d / "missing.gguf")], "not found"),
    (lambda d: [str(d / "text.gguf")], "not a GGUF"),
    (lambda d: [str(d / "truncated.gguf")], "cannot load"),
    (lambda d: ["DEMO", "--kv-budget", "40"], "too small"),
    (lambda d: ["DEMO", "--policy", "full", "--ctx", "64", "--max-tokens", "60"], "more than ctx"),
    (lambda d: ["DEMO", "--turns-file", str(d / "bad.json")], "not valid JSON"),
    (lambda d: ["DEMO", "--turns-file", str(d / "notlist.json")], "list of non-empty strings"),
    (lambda d: ["DEMO", "--turns-file", str(d / "blank.json")], "list of non-empty strings"),
    (lambda d: ["DEMO", "--kv-budget", "lots"], "kv_budget"),
    (lambda d: ["DEMO", "--importance-every", "0"], "importance_every >= 1"),
    (lambda d: ["DEMO", "--ctx", "0"], "--ctx must be a positive"),
    (lambda d: ["DEMO", "--ctx", "-5"], "--ctx must be a positive"),
    (lambda d: ["DEMO", "--ctx", "100000"], "training context of 8192 tokens"),
    (lambda d: ["DEMO", "--ctx", "2048", "--kv-budget", "4096"], "more than ctx 2048"),
    (lambda d: ["DEMO", "--policy", "full", "--kv-budget", "512"], "--policy full"),
    (lambda d: ["DEMO", "--prompt", " \n\t "], "empty"),
    (lambda d: ["DEMO", "--prompt-file", str(d / "blank.txt")], "empty"),
    (lambda d: ["DEMO", "--max-tokens", "many"], "invalid int value"),  # argparse's own errors too
    (lambda d: ["DEMO", "--policy", "best"], "invalid choice"),
    (lambda d: ["DEMO", "--no-such-flag"], "unrecognized arguments"),
    (lambda d: ["DEMO", "--temp", "-1"], "--temp cannot be negative"),
    (lambda d: ["DEMO", "--top-p", "2"], "--top-p must be in [0, 1]"),
    (lambda d: ["DEMO", "--top-k", "-1"], "--top-k cannot be negative"),
    (lambda d: ["DEMO", "--repeat-penalty", "0"], "--repeat-penalty must be positive"),
    (lambda d: ["DEMO", "--seed", "-7"], "--seed must be -1"),
    (lambda d: ["DEMO", "--grammar-file", str(d / "missing.gbnf")], "cannot read the grammar file"),
    (lambda d: ["DEMO", "--grammar-file", str(d / "bad.gbnf")], "cannot parse the grammar"),
    (lambda d: ["DEMO", "--json-schema", "{not json"], "--json-schema is not valid JSON"),
    (lambda d: ["DEMO", "--json-schema", "@" + str(d / "missing.json")], "cannot read the JSON schema"),
    (lambda d: ["DEMO", "--system", "  "], "system prompt is empty"),
    (lambda d: ["DEMO", "--threads", "0"], "--threads must be a positive"),
    (lambda d: ["DEMO", "--threads-batch", "-2"], "--threads-batch must be a positive"),
    (lambda d: ["DEMO", "--batch-size", "0"], "--batch-size must be a positive"),
    (lambda d: ["DEMO", "-ub", "-1"], "--ubatch-size must be a positive"),
    (lambda d: ["DEMO", "--hf-file", "x.gguf"], "--hf-file needs --hf-repo"),
    (lambda d: ["DEMO", "--hf-repo", "org/name"], "not both"),
    (lambda d: ["--hf-repo", "no-slash"], "ORG/NAME"),
    (lambda d: ["DEMO", "--policy", "full", "--ctx", "64", "--max-tokens", "60"], "--max-tokens 60), more than ctx 64"),
])
def test_bad_input_is_one_line_and_exit_2(real_demo_model_path, tmp_path, make_args, words):
    (tmp_path / "text.gguf").write_text("hello")
    with open(real_demo_model_path, "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(1 << 20))
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "notlist.json").write_text('{"a": 1}')
    (tmp_path / "blank.json").write_text('["hi", "  "]')
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "bad.gbnf").write_text('root ::= ( "a"\n')
    args = [real_demo_model_path if a == "DEMO" else a for a in make_args(tmp_path)]
    r = cli(*args, "--max-tokens", "4") if "--max-tokens" not in args else cli(*args)
    assert r.returncode == 2, r.stderr
    assert words in one_error_line(r)


def test_usage_errors_without_a_subcommand_are_one_line():
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "required" in one_error_line(r)


def test_a_context_llama_cpp_refuses_is_a_runtime_error_not_a_bad_file(real_demo_model_path):
    # llama.cpp loads the model, then refuses the context (a quantized V cache without flash attention): exit 1,
    # and the message is about the context and its KV size, not "truncated file or unsupported architecture?"
    r = cli(real_demo_model_path, "--ctx", "2048", "--kv-type", "q4_0", "--flash-attn", "off", "--max-tokens", "4")
    assert r.returncode == 1, r.stderr
    line = one_error_line(r)
    assert "could not create a context of 2048 cells" in line and "0.01 GiB q4_0 KV cache" in line
    assert "truncated" not in line


@pytest.fixture(scope="module")
def tiny_cli_model():
    from conftest import TINY_SPECS
    from asrkf_gguf.testmodels import tiny_model

    return str(tiny_model(TINY_SPECS["llama-gqa"]))


def test_a_tiny_model_runs_quietly_and_verbose_shows_the_log(tiny_cli_model):
    # a fixed seed: a random one may draw </s> first from random weights, and an empty reply warns on stderr
    r = cli(tiny_cli_model, "--chat-template", "chatml", "--prompt", "Hi", "--max-tokens", "4", "--seed", "1")
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r.stderr  # no llama.cpp lines
    r = cli(tiny_cli_model, "--chat-template", "chatml", "--prompt", "Hi", "--max-tokens", "4", "--seed", "1",
            "--verbose")
    assert r.returncode == 0 and "llama_model_loader" in r.stderr


def test_a_model_without_a_chat_template_is_told_to_take_one(tiny_cli_model):
    r = cli(tiny_cli_model, "--prompt", "Hi", "--max-tokens", "4")
    assert r.returncode == 2
    assert "no chat template" in one_error_line(r) and "--chat-template" in r.stderr


@pytest.mark.parametrize("json_out", [False, True])
def test_an_empty_reply_is_a_warning_not_an_error(tiny_cli_model, json_out, tmp_path):
    # a grammar that admits only the empty string: the sampler can draw nothing but </s>, so the reply is empty.
    # That is exit 0 with one warning line on stderr (never on stdout, which --json keeps to one object)
    grammar = tmp_path / "empty.gbnf"
    grammar.write_text('root ::= ""\n')
    args = ["--chat-template", "chatml", "--prompt", "Hi", "--max-tokens", "4", "--grammar-file", str(grammar)] \
        + (["--json"] if json_out else [])
    r = cli(tiny_cli_model, *args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "warning: the model produced no text\n"
    if json_out:
        out = json.loads(r.stdout)
        assert out["text"] == "" and out["n_generated_tokens"] == 1
    else:
        assert r.stdout.strip() == ""


def test_ctrl_c_exits_130_without_a_traceback(demo_model_path):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    proc = subprocess.Popen([sys.executable, "-m", "asrkf_gguf", "run", demo_model_path, "--ctx", "1024",
                             "--prompt", "Count from one to one thousand, in words.", "--max-tokens", "900",
                             "--seed", "1", "--ignore-eos"],  # the demo answers "What?": without it the run
                            # could end before the signal arrives (exit 0; seen once on a loaded CI machine)
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            # as from a terminal: a shell's background job (`cmd &`) ignores SIGINT, its children
                            # inherit that, and Python then installs no KeyboardInterrupt handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.read(1)  # it is generating
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.decode() == ""


def test_help_shows_every_default():
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "run", "--help"], capture_output=True, text=True,
                       timeout=60, env=env)
    text = " ".join(r.stdout.split("options:", 1)[1].split())
    for flag, default in (("--temp", "0.8"), ("--top-k", "40"), ("--top-p", "0.95"), ("--min-p", "0.05"),
                          ("--repeat-penalty", "1.0"), ("--repeat-last-n", "64"), ("--presence-penalty", "0.0"),
                          ("--seed", "-1"), ("--max-tokens", "128"), ("--policy", "asrkf"), ("--kv-type", "f16")):
        after = text[text.index(flag + " "):]
        assert f"(default: {default})" in after[:400], flag
    assert "physical cores" in text and "training context" in text


def hf_cache(tmp_path, model):
    """A Hugging Face cache as huggingface_hub lays it out, holding two quantizations of a tiny model."""
    repo = tmp_path / "hub" / "models--acme--tiny-GGUF"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for name in ("tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"):
        (snap / name).symlink_to(model)
    return dict(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))


@pytest.mark.parametrize("args,file", [
    (["--hf-repo", "acme/tiny-GGUF:q8_0"], "tiny-Q8_0.gguf"),    # llama.cpp's ORG/NAME:QUANT, any case
    (["--hf-repo", "acme/tiny-GGUF"], "tiny-Q4_K_M.gguf"),       # no tag: Q4_K_M, as llama.cpp
    (["-hf", "acme/tiny-GGUF", "-hff", "tiny-Q8_0.gguf"], "tiny-Q8_0.gguf"),
])
def test_a_model_from_the_hugging_face_cache(tiny_cli_model, tmp_path, monkeypatch, args, file):
    for k, v in hf_cache(tmp_path, tiny_cli_model).items():
        monkeypatch.setenv(k, v)
    r = cli(*args, "--chat-template", "chatml", "--prompt", "Hi", "--max-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"].endswith("/snapshots/0123456789abcdef0123456789abcdef01234567/" + file)


@pytest.mark.parametrize("repo,code,words", [
    ("acme/tiny-GGUF:Q5_K_S", 2, "no .gguf with Q5_K_S in its name"),
    ("acme/other", 1, "not in the Hugging Face cache"),
])
def test_a_hugging_face_model_that_is_not_there(tiny_cli_model, tmp_path, monkeypatch, repo, code, words):
    for k, v in hf_cache(tmp_path, tiny_cli_model).items():
        monkeypatch.setenv(k, v)
    r = cli("--hf-repo", repo, "--prompt", "Hi", "--max-tokens", "2")
    assert r.returncode == code, r.stderr
    assert words in one_error_line(r)


def on_a_terminal(*args):
    """Run the CLI with stderr on a pseudo-terminal 100 columns wide; (exit code, stdout, what the terminal got)."""
    import fcntl
    import pty
    import struct
    import termios

    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    try:
        proc = subprocess.run([sys.executable, "-m", "asrkf_gguf", "run", *args], stdout=subprocess.PIPE,
                              stderr=sub, timeout=300, env=env)
        os.close(sub)
        seen = b""
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: everything read
                break
            if not data:
                break
            seen += data
    finally:
        os.close(main)
    return proc.returncode, proc.stdout, seen


def test_progress_shows_on_a_terminal_only(tiny_cli_model, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the lighthouse keeper walks along the shore " * 40)  # ~1,500 tokens of the tiny vocabulary
    args = [tiny_cli_model, "--chat-template", "chatml", "--prompt-file", str(prompt), "--max-tokens", "2",
            "--ctx", "2048", "--seed", "1"]
    code, _, seen = on_a_terminal(*args)
    assert code == 0
    assert b"prompt" in seen and b"tok/s" in seen  # tqdm's rate on the terminal
    r = cli(*args)  # stderr a pipe: nothing on it
    assert r.returncode == 0 and r.stderr == ""
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(["Hello", "And then?", "Thanks"]))
    code, out, seen = on_a_terminal(tiny_cli_model, "--chat-template", "chatml", "--turns-file", str(turns),
                                    "--max-tokens", "2", "--json")
    assert code == 0 and b"3/3" in seen and b"turn" in seen
    assert len(json.loads(out)["turns"]) == 3  # stdout is the one JSON object still


def test_the_gguf_a_quant_tag_picks():
    from asrkf_gguf.models import ModelNotFoundError, _pick_gguf

    files = sorted(["m-Q8_0.gguf", "m-q4_k_m.gguf", "big/m-Q6_K-00001-of-00002.gguf",
                    "big/m-Q6_K-00002-of-00002.gguf"])
    assert _pick_gguf("o/m", files, "") == "m-q4_k_m.gguf"              # no tag: Q4_K_M, any case
    assert _pick_gguf("o/m", files, "Q8_0") == "m-Q8_0.gguf"
    assert _pick_gguf("o/m", files, "q6_k") == "big/m-Q6_K-00001-of-00002.gguf"  # a split model: its first part
    assert _pick_gguf("o/m", ["a-F16.gguf", "a-Q5_K.gguf"], "") == "a-F16.gguf"  # no Q4_K_M: the first
    with pytest.raises(ModelNotFoundError, match="no .gguf with IQ2 in its name"):
        _pick_gguf("o/m", files, "IQ2")
    with pytest.raises(ModelNotFoundError, match="holds no .gguf"):
        _pick_gguf("o/m", [], "")
