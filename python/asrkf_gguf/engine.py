"""Engine: the object an application embeds. It owns model, context, KV handle and controller.

    with Engine("model.gguf", ctx=32768, kv_budget=8192) as engine:
        for piece in engine.chat("Summarize this file: ..."):
            print(piece, end="", flush=True)
        print(engine.stats()["kv"])

One chat session at a time per Engine, its KV persisting across turns; the chat template comes from the GGUF (its
Jinja template, or chat_template=). save(path) / load(path) write and restore the current conversation (KV cells,
host tier, controller table, tokens) as one file; new_chat() / switch(chat_id) keep several conversations over one
model, the idle ones parked in the host store (KVCache.park: their resident rows copied there, their offloaded
ones left in place), so that switching back restores the KV instead of prefilling. Tokens are drawn by llama.cpp's sampler chain (asrkf_gguf.sampling);
create_chat_completion() takes and returns what llama_cpp.Llama's does. Use one Engine per thread; `cancel()` may be
called from any thread and stops the running generation between two tokens, and close() from another thread cancels
and waits for the token step in progress. A turn whose iterator is not exhausted is taken back out of the cache when
the next turn starts, on reset() and on close(); its iterator then raises (EngineError, or ClosedError after
close). Any use after close() raises ClosedError.
"""

from __future__ import annotations

import codecs
import dataclasses
import numbers
import os
import threading
import time
import uuid
import weakref
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import sessions
from .chat_format import ChatTemplate
from .controller import Controller, ControllerConfig, ControllerStats
from .entropy import EntropyMonitor
from .errors import ClosedError, SessionError
from .generate import generate_tokens, rewind
from .kv import AsrkfError, KVCache
from .llama import KV_TYPES, ContextCreateError, ContextOptions, LlamaSession, ModelLoadError
from .policies import make_policy
from .sampling import Sampler, SamplingError, SamplingParams, json_schema_grammar
from .schedule import TokenTable

_KV_TYPE_NAMES = {v: k for k, v in KV_TYPES.items()}

# the sampling keywords chat() and generate() take beside temperature and seed (llama-cpp-python's names)
SAMPLING_KEYS = ("top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty",
                 "presence_penalty", "grammar", "ignore_eos")


class EngineError(ValueError):
    """Bad configuration or input; the message says which and why."""


def budget_cells(spec: Union[int, float, str, None], ctx: int) -> int:
    """Device KV cells from an int (cells), a float in (0, 1] (fraction of ctx) or their string forms."""
    if spec is None:
        return ctx
    if isinstance(spec, str):
        try:
            spec = float(spec) if "." in spec else int(spec)
        except ValueError:
            raise EngineError(f"kv_budget must be a number of cells or a fraction, got {spec!r}") from None
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise EngineError(f"a fractional kv_budget must be in (0, 1], got {spec}")
        spec = int(spec * ctx)
    if spec < 1:
        raise EngineError(f"kv_budget must be positive, got {spec}")
    if spec > ctx:
        raise EngineError(f"a kv_budget of {spec} cells is more than ctx {ctx}: the budget is part of the context")
    return int(spec)


