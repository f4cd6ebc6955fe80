"""python -m asrkf_gguf serve: the official openai client against a server started on 127.0.0.1 (a free port) with
the demo model; replies compared with the Engine's, conversations interleaved, errors, disconnect, SIGTERM."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from asrkf_gguf import _lib  # noqa: E402
from asrkf_gguf.engine import Engine  # noqa: E402
from asrkf_gguf.server.pool import ConversationPool  # noqa: E402

CTX = 1024
MAX_TOKENS = 16  # the machine is small and shared: short replies


def start_server(model, *extra):
    """The server in a subprocess on 127.0.0.1, port 0 (the OS gives a free one; the server prints it)."""
    env = dict(os.environ)
    env["ASRKF_GGUF_LIB_DIR"] = str(_lib.lib_dir())
    proc = subprocess.Popen([sys.executable, "-m", "asrkf_gguf", "serve", model, "--port", "0", "--ctx", str(CTX),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"the server did not start: {proc.stderr.read()}")
    assert line.startswith("serving ") and " on http://127.0.0.1:" in line, line
    return proc, line.split(" on ")[1].strip()


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(real_demo_model_path):
    proc, url = start_server(real_demo_model_path)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(real_demo_model_path):
    """The same Engine settings as the server's, in this process: what `run` / Engine.chat give."""
    with Engine(real_demo_model_path, ctx=CTX) as e:
        yield e


def engine_replies(engine, turns):
    """The replies of one conversation alone: each turn continues the KV of the one before (Engine.chat)."""
    engine.reset()
    return ["".join(engine.chat(t, max_tokens=MAX_TOKENS, temperature=0.0)) for t in turns]


def ask(client, messages, stream=False):
    """One greedy request; (reply text, the final response or chunk)."""
    if not stream:
        r = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        return r.choices[0].message.content, r
    text, last, usage = [], None, None
    for chunk in client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                last = chunk
        else:
            usage = chunk.usage
    assert last is not None and usage is not None  # the finish reason, then the usage chunk
    return "".join(text), (last, usage)


def converse(client, turns, history, stream=False):
    """Send the next user turn with the history so far, as a client does; append both messages."""
    history.append({"role": "user", "content": turns[len(history) // 2]})
    text, resp = ask(client, history, stream)
    history.append({"role": "assistant", "content": text})
    return text, resp


T = ["My name is Ada. Say hello to me.", "What is my name?"]
A = ["I live in Paris. Say hello.", "Where do I live?", "Thank you. Now name a color."]
B = ["Write one sentence about the sea.", "Now one about mountains.", "Which of the two is colder?"]


def test_replies_equal_the_engines_streaming_or_not(client, reference):
    want = engine_replies(reference, T)
    history = []
    first, r1 = converse(client, T, history)
    assert first == want[0] and first
    assert r1.choices[0].finish_reason in ("stop", "length") and r1.usage.completion_tokens <= MAX_TOKENS
    second, (last, usage) = converse(client, T, history, stream=True)
    assert second == want[1] and second
    # the second turn continued the first one's KV: its prompt decoded only what the cache did not hold
    assert usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens


def test_two_conversations_interleaved_reply_as_each_alone(client, reference, server):
    # each conversation's KV is parked in host memory while the other one runs, and restored when it comes back:
    # interleaved, each replies exactly as it does alone (Engine.chat turn after turn); re-prefilled at every
    # switch it would not (KV computed in one prefill differs in the last bits from KV decoded token by token,
    # which flips a greedy pick of the demo model within 3 turns)
    want_a, want_b = engine_replies(reference, A), engine_replies(reference, B)
    ha, hb, ids_a, ids_b = [], [], set(), set()
    switches0 = httpx.get(f"{server}/health").json()["switches"]
    for turn in range(3):
        text, r = converse(client, A, ha, stream=turn % 2 == 1)
        assert text == want_a[turn], f"conversation A, turn {turn}"
        ids_a.add((r[0] if isinstance(r, tuple) else r).model_extra["conversation"])
        text, r = converse(client, B, hb, stream=turn % 2 == 0)
        assert text == want_b[turn], f"conversation B, turn {turn}"
        ids_b.add((r[0] if isinstance(r, tuple) else r).model_extra["conversation"])
    # each conversation kept its own record in the pool, and every request switched to the other one
    assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b
    assert httpx.get(f"{server}/health").json()["switches"] - switches0 == 6


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct-q4_1.gguf"]
    h = httpx.get(f"{server}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = client.completions.create(model="any", prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 4
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply_before_them(client, stream):
    # a raw prompt starts from an empty cache every time: greedy, the same continuation
    prompt = "1, 2, 3, 4, 5, 6, 7, 8,"
    full = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert " 11," in full, full
    want = full[:full.index(" 11,")]

    def ask_stop(stop):
        if not stream:
            c = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=stop)
            return c.choices[0].text, c.choices[0].finish_reason
        text, finish = [], None
        for chunk in client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                               stream=True):
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    assert ask_stop(["never there", " 11,"]) == (want, "stop")
    assert ask_stop(" 1") == (full[:full.index(" 1")], "stop")  # " 10," comes first


def assert_openai_error(err, status, param=None):
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) >= {"message", "type", "code"} and body["message"] and body["type"] == "invalid_request_error"
    if param:
        assert body["param"] == param


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_bad_requests_get_400_with_an_openai_error_body(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", **kwargs)
    assert_openai_error(info.value, 400, param)


def test_more_bad_requests_and_unknown_parameters(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=CTX)
    assert_openai_error(info.value, 400)
    assert info.value.response.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server}/v1/completions", json={"prompt": 42})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # parameters the server does not know are ignored, as llama-server does
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0, top_p=0.5, frequency_penalty=0.1,
                                       extra_body={"mirostat": 2, "top_k": 5})
    assert r.usage.completion_tokens <= 2
    # the sampler chain's settings reach the Engine, which refuses a bad one with nothing changed
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0.7, top_p=5.0)
    assert_openai_error(info.value, 400)
    assert "top_p" in info.value.response.json()["error"]["message"]


