"""Engine: streaming chat with KV across turns, cancellation from another thread, consistent state after abandon."""

import threading

import pytest

from asrkf_gguf.engine import Engine, EngineError, budget_cells


def test_budget_specs():
    assert budget_cells(None, 4096) == 4096
    assert budget_cells(0.25, 4096) == 1024 and budget_cells("0.25", 4096) == 1024
    assert budget_cells(512, 4096) == 512 and budget_cells("512", 4096) == 512
    assert budget_cells(10**6, 4096) == 4096
    for bad in (0, -3, 1.5, "x", 0.0):
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


def test_cancel_from_another_thread_stops_generation(engine):
    pieces = []
    before = engine.n_generated_tokens
    # the timer starts with the first piece, so a slow prefill on a busy machine cannot eat the 0.3 s
    timer = threading.Timer(0.3, engine.cancel)
    for piece in engine.chat("Count from one to one thousand, in words.", max_tokens=1500):
        if not pieces:
            timer.start()
        pieces.append(piece)
    timer.join()
    # ~80 tokens/s here: a cancel after 0.3 s stops well before the model could finish counting
    assert 0 < engine.n_generated_tokens - before < 200
    engine.controller.table.check(engine.kv)
    assert "".join(engine.chat("And now?", max_tokens=4)) is not None  # usable afterwards


def test_an_abandoned_turn_is_taken_back(engine):
    n_before, msgs_before = engine.controller.table.n, list(engine.messages)
    it = engine.chat("Tell me a long story about the sea.", max_tokens=64)
    next(it)
    it.close()  # the consumer stopped reading
    assert engine.controller.table.n == n_before and engine.messages == msgs_before
    engine.controller.table.check(engine.kv)
    assert "".join(engine.chat("Hi", max_tokens=4)) is not None


def test_generate_starts_a_new_conversation(engine):
    engine.chat("Remember the word apple.", max_tokens=4)
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


def test_bad_input(engine, demo_model_path, tmp_path):
    with pytest.raises(EngineError):
        engine.chat("")
    with pytest.raises(EngineError):
        engine.generate([{"role": "user"}])
    with pytest.raises(EngineError, match="too small"):
        Engine(demo_model_path, ctx=2048, kv_budget=32)
    with pytest.raises(EngineError, match="policy"):
        Engine(demo_model_path, ctx=2048, policy_params={"k": 0})
    with pytest.raises(EngineError):
        Engine(demo_model_path, ctx=2048, controller_params={"ema": 2.0})
    with Engine(demo_model_path, ctx=2048, kv_budget=512, policy_params={"recent": 32, "period": 4},
                controller_params={"n_q": 8, "importance_layers": (0, 10)}) as e:
        assert e.policy.recent == 32 and e.controller.layers == [0, 10]
        assert "".join(e.chat("Hi", max_tokens=4))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match="cannot load"):
        Engine(str(bad))
