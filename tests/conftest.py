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


@pytest.fixture(scope="session")
def demo_model_path():
    from asrkf_gguf.models import fetch_demo_model

    return fetched_model(fetch_demo_model)


def random_tokens(n, seed=0, vocab=500):
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def session(path, **kw):
    kw.setdefault("n_threads", 2)
    # ASRKF_TEST_N_GPU_LAYERS=99 runs the suite with the model and its KV cache on the GPU of a CUDA/Metal build
    kw.setdefault("n_gpu_layers", int(os.environ.get("ASRKF_TEST_N_GPU_LAYERS", "0")))
    return LlamaSession(path, ContextOptions(**kw))
