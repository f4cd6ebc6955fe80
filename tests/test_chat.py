"""Chat prompts from the GGUF's own Jinja template (llama.cpp's built-ins as the fallback), system prompts,
create_chat_completion's OpenAI shapes and its reuse of the cache, and the thread settings."""

import logging

import llama_cpp
import pytest

from asrkf_gguf.chat_format import ChatTemplate, builtin_template_names
from asrkf_gguf.engine import Engine, EngineError, common_prefix, cut_at_stop
from asrkf_gguf.llama import physical_cores
from asrkf_gguf.testmodels import TinyModelSpec, tiny_model

# brackets, so that the rendered text is plainly this template's and not a built-in's
BRACKETS = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
# chatml that refuses a system message, as Gemma's template does: llama.cpp's chatml (found from <|im_start|>) takes it
NO_SYSTEM = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_with(template):
    return str(tiny_model(TinyModelSpec(arch="llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
                                        chat_template=template)))


def test_the_ggufs_jinja_template_is_rendered(tmp_path):
    with Engine(tiny_with(BRACKETS), ctx=512, n_threads=2) as e:
        "".join(e.chat("Hi there", max_tokens=2, temperature=0.0))
        s = e.session
        want = s.tokenize("<s>[user]Hi there[assistant]", add_special=False)
        assert want[0] == 1 and want[1] != 1  # the template's BOS, once
        assert e.cached_tokens()[:len(want)] == want
        assert e._template.used == "jinja" and e._template.source == "gguf"


def test_a_template_that_refuses_falls_back_to_llama_cpp(caplog):
    path = tiny_with(NO_SYSTEM)
    with Engine(path, ctx=512, n_threads=2, system_prompt="Be brief.") as e:
        with caplog.at_level(logging.WARNING, logger="asrkf_gguf"):
            "".join(e.chat("Hi", max_tokens=2, temperature=0.0))
            assert e._template.used == "builtin" and "did not render" in caplog.text
            "".join(e.chat("Again", max_tokens=2, temperature=0.0))
        assert caplog.text.count("did not render") == 1  # said once, not at every turn
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        want = e.session.tokenize(e.session.chat_prompt(msgs, template="chatml"), add_special=True)
        assert e.cached_tokens()[:len(want)] == want
        assert e.messages[0] == {"role": "system", "content": "Be brief."}
        e.reset()  # a new conversation keeps the system prompt
        assert e.messages == [{"role": "system", "content": "Be brief."}]
    with Engine(path, ctx=512, n_threads=2) as e:  # without a system message the Jinja template renders
        "".join(e.chat("Hi", max_tokens=2, temperature=0.0))
        assert e._template.used == "jinja"


def test_a_builtin_name_is_llama_cpps_template(tiny_path):
    assert {"chatml", "llama3", "gemma"} <= set(builtin_template_names())
    with Engine(tiny_path, ctx=512, n_threads=2, chat_template="chatml") as e:
        t = ChatTemplate(e.session, "chatml")
        msgs = [{"role": "user", "content": "Hi"}]
        assert t.builtin and t.tokens(msgs) == e.session.tokenize(
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special=True)
        with pytest.raises(EngineError, match="system_prompt"):
            Engine(tiny_path, ctx=512, system_prompt="  ")


def test_the_demo_models_own_template_is_used(real_demo_model_path):
    # SmolLM2's Jinja template adds its default system message, which llama.cpp's built-in chatml does not
    with Engine(real_demo_model_path, ctx=1024, policy="full", n_threads=2) as e:
        "".join(e.chat("Hi", max_tokens=2, temperature=0.0))
        head = b"".join(e.session.piece(t) for t in e.cached_tokens()[:40])
        assert b"named SmolLM" in head and e._template.used == "jinja"
        assert "SmolLM" not in e.session.chat_prompt(e.messages[:1])  # what llama.cpp's built-in gave before


@pytest.fixture(scope="module")
def engine(demo_model_path):
    with Engine(demo_model_path, ctx=1024, kv_budget=256, n_threads=2) as e:
        yield e