def test_sampling_settings_reach_the_sampler_chain(client, reference):
    # top_k 1 keeps only the most likely token: at temperature 1.5 the reply is still the greedy one; without
    # top_k, sampling at 1.5 strays from it. Each request opens its own conversation (its own system message), so
    # each prompt is prefilled as the reference Engine prefills it (a retry of one prompt would decode its last
    # token again, one token at a time, and may pick differently)
    def messages(i):
        return [{"role": "system", "content": f"You are assistant number {i}."},
                {"role": "user", "content": "Write one sentence about the sea."}]

    def reply(i, **kw):
        return client.chat.completions.create(model="any", messages=messages(i), max_tokens=MAX_TOKENS,
                                              **kw).choices[0].message.content

    def greedy(i):
        reference.reset()
        return "".join(reference.generate(messages(i), max_tokens=MAX_TOKENS, temperature=0.0))

    assert all(reply(i, temperature=1.5, seed=i, extra_body={"top_k": 1}) == greedy(i) for i in (1, 2))
    assert any(reply(i, temperature=1.5, seed=i) != greedy(i) for i in (3, 4, 5))


def wait_for_request(server, n_before, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{server}/health").json()
        if h["requests"] > n_before and not h["busy"]:
            return h
        time.sleep(0.2)
    pytest.fail(f"the request did not end within {timeout} s")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(server, stream):
    n_before = httpx.get(f"{server}/health").json()["requests"]
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 900, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break  # leaving the block closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server}/v1/completions", json=body, timeout=3)
    h = wait_for_request(server, n_before, timeout=120)
    # cancelled soon after the disconnect, not 900 tokens later (a loaded 2-core machine took 254 tokens to notice
    # a non-streamed client gone: the bound is half of max_tokens, not a latency target)
    assert h["last_request"]["cancelled"] and h["last_request"]["completion_tokens"] < 450


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly_mid_stream(real_demo_model_path, sig):
    proc, url = start_server(real_demo_model_path)
    try:
        chunks, errors = [], []

        def stream():
            body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 900, "temperature": 0, "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            chunks.append(line)
            except httpx.HTTPError as err:
                errors.append(err)

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 120
        while len(chunks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(chunks) >= 2, "no reply streamed"
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        assert time.monotonic() - t0 < 8
        t.join(timeout=10)
        # the stream in progress was cut short with an error chunk (no 900 tokens)
        assert len(chunks) < 100 and any('"error"' in c for c in chunks), chunks[-3:]
        assert "Traceback" not in proc.stderr.read()
    finally:
        stop_server(proc)


def test_serve_errors_are_one_line(tmp_path):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "asrkf_gguf", "serve", *args], capture_output=True, text=True,
                              timeout=120, env=env)

    r = serve(str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and r.stderr == f"error: model file not found: {tmp_path / 'missing.gguf'}\n", r.stderr
    (tmp_path / "text.gguf").write_text("hello")
    r = serve(str(tmp_path / "text.gguf"))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'text.gguf'} is not a GGUF file\n", r.stderr
    for args, code, words in ((["--port", "70000"], 2, "--port must be"),
                              (["--max-conversations", "0"], 2, "--max-conversations must be"),
                              (["--policy", "full", "--kv-budget", "64"], 2, "--policy full")):
        r = serve(*args)
        assert r.returncode == code and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1


def test_a_port_in_use_is_one_error_line_before_the_model_loads(real_demo_model_path):
    env = dict(os.environ, ASRKF_GGUF_LIB_DIR=str(_lib.lib_dir()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = subprocess.run([sys.executable, "-m", "asrkf_gguf", "serve", real_demo_model_path, "--port",
                            str(taken.getsockname()[1])], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:"), r.stderr


# ---- the pool's choice, without a model


def test_pool_picks_the_longest_prefix_and_starts_new_conversations():
    pool = ConversationPool(None, max_conversations=2)
    a = pool.pick([1, 2, 3])
    a.tokens = [1, 2, 3, 4, 5, 6]
    assert pool.pick([1, 2, 3, 4, 5, 6, 7, 8]) is a          # continues a
    assert pool.pick([1, 2, 3, 4, 9]) is a                   # edits a's last turn: 4 of 6 tokens shared
    b = pool.pick([1, 2, 7, 7, 7])                           # shares 2 of a's 6 tokens: a new conversation
    assert b is not a
    b.tokens, b.last_used, a.last_used = [1, 2, 7, 7, 7, 8], 2.0, 1.0
    assert pool.pick([1, 2, 7, 7, 7, 8, 9]) is b
    c = pool.pick([5, 5])                                    # full: a, the least recently used, is forgotten
    assert c not in (a, b) and a not in pool.conversations and len(pool.conversations) == 2
