"""The user-path benchmark's pieces on the CPU: a written model with a real vocabulary runs through `run`, the
prompt phase and the decode steps are broken down, and the controller settings follow where the KV lives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asrkf_gguf.engine import Engine, device_defaults

ROOT = Path(__file__).resolve().parents[1]


def _script(name, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, check=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def vocab_model(real_demo_model_path, tmp_path_factory):
    pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("vocab")
    _script("extract_vocab.py", real_demo_model_path, d / "vocab.json.gz")
    _script("write_bench_model.py", d / "m.gguf", "--n-layer", 2, "--n-embd", 256, "--n-head", 4, "--n-head-kv", 2,
            "--n-ff", 512, "--vocab", d / "vocab.json.gz")
    return d / "m.gguf"


def test_a_written_model_with_a_real_vocabulary_runs_through_the_cli(vocab_model):
    # the GPU machine cannot download a model: the benchmark model takes a real model's tokenizer and template
    prompt = "Tell me about the sea. " * 60
    out = subprocess.run([sys.executable, "-m", "asrkf_gguf", "run", str(vocab_model), "--prompt", prompt,
                          "--ctx", "1024", "--kv-budget", "160", "--max-tokens", "8", "--temperature", "0", "--json"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["n_prompt_tokens"] > 300 and res["events"]["offloads"] > 0
    phase = res["timing"]["prompt_phase_ms"]
    parts = ("model_decode", "offload", "thaw", "score_fold", "recall_scoring", "controller_other")
    assert all(phase[k] >= 0 for k in parts) and phase["offload"] > 0 and phase["model_decode"] > 0
    # the parts are disjoint pieces of the prompt phase
    assert sum(phase[k] for k in parts) <= phase["total"] * 1.01 + 1
    steps = res["timing"]["decode_phase_ms"]
    assert steps["model_decode"] > 0 and steps["model_decode"] + steps["controller"] <= steps["total"] * 1.01 + 1


def test_controller_settings_follow_where_the_kv_lives(demo_model_path):
    import llama_cpp

    from asrkf_gguf.rpc import has_local_gpu

    with Engine(demo_model_path, ctx=1024, kv_budget=256, n_gpu_layers=99, n_threads=2) as e:
        layers = e.controller.layers
        all_layers = e.kv.layers().tolist()
        native_recall = e.controller.config.recall_native
    # (llama_supports_gpu_offload is true for the RPC backend alone: a local GPU is what counts)
    if llama_cpp.llama_supports_gpu_offload() and has_local_gpu():
        # every 4th layer scored, recall scored on the device; a caller's layers are kept, recall still native
        assert device_defaults(99) == {"importance_every": 4, "recall_native": True}
        assert layers == all_layers[::-1][::4][::-1] and native_recall
        assert device_defaults(99, {"importance_every": 1}) == {"recall_native": True}
    else:  # a CPU build (with or without RPC): the KV stays on the CPU whatever n_gpu_layers says, every layer scored, recall in numpy
        assert device_defaults(99) == {} and layers == all_layers and not native_recall
    assert device_defaults(0) == {}


def test_a_host_budget_refuses_the_offload_that_would_pass_it_and_keeps_the_chat(real_demo_model_path):
    from asrkf_gguf.engine import EngineError, size_bytes
    from asrkf_gguf.errors import HostBudgetError

    assert size_bytes("512M") == 512 * 2**20 and size_bytes("1.5GiB") == 3 * 2**29 and size_bytes(4096) == 4096
    for bad in ("", "x", "-1G", "0", True, 1.5):
        with pytest.raises(EngineError):
            size_bytes(bad)
    with Engine(real_demo_model_path, ctx=4096, kv_budget=256, n_threads=2, host_budget="8M") as e:
        per_token = e.kv.info().kv_bytes_per_token
        limit = 8 * 2**20 // per_token  # tokens the host may hold
        "".join(e.chat("Hello there, my friend! " * 70, max_tokens=4))
        first = e.controller.table.counts()
        assert 0 < first["offloaded"] <= limit
        n_before, msgs_before = e.controller.table.n, list(e.messages)
        with pytest.raises(HostBudgetError, match="host budget"):
            "".join(e.chat("Tell me more. " * 400, max_tokens=4))
        # the failed turn is taken back: the chat is where it was, every host copy within the budget and intact
        assert e.controller.table.n == n_before and e.messages == msgs_before
        assert e.kv.info().host_bytes_used <= 8 * 2**20
        e.controller.table.check(e.kv)
        "".join(e.chat("And now?", max_tokens=4))  # usable afterwards
        assert e.controller.table.n > n_before