def test_create_chat_completion_is_openai_shaped_and_reuses_the_cache(engine):
    msgs = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "My name is Ada. Say hello."}]
    out = engine.create_chat_completion(msgs, max_tokens=6, temperature=0.0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"] == engine.model_path
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    u = out["usage"]
    assert u["completion_tokens"] == 6 and u["total_tokens"] == u["prompt_tokens"] + 6
    # the follow-up carries the whole conversation; only what the cache does not hold is decoded
    cached = engine.cached_tokens()
    decoded_before = engine.n_prompt_tokens
    msgs2 = msgs + [choice["message"], {"role": "user", "content": "What is my name?"}]
    out2 = engine.create_chat_completion(msgs2, max_tokens=6, temperature=0.0)
    decoded = engine.n_prompt_tokens - decoded_before
    prompt2 = out2["usage"]["prompt_tokens"]
    assert decoded <= prompt2 - u["prompt_tokens"]
    assert common_prefix(cached, engine.cached_tokens()) >= u["prompt_tokens"]
    assert engine.messages == msgs2 + [out2["choices"][0]["message"]]


def test_create_chat_completion_streams_chunks(engine, real_demo_model_path):  # the real model stops by itself
    msgs = [{"role": "user", "content": "Count to three."}]
    chunks = list(engine.create_chat_completion(msgs, stream=True, max_tokens=40, temperature=0.0))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    last = chunks[-1]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text and engine.messages[-1] == {"role": "assistant", "content": text}
    assert engine.create_chat_completion(msgs, max_tokens=40, temperature=0.0)["choices"][0]["message"][
        "content"] == text


def test_stop_strings_cut_the_reply(engine):
    # each call from an empty cache, so that greedy decoding gives the same tokens up to the stop (a reply
    # decoded after a reused prefix may differ in the last bits of the logits)
    msgs = [{"role": "user", "content": "Describe a lighthouse in two sentences."}]
    engine.reset()
    full = engine.create_chat_completion(msgs, max_tokens=40, temperature=0.0)["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) > 8
    stop = " " + words[5]  # a word in the middle, with the space before it: spans token pieces
    want = full[:full.index(stop)]
    engine.reset()
    out = engine.create_chat_completion(msgs, max_tokens=40, temperature=0.0, stop=[stop, "never-there"])
    choice = out["choices"][0]
    assert choice["message"]["content"] == want and choice["finish_reason"] == "stop"
    assert engine.messages[-1] == {"role": "assistant", "content": want}  # the Engine keeps the cut reply too
    engine.reset()
    chunks = list(engine.create_chat_completion(msgs, max_tokens=40, temperature=0.0, stop=stop, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    follow = msgs + [choice["message"], {"role": "user", "content": "Thanks."}]
    assert engine.create_chat_completion(follow, max_tokens=4, temperature=0.0)["choices"][0]["message"]["content"]
    engine.controller.table.check(engine.kv)
    assert len(engine.cached_tokens()) == engine.controller.table.n
    with pytest.raises(EngineError, match="stop must be"):
        engine.create_chat_completion(msgs, stop=[""])


def test_cut_at_stop_holds_back_what_may_begin_a_stop():
    def run(pieces, stops):
        seen = []
        out = list(cut_at_stop(iter(pieces), stops, seen.append))
        return out, seen

    # "<e" might begin "<end>": held back until "nd>" shows it does; "<x" does not, so it goes out then
    assert run(["ab<", "e", "nd> more"], ["<end>"]) == (["ab"], ["ab"])
    assert run(["ab<", "x", "y"], ["<end>"]) == (["ab", "<x", "y"], [])
    assert run(["one tw", "o three"], ["wo th", "two"]) == (["one "], ["one "])  # the earliest stop wins
    assert run(["abc", "de"], ["zz"]) == (["abc", "de"], [])
    assert run(["tail <en"], ["<end>"]) == (["tail ", "<en"], [])  # no stop came: the held text goes out at the end


def test_create_chat_completion_bad_input_changes_nothing(engine):
    "".join(engine.chat("Hi", max_tokens=2))
    msgs, cached = list(engine.messages), engine.cached_tokens()
    for bad in ([], [{"role": "user"}], "Hi", [{"role": "user", "content": 3}]):
        with pytest.raises(EngineError, match="messages"):
            engine.create_chat_completion(bad)
    with pytest.raises(EngineError, match="response_format"):
        engine.create_chat_completion([{"role": "user", "content": "x"}], response_format={"type": "xml"})
    with pytest.raises(EngineError, match="more than ctx"):
        engine.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=5000)
    with pytest.raises(EngineError, match="max_tokens"):
        engine.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=-1)
    assert engine.messages == msgs and engine.cached_tokens() == cached


def test_max_tokens_none_fills_the_context(tiny_path):
    with Engine(tiny_path, ctx=128, n_threads=2, chat_template="chatml") as e:
        # a grammar that never completes leaves the end token out: the reply runs to the context's end
        out = e.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=None, seed=5,
                                       grammar="root ::= [a-z] root")
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["total_tokens"] == 128


def test_threads_reach_the_context(tiny_path):
    with Engine(tiny_path, ctx=256, n_threads=1, n_threads_batch=2) as e:
        assert llama_cpp.llama_n_threads(e.session.ctx) == 1
        assert llama_cpp.llama_n_threads_batch(e.session.ctx) == 2
    with Engine(tiny_path, ctx=256) as e:  # llama.cpp's default: the physical cores, for batches too
        assert llama_cpp.llama_n_threads(e.session.ctx) == physical_cores()
        assert llama_cpp.llama_n_threads_batch(e.session.ctx) == physical_cores()
    with pytest.raises(EngineError, match="n_threads must be a positive"):
        Engine(tiny_path, ctx=256, n_threads=0)
