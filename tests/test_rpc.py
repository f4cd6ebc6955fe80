"""llama.cpp's RPC backend: layers, and their KV cache, on ggml-rpc-server processes (started here on 127.0.0.1).

The moves must be as exact there as on a local device: offload -> thaw gives back the logits of never moving, a
frozen cell is out of attention as if removed, a session round trip continues bit for bit, K rows and recall read
the same bytes, and a greedy run over RPC answers as the local run does. A bad server list is one clear error.
"""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import llama_cpp
import numpy as np
import pytest

from asrkf_gguf import CellState, KVCache, _lib
from asrkf_gguf.llama import ContextOptions, LlamaSession
from asrkf_gguf.rpc import has_local_gpu
from asrkf_gguf.testmodels import TinyModelSpec, tiny_model
from conftest import KV_CASES, random_tokens

SERVER = _lib.rpc_server_path()
pytestmark = pytest.mark.skipif(not SERVER.exists(), reason=f"ggml-rpc-server was not built ({SERVER}): a build "
                                                            "without the RPC backend (-DASRKF_RPC=OFF)")

# four layers, so that with 4 of 5 offloaded (the output counts as one) llama.cpp places layer 0 on the CPU,
# layers 1-2 on the first server and layer 3 (and the output) on the second: K/V on three backends
SPEC = TinyModelSpec(arch="llama", n_layer=4, n_embd=256, n_head=2, n_head_kv=1, head_dim=128, seed=3)
N_GPU_LAYERS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_servers(n, log_dir):
    """n ggml-rpc-server processes on 127.0.0.1 (one CPU thread each); their endpoints. Stopped on the way out."""
    procs, endpoints = [], []
    try:
        for i in range(n):
            port = free_port()
            log = open(log_dir / f"rpc-server-{port}.log", "wb")
            procs.append(subprocess.Popen([str(SERVER), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
            deadline = time.monotonic() + 30
            while True:  # listening once a connection is accepted
                if procs[-1].poll() is not None:
                    pytest.fail(f"ggml-rpc-server exited with {procs[-1].returncode}: "
                                + (log_dir / f"rpc-server-{port}.log").read_text(errors="replace"))
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"ggml-rpc-server on port {port} did not start listening")
                    time.sleep(0.05)
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # a server that crashed while a test used it (not stopped by us) fails the test that started it
        crashed = [p.returncode for p in procs if p.returncode not in (0, -15)]
        assert not crashed, f"a ggml-rpc-server crashed: exit {crashed}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with rpc_servers(2, tmp_path_factory.mktemp("rpc")) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def model_path():
    return str(tiny_model(SPEC))


def rpc_session(path, servers, **kw):
    kw = {"n_threads": 1, "n_gpu_layers": N_GPU_LAYERS, "rpc": tuple(servers), **kw}
    return LlamaSession(path, ContextOptions(**kw))


@contextlib.contextmanager
def llama_log():
    """llama.cpp's log lines while the block runs."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("asrkf_gguf.llama")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_layers_and_their_kv_go_to_both_servers_and_the_cpu(model_path, servers):
    with llama_log() as lines, rpc_session(model_path, servers, n_ctx=256) as s:
        assert s.devices.names[:2] == [n for n in s.devices.names if n.startswith("RPC")][:2]
    kv_lines = [line for line in lines if "KV buffer size" in line]
    # one line per backend holding K/V: the CPU (layer 0) and each server (named by its endpoint); on a machine with
    # a GPU (which then shares the offloaded layers by free memory) at least one server
    assert any("CPU KV buffer" in line for line in kv_lines), kv_lines
    on_servers = [e for e in servers if any(f"[{e}] KV buffer" in line for line in kv_lines)]
    assert on_servers == servers or (has_local_gpu() and on_servers), kv_lines


def expected_and_moved(path, servers, tokens, offload, **opts):
    """Logits of the last token with the cache never moved, and after offload -> thaw (in two spread halves) with
    the same placement; the info after the offload."""
    n = len(tokens)
    with rpc_session(path, servers, **opts) as ref:
        ref.decode(tokens[:-1], 0)
        expected = ref.decode(tokens[-1:], n - 1)
    with rpc_session(path, servers, **opts) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:-1], 0)
        before = kv.cells()
        kv.offload(offload)
        info = kv.info()
        assert info.n_offloaded == len(offload)
        kv.thaw(offload[::2])
        kv.thaw(offload[1::2])
        kv.check()
        for a, b in zip(before, kv.cells()):
            assert np.array_equal(a, b)
        got = s.decode(tokens[-1:], n - 1)
    return expected, got, info


@pytest.mark.parametrize("kv_type,fa", KV_CASES)
@pytest.mark.parametrize("layout", ["scattered", "few-runs"])
def test_offload_thaw_with_kv_on_rpc_is_bit_exact(model_path, servers, kv_type, fa, layout):
    # scattered: many runs of cells, gathered / scattered by get_rows / set_rows graphs on each server; few runs:
    # a copy per run (tensor_get / tensor_set over the connection); the CPU layer's rows are plain memory copies
    tokens = random_tokens(160, seed=60)
    offload = list(range(3, 150, 3)) if layout == "scattered" else list(range(10, 40)) + list(range(80, 120))
    expected, got, info = expected_and_moved(model_path, servers, tokens, offload, n_ctx=256, kv_type=kv_type,
                                             flash_attn=fa, n_batch=64, n_ubatch=64)
    assert np.array_equal(expected, got)
    if layout == "scattered":
        assert info.n_gathers >= 2  # at least one gather graph on each server
    else:
        assert info.n_gathers == 0


def test_a_frozen_cell_on_rpc_is_out_of_attention_as_if_removed(model_path, servers):
    frozen = [2, 3, 10, 11, 12, 40, 77]
    tokens = random_tokens(90, seed=61)
    opts = dict(n_ctx=256, kv_type="f16", flash_attn="on", n_batch=32, n_ubatch=32, n_seq_max=2)
    with rpc_session(model_path, servers, **opts) as ref:
        ref.decode(tokens[:-1], 0)
        for p in frozen:
            assert ref.seq_rm(p, p + 1)
        # the next token lands in the same cell as in the frozen run (test_freeze.py says why)
        ref.batch.reset()
        ref.batch.add_sequence(tokens[: len(frozen)], 1, False)
        assert llama_cpp.llama_decode(ref.ctx, ref.batch.batch) == 0
        expected = ref.decode(tokens[-1:], len(tokens) - 1)
    with rpc_session(model_path, servers, **opts) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:-1], 0)
        unfrozen = s.decode(tokens[-1:], len(tokens) - 1)
        s.seq_rm(len(tokens) - 1, -1)
        kv.freeze(frozen)
        pos, state, _ = kv.cells()
        assert set(pos[state == CellState.FROZEN].tolist()) == set(frozen)
        got = s.decode(tokens[-1:], len(tokens) - 1)
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert np.max(np.abs(unfrozen - expected)) > 1e-4  # freezing did change attention


def test_session_round_trip_with_kv_on_rpc_continues_bit_for_bit(model_path, servers):
    tokens = random_tokens(220, seed=62)
    opts = dict(n_ctx=128, kv_type="f16", flash_attn="on", n_batch=32, n_ubatch=32)

    def fill(s, kv):  # active, frozen and offloaded positions (as tests/test_sessions.py)
        for i in range(0, 160, 32):
            if kv.info().n_cells_used + 32 > 128:
                kv.offload(kv.cells()[0][4:60])
            s.decode(tokens[i:i + 32], i)
        kv.freeze([0, 1, 150])

    with rpc_session(model_path, servers, **opts) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv)
        state = (kv.cells(), kv.offloaded())
        blob = kv.session_save()
        assert kv.info().n_offloaded > 0 and kv.info().n_frozen == 3
        kv.thaw(kv.offloaded()[10:20])
        want = s.decode(tokens[160:200], 160)
    with rpc_session(model_path, servers, **opts) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:40], 0)  # replaced by the load
        kv.session_load(blob)
        kv.check()
        for a, b in zip(state[0], kv.cells()):
            assert np.array_equal(a, b)
        assert np.array_equal(state[1], kv.offloaded())
        kv.thaw(kv.offloaded()[10:20])
        got = s.decode(tokens[160:200], 160)
    assert np.array_equal(want, got)


@pytest.mark.parametrize("kv_type", ["f16", "q4_0"])
def test_k_rows_and_recall_read_the_same_bytes_on_rpc(model_path, servers, kv_type):
    # K rows of positions read from their cells on the servers, from the host copies once offloaded, and again
    # after the thaw: the same bytes; recall's scoring on the servers (asrkf_kv_recall_mass) agrees with numpy's
    from asrkf_gguf.recall import recall_mass

    tokens = random_tokens(200, seed=63)
    pos = np.random.default_rng(64).permutation(np.arange(4, 150))[:90]  # many runs of cells: gathered
    with rpc_session(model_path, servers, n_ctx=256, kv_type=kv_type, flash_attn="on", n_batch=64,
                     n_ubatch=64) as s, KVCache(ctx=s.context) as kv:
        kv.set_importance(True, n_q=8, export_q=True)
        s.decode(tokens[:180], 0)
        layers = kv.layers().tolist()
        resident = [kv.k_rows(il, pos) for il in layers]
        kv.offload(np.sort(pos))
        host = [kv.k_rows(il, pos) for il in layers]
        movable, fixed = np.arange(4, 150), np.concatenate([np.arange(4), np.arange(150, 180)])
        scores_host = recall_mass(kv, movable, layers, others=fixed)
        scores_native = recall_mass(kv, movable, layers, others=fixed, native=True)
        kv.thaw(np.sort(pos))
        back = [kv.k_rows(il, pos) for il in layers]
        kv.check()
    for a, b, c in zip(resident, host, back):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    rtol = 2e-3 if kv_type == "f16" else 5e-2
    np.testing.assert_allclose(scores_native, scores_host, rtol=rtol, atol=2e-4)


def run_cli(args, timeout=300):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    return subprocess.run([sys.executable, "-m", "asrkf_gguf", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_greedy_run_over_rpc_answers_as_the_local_run(real_demo_model_path, tmp_path):
    # the demo model with every layer on two servers, a prompt four times the device budget (offloads and thaws
    # over the connections): the reply of the local run, word for word, with the same cache events
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Here is a list: " + ", ".join(f"item {i} is {i * 7 % 13}" for i in range(150)) +
                      ". What is item 5? And item 17?")
    common = ["run", real_demo_model_path, "--prompt-file", str(prompt), "--temp", "0", "-n", "24", "-t", "1",
              "--ctx", "2048", "--kv-budget", "256", "--json"]
    local = run_cli(common)
    assert local.returncode == 0, local.stderr
    with rpc_servers(2, tmp_path) as endpoints:
        remote = run_cli(common + ["--rpc", ",".join(endpoints), "-ngl", "99"])
    assert remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert b["events"]["offloads"] > 0 and b["events"]["thaws"] > 0
    assert b["text"] == a["text"] and b["events"] == a["events"]


def test_engine_on_rpc_and_its_errors(demo_model_path, servers):
    from asrkf_gguf.engine import Engine, EngineError

    with Engine(demo_model_path, ctx=1024, kv_budget=256, n_threads=1, n_gpu_layers=99, rpc=servers) as e:
        assert [n for n in e.session.devices.names if n.startswith("RPC")] == e.session.devices.names[:2]
        "".join(e.generate("Hello " * 300, max_tokens=4, temperature=0))
        assert e.kv.info().n_offloaded > 0
        e.kv.check()
    for bad, words in [("localhost", "HOST:PORT"), ("127.0.0.1:0", "port"), (f"{servers[0]},{servers[0]}", "twice"),
                       ([], "no RPC server")]:
        with pytest.raises(EngineError, match=words):
            Engine(demo_model_path, ctx=1024, n_gpu_layers=99, rpc=bad)
    with pytest.raises(EngineError, match="n_gpu_layers"):
        Engine(demo_model_path, ctx=1024, rpc=servers, n_gpu_layers=0)
    with pytest.raises(EngineError, match="cannot reach the RPC server"):
        Engine(demo_model_path, ctx=1024, n_gpu_layers=99, rpc=f"127.0.0.1:{free_port()}")


def test_switching_chats_with_kv_on_rpc_gives_each_chat_its_own_replies(demo_model_path, servers):
    # an idle chat is parked in host memory (its rows read from the servers) and restored into their cells: the
    # replies of each chat alone, and no earlier turn decoded again
    from test_sessions import switch_between_two_chats

    switch_between_two_chats(demo_model_path, dict(ctx=1024, kv_budget=96, n_threads=1, n_gpu_layers=99, rpc=servers),
                             max_tokens=24)


def test_cli_refuses_a_bad_server_list_in_one_line(tmp_path):
    for args, words in [(["--rpc", "nohost", "-ngl", "99"], "HOST:PORT"),
                        (["--rpc", "127.0.0.1:70000", "-ngl", "99"], "65535"),
                        (["--rpc", "127.0.0.1:5"], "--n-gpu-layers")]:
        res = run_cli(["run", "-p", "hi", *args], timeout=60)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr


@contextlib.contextmanager
def fake_server(reply):
    """A TCP listener on 127.0.0.1 that reads the HELLO and answers `reply` (None: never answers)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.recv(64)
            if reply is not None:
                conn.sendall(reply)
            done.wait(10)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        done.set()
        t.join(10)
        srv.close()


def test_a_server_that_is_not_a_matching_rpc_server_is_refused_before_ggml_sees_it():
    # ggml's RPC client would abort the whole process on these: the handshake is checked from Python first
    import struct

    from asrkf_gguf.rpc import RpcError, check_server

    with fake_server(None) as endpoint, pytest.raises(RpcError, match="did not answer the handshake"):
        check_server(endpoint, timeout=0.5)
    with fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as endpoint, pytest.raises(RpcError, match="does not answer"):
        check_server(endpoint, timeout=2)
    newer = struct.pack("<Q", 28) + bytes([8, 0, 0, 0]) + bytes(24)  # protocol 8.0.0
    with fake_server(newer) as endpoint, pytest.raises(RpcError, match="speaks protocol 8.0.0"):
        check_server(endpoint, timeout=2)


def test_rpc_server_command_runs_llama_cpps_server():
    res = run_cli(["rpc-server", "--help"], timeout=60)
    assert res.returncode == 0
    assert "--port PORT" in res.stderr and "--host HOST" in res.stderr
