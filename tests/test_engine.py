"""Engine: streaming chat with KV across turns, cancellation, consistent state after abandon, close and reset."""

import threading

import numpy as np

import pytest

from asrkf_gguf.engine import Engine, EngineError, budget_cells, common_prefix, text_decoder
from asrkf_gguf.errors import ClosedError
from asrkf_gguf.states import CellState


def test_budget_specs():
    assert budget_cells(None, 4096) == 4096
    assert budget_cells(0.25, 4096) == 1024 and budget_cells("0.25", 4096) == 1024
    assert budget_cells(512, 4096) == 512 and budget_cells("512", 4096) == 512
    assert budget_cells(4096, 4096) == 4096 and budget_cells(1.0, 4096) == 4096
    for bad in (0, -3, 1.5, "x", 0.0, 4097, 10**6, "5000"):  # more cells than the context: refused, not clamped
        with pytest.raises(EngineError):
            budget_cells(bad, 4096)


@pytest.fixture(scope="module")
def engine(demo_model_path):
    with Engine(demo_model_path, ctx=2048, kv_budget=256, n_threads=2) as e:
        yield e


def test_chat_streams_and_keeps_the_conversation(engine):
    first = "".join(engine.chat("My name is Ada. Say hello to me.", max_tokens=16))
    assert first and engine.messages[-1] == {"role": "assistant", "content": first}
    n_after_first = engine.controller.table.n
    second = "".join(engine.chat("What is my name?", max_tokens=16))
    assert second and len(engine.messages) == 4
    assert engine.controller.table.n > n_after_first  # the second turn continued the same sequence
    st = engine.stats()
    assert st["kv"]["logical_tokens"] == engine.controller.table.n
    assert st["n_generated_tokens"] > 0 and st["policy"] == "asrkf"
    engine.controller.table.check(engine.kv)


def test_cancel_stops_generation_after_the_current_token(engine):
    # cancel() after the third piece: the generator stops at its next step and hands over the tokens it held back
    # (rr_tokens of them, kept for a rewalk), so exactly 3 + rr_tokens tokens come out of a 200-token request
    pieces = []
    before, n_msgs = engine.n_generated_tokens, len(engine.messages)
    for piece in engine.chat("Count from one to one thousand, in words.", max_tokens=200):
        pieces.append(piece)
        if len(pieces) == 3:
            canceller = threading.Thread(target=engine.cancel)  # any thread may cancel
            canceller.start()
            canceller.join()
    k = engine.controller.config.rr_tokens
    assert engine.n_generated_tokens - before == 3 + k
    assert len(pieces) == 3 + k
    engine.controller.table.check(engine.kv)
    assert len(engine.cached_tokens()) == engine.controller.table.n
    # usable afterwards: the cancelled turn was kept, the next one is a full turn
    assert "".join(engine.chat("And now?", max_tokens=4))
    assert len(engine.messages) == n_msgs + 4


def test_an_abandoned_turn_is_taken_back(engine):
    n_before, msgs_before = engine.controller.table.n, list(engine.messages)
    cached_before = engine.cached_tokens()
    it = engine.chat("Tell me a long story about the sea.", max_tokens=64)
    next(it)
    assert engine.controller.table.n > n_before
    it.close()  # the consumer stopped reading
    # the turn went; the cache keeps what it shared with the previous conversation, token for token
    n = engine.controller.table.n
    assert n <= n_before and engine.cached_tokens() == cached_before[:n] and engine.messages == msgs_before
    engine.controller.table.check(engine.kv)
    with pytest.raises(StopIteration):
        next(it)
    assert "".join(engine.chat("Hi", max_tokens=4)) and len(engine.messages) == len(msgs_before) + 2


def test_a_new_turn_ends_the_suspended_one(engine):
    msgs_before = list(engine.messages)
    first = engine.chat("Tell me a long story about the sea.", max_tokens=64)
    next(first)
    second = "".join(engine.chat("Say hi.", max_tokens=4))
    assert second
    assert engine.messages == msgs_before + [{"role": "user", "content": "Say hi."},
                                             {"role": "assistant", "content": second}]
    with pytest.raises(EngineError, match="newer turn"):
        next(first)
    assert len(engine.cached_tokens()) == engine.controller.table.n
    engine.controller.table.check(engine.kv)


