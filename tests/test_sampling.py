"""Sampling through llama.cpp's sampler chain: greedy is argmax, the penalties see the prompt and survive rewalks,
grammars and JSON schemas constrain the reply, seeds reproduce, bad settings are refused with the state intact."""

import json

import numpy as np
import pytest

from asrkf_gguf.engine import Engine, EngineError
from asrkf_gguf.generate import generate_tokens, greedy
from asrkf_gguf.sampling import Sampler, SamplingError, SamplingParams, json_schema_grammar
from conftest import session


@pytest.fixture(scope="module")
def engine(demo_model_path):
    with Engine(demo_model_path, ctx=1024, kv_budget=192, n_threads=2) as e:
        yield e


@pytest.fixture(scope="module")
def tiny_session(tiny_path):
    with session(tiny_path, n_ctx=256) as s:
        yield s


def row(n_vocab, high):
    """Logits: 0 everywhere, then the tokens of `high` from the largest down."""
    logits = np.zeros(n_vocab, np.float32)
    for rank, token in enumerate(high):
        logits[token] = 10.0 - rank
    return logits


def test_temperature_0_is_numpy_argmax_bit_for_bit(engine):
    # the same prompt through the same Engine (asrkf, 192 cells: offloads, recall, maybe rewalks), once with the
    # numpy argmax the generation loop used before the sampler chain, once with the chain at temperature 0
    prompt = "Write a long story about a lighthouse keeper and his dog. " * 20
    tokens = engine.session.tokenize(prompt, add_special=True)
    assert len(tokens) > 192
    engine.reset()
    # with the sentence ends the Engine gives recall, so that both runs move the same tokens
    it = generate_tokens(engine.session, engine.controller, tokens, 40, pick=greedy, stop_at_eog=True, recall=True,
                         span_ends=engine._span_ends(tokens))
    argmax_ids = list(it)
    engine.reset()
    "".join(engine.generate(prompt, max_tokens=40, temperature=0.0))
    chain_ids = engine.cached_tokens()[len(tokens):]
    assert len(argmax_ids) >= 20
    assert chain_ids[:len(argmax_ids)] == argmax_ids
    engine.reset()


def test_llama_cpps_greedy_sampler_is_argmax(tiny_session):
    # plain greedy runs as numpy's argmax; llama.cpp's greedy sampler (what runs behind penalties or a grammar)
    # must pick the same token, ties included (the first largest logit)
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(tiny_session.n_vocab).astype(np.float32) for _ in range(20)]
    tie = np.zeros(tiny_session.n_vocab, np.float32)
    tie[[7, 300, 41]] = 3.0
    with Sampler(tiny_session, SamplingParams(temperature=0)) as fast, \
            Sampler(tiny_session, SamplingParams(temperature=0)) as chain:
        chain._argmax = False  # through llama_sampler_apply
        assert fast._argmax
        for logits in rows + [tie]:
            assert fast(logits) == chain(logits) == int(np.argmax(logits))
        assert chain(tie) == 7


def test_penalties_see_the_prompt_and_the_reply(engine, real_demo_model_path):  # greedy repeats: the real model
    prompt = "one two three four one two three four one two three four one two"
    plain = engine.generate(prompt, max_tokens=12, temperature=0.0)
    "".join(plain)
    tokens = engine.session.tokenize(prompt, add_special=True)
    reply = engine.cached_tokens()[len(tokens):]
    assert set(reply) & set(tokens)  # greedy repeats the prompt: the case this test is about
    "".join(engine.generate(prompt, max_tokens=12, temperature=0.0, presence_penalty=50.0, repeat_last_n=-1))
    reply = engine.cached_tokens()[len(tokens):]
    assert len(reply) >= 6
    assert not set(reply) & set(tokens)  # the prompt was accepted into the penalties
    assert len(set(reply)) == len(reply)  # and every generated token
    engine.reset()


def test_take_back_replays_the_penalties_and_the_window(tiny_session):
    logits = row(tiny_session.n_vocab, [10, 11, 12])
    with Sampler(tiny_session, SamplingParams(temperature=0, presence_penalty=100.0, repeat_last_n=-1),
                 n_ctx=256) as pick:
        pick.prime([5])
        assert pick(logits) == 10
        pick.accept(10)
        assert pick(logits) == 11
        pick.accept(11)
        assert pick(logits) == 12
        pick.take_back(1)   # a rewalk took 11 back: it may be drawn again, 10 may not
        assert pick(logits) == 11 and pick.generated == [10]
        pick.take_back(1)
        assert pick(logits) == 10
        with pytest.raises(ValueError):
            pick.take_back(1)  # the context is not the sampler's to take back
    with Sampler(tiny_session, SamplingParams(temperature=0, presence_penalty=100.0, repeat_last_n=1)) as pick:
        pick.prime([10])    # only the last token is penalized: 10, then 11 once 10 has left the window
        assert pick(logits) == 11
        pick.accept(11)
        assert pick(logits) == 10


