"""serve --cache-dir: idle conversations on disk past --max-conversations / --host-budget, restored instead of
prefilled; a restart continues the chats a SIGTERM wrote; a damaged file, or one of another model, is refused and
the reply is still right. The official openai client, greedy, the demo model."""

import os
import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from asrkf_gguf import _lib, sessions  # noqa: E402
from asrkf_gguf.engine import Engine  # noqa: E402
from asrkf_gguf.server.pool import SESSION_SUFFIX  # noqa: E402
from test_server import A, B, CTX, MAX_TOKENS, T, converse, engine_replies, start_server, stop_server  # noqa: E402


# one thread, here and in the servers: the machine that runs the suite is small and shared (2 cores; a second
# thread there made each request 4x slower under load), and the reference and the servers compute alike
THREADS = "1"


@pytest.fixture(scope="module")
def reference(real_demo_model_path):
    with Engine(real_demo_model_path, ctx=CTX, n_threads=int(THREADS)) as e:
        yield e


def serve(model, cache_dir, *extra):
    return start_server(model, "--cache-dir", str(cache_dir), "--threads", THREADS, *extra)


def client_of(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def health(url, requests=None):
    """/health; with requests, once that many requests have ended and the model thread is idle (it moves
    conversations to disk after a reply went out, and is busy until then)."""
    deadline = time.monotonic() + 60
    while True:
        h = httpx.get(f"{url}/health").json()
        if requests is None or (h["requests"] >= requests and not h["busy"]):
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def session_files(d):
    return sorted(p for p in d.iterdir() if p.name.endswith(SESSION_SUFFIX))


def stop_cleanly(proc):
    """SIGTERM; the server's exit code and what it wrote on stderr."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    return code, proc.stderr.read()


def test_interleaved_conversations_through_the_disk_reply_as_each_alone(real_demo_model_path, reference, tmp_path):
    # one conversation in memory: every switch writes the other one to disk and the next turn loads it back. Loaded,
    # each replies exactly as alone (Engine.chat turn after turn); prefilled again it would not (KV of one prefill
    # differs in its last bits from KV decoded token by token: a greedy pick of the demo model flips within 3 turns)
    want_a, want_b = engine_replies(reference, A), engine_replies(reference, B)
    proc, url = serve(real_demo_model_path, tmp_path, "--max-conversations", "1")
    try:
        client = client_of(url)
        ha, hb, last = [], [], {}
        for turn in range(3):
            for name, turns, hist, want in (("A", A, ha, want_a), ("B", B, hb, want_b)):
                text, r = converse(client, turns, hist, stream=False)
                assert text == want[turn], f"conversation {name}, turn {turn}"
                if turn > 0:  # the cache held everything up to this turn's new user message: from the file
                    assert r.usage.prompt_tokens_details.cached_tokens >= last[name], (name, turn)
                last[name] = r.usage.prompt_tokens + r.usage.completion_tokens - 1  # the end token is not decoded
        h = health(url, requests=6)
        assert h["conversations"] == 2 and h["on_disk"] == 1
        assert h["loaded_from_disk"] == 4 and h["written_to_disk"] >= 5 and h["refused_files"] == 0
        assert len(session_files(tmp_path)) == 2
    finally:
        stop_server(proc)


def test_a_restart_continues_the_conversations_a_sigterm_wrote(real_demo_model_path, reference, tmp_path):
    want = engine_replies(reference, T)
    proc, url = serve(real_demo_model_path, tmp_path)
    try:
        history = []
        first, r1 = converse(client_of(url), T, history)
        assert first == want[0]
        assert session_files(tmp_path) == []  # in memory only, until the server stops
        code, err = stop_cleanly(proc)
        assert code == 0 and "Traceback" not in err, err
    finally:
        stop_server(proc)
    files = session_files(tmp_path)
    assert len(files) == 1 and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # the file holds the conversation as the cache held it: prompt and reply (the end token is not decoded)
    tokens = sessions.read_header(str(files[0]))["chat"]["tokens"]
    ended_by_eog = r1.choices[0].finish_reason == "stop"
    assert len(tokens) == r1.usage.prompt_tokens + r1.usage.completion_tokens - ended_by_eog

    proc, url = serve(real_demo_model_path, tmp_path)
    try:
        assert health(url)["conversations"] == 1
        second, r2 = converse(client_of(url), T, history)
        assert second == want[1]  # as in one uninterrupted run
        assert r2.usage.prompt_tokens_details.cached_tokens >= len(tokens)
        assert health(url, requests=1)["loaded_from_disk"] == 1
    finally:
        stop_server(proc)


def flipped(data: bytes, where: int) -> bytes:
    return data[:where] + bytes([data[where] ^ 0x40]) + data[where + 1:]


def test_a_damaged_file_or_another_models_is_refused_and_the_reply_is_still_right(real_demo_model_path, reference,
                                                                                  tmp_path):
    # a session of "another model": a real one whose header names another model fingerprint (checksum redone)
    reference.reset()
    "".join(reference.chat(A[0], max_tokens=4))
    reference.save(tmp_path / "other.session")
    header, parts = sessions.decode((tmp_path / "other.session").read_bytes())
    header.pop("sections")
    header["compat"]["model_fingerprint"] = "0" * 64
    other = tmp_path / f"other{SESSION_SUFFIX}"
    other.write_bytes(sessions.encode(header, {k: bytes(v) for k, v in parts.items()}))
    (tmp_path / "other.session").unlink()

    # --host-budget 1 byte: every parked conversation is past it and goes to disk
    proc, url = serve(real_demo_model_path, tmp_path, "--host-budget", "1")
    try:
        assert health(url)["conversations"] == 0  # the other model's file was not taken
        client = client_of(url)
        ha, hb = [], []
        converse(client, A, ha)
        converse(client, B, hb)  # A goes to disk
        assert health(url, requests=2)["on_disk"] == 1
        files = [p for p in session_files(tmp_path) if p != other]
        assert len(files) == 1
        data = files[0].read_bytes()
        files[0].write_bytes(flipped(data, len(data) // 2))  # in the K/V rows
        # A's next turn: the file fails its checksum, so A is prefilled from scratch, as a fresh Engine does it
        ha.append({"role": "user", "content": A[1]})
        reference.reset()
        want = "".join(reference.generate(ha, max_tokens=MAX_TOKENS, temperature=0.0))
        r = client.chat.completions.create(model="any", messages=ha, temperature=0, max_tokens=MAX_TOKENS)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        h = health(url, requests=3)
        assert h["refused_files"] == 1 and h["loaded_from_disk"] == 0
        assert not files[0].exists() or files[0].read_bytes() != flipped(data, len(data) // 2)
        code, err = stop_cleanly(proc)
    finally:
        stop_server(proc)
    assert code == 0, err
    assert f"skipped {other}: the session was saved with another model" in err, err
    assert "was refused (the session file failed its checksum" in err, err
    assert other.exists()  # another model's file is left alone


def test_a_cache_dir_that_is_a_file_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "serve", "--cache-dir", str(tmp_path / "file")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir())))
    assert r.returncode == 2 and r.stderr.startswith(f"error: --cache-dir {tmp_path / 'file'}: "), r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_an_idle_chat_is_written_as_save_writes_it_when_current(reference, tmp_path):
    # what the server writes for a parked conversation (Engine.save_chat) is byte for byte the file Engine.save
    # writes for the same conversation once it is current again, and its header gives its tokens
    e = reference
    e.reset()
    "".join(e.chat(A[0], max_tokens=4))
    a, a_tokens = e.chat_id, e.cached_tokens()
    b = e.new_chat()
    "".join(e.chat(B[0], max_tokens=4))
    try:
        e.save_chat(a, tmp_path / f"idle{SESSION_SUFFIX}")
        assert e.saved_tokens(tmp_path / f"idle{SESSION_SUFFIX}") == a_tokens
        e.switch(a)
        e.save_chat(a, tmp_path / f"current{SESSION_SUFFIX}")  # the current one: save()
        assert (tmp_path / f"idle{SESSION_SUFFIX}").read_bytes() == (tmp_path / f"current{SESSION_SUFFIX}").read_bytes()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    finally:
        if b in e.chat_ids() and b != e.chat_id:
            e.drop_chat(b)


def test_the_disk_budget_deletes_the_least_recently_used_files_first(tmp_path):
    # trim_disk touches files and records only: conversations with files of known sizes, used in a known order
    from asrkf_gguf.server.pool import Conversation, ConversationPool

    pool = ConversationPool(engine=None, cache_dir=str(tmp_path), disk_budget=2500)
    convs = []
    for i, (size, in_memory) in enumerate([(1000, False), (1000, True), (1000, False), (1000, False)]):
        path = tmp_path / f"c{i}{SESSION_SUFFIX}"
        path.write_bytes(b"x" * size)
        conv = Conversation(id=i, tokens=[1, 2, 3], last_used=float(i), path=str(path), file_current=True,
                            chat=i if in_memory else None)
        convs.append(conv)
    pool.conversations = list(convs)
    (tmp_path / "not-ours.bin").write_bytes(b"y" * 10_000)  # other files are neither counted nor deleted
    assert pool.trim_disk() == 2  # 4000 bytes -> 2000: the two least recently used files go
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"c2{SESSION_SUFFIX}", f"c3{SESSION_SUFFIX}", "not-ours.bin"]
    # the one only on disk is forgotten; the one in memory keeps its record and KV, without a file
    assert pool.conversations == convs[1:]
    assert convs[1].path is None and not convs[1].file_current and convs[1].chat == 1
    assert pool.trim_disk() == 0 and pool.snapshot()["trimmed_files"] == 2
    pool.disk_budget = 0
    assert pool.trim_disk() == 2 and pool.conversations == [convs[1]]


def test_a_server_with_a_tiny_disk_budget_forgets_what_it_cannot_keep(real_demo_model_path, reference, tmp_path):
    # one conversation in memory and room for no file: the idle one is written, then deleted, and forgotten; its
    # next turn is prefilled from scratch (no cached tokens) and still answered
    r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "serve", "--disk-budget", "1M"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir())))
    assert r.returncode == 2 and r.stderr == "error: --disk-budget needs --cache-dir\n", r.stderr
    proc, url = serve(real_demo_model_path, tmp_path, "--max-conversations", "1", "--disk-budget", "1")
    try:
        client = client_of(url)
        ha, hb = [], []
        converse(client, A, ha, stream=False)
        converse(client, B, hb, stream=False)  # A leaves memory: written, then over the budget
        h = health(url, requests=2)
        assert h["written_to_disk"] == 1 and h["trimmed_files"] == 1 and h["on_disk"] == 0
        assert h["conversations"] == 1 and session_files(tmp_path) == []
        text, r = converse(client, A, ha, stream=False)
        assert text and r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        stop_server(proc)