def test_generate_starts_a_new_conversation(engine):
    assert "".join(engine.chat("Remember the word apple.", max_tokens=4))
    assert len(engine.messages) >= 2
    text = "".join(engine.generate([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Say hi."}], max_tokens=8))
    assert text and len(engine.messages) == 3 and engine.messages[0]["role"] == "system"
    n = engine.controller.table.n
    engine.controller.table.check(engine.kv)
    raw = "".join(engine.generate("The capital of France is", max_tokens=6))
    assert raw and engine.controller.table.n < n + 20
    with pytest.raises(EngineError, match="raw prompt"):
        engine.chat("and Spain?")
    engine.reset()
    assert engine.controller.table.n == 0 and engine.kv.info().n_cells_used == 0
    assert "".join(engine.chat("Hello", max_tokens=4))


def test_bad_input(engine, real_demo_model_path, tmp_path):
    for empty in ("", " \n\t"):
        with pytest.raises(EngineError, match="non-empty"):
            engine.chat(empty)
    with pytest.raises(EngineError):
        engine.generate([{"role": "user"}])
    with pytest.raises(EngineError, match="too small"):
        Engine(real_demo_model_path, ctx=2048, kv_budget=32)
    for ctx in (0, -1, 2.5):  # 0 fell back to the training context
        with pytest.raises(EngineError, match="ctx must be a positive"):
            Engine(real_demo_model_path, ctx=ctx)
    with pytest.raises(EngineError, match="training context of 8192"):
        Engine(real_demo_model_path, ctx=8193)
    with pytest.raises(EngineError, match="no kv_budget"):
        Engine(real_demo_model_path, ctx=2048, kv_budget=512, policy="full")
    with pytest.raises(EngineError, match="policy"):
        Engine(real_demo_model_path, ctx=2048, policy_params={"k": 0})
    with pytest.raises(EngineError):
        Engine(real_demo_model_path, ctx=2048, controller_params={"ema": 2.0})
    with Engine(real_demo_model_path, ctx=2048, kv_budget=512, policy_params={"recent": 32, "period": 4},
                controller_params={"n_q": 8, "importance_layers": (0, 10)}) as e:
        assert e.policy.recent == 32 and e.controller.layers == [0, 10]
        assert "".join(e.chat("Hi", max_tokens=4))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match="cannot load"):
        Engine(str(bad))


def test_text_decoder_streams_past_an_invalid_byte():
    d = text_decoder()
    # an invalid byte becomes U+FFFD and what follows it comes out at once; a character split across two pieces
    # comes out with its last byte
    out = [d.decode(piece) for piece in (b"a", b"\xff", b"b", b"\xe2\x82", b"\xac", b"\xc3")]
    assert out == ["a", "\ufffd", "b", "", "\u20ac", ""]
    assert d.decode(b"", final=True) == "\ufffd"  # a character cut off at the end


def test_common_prefix():
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 9, 3]) == 1


@pytest.fixture
def closed_engine(demo_model_path):
    e = Engine(demo_model_path, ctx=1024, kv_budget=256, n_threads=2)
    it = e.chat("Tell me a long story about the sea.", max_tokens=64)
    next(it)
    # close() with a turn suspended at a yield must neither wait for it (it used to hold a lock across the yield)
    # nor leave it runnable on freed memory
    closer = threading.Thread(target=e.close, daemon=True)
    closer.start()
    closer.join(timeout=60)
    assert not closer.is_alive(), "close() blocked on the suspended turn"
    return e, it


def test_close_ends_a_suspended_turn_and_everything_after_raises(closed_engine):
    e, it = closed_engine
    with pytest.raises(ClosedError, match="closed"):
        next(it)
    with pytest.raises(ClosedError, match="closed"):
        e.chat("Hi")
    with pytest.raises(ClosedError, match="closed"):
        e.generate("Hi")
    with pytest.raises(ClosedError, match="closed"):
        e.reset()
    with pytest.raises(ClosedError, match="closed"):
        e.stats()
    with pytest.raises(ClosedError, match="closed"):
        e.session.tokenize("Hi", add_special=True)  # aborted in llama.cpp before
    with pytest.raises(ClosedError, match="closed"):
        e.kv.info()
    with pytest.raises(ClosedError):
        e.session.chat_prompt([{"role": "user", "content": "Hi"}])
    with pytest.raises(ClosedError):
        e.session.decode([1], 0)
    e.close()  # twice is fine
    it.close()