def test_take_back_replays_the_grammar(tiny_session):
    s = tiny_session
    a, b, c = 260, 261, 262  # the tiny vocabulary's pieces "a", "b", "c" (testmodels._spm_vocab)
    assert [s.piece(t) for t in (a, b, c)] == [b"a", b"b", b"c"]
    logits = row(s.n_vocab, [a, c, b])
    with Sampler(s, SamplingParams(temperature=0, grammar='root ::= "a" "b" | "c" "a"')) as pick:
        pick.prime([1])
        assert pick(logits) == a
        pick.accept(a)
        assert pick(logits) == b  # after "a" only "b"
        pick.take_back(1)
        assert pick(logits) == a  # the grammar is back at its start, not after "a"
        pick.accept(c)
        assert pick(logits) == a


def test_a_seed_reproduces_and_a_random_one_is_reported(engine):
    msgs = [{"role": "user", "content": "Name three colours."}]
    one = "".join(engine.generate(msgs, max_tokens=16, temperature=1.0, seed=7))
    assert engine.last_seed == 7
    assert "".join(engine.generate(msgs, max_tokens=16, temperature=1.0, seed=7)) == one
    drawn = "".join(engine.generate(msgs, max_tokens=16, temperature=1.0, seed=None))
    seed = engine.last_seed
    assert seed is not None and 0 <= seed < 2**32
    assert "".join(engine.generate(msgs, max_tokens=16, temperature=1.0, seed=seed)) == drawn
    "".join(engine.generate(msgs, max_tokens=4, temperature=0.0))
    assert engine.last_seed is None  # greedy draws nothing


def test_a_json_schema_constrains_the_reply(engine):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"]}
    out = engine.create_chat_completion([{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
                                        max_tokens=40, temperature=0.0,
                                        response_format={"type": "json_object", "schema": schema})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"  # the grammar ends the reply: only the end token is left
    assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")
    text = "".join(engine.generate("The sky is", max_tokens=8, grammar='root ::= " blue" | " green"'))
    assert text in (" blue", " green") and engine.last_finish_reason == "stop"
    engine.reset()


@pytest.mark.parametrize("kw,words", [
    ({"temperature": -1.0}, "temperature cannot be negative"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 1.5}, "top_p must be in [0, 1]"),
    ({"min_p": float("nan")}, "min_p must be a finite"),
    ({"repeat_penalty": 0.0}, "repeat_penalty must be positive"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"seed": -5}, "seed must be -1"),
    ({"top_q": 3}, "unknown sampling option top_q"),
    ({"grammar": "root ::= ("}, "cannot parse the grammar"),
])
def test_bad_sampling_settings_are_refused_and_change_nothing(engine, kw, words):
    engine.reset()
    first = "".join(engine.chat("Say hi.", max_tokens=4))
    msgs, cached = list(engine.messages), engine.cached_tokens()
    with pytest.raises(EngineError, match=words.replace("[", r"\[").replace("]", r"\]")):
        engine.chat("And again?", max_tokens=4, **kw)
    assert engine.messages == msgs and engine.cached_tokens() == cached
    engine.controller.table.check(engine.kv)
    assert first and "".join(engine.chat("And again?", max_tokens=4))


def test_sampling_params_and_schema_errors():
    assert SamplingParams().temperature == 0.8 and SamplingParams().top_k == 40  # llama.cpp's defaults
    assert SamplingParams().min_p == 0.05 and SamplingParams().repeat_last_n == 64
    with pytest.raises(SamplingError):
        SamplingParams(top_k=True)
    with pytest.raises(SamplingError, match="JSON schema"):
        json_schema_grammar('{"type": 5}')
    assert "root ::=" in json_schema_grammar({"type": "integer"})


def test_ignore_eos_never_draws_an_end_of_generation_token(tiny_session):
    # llama.cpp's --ignore-eos: a row whose largest logit is an end-of-generation token draws the next best, greedy
    # and sampled; without it, greedy draws the EOG token
    from asrkf_gguf.sampling import eog_tokens

    eog = eog_tokens(tiny_session.model)
    assert eog.size >= 1
    with Sampler(tiny_session, SamplingParams(temperature=0.0)) as plain:
        row = np.zeros(plain.n_vocab, np.float32)
        row[eog[0]], row[7] = 10.0, 5.0
        assert plain(row) == eog[0]
    for temperature in (0.0, 0.8):
        with Sampler(tiny_session, SamplingParams(temperature=temperature, seed=3, ignore_eos=True)) as s:
            assert s(row) == 7
            assert row[eog[0]] == 10.0  # the caller's logits are not changed
    with pytest.raises(SamplingError):
        SamplingParams(ignore_eos="yes")
