"""Token sampling through llama.cpp's sampler chain (llama_sampler_*), as llama-cli and llama-cpp-python sample.

    params = SamplingParams(temperature=0.8, top_k=40, repeat_penalty=1.1, seed=7)
    with Sampler(session, params) as pick:
        pick.prime(prompt_tokens)        # the penalties see the context, as in llama.cpp
        token = pick(logits)             # a row of logits (the last token's), not yet accepted
        pick.accept(token)
        pick.take_back(2)                # a rewalk: the last 2 accepted tokens are undone

Three llama.cpp samplers, each in its own chain: penalties (repeat / frequency / presence over the last
repeat_last_n tokens of the context), the grammar (GBNF, over the generated tokens only) and the rest: greedy at
temperature 0 (as llama-cpp-python: the first largest logit, what numpy's argmax picks, which is what runs when
greedy has no penalties or grammar before it), else top-k, top-p, min-p, temperature and a seeded draw, in
llama.cpp's default order. They are kept apart so that the history can be
rewound: the penalties and the grammar are reset and replayed, the random draw keeps its state.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from . import _lib  # noqa: F401  (must load before llama_cpp)
import llama_cpp

# llama.cpp's defaults (common/common.h, common_params_sampling) and the flags llama-cli gives them
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.0
DEFAULT_REPEAT_LAST_N = 64
RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # 0xFFFFFFFF: llama.cpp draws a seed

# llama_token_data {int32 id; float logit; float p;}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


@contextmanager
def _stderr_to_log():
    """llama.cpp's grammar parser writes its errors with fprintf(stderr) instead of its log: catch file descriptor 2
    while it parses and hand the text to llama.cpp's logger (asrkf_gguf.llama), so that the CLI's stderr stays one
    `error:` line without --verbose. (Another thread writing to stderr in that instant is caught too.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace").strip()
    if text:
        logging.getLogger("asrkf_gguf.llama").error("%s", text)


class SamplingError(ValueError):
    """A sampling setting llama.cpp cannot take; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    """llama-cpp-python's names; llama.cpp's defaults. seed None or -1: a random seed (the one drawn is reported
    by Sampler.seed). repeat_last_n: tokens the penalties look back over (0: none, -1: the whole context).
    grammar: a GBNF grammar (llama.cpp's format), e.g. from json_schema_grammar()."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    grammar: Optional[str] = None
    # llama.cpp's --ignore-eos: end-of-generation tokens are never drawn (their logits -inf), so a reply runs to
    # max_tokens (benchmarks of decode speed)
    ignore_eos: bool = False

    def __post_init__(self):
        def number(name, value, kind=float):
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
                    or value != value or value in (float("inf"), float("-inf")):
                raise SamplingError(f"{name} must be a finite {'number' if kind is float else 'integer'}, "
                                    f"got {value!r}")
            return value

        if number("temperature", self.temperature) < 0:
            raise SamplingError(f"temperature cannot be negative, got {self.temperature}")
        if number("top_k", self.top_k, int) < 0:
            raise SamplingError(f"top_k cannot be negative (0: off), got {self.top_k}")
        for name in ("top_p", "min_p"):
            if not 0 <= number(name, getattr(self, name)) <= 1:
                raise SamplingError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not number("repeat_penalty", self.repeat_penalty) > 0:
            raise SamplingError(f"repeat_penalty must be positive (1.0: off), got {self.repeat_penalty}")
        if number("repeat_last_n", self.repeat_last_n, int) < -1:
            raise SamplingError(f"repeat_last_n must be -1 (the context), 0 (off) or positive, got "
                                f"{self.repeat_last_n}")
        number("frequency_penalty", self.frequency_penalty)
        number("presence_penalty", self.presence_penalty)
        if self.seed is not None and (number("seed", self.seed, int) < -1 or self.seed > 0xFFFFFFFF):
            raise SamplingError(f"seed must be -1 (random) or in 0..{0xFFFFFFFF}, got {self.seed}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise SamplingError("grammar must be a non-empty GBNF string")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalties(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                            or self.presence_penalty != 0.0)


def json_schema_grammar(schema) -> str:
    """A GBNF grammar for a JSON schema (a dict or its JSON text), with llama-cpp-python's converter (the port of
    llama.cpp's json-schema-to-grammar)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        json.loads(text)
        return json_schema_to_gbnf(text)
    except Exception as err:  # the converter raises several types on schemas it cannot take
        raise SamplingError(f"cannot convert the JSON schema to a grammar: {err}") from None


def eog_tokens(model) -> np.ndarray:
    """Ids of a model's end-of-generation tokens (llama_vocab_is_eog), what llama.cpp's --ignore-eos biases to
    -inf; asked once per loaded model and kept on it (a loop over 150k ids through ctypes takes ~0.1 s)."""
    ids = getattr(model, "_asrkf_eog_ids", None)
    if ids is None:
        vocab = model.vocab
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        ids = np.array([i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)], np.int64)
        model._asrkf_eog_ids = ids
    return ids


class Sampler:
    """llama.cpp samplers for one generation; a callable logits -> token for generate_tokens (which calls accept()
    and take_back()). close() frees them (twice is fine)."""

    def __init__(self, session, params: SamplingParams = SamplingParams(), *, n_ctx: int = 0):
        """session: a LlamaSession (its model's vocabulary). n_ctx: the context for repeat_last_n=-1."""
        self.params = params
        self._stack = ExitStack()
        self._history: List[int] = []   # accepted tokens: the context, then the generated ones
        self._n_generated = 0           # of which generated (the grammar has seen these)
        if params.repeat_last_n == -1 and params.penalties and n_ctx < 1:
            raise SamplingError("repeat_last_n -1 (the context) needs the context's size: Sampler(n_ctx=...)")
        self._last_n = n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
        vocab = session.model.vocab
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.n_vocab = n_vocab
        try:
            self._penalties = self._chain(llama_cpp.llama_sampler_init_penalties(
                n_vocab, self._last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty)) \
                if params.penalties else None
            self._grammar = None
            if params.grammar is not None:
                with _stderr_to_log():
                    g = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
                if not g:
                    raise SamplingError("llama.cpp cannot parse the grammar (GBNF with a `root` rule; --verbose "
                                        "shows where)")
                self._grammar = self._chain(g)
            if params.greedy:
                self._draw = self._chain(llama_cpp.llama_sampler_init_greedy())
            else:
                seed = RANDOM_SEED if params.seed in (None, -1) else params.seed
                self._draw = self._chain(
                    llama_cpp.llama_sampler_init_top_k(params.top_k),
                    llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
                    llama_cpp.llama_sampler_init_min_p(params.min_p, 1),
                    llama_cpp.llama_sampler_init_temp(params.temperature),
                    llama_cpp.llama_sampler_init_dist(seed))
        except BaseException:
            self.close()
            raise
        self.seed: Optional[int] = None if params.greedy else int(llama_cpp.llama_sampler_get_seed(self._draw))
        # greedy with nothing before it: numpy's argmax picks what llama.cpp's greedy sampler picks (the first
        # largest logit; test_sampling checks both) in 5 us instead of 0.2-0.6 ms for a vocabulary copied into
        # llama_token_data, which is 4-13% of a decode step on a GPU
        self._argmax = params.greedy and self._penalties is None and self._grammar is None
        self._eog = eog_tokens(session.model) if params.ignore_eos else None
        self._data = np.empty(n_vocab, _TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=n_vocab,
            selected=-1, sorted=False)

    def _chain(self, *samplers):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            for s in samplers:
                if s:
                    llama_cpp.llama_sampler_free(s)
            raise MemoryError("llama_sampler_chain_init failed")
        holder = [chain]

        def free():
            if holder[0] is not None:
                llama_cpp.llama_sampler_free(holder[0])  # frees the samplers it holds
                holder[0] = None

        self._stack.callback(free)
        for s in samplers:
            if not s:
                raise SamplingError("llama.cpp refused a sampler setting")
            llama_cpp.llama_sampler_chain_add(chain, s)
        return chain

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    # ---- use

    def prime(self, context: Sequence[int]) -> None:
        """Start over on this context (the tokens before the first generated one): the penalties see its last
        repeat_last_n tokens, as llama.cpp accepts the prompt into its sampler; the grammar starts afresh."""
        self._history = [int(t) for t in context]
        self._n_generated = 0
        self._replay()

    def __call__(self, logits: np.ndarray) -> int:
        """The token drawn from a row of logits (the last decoded token's); not accepted yet."""
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"a row of {self.n_vocab} logits is expected, got shape {logits.shape}")
        if self._eog is not None and self._eog.size:
            logits = logits.copy()  # the caller's row stays as the model computed it
            logits[self._eog] = -np.inf
        if self._argmax:
            return int(np.argmax(logits))
        self._data["id"] = self._ids
        self._data["logit"] = logits
        self._data["p"] = 0.0
        arr = self._array
        arr.size, arr.selected, arr.sorted = self.n_vocab, -1, False
        for s in (self._penalties, self._grammar, self._draw):
            if s is not None:
                llama_cpp.llama_sampler_apply(s, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError("llama.cpp's sampler selected nothing")
        return int(arr.data[arr.selected].id)

    def accept(self, token: int) -> None:
        """The token was generated: the penalties and the grammar take it."""
        token = int(token)
        self._history.append(token)
        self._n_generated += 1
        for s in (self._penalties, self._grammar, self._draw):
            if s is not None:
                llama_cpp.llama_sampler_accept(s, token)

    def take_back(self, n: int) -> None:
        """Undo the last n accepted tokens (a rewalk decodes them again): the penalties and the grammar replay the
        history without them; the random draw goes on from where it is."""
        if not 0 <= n <= self._n_generated:
            raise ValueError(f"cannot take back {n} of {self._n_generated} generated tokens")
        if n:
            del self._history[len(self._history) - n:]
            self._n_generated -= n
            self._replay()

    def _replay(self) -> None:
        if self._penalties is not None:
            llama_cpp.llama_sampler_reset(self._penalties)
            for t in self._history[-self._last_n:] if self._last_n > 0 else ():
                llama_cpp.llama_sampler_accept(self._penalties, t)
        if self._grammar is not None:
            llama_cpp.llama_sampler_reset(self._grammar)
            for t in self._history[len(self._history) - self._n_generated:]:
                llama_cpp.llama_sampler_accept(self._grammar, t)

    @property
    def generated(self) -> List[int]:
        return self._history[len(self._history) - self._n_generated:]