def test_close_from_another_thread_stops_a_running_turn(demo_model_path):
    e = Engine(demo_model_path, ctx=1024, kv_budget=256, n_threads=2)
    got_one = threading.Event()
    outcome = []

    def consume():
        pieces = 0
        try:
            for _ in e.chat("Count from one to one thousand, in words.", max_tokens=500):
                pieces += 1
                got_one.set()
            outcome.append(("finished", pieces))
        except ClosedError:
            outcome.append(("closed", pieces))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert got_one.wait(timeout=120)
    closer = threading.Thread(target=e.close, daemon=True)
    closer.start()
    closer.join(timeout=60)
    reader.join(timeout=60)
    assert not closer.is_alive() and not reader.is_alive()
    # the reader was stopped well before its 500 tokens, by the cancel or by the closed turn
    assert outcome and outcome[0][1] < 100


def test_a_template_that_trims_replies_keeps_the_chat_going(real_demo_model_path):
    # llama.cpp's built-in Llama-3 template trims each message; this model's replies to it start with a newline,
    # so the second turn renders the first reply differently from how it was generated. The cache keeps the
    # common token prefix and decodes the rest again: the second reply is then the one a fresh conversation
    # gives to the same messages (policy full: no budget, so both caches hold the same tokens).
    with Engine(real_demo_model_path, ctx=1024, policy="full", n_threads=2, chat_template="llama3") as e:
        first = "".join(e.chat("My name is Ada. Say hello.", max_tokens=12))
        assert first != first.strip()  # the case this test is about
        n_first = e.controller.table.n
        second = "".join(e.chat("What is my name?", max_tokens=12))
        s = e.session
        rendered = s.tokenize(s.chat_prompt(e.messages[:3], template="llama3"), add_special=True)
        kept = common_prefix(e.cached_tokens(), rendered)
        assert kept == len(rendered)  # the cache holds the second turn's prompt exactly ...
        assert common_prefix(rendered, s.tokenize(s.chat_prompt(e.messages[:1], template="llama3"), add_special=True)
                             + s.tokenize(first, add_special=False, parse_special=False)) < n_first  # ... rewritten
        assert len(e.cached_tokens()) == e.controller.table.n
        fresh = "".join(e.generate(e.messages[:3], max_tokens=12))
    assert second == fresh


def test_h2o_drops_are_counted_in_the_events(demo_model_path):
    with Engine(demo_model_path, ctx=1024, kv_budget=128, policy="h2o", n_threads=2) as e:
        "".join(e.chat("Write a long story about a lighthouse keeper. " * 20, max_tokens=4))
        events = e.stats()["events"]
        assert events["drops"] == e.controller.stats.drops > 0
        assert e.controller.table.counts()["dropped"] == events["drops"]


def test_close_from_another_thread_stops_a_long_prefill(real_demo_model_path):
    # close() waits for the step in progress; a prefill is one step, so it now stops between two chunks instead
    # of running through the whole prompt (and the first tokens) first
    e = Engine(real_demo_model_path, ctx=2048, kv_budget=256, n_threads=2)
    progress, outcome = [], []
    first_chunk = threading.Event()

    def on_prefill(done, total):
        progress.append((done, total))
        first_chunk.set()

    def consume():
        try:
            outcome.append("".join(e.chat("Write a long story about a lighthouse keeper. " * 60, max_tokens=8,
                                          on_prefill=on_prefill)))
        except ClosedError as err:
            outcome.append(err)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert first_chunk.wait(timeout=120)
    closer = threading.Thread(target=e.close, daemon=True)
    closer.start()
    closer.join(timeout=120)
    reader.join(timeout=120)
    assert not closer.is_alive() and not reader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)
    done, total = progress[-1]
    assert done < total  # stopped part way through the prompt


def test_close_inside_a_callback_is_refused_not_a_deadlock(engine):
    refused = []

    def on_prefill(done, total):
        for call in (engine.close, engine.reset):
            try:
                call()
            except EngineError as err:
                refused.append(str(err))

    n_msgs = len(engine.messages)
    "".join(engine.chat("Hi", max_tokens=2, on_prefill=on_prefill))
    assert len(engine.messages) == n_msgs + 2  # the turn ran to its end
    assert len(refused) >= 2 and all("inside a callback" in r for r in refused)
    assert "".join(engine.chat("Hello", max_tokens=2))  # still open and usable


