"""Sessions: save / load one conversation (native K/V export, Engine, CLI) and several conversations in one Engine.

A saved and restored conversation must continue exactly as if it had never left: same cells, frozen flags, host
copies and controller table, so the same logits bit for bit and the same greedy replies. A damaged or incompatible
session is refused with its reason and changes nothing.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from asrkf_gguf import KVCache, _lib
from asrkf_gguf.engine import Engine, EngineError
from asrkf_gguf.errors import SessionError
from asrkf_gguf.kv import AsrkfError

from conftest import KV_CASES, random_tokens, session

N_CELLS = 128
CHUNK = 32


def fill(s, kv, tokens, n):
    """Decode tokens[:n] in chunks on a cache of N_CELLS cells, offloading the middle whenever it fills, then
    freeze a few positions: the sequence has active, frozen and offloaded positions."""
    for i in range(0, n, CHUNK):
        if kv.info().n_cells_used + CHUNK > N_CELLS:
            pos, _, _ = kv.cells()
            kv.offload(pos[4:60])
        s.decode(tokens[i:i + CHUNK], i)
    kv.freeze([0, 1, n - 10])


def state_of(kv):
    pos, st, cell = kv.cells()
    return pos.tolist(), st.tolist(), cell.tolist(), kv.offloaded().tolist()


def tiny_session(path, kv_type="f16", fa="on", n_ctx=N_CELLS):
    return session(path, n_ctx=n_ctx, n_batch=CHUNK, n_ubatch=CHUNK, flash_attn=fa, kv_type=kv_type)


@pytest.mark.parametrize("kv_type,fa", KV_CASES[:3])
def test_native_round_trip_is_bit_identical(tiny_path, kv_type, fa):
    tokens = random_tokens(220)
    with tiny_session(tiny_path, kv_type, fa) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv, tokens, 160)
        before = state_of(kv)
        blob = kv.session_save()
        assert state_of(kv) == before  # saving changes nothing
        kv.check()
        assert kv.info().n_offloaded > 0 and kv.info().n_frozen == 3
        kv.thaw(kv.offloaded()[10:20])
        want = s.decode(tokens[160:200], 160)
    with tiny_session(tiny_path, kv_type, fa) as s, KVCache(ctx=s.context) as kv:
        s.decode(tokens[:40], 0)  # something to replace: the load empties the sequence first
        kv.session_load(blob)
        kv.check()
        assert state_of(kv) == before
        kv.thaw(kv.offloaded()[10:20])
        got = s.decode(tokens[160:200], 160)
    assert np.array_equal(want, got)


@pytest.mark.parametrize("kv_type,fa", KV_CASES[:3])
def test_park_and_unpark_restore_a_sequence_bit_identically(tiny_path, kv_type, fa):
    """Parking moves a conversation into the host store and empties the sequence; another conversation can use the
    cells meanwhile; unparking restores cells, flags and host copies, so later decodes compute the same logits."""
    tokens, other = random_tokens(220), random_tokens(220, seed=5)
    with tiny_session(tiny_path, kv_type, fa) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv, tokens, 160)
        kv.thaw(kv.offloaded()[10:20])
        want = s.decode(tokens[160:200], 160)
    with tiny_session(tiny_path, kv_type, fa) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv, tokens, 160)
        before, blob = state_of(kv), bytes(kv.session_save())
        n, tb = len(before[0]) + len(before[3]), kv.info().kv_bytes_per_token
        kv.park(7)
        assert state_of(kv) == ([], [], [], [])  # the sequence is empty: its cells are free for another chat
        assert kv.parked_tokens(7) == n and kv.info().host_bytes_used == n * tb
        out = bytearray(kv.parked_size(7))
        kv.parked_save_into(out, 7)
        assert bytes(out) == blob  # what session_save wrote before the park
        kv.check()
        fill(s, kv, other, 128)  # another conversation in the same cells, with its own host copies
        other_state = state_of(kv)
        kv.park(8)
        s.clear()  # llama.cpp's clear empties the cache, not the parked conversations
        kv.unpark(7)
        kv.check()
        assert state_of(kv) == before
        kv.thaw(kv.offloaded()[10:20])
        got = s.decode(tokens[160:200], 160)
        s.clear()
        kv.unpark(8)
        assert state_of(kv) == other_state
    assert np.array_equal(want, got)


def test_park_refuses_bad_calls_and_a_corrupted_row_changes_nothing(tiny_path):
    tokens = random_tokens(220)
    with tiny_session(tiny_path) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv, tokens, 160)
        before = state_of(kv)
        resident_pos, offloaded_pos = before[0][5], before[3][3]
        kv.park(1)
        with pytest.raises(AsrkfError) as err:
            kv.park(1)  # the id is taken (and the sequence is empty anyway)
        assert err.value.code == -1
        with pytest.raises(AsrkfError) as err:
            kv.unpark(2)
        assert err.value.code == -1 and "no sequence is parked" in err.value.message
        s.decode(tokens[:8], 0)
        with pytest.raises(AsrkfError) as err:
            kv.unpark(1)  # into a sequence that holds something
        assert err.value.code == -2 and "not empty" in err.value.message
        assert kv.parked_tokens(1) == len(before[0]) + len(before[3])
        s.clear()
        # a row that was resident when parked is checked before it goes back: refused, nothing changed
        kv.debug_corrupt_parked(1, resident_pos, byte=3)
        with pytest.raises(AsrkfError) as err:
            kv.unpark(1)
        assert err.value.code == -3 and f"position {resident_pos} " in err.value.message
        assert state_of(kv) == ([], [], [], []) and kv.parked_tokens(1) == len(before[0]) + len(before[3])
        with pytest.raises(AsrkfError) as err:
            kv.check()
        assert err.value.code == -3
        with pytest.raises(AsrkfError) as err:  # and it is not written to a session file either
            kv.parked_save_into(bytearray(kv.parked_size(1)), 1)
        assert err.value.code == -3
        kv.debug_corrupt_parked(1, resident_pos, byte=3)  # flipped back
        kv.debug_corrupt_parked(1, offloaded_pos, byte=9)
        with pytest.raises(AsrkfError) as err:
            kv.parked_save_into(bytearray(kv.parked_size(1)), 1)
        assert err.value.code == -3 and f"position {offloaded_pos} " in err.value.message
        kv.unpark(1)  # an offloaded row is checked when it is thawed, as always
        with pytest.raises(AsrkfError) as err:
            kv.thaw([offloaded_pos])
        assert err.value.code == -3
        kv.park(3)
        with pytest.raises(AsrkfError) as err:
            kv.close(force=False)  # parked rows would be lost
        assert err.value.code == -2 and "parked" in err.value.message
        kv.drop_parked(3)
        assert kv.info().host_bytes_used == 0
        kv.check()
        with pytest.raises(AsrkfError):
            kv.drop_parked(3)


@pytest.fixture
def saved(tiny_path):
    tokens = random_tokens(220)
    with tiny_session(tiny_path) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv, tokens, 160)
        return tokens, bytes(kv.session_save())


def flipped(blob, where):
    b = bytearray(blob)
    b[where] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize("where,code,words", [(-100, -3, "checksum"),  # a K/V row of the last entry
                                              (200, -1, "table failed its checksum"),  # an entry's position or cell
                                              (0, -1, "bad magic")])
def test_a_corrupted_buffer_is_refused_and_changes_nothing(tiny_path, saved, where, code, words):
    tokens, blob = saved
    with tiny_session(tiny_path) as s, KVCache(ctx=s.context) as kv:
        fill(s, kv, tokens[::-1], 96)  # another conversation, which must survive the refused load
        before = state_of(kv)
        with pytest.raises(AsrkfError) as err:
            kv.session_load(flipped(blob, where))
        assert err.value.code == code and words in err.value.message
        assert state_of(kv) == before
        kv.check()
        assert kv.info().host_bytes_used == len(before[3]) * kv.info().kv_bytes_per_token
        kv.session_load(blob)  # and the intact one still loads
        kv.check()
        with pytest.raises(AsrkfError) as err:
            kv.session_load(blob[:-1])
        assert "bytes, its header says" in err.value.message


def test_an_incompatible_buffer_is_refused(tiny_paths, saved):
    _, blob = saved
    cases = [(tiny_paths["llama-gqa"], dict(kv_type="q8_0"), "another --kv-type"),
             (tiny_paths["llama-gqa"], dict(n_ctx=512), "another device budget"),  # 128 cells are padded to 256
             (tiny_paths["llama-gqa"], dict(fa="off"), "flash attention"),
             (tiny_paths["llama-hd128"], {}, "another model")]
    for path, kw, words in cases:
        with tiny_session(path, **kw) as s, KVCache(ctx=s.context) as kv:
            s.decode(random_tokens(20), 0)
            before = state_of(kv)
            with pytest.raises(AsrkfError) as err:
                kv.session_load(blob)
            assert err.value.code == -1 and words in err.value.message, err.value.message
            assert state_of(kv) == before


# ---- Engine and CLI on the demo model

KW = dict(ctx=1024, kv_budget=96, n_threads=2)
A = ["Write a story about a dragon who learns to bake bread.", "Continue the story: the dragon opens a bakery."]
B = ["What did the dragon bake? Answer in one sentence."]
MAX = 40


def replies(engine, turns):
    return ["".join(engine.chat(t, max_tokens=MAX)) for t in turns]


@pytest.fixture(scope="module")
def reference(demo_model_path):
    """The replies of A + B in one conversation, and a session file saved after A (with offloaded tokens)."""
    with Engine(demo_model_path, **KW) as e:
        full = replies(e, A + B)
    return full


@pytest.fixture(scope="module")
def after_a(demo_model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "a.session"
    with Engine(demo_model_path, **KW) as e:
        got = replies(e, A)
        counts = e.controller.table.counts()
        e.save(path)
        arrays = e.controller.table.arrays()
        state = (e.cached_tokens(), list(e.messages), e.controller.step, e.kv.offloaded().tolist())
    return path, got, counts, arrays, state


def test_engine_save_load_continues_exactly(demo_model_path, reference, after_a):
    path, got_a, counts, arrays, state = after_a
    assert got_a == reference[: len(A)]
    assert counts["offloaded"] > 0  # the host tier travels in the file
    with Engine(demo_model_path, **KW) as e:
        e.load(path)
        assert (e.cached_tokens(), e.messages, e.controller.step, e.kv.offloaded().tolist()) == state
        for name, a in e.controller.table.arrays().items():
            assert np.array_equal(a, arrays[name]), name
        e.controller.table.check(e.kv)
        assert replies(e, B) == reference[len(A):]


def test_a_corrupted_or_incompatible_file_changes_nothing(demo_model_path, after_a, tmp_path):
    path, *_ = after_a
    data = path.read_bytes()
    bad = tmp_path / "bad.session"
    with Engine(demo_model_path, **KW) as e, Engine(demo_model_path, **KW) as twin:
        replies(e, ["Tell me about cats."])
        replies(twin, ["Tell me about cats."])
        before = (e.cached_tokens(), list(e.messages), e.controller.table.arrays(), state_of(e.kv))
        for where in (len(data) // 2, 40, len(data) - 1):
            bad.write_bytes(flipped(data, where))
            with pytest.raises(SessionError, match="checksum"):
                e.load(bad)
        bad.write_bytes(data[:-10])
        with pytest.raises(SessionError, match="checksum"):
            e.load(bad)
        after = (e.cached_tokens(), list(e.messages), e.controller.table.arrays(), state_of(e.kv))
        assert after[:2] == before[:2] and after[3] == before[3]
        assert all(np.array_equal(after[2][k], before[2][k]) for k in before[2])
        assert replies(e, B) == replies(twin, B)  # still usable, as if nothing had happened
    for kw, words in ((dict(KW, kv_budget=128), "device budget"), (dict(KW, ctx=2048), "context size"),
                      (dict(KW, kv_type="q8_0", flash_attn="on"), "K cache type")):
        with Engine(demo_model_path, **kw) as e:
            with pytest.raises(SessionError, match=words):
                e.load(path)
            assert e.cached_tokens() == [] and e.controller.table.n == 0


def test_another_model_is_refused(tiny_path, after_a):
    path, *_ = after_a
    with Engine(tiny_path, ctx=KW["ctx"], kv_budget=KW["kv_budget"], n_threads=2) as e:
        with pytest.raises(SessionError, match="another model|K/V bytes per token"):
            e.load(path)


def cli(*args, timeout=600):
    env = dict(os.environ)
    env["ASRKF_GGUF_LIB_DIR"] = str(_lib.lib_dir())
    return subprocess.run([sys.executable, "-m", "asrkf_gguf", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_save_then_load_gives_the_replies_of_one_run(real_demo_model_path, reference, tmp_path):
    files = {}
    for name, turns in (("a", A), ("b", B), ("ab", A + B)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(turns))
    common = [real_demo_model_path, "--temp", "0", "--max-tokens", str(MAX), "--ctx", str(KW["ctx"]), "--kv-budget",
              str(KW["kv_budget"]), "--threads", "2", "--json"]
    ses = tmp_path / "chat.session"
    r1 = cli(*common, "--turns-file", str(files["a"]), "--save-session", str(ses))
    assert r1.returncode == 0, r1.stderr
    assert json.loads(r1.stdout)["kv"]["offloaded_tokens_final"] > 0  # the host tier is in the file
    r2 = cli(*common, "--load-session", str(ses), "--turns-file", str(files["b"]))
    assert r2.returncode == 0, r2.stderr
    r3 = cli(*common, "--turns-file", str(files["ab"]))
    assert r3.returncode == 0, r3.stderr
    both = json.loads(r1.stdout)["turns"] + json.loads(r2.stdout)["turns"]
    assert both == json.loads(r3.stdout)["turns"] == reference

    data = ses.read_bytes()
    ses.write_bytes(flipped(data, len(data) // 3))
    r4 = cli(*common, "--load-session", str(ses), "--turns-file", str(files["b"]))
    assert r4.returncode == 2 and "checksum" in r4.stderr and "Traceback" not in r4.stderr
    ses.write_bytes(data)
    other_budget = [a if a != str(KW["kv_budget"]) else "128" for a in common]
    r5 = cli(*other_budget, "--load-session", str(ses), "--turns-file", str(files["b"]))
    assert r5.returncode == 2 and "device budget" in r5.stderr


STORY = "The hive stands at the end of the orchard, under the old pear tree, and every morning the bees "
C1 = ["My name is Ada and I keep bees. " + STORY * 4 + "Say hello.", "What do I keep?"]
C2 = ["Write a short poem about the sea. " + STORY * 4, "Now one about the mountains."]


def switch_between_two_chats(path, kw, max_tokens=MAX, while_parked=None):
    """Each chat alone in its own Engine, then both in one Engine: C1's first turn, new_chat, C2's first turn
    (while_parked(engine, first, second) runs here), switch back for C1's second turn, then to C2 for its second.
    Asserts that the interleaved replies are the replies alone and that no earlier turn was decoded again."""
    def run(e, turns):
        return ["".join(e.chat(t, max_tokens=max_tokens)) for t in turns]

    with Engine(path, **kw) as e:
        alone1, prompt1 = run(e, C1), e.n_prompt_tokens
    with Engine(path, **kw) as e:
        alone2, prompt2 = run(e, C2), e.n_prompt_tokens
    with Engine(path, **kw) as e:
        first = e.chat_id
        got1 = run(e, C1[:1])
        assert e.controller.table.counts()["offloaded"] > 0  # parked with its host tier
        second = e.new_chat()
        assert e.cached_tokens() == [] and e.chat_ids() == [first, second]
        got2 = run(e, C2[:1])
        if while_parked:
            while_parked(e, first, second)
        e.switch(first)
        got1 += run(e, C1[1:])
        e.switch(second)
        got2 += run(e, C2[1:])
        e.controller.table.check(e.kv)
        # switching restored the KV: no token of an earlier turn was decoded again
        assert e.n_prompt_tokens == prompt1 + prompt2
        e.drop_chat(first)
        assert e.chat_ids() == [second]
    assert got1 == alone1 and got2 == alone2


def test_switching_chats_gives_each_chat_its_own_replies(demo_model_path, tmp_path):
    def while_parked(e, first, second):
        # a parked chat is written as save() wrote it while current (its resident rows are host copies now)
        e.switch(first)
        size = e.save(tmp_path / "current.session")
        e.switch(second)
        assert e.save_chat(first, tmp_path / "parked.session") == size
        assert (tmp_path / "parked.session").read_bytes() == (tmp_path / "current.session").read_bytes()
        mem = e.chat_memory()
        tb = e.kv.info().kv_bytes_per_token
        # parked: host memory only, every position of it
        assert mem[first]["device_bytes"] == 0 and mem[first]["host_bytes"] == mem[first]["tokens"] * tb > 0
        assert e.kv.info().host_bytes_used == mem[first]["host_bytes"] + mem[second]["host_bytes"]
        assert mem[second]["device_bytes"] > 0

    switch_between_two_chats(demo_model_path, KW, while_parked=while_parked)


def test_a_model_with_window_layers_is_refused_clearly(iswa_model, tmp_path):
    # iSWA: the window layers' K/V live outside the managed cache, so a session would miss them
    with Engine(iswa_model[0], ctx=1024, kv_budget=512, n_threads=2, chat_template="gemma") as e:
        "".join(e.chat("Hello", max_tokens=4))
        before = e.cached_tokens()
        for call in (lambda: e.save(tmp_path / "g.session"), e.new_chat):
            with pytest.raises(EngineError, match="sliding-window"):
                call()
        assert e.cached_tokens() == before and e.chat_ids() == [0] and not (tmp_path / "g.session").exists()


def test_saving_or_dropping_an_idle_chat_leaves_the_current_turn_running(demo_model_path, tmp_path):
    with Engine(demo_model_path, **KW) as e:
        "".join(e.chat(A[0], max_tokens=MAX))
        first = e.chat_id
        e.new_chat()
        want = "".join(e.chat(B[0], max_tokens=MAX))
        e.reset()
        it = e.chat(B[0], max_tokens=MAX)
        got = next(it)
        assert e.save_chat(first, tmp_path / "idle.session") > 0  # while the turn is suspended
        e.drop_chat(first)
        got += "".join(it)
        assert got == want and e.chat_ids() == [e.chat_id]
        assert e.kv.info().host_bytes_used == e.chat_memory()[e.chat_id]["host_bytes"]
        e.kv.check()


def test_a_parked_chat_keeps_the_rest_of_its_offload_batch(demo_model_path):
    # the tokens of a chat's last offload batch still to leave are its own: another chat's would evict the wrong
    # tokens (or none), and the chat's replies would differ from the same chat run alone
    def rest(c):
        return c.ahead_queue()

    with Engine(demo_model_path, **KW) as e:
        first = e.chat_id
        "".join(e.chat(C1[0], max_tokens=6))
        mine = rest(e.controller)
        assert mine.size > 0  # a batch of 3 (96 // 32) copied ahead, not all gone yet
        e.new_chat()
        assert rest(e.controller).size == 0
        "".join(e.chat(C2[0], max_tokens=4))
        theirs = rest(e.controller)
        e.switch(first)
        assert np.array_equal(rest(e.controller), mine)
        second = [c for c in e.chat_ids() if c != first][0]
        e.switch(second)
        assert np.array_equal(rest(e.controller), theirs)
        e.controller.table.check(e.kv)


def test_a_loaded_session_does_not_inherit_the_offload_batch_of_the_chat_it_replaces(demo_model_path, tmp_path):
    # the rest of a batch names positions of the chat that was current: after a load they would be other tokens
    with Engine(demo_model_path, **KW) as e:
        "".join(e.chat(C2[0], max_tokens=4))
        e.save(tmp_path / "two.session")
        e.reset()
        "".join(e.chat(C1[0], max_tokens=6))
        assert e.controller.ahead_queue().size > 0
        e.load(tmp_path / "two.session")
        assert e.controller.ahead_queue().size == 0
        e.controller.table.check(e.kv)