def size_bytes(spec: Union[int, str]) -> int:
    """A size in bytes from an int or a string such as "512M", "4G", "1.5GiB", "100000" (binary units)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise EngineError(f"a size must be bytes or a string such as 512M or 4G, got {spec!r}")
    text = str(spec).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise EngineError(f"a size must be bytes or a string such as 512M or 4G, got {spec!r}") from None
    if not value > 0 or value != value:
        raise EngineError(f"a size must be positive, got {spec!r}")
    return int(value)


def device_defaults(n_gpu_layers: int, given: Optional[dict] = None) -> dict:
    """Controller settings by where the KV cache lives. On a GPU each scored layer is a second pass over its keys
    next to a decode step that is short, and recall scores every scored layer on the host: every 4th layer keeps
    most of the speed (docs/gpu.md: time to first token 9.8 -> 7.1 s, decode 1.03x -> 1.10x the full cache at 30k
    tokens and 25%) and found the same needles on the CPU evaluation (docs/evaluation.md). On the CPU the scoring
    is a small part of a step: every layer. Recall scores on the GPU too (recall_native)."""
    import llama_cpp

    from .rpc import has_local_gpu

    # a local GPU (llama_supports_gpu_offload is also true for a build with the RPC backend alone: layers on RPC
    # servers keep the CPU's settings, recall on the host reads K over the network once instead of twice)
    on_gpu = n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload()) and has_local_gpu()
    if not on_gpu:
        return {}
    # recall's products and softmax on the device that holds K (30k tokens: ~1 s of numpy on the host)
    out = {"recall_native": True}
    if not (given and ("importance_every" in given or "importance_layers" in given)):  # else the caller chose the layers
        out["importance_every"] = 4
    return out


@dataclasses.dataclass
class _ParkedChat:
    """An idle conversation: its K/V is parked in the host store under its chat id (KVCache.park), its Python side
    is kept here as it was (the objects themselves: the controller makes new ones for the next chat)."""
    table: TokenTable
    step: int
    n_queries: int
    scoring: bool
    entropy: EntropyMonitor
    stats: ControllerStats
    messages: List[Dict[str, str]]
    raw: bool
    tokens: List[int]
    n_tokens: int  # positions parked (resident and offloaded; an eviction policy's dropped ones are gone)
    # the tokens of its last offload batch still to leave, in order (Controller.ahead_queue): without them the
    # chat's next steps would pick a new batch and evict other tokens than the same chat run alone. Their host
    # copies went with the park; unparked, they are copied ahead again (Controller.set_ahead_queue)
    ahead: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int32))


class Engine:
    def __init__(self, model_path: Optional[str] = None, *, ctx: Optional[int] = None,
                 kv_budget: Union[int, float, str, None] = None, policy: str = "asrkf", kv_type: str = "f16",
                 flash_attn: str = "auto", n_gpu_layers: int = 0, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, n_batch: int = 512, n_ubatch: Optional[int] = None,
                 policy_params: Optional[dict] = None, controller_params: Optional[dict] = None,
                 chat_template: Optional[str] = None, system_prompt: Optional[str] = None,
                 host_budget: Union[int, str, None] = None, host_memory: str = "auto",
                 rpc: Union[str, Sequence[str], None] = None, kv_offload: bool = True, verbose: bool = False):
        """policy_params go to the policy (e.g. n_sinks, recent, k, period, low_quantile for asrkf);
        controller_params to ControllerConfig (ema, n_q, importance_layers, wr_window, rr_tokens, recovery).
        chat_template replaces the GGUF's: a Jinja template or a llama.cpp built-in name ("gemma", "llama3").
        system_prompt: the system message every conversation of chat() starts with (reset() keeps it).
        n_threads / n_threads_batch: CPU threads for generation / prompt batches (default: as llama.cpp, the
        physical cores, and n_threads for batches).
        n_batch / n_ubatch: tokens of a prompt decoded per call, and per graph within it (llama.cpp's -b / -ub;
        n_ubatch defaults to 512, at most n_batch). Under a budget a call also fits the budget beside the sink
        and recent tokens, and takes at most a quarter of it (ControllerConfig.chunk_share); the controller
        scores, offloads and recalls between calls, so a larger n_batch means fewer, larger moves during a prompt,
        scored by its last ubatch's queries.
        host_budget: host memory for offloaded K/V (bytes, or "512M", "4G"); past it a turn fails with
        HostBudgetError and is taken back, nothing is dropped (None: no limit).
        host_memory: where offloaded K/V lives on the host: "pinned" (the device's pinned memory, moved straight;
        slow to allocate) or "pageable" (allocated ahead on a background thread while a prompt decodes, every move
        staged through one pinned buffer); "auto": pageable when layers run on a GPU (n_gpu_layers != 0; on the
        H200 a 30k prompt's first token came 1.3 s sooner, docs/gpu.md), else pinned (on a CPU both are plain
        memory, and nothing is reserved on a background thread).
        rpc: llama.cpp's RPC servers, "HOST:PORT[,HOST:PORT]" or a list (each a ggml-rpc-server: python -m asrkf_gguf
        rpc-server): the n_gpu_layers layers llama.cpp offloads, and their KV cache, go to their devices (and the
        local GPUs), split by free memory as llama.cpp does (docs/placement.md).
        kv_offload: False is llama.cpp's -nkvo: the KV cache and attention stay in host memory on the CPU while the
        n_gpu_layers layers' weights run on the GPU (the controller then takes the CPU's settings)."""
        from .models import fetch_demo_model

        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise EngineError("system_prompt must be a non-empty string")
        self.model_path = model_path or str(fetch_demo_model(progress=verbose))
        if ctx is not None and (not isinstance(ctx, numbers.Integral) or ctx < 1):
            raise EngineError(f"ctx must be a positive number of tokens, got {ctx}")
        try:
            n_ctx_train = LlamaSession.n_ctx_train(self.model_path)
        except ValueError as err:
            raise EngineError(f"cannot load {self.model_path}: {err}") from None
        if ctx is not None and ctx > n_ctx_train:
            # positions beyond the training context are out of the model's distribution (no RoPE scaling here)
            raise EngineError(f"ctx {ctx} is beyond the model's training context of {n_ctx_train} tokens")
        self.ctx = int(ctx) if ctx is not None else n_ctx_train
        try:
            self.policy = make_policy(policy, **(policy_params or {}))
        except (TypeError, ValueError) as err:
            raise EngineError(f"policy {policy!r}: {err}") from None
        if kv_budget is not None and not self.policy.uses_budget:
            raise EngineError(f"policy {self.policy.name!r} keeps the whole context on the device: it takes no "
                              "kv_budget")
        budget = budget_cells(kv_budget, self.ctx) if self.policy.uses_budget else self.ctx
        if self.policy.uses_budget and budget <= self.policy.n_sinks + self.policy.recent:
            raise EngineError(f"a budget of {budget} cells is too small: {self.policy.n_sinks} sink and "
                              f"{self.policy.recent} recent tokens are always kept on the device")

        host_bytes = size_bytes(host_budget) if host_budget is not None else 0
        if host_memory not in ("auto", "pinned", "pageable"):
            raise EngineError(f"host_memory must be 'auto', 'pinned' or 'pageable', got {host_memory!r}")
        if host_memory == "auto":
            host_memory = "pageable" if n_gpu_layers != 0 and kv_offload else "pinned"
        rpc_servers: tuple = ()
        if rpc is not None:
            from .rpc import RpcError, parse_servers

            try:
                rpc_servers = tuple(parse_servers(rpc))
            except RpcError as err:
                raise EngineError(str(err)) from None
            if n_gpu_layers == 0:
                raise EngineError("rpc puts the layers that n_gpu_layers offloads on the RPC servers: with "
                                  "n_gpu_layers=0 nothing would go there (-1 or 99: every layer)")
        for name, value in (("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if (value is not None or name == "n_batch") and (isinstance(value, bool) or
                                                             not isinstance(value, numbers.Integral) or value < 1):
                raise EngineError(f"{name} must be a positive number of tokens, got {value!r}")
        n_ubatch = min(n_ubatch or 512, n_batch)  # llama.cpp clamps it too
        try:
            options = ContextOptions(n_ctx=budget, kv_type=kv_type, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers,
                                     n_threads=n_threads, n_threads_batch=n_threads_batch, rpc=rpc_servers,
                                     n_batch=int(n_batch), n_ubatch=int(n_ubatch), kv_offload=bool(kv_offload))
        except ValueError as err:
            raise EngineError(str(err)) from None
        self._stack = ExitStack()
        try:
            self.session = self._stack.enter_context(LlamaSession(self.model_path, options, verbose=verbose))
        except ModelLoadError as err:
            self._stack.close()
            raise EngineError(f"cannot load {self.model_path}: {err} (truncated file or unsupported architecture?)") \
                from None
        except ValueError as err:  # rpc.RpcError: a server that cannot be used, checked before anything loads
            self._stack.close()
            raise EngineError(str(err)) from None
        except ContextCreateError:
            self._stack.close()  # the message says how large a KV cache was asked for: a RuntimeError, not bad input
            raise
        try:
            self.kv = self._stack.enter_context(KVCache(ctx=self.session.context,
                                                        pinned_host=host_memory == "pinned"))
            # where the KV lives decides (kv_offload False: on the CPU, with the layers' weights on the GPU)
            on_gpu = device_defaults(n_gpu_layers if kv_offload else 0, controller_params)
            self.controller = Controller(self.kv, self.policy, ControllerConfig(
                budget_cells=min(budget, self.kv.info().n_cells),
                # (n_q: the importance node scores the last n_q queries of a ubatch, at most n_ubatch of them)
                **{**on_gpu, "host_budget_bytes": host_bytes,
                   "n_q": min(ControllerConfig.n_q, n_ubatch),
                   "reserve_ahead": host_memory == "pageable", **(controller_params or {})}))
            if on_gpu and self.policy.reversible and self.policy.uses_budget and budget < self.ctx:
                # the pinned staging of the moves, pinned now rather than inside a prompt's moves (115-151 ms of a
                # 30k-token prompt on the H200, docs/gpu.md): recall's swap moves up to the whole budget, and a move
                # stages at most 256 MiB at a time (copy_to_host's rounds)
                self.kv.reserve_staging(min(budget * self.kv.info().kv_bytes_per_token, 256 << 20))
        except Exception as err:
            self._stack.close()
            raise EngineError(str(err)) from None

        self.system_prompt = system_prompt
        self.messages: List[Dict[str, str]] = self._first_messages()
        self.chat_template = chat_template
        self._template: Optional[ChatTemplate] = None  # made at the first chat turn
        self._cached: List[int] = []  # the token ids at positions 0.. of the cache, as decoded
        self._span_end_of: Dict[int, bool] = {}  # token id -> a sentence or line ends with it (_span_ends)
        self._raw = False    # the sequence holds a raw prompt, not a chat
        # held while a turn computes (one next() of its iterator), never across a yield: close() and reset() from
        # another thread wait for the token step in progress; a consumer that stops between pieces blocks nothing
        self._step = threading.Lock()
        self._turn: Optional["weakref.ref[_Turn]"] = None  # the turn that chat() / generate() returned last
        self._turn_id = 0
        self._cancel = threading.Event()
        # set by close() / reset() from another thread while they wait for the step: a long prefill stops between
        # two chunks instead of running to its end (a decode stops at the cancel)
        self._ending: Optional[tuple] = None
        self._step_thread: Optional[int] = None  # the thread running a step (a callback must not wait for itself)
        self._closed = False
        self.n_prompt_tokens = 0
        self.n_generated_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.last_prompt_phase_ms: dict = {}
        self.last_decode_phase_ms: dict = {}
        self._chat_id = 0
        self._next_chat_id = 1
        self._parked: Dict[int, _ParkedChat] = {}  # idle conversations: their KV parked in the host store
        self._fingerprint: Optional[str] = None
        self.last_seed: Optional[int] = None  # the seed of the last turn's random draw (None: greedy)
        self.last_finish_reason: Optional[str] = None  # "stop" (end of generation), "length", "cancelled"
        self.last_usage: dict = {}  # the last turn's prompt_tokens, completion_tokens, total_tokens

    def _first_messages(self) -> List[Dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def chat_tokens(self, messages: List[Dict[str, str]]) -> List[int]:
        """The prompt token ids the chat template gives these messages, as chat() and generate() decode them (a
        server matches requests to conversations by them)."""
        self._live()
        try:
            if self._template is None:
                self._template = ChatTemplate(self.session, self.chat_template)
            return self._template.tokens(messages)
        except ValueError as err:
            raise EngineError(f"{err}: give one (chat_template=, --chat-template), e.g. chatml") from None

    # ---- lifetime

    def close(self) -> None:
        """Free the model and the cache. A turn in progress is taken back out of the cache first; a token step
        running in another thread is cancelled and waited for. Closing twice is fine."""
        if self._closed:
            return
        self._not_from_a_callback("close()")
        self._ending = (ClosedError, "the Engine was closed")  # a prefill in progress stops at its next chunk
        self._cancel.set()
        with self._step:
            if self._closed:
                return
            self._end_turn(ClosedError, "the Engine was closed")
            self._closed = True
            self._stack.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _not_from_a_callback(self, what: str) -> None:
        # the step lock is not reentrant: from a callback of the running step (on_prefill) this would wait forever
        if self._step_thread == threading.get_ident():
            raise EngineError(f"{what} cannot run inside a callback of the running turn: call cancel() there")

    def _live(self) -> None:
        if self._closed:
            raise ClosedError("the Engine is closed")

    # ---- use

    def cancel(self) -> None:
        """Stop the running generation after the current token (any thread)."""
        self._cancel.set()

    def reset(self) -> None:
        """Start a new conversation: the cache and the host copies are cleared (a turn in progress ends)."""
        self._live()
        self._not_from_a_callback("reset()")
        self._ending = (EngineError, "reset() ended this turn")
        self._cancel.set()
        try:
            with self._step:
                self._live()
                self._end_turn(EngineError, "reset() ended this turn")
                self._clear()
        finally:
            self._ending = None

    def chat(self, message: str, *, max_tokens: int = 256, temperature: float = 0.0, seed: Optional[int] = 0,
             on_prefill: Optional[Callable[[int, int], None]] = None, **sampling) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply as text pieces (the KV cache carries the whole chat).

        Sampling: temperature 0 is greedy (the default here); above it llama.cpp's chain draws with top_k,
        top_p, min_p (llama.cpp's defaults 40, 0.95, 0.05) and the seed (None or -1: a random one). Also
        repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty and grammar (GBNF): see
        asrkf_gguf.sampling.SamplingParams. A turn still in progress (its iterator not exhausted) is ended first
        and taken back out of the cache."""
        if not isinstance(message, str) or not message.strip():
            raise EngineError("the message must be a non-empty string")
        params = sampling_params(temperature=temperature, seed=seed, **sampling)
        return self._start(self.messages + [{"role": "user", "content": message}], None, max_tokens, params,
                           on_prefill)

    def generate(self, prompt: Union[str, List[Dict[str, str]]], *, max_tokens: int = 256, temperature: float = 0.0,
                 seed: Optional[int] = 0, on_prefill: Optional[Callable[[int, int], None]] = None,
                 **sampling) -> Iterator[str]:
        """Stream a reply in a new conversation: to `messages` ([{role, content}, ...], chat template applied)
        or to a raw text prompt (no template). chat() continues the conversation afterwards. Sampling as chat()."""
        params = sampling_params(temperature=temperature, seed=seed, **sampling)
        if isinstance(prompt, str):
            if not prompt:
                raise EngineError("the prompt is empty")
            return self._start(None, prompt, max_tokens, params, on_prefill, mode="new")
        return self._start(checked_messages(prompt), None, max_tokens, params, on_prefill, mode="new")

    def create_chat_completion(self, messages: List[Dict[str, str]], *, stream: bool = False,
                               max_tokens: Optional[int] = None, temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                               frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                               seed: Optional[int] = None, stop: Union[str, List[str], None] = None,
                               response_format: Optional[dict] = None, grammar=None, model: Optional[str] = None,
                               on_prefill: Optional[Callable[[int, int], None]] = None, **sampling):
        """llama_cpp.Llama.create_chat_completion's shape and defaults: `messages` is the whole conversation
        (OpenAI style). Returns a "chat.completion" dict, or with stream=True an iterator of "chat.completion.chunk"
        dicts (the role first, then content deltas, then one with finish_reason "stop" or "length").

        The cache keeps the longest token prefix the new prompt shares with what it holds, so a call with the
        previous messages, the reply and a new user message decodes only the new part. max_tokens None: up to the
        context. stop: strings that end the reply (not included; the reply in self.messages is cut there too).
        grammar: GBNF text or a llama_cpp.LlamaGrammar; response_format {"type": "json_object"} (with an
        optional "schema") constrains the reply to JSON. Cancelled replies end with finish_reason "stop"."""
        msgs = checked_messages(messages)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(x, str) and x for x in stops):
            raise EngineError("stop must be a non-empty string or a list of them")
        grammar = _grammar_text(grammar, response_format)
        params = sampling_params(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                 repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                                 presence_penalty=presence_penalty, seed=seed, grammar=grammar, **sampling)
        turn = self._start(msgs, None, max_tokens, params, on_prefill, mode="reuse")
        cid, created, name = f"chatcmpl-{uuid.uuid4()}", int(time.time()), model or self.model_path

        def finish() -> str:
            return "length" if self.last_finish_reason == "length" else "stop"

        def stopped(text: str) -> None:
            # cancel and run the turn out (the tokens it still holds go into the cache, as a cancel's do); the
            # reply the Engine keeps is cut where the caller's is
            self.cancel()
            for _ in turn:
                pass
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages[-1] = {"role": "assistant", "content": text}
            self.last_finish_reason = "stop"

        pieces = cut_at_stop(turn, stops, stopped) if stops else turn
        if stream:
            def chunks():
                def chunk(delta, reason=None):
                    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

                yield chunk({"role": "assistant"})
                for piece in pieces:
                    yield chunk({"content": piece})
                yield chunk({}, finish())

            return chunks()
        text = "".join(pieces)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish()}],
                "usage": dict(self.last_usage)}

    def _start(self, messages, raw: Optional[str], max_tokens: Optional[int], params: SamplingParams, on_prefill,
               mode: str = "chat") -> "_Turn":
        """Check the turn, end the one in progress and return the new turn's iterator (nothing decoded yet).
        mode: "chat" continues the conversation, "new" starts one, "reuse" continues unless it was a raw prompt."""
        self._live()
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral)
                                       or max_tokens < 0):
            raise EngineError(f"max_tokens must be a number of tokens, not negative, got {max_tokens!r}")
        if not self._step.acquire(blocking=False):
            raise EngineError("this Engine is already generating: use one Engine per thread")
        pick = None
        try:
            self._live()
            if self._raw and mode == "chat":
                raise EngineError("the conversation started from a raw prompt; use generate(messages) or reset() "
                                  "to chat")
            try:
                pick = Sampler(self.session, params, n_ctx=self.ctx)
            except SamplingError as err:
                raise EngineError(str(err)) from None
            s = self.session
            if raw is not None:
                tokens = s.tokenize(raw, add_special=True)
            else:
                tokens = self.chat_tokens(messages)
            if not tokens:
                raise EngineError("the prompt tokenizes to nothing")
            if max_tokens is None:
                max_tokens = max(0, self.ctx - len(tokens))
            need = len(tokens) + max_tokens
            if need > self.ctx:
                raise EngineError(f"the conversation needs {need} positions ({len(tokens)} of prompt + max_tokens "
                                  f"{max_tokens}), more than ctx {self.ctx}")
            # checks done: only now end the turn in progress and, for a new conversation, empty the cache
            self._end_turn(EngineError, "a newer turn (chat, generate) ended this one")
            if mode == "new" or (mode == "reuse" and self._raw):
                self._clear()
            self._cancel.clear()
            self._turn_id += 1
            turn = _Turn(self, self._run(self._turn_id, messages, raw, tokens, max_tokens, pick, on_prefill))
            self._turn = weakref.ref(turn)
            return turn
        except BaseException:
            if pick is not None:
                pick.close()
            raise
        finally:
            self._step.release()

    def _end_turn(self, error: type, why: str) -> None:
        """End the turn in progress, if any (the caller holds self._step)."""
        turn = self._turn() if self._turn is not None else None
        self._turn = None
        if turn is not None:
            turn._end(error, why)

    def _clear(self) -> None:
        self.session.clear()
        self.controller.reset()
        self.messages = self._first_messages()
        self._cached = []
        self._raw = False

    def _run(self, turn_id, messages, raw, tokens, max_tokens, pick, on_prefill) -> Iterator[str]:
        s = self.session
        # like llama-server: keep the longest prefix the cache already holds, token by token, and decode the rest.
        # Templates that rewrite earlier turns (Gemma and Llama-3 trim the replies) or a reply that tokenizes
        # differently from how it was generated cost a re-prefill from the first differing token, nothing more.
        # At least one token is decoded: the first generated token needs its logits.
        try:
            keep = rewind(s, self.controller, min(common_prefix(self._cached, tokens), len(tokens) - 1))
        except BaseException:
            pick.close()
            raise
        del self._cached[keep:]
        # the penalties see the whole prompt (its last repeat_last_n tokens), as llama.cpp's sampler does
        pick.prime(tokens)
        self.last_seed = pick.seed
        def prefill_step(done: int, total: int) -> None:
            if self._ending is not None:
                raise _TurnEnded(*self._ending)
            if on_prefill:
                on_prefill(done, total)

        it = generate_tokens(s, self.controller, tokens[keep:], max_tokens, pick=pick, stop_at_eog=True,
                             on_prefill=prefill_step, recall=self.policy.reversible, cancel=self._cancel,
                             span_ends=self._span_ends(tokens) if self.policy.reversible else None)
        pieces: List[bytes] = []
        decoder = text_decoder()
        try:
            while True:
                try:
                    token = next(it)
                except StopIteration as done:
                    res = done.value
                    break
                piece = s.piece(token)
                pieces.append(piece)
                text = decoder.decode(piece)
                if text:
                    yield text
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        except BaseException:
            # abandoned, ended or failed mid-turn: take the turn back out of the cache so the chat stays consistent
            # (unless a newer turn owns the cache by now: a generator the garbage collector finalizes late)
            it.close()
            if turn_id == self._turn_id and not self._closed:
                rewind(s, self.controller, keep)
            raise
        finally:
            pick.close()
        reply = b"".join(pieces).decode("utf-8", "replace")
        n_reply = len(res.tokens) - (res.finish_reason == "stop")
        self.last_finish_reason = res.finish_reason
        self.last_usage = {"prompt_tokens": len(tokens), "completion_tokens": n_reply,
                           "total_tokens": len(tokens) + n_reply}
        self._raw = raw is not None
        self.messages = self._first_messages() if self._raw else messages + [{"role": "assistant", "content": reply}]
        # the cache holds the prompt and every generated token but a final end-of-generation one
        self._cached = (self._cached + tokens[keep:] + res.tokens)[: self.controller.table.n]
        self.n_prompt_tokens += len(tokens) - keep
        self.n_generated_tokens += len(res.tokens)
        self.prefill_seconds += res.prefill_seconds
        self.decode_seconds += res.decode_seconds
        self.last_prompt_phase_ms = res.prompt_phase_ms
        self.last_decode_phase_ms = res.decode_phase_ms

    def _span_ends(self, tokens: Sequence[int]) -> np.ndarray:
        """Per token: does a sentence or line end with it (its text holds a newline or ends with . ! ? or their
        full-width forms)? Recall keeps or leaves such spans whole. Looked up once per token id."""
        ids = np.asarray(tokens, np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        known = self._span_end_of
        for t in uniq.tolist():
            if t not in known:
                text = self.session.piece(t).decode("utf-8", "ignore")
                known[t] = "\n" in text or text.rstrip(" ").endswith((".", "!", "?", "\u3002", "\uff01", "\uff1f"))
        return np.array([known[t] for t in uniq.tolist()], bool)[inv]

    # ---- sessions: save / load one conversation, several conversations in one Engine

    def save(self, path: Union[str, os.PathLike]) -> int:
        """Write the current conversation to one file (asrkf_gguf.sessions: tokens, KV cells, host tier with its
        checksums, controller table, versions, model fingerprint, sha256); returns its size. Nothing changes.
        Refused (EngineError) while a turn's iterator is not exhausted: finish or close it first."""
        self._live()
        if not self._step.acquire(blocking=False):
            raise EngineError("this Engine is generating: save between turns")
        try:
            self._live()
            turn = self._turn() if self._turn is not None else None
            if turn is not None and turn._ended is None and turn._gen.gi_frame is not None:
                raise EngineError("a turn is in progress: read its reply to the end (or close it) before save()")
            data = self._snapshot(digest=True)
        finally:
            self._step.release()
        sessions.write_file(os.fspath(path), data)  # atomic: the old file or the new one, never a torn one
        return len(data)

    def save_chat(self, chat_id: int, path: Union[str, os.PathLike]) -> int:
        """Write one conversation, the current one (as save()) or an idle one, to a session file; returns its size.
        An idle one is written as the file save() wrote while it was current (KVCache.parked_save_into); nothing
        changes in the Engine. A server moves idle
        conversations to disk with this, then drop_chat()."""
        self._live()
        if chat_id == self._chat_id:
            return self.save(path)
        parked = self._parked.get(chat_id)
        if parked is None:
            raise EngineError(f"no conversation {chat_id}; this Engine holds {self.chat_ids()}")
        # the current chat's turn, if one is in progress, goes on: the parked rows are not its cells, and the
        # handle's own lock orders the native calls
        data = self._snapshot(digest=True, parked=(chat_id, parked))
        sessions.write_file(os.fspath(path), data)
        return len(data)

    def saved_tokens(self, path: Union[str, os.PathLike]) -> List[int]:
        """The token ids a session file holds, if its header says it can be loaded into this Engine (the same
        model and cache settings); SessionError naming what differs otherwise. Reads only the header: load()
        still verifies the whole file (checksum, KV) and may refuse it."""
        self._live()
        header = sessions.read_header(os.fspath(path))
        sessions.compare(header.get("compat", {}), self._compat(model=True))
        try:
            return [int(t) for t in header["chat"]["tokens"]]
        except (KeyError, TypeError, ValueError) as err:
            raise SessionError(f"the session's chat cannot be read: {err}") from None

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Replace the current conversation with a saved one (save()). A file that is not a session, is damaged,
        or was saved with another model, KV type, context size, budget or policy is refused with SessionError
        before anything changes; a turn in progress ends (as on reset())."""
        self._live()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise SessionError(f"cannot read the session file: {err}") from None
        prepared = self._prepare(data, verify=True)
        with self._exclusive("load()"):
            self._apply(prepared)

    @property
    def chat_id(self) -> int:
        """The id of the current conversation (0 for the first one)."""
        return self._chat_id

    def chat_ids(self) -> List[int]:
        """Every conversation this Engine holds: the current one and the idle ones, ascending."""
        return sorted([self._chat_id, *self._parked])

    def new_chat(self) -> int:
        """Park the current conversation in host memory and start an empty one; returns its id (current from now
        on). A turn in progress ends first (as on reset())."""
        with self._exclusive("new_chat()"):
            parked = self._park()
            self._clear()
            self.controller.stats = ControllerStats()
            self._parked[self._chat_id] = parked
            self._chat_id, self._next_chat_id = self._next_chat_id, self._next_chat_id + 1
            return self._chat_id

    def switch(self, chat_id: int) -> None:
        """Make an idle conversation current: the current one is parked in host memory (its resident K/V rows
        copied to the host store, its offloaded ones left where they are) and the other's resident rows go back
        into their cells, checked; nothing is prefilled again. A turn in progress ends first."""
        self._live()
        if chat_id == self._chat_id:
            return
        if chat_id not in self._parked:
            raise EngineError(f"no conversation {chat_id}; this Engine holds {self.chat_ids()}")
        with self._exclusive("switch()"):
            mine = self._park()
            try:
                self._unpark(chat_id, self._parked[chat_id])
            except BaseException:
                self._restore_after_failed_switch(chat_id, mine)
                raise
            self._parked[self._chat_id] = mine
            del self._parked[chat_id]
            self._chat_id = chat_id

    def drop_chat(self, chat_id: int) -> None:
        """Forget an idle conversation and free its host memory (the current one: use reset())."""
        if chat_id == self._chat_id:
            raise EngineError("that is the current conversation: switch to another one first, or reset() it")
        self._live()
        if self._parked.pop(chat_id, None) is None:
            raise EngineError(f"no conversation {chat_id}; this Engine holds {self.chat_ids()}")
        self.kv.drop_parked(chat_id)  # the current chat's turn, if any, goes on (as in save_chat)

    def chat_memory(self) -> Dict[int, dict]:
        """Per conversation: device_bytes, the K/V bytes of its resident cells (0 for an idle one: it holds no
        cells; the context's device cache, stats()["kv"]["device_kv_bytes"], is shared), and host_bytes, its
        offloaded rows (current) or all of its rows (idle: parked in the host store)."""
        self._live()
        info = self.kv.info()
        tb = info.kv_bytes_per_token
        out = {cid: {"device_bytes": 0, "host_bytes": p.n_tokens * tb, "tokens": p.n_tokens}
               for cid, p in self._parked.items()}
        cur = {"device_bytes": info.n_cells_used * tb,
               "host_bytes": info.host_bytes_used - sum(m["host_bytes"] for m in out.values()),
               "tokens": self.controller.table.n}
        return {**out, self._chat_id: cur}

    def _park(self) -> "_ParkedChat":
        """The current conversation into the host store under its chat id (kv.park), its Python state into the
        returned record; the sequence is empty afterwards (the caller clears or unparks). The caller holds the
        step lock."""
        c = self.controller
        ahead = c.ahead_queue()  # before the park, which releases their copies
        try:
            self.kv.park(self._chat_id, c.seq_id)
        except AsrkfError as err:
            if err.code == -5:  # iSWA: the window layers' K/V are not in the managed cache
                raise EngineError(f"this model's conversations cannot be saved or parked: {err.message}") from None
            raise
        return _ParkedChat(table=c.table, step=c.step, n_queries=c._n_queries, scoring=c._scoring,
                           entropy=c.entropy, stats=c.stats, messages=self.messages, raw=self._raw,
                           tokens=self._cached, n_tokens=self.kv.parked_tokens(self._chat_id),
                           ahead=ahead)

    def _restore_after_failed_switch(self, chat_id: int, mine: "_ParkedChat") -> None:
        """A switch to chat_id failed after the current chat was parked: chat_id goes back to the host store if it
        left it (unpark refuses before it changes anything, so only a later failure gets here) and the current chat
        comes back. Should that fail too, it stays parked (nothing is lost) and an empty chat becomes current."""
        c = self.controller
        try:
            try:
                self.kv.parked_tokens(chat_id)
            except AsrkfError:  # unparked into the sequence: park it back as it is
                self.kv.park(chat_id, c.seq_id)
            self._unpark(self._chat_id, mine)
        except BaseException:
            self._clear()
            self.controller.stats = ControllerStats()
            self._parked[self._chat_id] = mine
            self._chat_id, self._next_chat_id = self._next_chat_id, self._next_chat_id + 1

    def _unpark(self, chat_id: int, p: "_ParkedChat") -> None:
        """A parked conversation back into the (empty) current sequence, with its Python state."""
        c = self.controller
        self.kv.unpark(chat_id, c.seq_id)
        c.table, c.step, c._n_queries = p.table, p.step, p.n_queries
        c.set_ahead_queue(p.ahead)
        c.entropy, c.stats = p.entropy, p.stats
        if c.policy.uses_importance:
            c._set_scoring(p.scoring)
        self.messages, self._raw, self._cached = p.messages, p.raw, p.tokens
        c.table.check(self.kv, c.seq_id)

    @contextmanager
    def _exclusive(self, what: str):
        """Hold the step lock with any turn in progress ended (taken back), as reset() does."""
        self._live()
        self._not_from_a_callback(what)
        self._ending = (EngineError, f"{what} ended this turn")
        self._cancel.set()
        try:
            with self._step:
                self._live()
                self._end_turn(EngineError, f"{what} ended this turn")
                yield
        finally:
            self._ending = None

    def _compat(self, model: bool) -> dict:
        """What a session must share with this Engine to be loaded (sessions.compare); model: the fingerprint too."""
        info = self.kv.info()
        out = {"llama_cpp_commit": sessions.LLAMA_CPP_COMMIT,
               "type_k": _KV_TYPE_NAMES.get(info.type_k, str(info.type_k)),
               "type_v": _KV_TYPE_NAMES.get(info.type_v, str(info.type_v)),
               "ctx": self.ctx, "budget_cells": self.controller.config.budget_cells, "n_cells": info.n_cells,
               "v_trans": info.v_trans, "policy": self.policy.name, "kv_bytes_per_token": info.kv_bytes_per_token}
        if model:
            if self._fingerprint is None:
                self._fingerprint = sessions.model_fingerprint(self.model_path)
            out.update(model_fingerprint=self._fingerprint, model_file=os.path.basename(self.model_path),
                       model_size=os.path.getsize(self.model_path))
        return out

    def _snapshot(self, *, digest: bool, parked: Optional[tuple] = None) -> np.ndarray:
        """The current conversation, or a parked one (parked=(chat_id, _ParkedChat)), as a session: a file's bytes
        with digest (save, save_chat), else without the sha256."""
        import llama_cpp

        from . import __version__

        c = self.controller
        p = parked[1] if parked is not None else _ParkedChat(
            table=c.table, step=c.step, n_queries=c._n_queries, scoring=c._scoring, entropy=c.entropy,
            stats=c.stats, messages=self.messages, raw=self._raw, tokens=self._cached, n_tokens=c.table.n)
        try:
            n_kv = self.kv.parked_size(parked[0]) if parked is not None else self.kv.session_size(c.seq_id)
        except AsrkfError as err:
            if err.code == -5:  # iSWA: the window layers' K/V are not in the managed cache
                raise EngineError(f"this model's conversations cannot be saved or parked: {err.message}") from None
            raise
        header = {
            "library": {"asrkf_gguf": __version__, "llama_cpp_python": getattr(llama_cpp, "__version__", ""),
                        "llama_cpp_commit": sessions.LLAMA_CPP_COMMIT},
            "fingerprint_method": sessions.FINGERPRINT_METHOD,
            "compat": self._compat(model=digest),
            "chat": {"messages": p.messages, "raw": p.raw, "tokens": list(p.tokens)},
            "controller": {"step": p.step, "n_queries": p.n_queries, "scoring": p.scoring,
                           "entropy": dataclasses.asdict(p.entropy), "stats": dataclasses.asdict(p.stats)},
        }
        table = sessions.pack_arrays(p.table.arrays())

        def fill(name: str, view: memoryview) -> None:
            if name == "kv":  # written in place: the K/V section is GBs for a long chat of a large model
                if parked is not None:
                    self.kv.parked_save_into(view, parked[0])
                else:
                    self.kv.session_save_into(view, c.seq_id)
            else:
                view[:] = table

        return sessions.encode_into(header, {"kv": n_kv, "table": len(table)}, fill, digest=digest)

    def _prepare(self, data, *, verify: bool) -> dict:
        """Everything of a session checked that can be without touching the cache; SessionError otherwise."""
        header, sections = sessions.decode(data, verify=verify)
        sessions.compare(header.get("compat", {}), self._compat(model=verify))
        try:
            table = TokenTable.from_arrays(sessions.unpack_arrays(bytes(sections["table"])))
            chat, ctl = header["chat"], header["controller"]
            tokens = [int(t) for t in chat["tokens"]]
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in chat["messages"]]
            fields = {f.name: f.init for f in dataclasses.fields(EntropyMonitor)}
            entropy = EntropyMonitor(**{k: v for k, v in ctl["entropy"].items() if fields.get(k)})
            for k, v in ctl["entropy"].items():
                if k in fields and not fields[k]:
                    setattr(entropy, k, float(v) if k in ("mean", "var", "threshold") else int(v))
            stats = ControllerStats(**ctl["stats"])
            state = {"table": table, "tokens": tokens, "messages": messages, "raw": bool(chat["raw"]),
                     "step": int(ctl["step"]), "n_queries": int(ctl["n_queries"]), "scoring": bool(ctl["scoring"]),
                     "entropy": entropy, "stats": stats, "kv": sections["kv"]}
        except (KeyError, TypeError, ValueError) as err:
            raise SessionError(f"the session's chat or controller state cannot be read: {err}") from None
        if len(tokens) != table.n:
            raise SessionError(f"the session holds {len(tokens)} tokens for {table.n} positions")
        return state

    def _apply(self, p: dict) -> None:
        """Replace the current conversation with a prepared session (the caller holds the step lock)."""
        c = self.controller
        try:
            self.kv.session_load(p["kv"], c.seq_id, check_only=True)
        except AsrkfError as err:
            raise SessionError(f"the session's KV cannot be loaded into this cache: {err.message}") from None
        try:
            self.kv.session_load(p["kv"], c.seq_id)
        except AsrkfError as err:
            if err.code in (-1, -2, -3):  # refused by its checks: nothing changed
                raise SessionError(f"the session's KV cannot be loaded: {err.message}") from None
            self._clear()
            raise
        c.table, c.step, c._n_queries = p["table"], p["step"], p["n_queries"]
        c.set_ahead_queue(np.empty(0, np.int32))  # a loaded chat starts a new offload batch (the file holds none)
        c.entropy, c.stats = p["entropy"], p["stats"]
        if c.policy.uses_importance:
            c._set_scoring(p["scoring"])
        self.messages, self._raw, self._cached = p["messages"], p["raw"], p["tokens"]
        try:
            c.table.check(self.kv, c.seq_id)
        except AssertionError as err:
            self._clear()
            raise SessionError(f"the session's token table and its KV disagree ({err}); the conversation was "
                               "cleared") from None

    def cached_tokens(self) -> List[int]:
        """The token ids the cache holds, position by position (the conversation as decoded)."""
        return list(self._cached)

    def stats(self) -> dict:
        """Figures with the field names of the CLI's JSON."""
        self._live()
        c = self.controller.table.counts()
        st = self.controller.stats
        logical = self.controller.table.n
        return {
            "n_prompt_tokens": self.n_prompt_tokens,
            "n_generated_tokens": self.n_generated_tokens,
            "kv": {
                "logical_tokens": logical,
                "budget_cells": self.controller.config.budget_cells,
                "active_cells_peak": st.active_peak,
                "active_cells_mean": st.active_sum / max(1, st.steps),
                "active_fraction_final": c["active"] / max(1, logical),
                "resident_cells_peak": st.resident_peak,
                "offloaded_tokens_final": c["offloaded"],
                "host_bytes_peak": st.host_bytes_peak,
                "device_kv_bytes": self.kv.info().device_kv_bytes,
            },
            "timing": {
                "prefill_tokens_per_s": self.n_prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0,
                "decode_tokens_per_s": self.n_generated_tokens / self.decode_seconds if self.decode_seconds else 0.0,
                "controller_us_per_token": 1e6 * st.seconds / max(1, logical),
                # the last turn's prompt: model decodes vs the controller's moves, folds and recall scoring
                "prompt_phase_ms": dict(self.last_prompt_phase_ms),
                "decode_phase_ms": dict(self.last_decode_phase_ms),
            },
            "events": {"freezes": st.freezes, "unfreezes": st.unfreezes, "offloads": st.offloads,
                       "thaws": st.thaws, "drops": st.drops, "recoveries": dict(st.recoveries)},
            "recovery_log": list(st.recovery_log),
            "policy": self.policy.name,
            "model": self.model_path,
        }


def cut_at_stop(pieces: Iterator[str], stops: List[str], on_stop: Callable[[str], None]) -> Iterator[str]:
    """Text pieces up to the first of the stop strings (not included). Text that may be the start of one is held
    back until it is not. At a stop, on_stop(the text before it) runs before the last piece is yielded."""
    sent, buf = [], ""
    for piece in pieces:
        buf += piece
        hits = [i for i in (buf.find(x) for x in stops) if i >= 0]
        if hits:
            sent.append(buf[:min(hits)])
            on_stop("".join(sent))
            if sent[-1]:
                yield sent[-1]
            return
        # the longest end of buf that begins a stop string waits for the next piece
        held = max((k for x in stops for k in range(1, min(len(x) - 1, len(buf)) + 1) if x.startswith(buf[-k:])),
                   default=0)
        out, buf = buf[:len(buf) - held], buf[len(buf) - held:]
        if out:
            sent.append(out)
            yield out
    if buf:
        yield buf


def sampling_params(**given) -> SamplingParams:
    """SamplingParams from keyword arguments, an unknown name or a bad value as EngineError."""
    unknown = sorted(set(given) - set(SAMPLING_KEYS) - {"temperature", "seed"})
    if unknown:
        raise EngineError(f"unknown sampling option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: "
                          f"temperature, seed, {', '.join(SAMPLING_KEYS)})")
    try:
        return SamplingParams(**given)
    except SamplingError as err:
        raise EngineError(str(err)) from None


def checked_messages(messages) -> List[Dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] and isinstance(m.get("content"), str)
            for m in messages):
        raise EngineError("messages must be a non-empty list of {role, content} dicts")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _grammar_text(grammar, response_format: Optional[dict]) -> Optional[str]:
    """GBNF text from a grammar (text or llama_cpp.LlamaGrammar) or an OpenAI response_format."""
    if grammar is not None and response_format is not None:
        raise EngineError("give grammar or response_format, not both")
    if grammar is not None:
        text = getattr(grammar, "_grammar", grammar)  # llama_cpp.LlamaGrammar keeps its GBNF text there
        if not isinstance(text, str):
            raise EngineError("grammar must be GBNF text or a llama_cpp.LlamaGrammar")
        return text
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") != "json_object":
        raise EngineError(f"response_format type must be 'text' or 'json_object', got {response_format.get('type')!r}")
    try:
        return json_schema_grammar(response_format.get("schema") or {})
    except SamplingError as err:
        raise EngineError(str(err)) from None


class _TurnEnded(Exception):
    """Raised inside a turn's prefill when close() or reset() in another thread is waiting for it."""

    def __init__(self, error: type, why: str):
        super().__init__(why)
        self.error = error
        self.why = why


class _Turn:
    """The iterator of one turn's text pieces: each next() runs the turn's generator under the engine's step lock."""

    def __init__(self, engine: Engine, gen: Iterator[str]):
        self._engine = engine
        self._gen = gen
        self._ended: Optional[tuple] = None  # (exception type, message) once close/reset/a newer turn ended it

    def __iter__(self) -> "_Turn":
        return self

    def __next__(self) -> str:
        with self._engine._step:
            if self._ended is not None:
                error, why = self._ended
                raise error(why)
            self._engine._step_thread = threading.get_ident()
            try:
                return next(self._gen)
            except _TurnEnded as ended:  # close() / reset() stopped the prefill; the turn was taken back
                self._ended = (ended.error, ended.why)
                raise ended.error(ended.why) from None
            finally:
                self._engine._step_thread = None

    def close(self) -> None:
        """Stop reading: the turn is taken back out of the cache."""
        with self._engine._step:
            self._gen.close()

    def _end(self, error: type, why: str) -> None:
        # the caller holds the step lock, so the generator is suspended at a yield (or never started)
        self._ended = (error, why)
        self._gen.close()


def text_decoder() -> codecs.IncrementalDecoder:
    """Bytes of token pieces to text as they come: a character split across tokens waits for its last byte, and
    an invalid byte becomes U+FFFD instead of holding back everything after it."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
