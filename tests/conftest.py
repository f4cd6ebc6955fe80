import os

import numpy as np
import pytest

import asrkf_gguf  # noqa: F401  (loads the patched libllama before llama_cpp)
from asrkf_gguf.llama import ContextOptions, LlamaSession
from asrkf_gguf.testmodels import TinyModelSpec, tiny_model

# structural cases: GQA, MHA-like, qwen2 with biases, head size 128
TINY_SPECS = {
    "llama-gqa": TinyModelSpec(arch="llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2),
    "llama-hd128": TinyModelSpec(arch="llama", n_layer=2, n_embd=256, n_head=2, n_head_kv=1, head_dim=128),
    "qwen2": TinyModelSpec(arch="qwen2", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, seed=1),
}

# ASRKF_TEST_N_GPU_LAYERS=99 (a CUDA/Metal build): the sessions of these tests and every Engine a test makes
# without saying n_gpu_layers put the model and its KV cache on the GPU, so that the Engine's GPU defaults (every
# 4th layer scored, recall on the device, pageable host memory with staged moves) run under the suite there
if os.environ.get("ASRKF_TEST_N_GPU_LAYERS"):
    from asrkf_gguf.engine import Engine as _Engine

    _Engine.__init__.__kwdefaults__["n_gpu_layers"] = int(os.environ["ASRKF_TEST_N_GPU_LAYERS"])

# (kv type, flash attention): quantized V needs flash attention in llama.cpp
KV_CASES = [("f16", "off"), ("f16", "on"), ("q8_0", "on"), ("q4_0", "on")]


@pytest.fixture(scope="session")
def tiny_paths():
    return {name: str(tiny_model(spec)) for name, spec in TINY_SPECS.items()}


@pytest.fixture(scope="session")
def tiny_path(tiny_paths):
    return tiny_paths["llama-gqa"]


def fetched_model(fetch):
    """A model fetched (or taken from the cache) by the project's own code; on a machine that cannot download
    anything (the GPU machine of scripts/gpu_bench.sh) ASRKF_TEST_NO_FETCH=1 skips the tests that need one."""
    if os.environ.get("ASRKF_TEST_NO_FETCH"):
        pytest.skip("ASRKF_TEST_NO_FETCH is set: this machine cannot fetch models")
    return str(fetch(progress=False))


# ChatML, as SmolLM2-135M-Instruct (the demo model) writes it
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# where nothing can be fetched (ASRKF_TEST_NO_FETCH=1: the GPU machine of scripts/gpu_bench.sh) a written model
# stands in for the demo model: random weights, a SentencePiece vocabulary and the demo's chat template, so that
# the Engine, CLI, server and session tests run on the GPU's paths too. Tests that need the real model's answers
# ask for real_demo_model_path, which skips there
DEMO_STANDIN = TinyModelSpec(arch="llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_vocab=1024,
                             n_ctx_train=16384, seed=7, chat_template=CHATML)


@pytest.fixture(scope="session")
def real_demo_model_path():
    from asrkf_gguf.models import fetch_demo_model

    return fetched_model(fetch_demo_model)


@pytest.fixture(scope="session")
def demo_model_path():
    if os.environ.get("ASRKF_TEST_NO_FETCH"):
        return str(tiny_model(DEMO_STANDIN))
    from asrkf_gguf.models import fetch_demo_model

    return fetched_model(fetch_demo_model)


# an iSWA model written here (Gemma 3's layout: five window layers, then one that attends the whole context), so
# that the iSWA tests run where nothing can be fetched (the GPU machine) as well as on the real Gemma 3 270M
ISWA_STANDIN = TinyModelSpec(arch="gemma3", n_layer=6, n_embd=128, n_head=4, n_head_kv=2, head_dim=64, n_ff=256,
                             sliding_window=128, seed=3)


@pytest.fixture(scope="session", params=["written", "gemma3-270m"])
def iswa_model(request):
    """(path, vocabulary size) of an iSWA model: the written stand-in, and the real Gemma 3 (fetched)."""
    if request.param == "written":
        return str(tiny_model(ISWA_STANDIN)), ISWA_STANDIN.n_vocab
    from asrkf_gguf.models import fetch_gemma3_model

    return fetched_model(fetch_gemma3_model), 200000


def random_tokens(n, seed=0, vocab=500):
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def session(path, **kw):
    kw.setdefault("n_threads", 2)
    # ASRKF_TEST_N_GPU_LAYERS=99 runs the suite with the model and its KV cache on the GPU of a CUDA/Metal build
    kw.setdefault("n_gpu_layers", int(os.environ.get("ASRKF_TEST_N_GPU_LAYERS", "0")))
    return LlamaSession(path, ContextOptions(**kw))