def test_recall_is_given_where_sentences_and_lines_end(demo_model_path):
    # the Engine tells recall which tokens end a sentence or a line, so that it keeps or leaves them whole: every
    # position of the prompt, True exactly where the token's text holds a newline or ends with . ! ?
    seen = []
    with Engine(demo_model_path, ctx=2048, kv_budget=256, n_threads=2) as e:
        recall = e.controller.recall

        def spy(span_ends=None):
            seen.append(span_ends)
            return recall(span_ends)

        e.controller.recall = spy
        text = "The keeper is Ada. She keeps bees!\nThe hive is old? Yes.\n" * 30
        "".join(e.chat(text + "Who is the keeper?", max_tokens=2))
        tokens = e.cached_tokens()
        ends = seen[-1]
        assert ends is not None and ends.dtype == bool and ends.size >= len(tokens) - 2
        pieces = [e.session.piece(t).decode("utf-8", "ignore") for t in tokens[: ends.size]]
        want = ["\n" in p or p.rstrip(" ").endswith((".", "!", "?")) for p in pieces]
        assert ends[: len(pieces)].tolist() == want and 60 <= sum(want) < len(want) // 2


def test_batch_sizes_reach_llama_cpp_and_split_the_prompt_alike(demo_model_path):
    # n_batch / n_ubatch (run's -b / -ub) are the context's: a prompt decoded in calls of 64 tokens gives the
    # logits of calls of 512 when both run graphs of 64 (the same ubatches); n_ubatch defaults to 512 as in
    # llama.cpp, is clamped to n_batch, and bounds the queries the importance node scores
    import llama_cpp
    from asrkf_gguf.engine import EngineError

    prompt = "Count with me: " + ", ".join(str(i) for i in range(150)) + "."
    logits = {}
    for n_batch in (64, 512):
        with Engine(demo_model_path, ctx=1024, policy="full", n_threads=2, n_batch=n_batch, n_ubatch=64) as e:
            assert llama_cpp.llama_n_batch(e.session.context.ctx) == n_batch
            assert llama_cpp.llama_n_ubatch(e.session.context.ctx) == 64
            ids = e.session.tokenize(prompt, add_special=True)
            assert len(ids) > 256
            logits[n_batch] = e.session.decode(ids, 0)
    assert np.array_equal(logits[64], logits[512])
    with Engine(demo_model_path, ctx=1024, kv_budget=256, n_threads=2, n_batch=200) as e:
        assert llama_cpp.llama_n_ubatch(e.session.context.ctx) == 200
    with Engine(demo_model_path, ctx=1024, policy="full", n_threads=2, n_batch=1024) as e:
        assert llama_cpp.llama_n_ubatch(e.session.context.ctx) == 512
    with Engine(demo_model_path, ctx=1024, kv_budget=256, n_threads=2, n_batch=100, n_ubatch=16) as e:
        assert llama_cpp.llama_n_ubatch(e.session.context.ctx) == 16
        assert e.controller.config.n_q == 16  # 32 would be refused by the importance node
        assert "".join(e.generate(prompt, max_tokens=4, temperature=0))
    with Engine(demo_model_path, ctx=1024, n_threads=2, n_batch=64, n_ubatch=256) as e:
        assert llama_cpp.llama_n_ubatch(e.session.context.ctx) == 64
    for bad in (0, None, 2.5):
        with pytest.raises(EngineError, match="n_batch must be a positive"):
            Engine(demo_model_path, ctx=1024, n_batch=bad)
    with pytest.raises(EngineError, match="n_ubatch must be a positive"):
        Engine(demo_model_path, ctx=1024, n_ubatch=-3)


def test_no_kv_offload_keeps_the_cache_on_the_cpu_as_llama_cpp_nkvo(demo_model_path):
    # llama.cpp's -nkvo: the layers' weights may run on a GPU while K/V and attention stay in host memory. The flag
    # must reach the context, and the controller must then take the CPU's settings (every layer scored, recall in
    # numpy), since the KV it scores and moves is in host memory
    kw = dict(ctx=1024, kv_budget=0.25, n_gpu_layers=99)
    with Engine(demo_model_path, **kw) as on, Engine(demo_model_path, kv_offload=False, **kw) as off:
        assert on.session.context.params.offload_kqv and not off.session.context.params.offload_kqv
        prompt = "Tell me about the sea and the ships that sail on it. " * 40
        got = "".join(off.chat(prompt, max_tokens=8, temperature=0))
        want = "".join(on.chat(prompt, max_tokens=8, temperature=0))
        assert off.controller.table.count(CellState.OFFLOADED) > 0
        assert not off.controller.config.recall_native
        assert off.controller.layers == off.kv.layers().tolist()
        import llama_cpp
        if not llama_cpp.llama_supports_gpu_offload():  # on a CPU build the flag changes nothing: same tokens
            assert got == want
