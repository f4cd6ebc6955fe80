"""Engine: the object an application embeds. It owns model, context, KV handle and controller.

    with Engine("model.gguf", ctx=32768, kv_budget=8192) as engine:
        for piece in engine.chat("Summarize this file: ..."):
            print(piece, end="", flush=True)
        print(engine.stats()["kv"])

One chat session per Engine; its KV persists across turns and the chat template comes from the GGUF. Use one
Engine per thread; `cancel()` may be called from any thread and stops the running generation between two tokens.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Callable, Dict, Iterator, List, Optional, Union

from .controller import Controller, ControllerConfig
from .generate import generate_tokens, sampler
from .kv import KVCache
from .llama import ContextOptions, LlamaSession
from .policies import make_policy


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
    return min(int(spec), ctx)


def device_defaults(n_gpu_layers: int) -> dict:
    """Controller settings by where the KV cache lives. On a GPU each scored layer is a second pass over its keys
    next to a decode step that is short, and recall scores every scored layer on the host: every 4th layer keeps
    most of the speed (docs/gpu.md: time to first token 9.8 -> 7.1 s, decode 1.03x -> 1.10x the full cache at 30k
    tokens and 25%) and found the same needles on the CPU evaluation (docs/evaluation.md). On the CPU the scoring
    is a small part of a step: every layer."""
    import llama_cpp

    on_gpu = n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
    return {"importance_every": 4} if on_gpu else {}


class Engine:
    def __init__(self, model_path: Optional[str] = None, *, ctx: Optional[int] = None,
                 kv_budget: Union[int, float, str, None] = None, policy: str = "asrkf", kv_type: str = "f16",
                 flash_attn: str = "auto", n_gpu_layers: int = 0, n_threads: Optional[int] = None,
                 policy_params: Optional[dict] = None, controller_params: Optional[dict] = None,
                 verbose: bool = False):
        """policy_params go to the policy (e.g. n_sinks, recent, k, period, low_quantile for asrkf);
        controller_params to ControllerConfig (ema, n_q, importance_layers, wr_window, rr_tokens, recovery)."""
        from .models import fetch_demo_model

        self.model_path = model_path or str(fetch_demo_model(progress=verbose))
        try:
            self.ctx = ctx or LlamaSession.n_ctx_train(self.model_path)
        except ValueError as err:
            raise EngineError(f"cannot load {self.model_path}: {err}") from None
        if self.ctx < 1:
            raise EngineError("ctx must be positive")
        try:
            self.policy = make_policy(policy, **(policy_params or {}))
        except (TypeError, ValueError) as err:
            raise EngineError(f"policy {policy!r}: {err}") from None
        budget = budget_cells(kv_budget, self.ctx) if self.policy.uses_budget else self.ctx
        if self.policy.uses_budget and budget <= self.policy.n_sinks + self.policy.recent:
            raise EngineError(f"a budget of {budget} cells is too small: {self.policy.n_sinks} sink and "
                              f"{self.policy.recent} recent tokens are always kept on the device")

        self._stack = ExitStack()
        try:
            self.session = self._stack.enter_context(LlamaSession(
                self.model_path, ContextOptions(n_ctx=budget, kv_type=kv_type, flash_attn=flash_attn,
                                                n_gpu_layers=n_gpu_layers, n_threads=n_threads), verbose=verbose))
        except (ValueError, RuntimeError) as err:
            self._stack.close()
            raise EngineError(f"cannot load {self.model_path}: {err} (truncated file or unsupported architecture?)") \
                from None
        try:
            self.kv = self._stack.enter_context(KVCache(ctx=self.session.context))
            self.controller = Controller(self.kv, self.policy, ControllerConfig(
                budget_cells=min(budget, self.kv.info().n_cells),
                **{**device_defaults(n_gpu_layers), **(controller_params or {})}))
        except Exception as err:
            self._stack.close()
            raise EngineError(str(err)) from None

        self.messages: List[Dict[str, str]] = []
        self._consumed = ""  # conversation text whose tokens are in the cache
        self._raw = False    # the sequence holds a raw prompt, not a chat
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.n_prompt_tokens = 0
        self.n_generated_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.last_prompt_phase_ms: dict = {}
        self.last_decode_phase_ms: dict = {}

    # ---- lifetime

    def close(self) -> None:
        with self._lock:
            self._stack.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- use

    def cancel(self) -> None:
        """Stop the running generation after the current token (any thread)."""
        self._cancel.set()

    def reset(self) -> None:
        """Start a new conversation: the cache and the host copies are cleared."""
        with self._lock:
            self.session.clear()
            self.controller.reset()
            self.messages = []
            self._consumed = ""
            self._raw = False

    def chat(self, message: str, *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
             on_prefill: Optional[Callable[[int, int], None]] = None) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply as text pieces (the KV cache carries the whole chat)."""
        if not isinstance(message, str) or not message:
            raise EngineError("the message must be a non-empty string")
        if self._raw:
            raise EngineError("the conversation started from a raw prompt; use generate(messages) or reset() to chat")
        return self._turn(self.messages + [{"role": "user", "content": message}], max_tokens, temperature, seed,
                          on_prefill)

    def generate(self, prompt: Union[str, List[Dict[str, str]]], *, max_tokens: int = 256, temperature: float = 0.0,
                 seed: int = 0, on_prefill: Optional[Callable[[int, int], None]] = None) -> Iterator[str]:
        """Stream a reply in a new conversation: to `messages` ([{role, content}, ...], chat template applied)
        or to a raw text prompt (no template). chat() continues the conversation afterwards."""
        if isinstance(prompt, str):
            if not prompt:
                raise EngineError("the prompt is empty")
            self.reset()
            return self._turn(None, max_tokens, temperature, seed, on_prefill, raw=prompt)
        if not prompt or not all(isinstance(m, dict) and m.get("role") and isinstance(m.get("content"), str)
                                 for m in prompt):
            raise EngineError("messages must be a non-empty list of {role, content} dicts")
        self.reset()
        return self._turn(list(prompt), max_tokens, temperature, seed, on_prefill)

    def _turn(self, messages, max_tokens, temperature, seed, on_prefill, raw: Optional[str] = None) -> Iterator[str]:
        if max_tokens < 0:
            raise EngineError("max_tokens cannot be negative")
        if not self._lock.acquire(blocking=False):
            raise EngineError("this Engine is already generating: use one Engine per thread")
        try:
            self._cancel.clear()
            s = self.session
            if raw is not None:
                full = raw
                tokens = s.tokenize(raw, add_special=True)
            else:
                full = s.chat_prompt(messages)
                if not full.startswith(self._consumed):
                    raise EngineError("the chat template rewrites earlier turns; the KV cache cannot be carried over")
                tokens = s.tokenize(full[len(self._consumed):], add_special=not self._consumed)
            need = self.controller.table.n + len(tokens) + max_tokens
            if need > self.ctx:
                raise EngineError(f"the conversation needs {need} positions, more than ctx {self.ctx}")
            start = self.controller.table.n
            it = generate_tokens(s, self.controller, tokens, max_tokens, pick=sampler(temperature, seed),
                                 stop_at_eog=True, on_prefill=on_prefill, recall=self.policy.reversible,
                                 cancel=self._cancel)
            pieces: List[bytes] = []
            pending = b""  # a UTF-8 character can span tokens
            try:
                while True:
                    try:
                        token = next(it)
                    except StopIteration as done:
                        res = done.value
                        break
                    piece = s.piece(token)
                    pieces.append(piece)
                    pending += piece
                    text = pending.decode("utf-8", "ignore")
                    if text.encode("utf-8") == pending:
                        pending = b""
                        yield text
                if pending:
                    yield pending.decode("utf-8", "replace")
            except BaseException:
                # abandoned or failed mid-turn: take the turn back out of the cache so the chat stays consistent
                it.close()
                s.seq_rm(start, -1)
                self.controller.table.truncate(start)
                raise
            reply = b"".join(pieces).decode("utf-8", "replace")
            self._raw = raw is not None
            self.messages = [] if self._raw else messages + [{"role": "assistant", "content": reply}]
            self._consumed = full + reply
            self.n_prompt_tokens += len(tokens)
            self.n_generated_tokens += len(res.tokens)
            self.prefill_seconds += res.prefill_seconds
            self.decode_seconds += res.decode_seconds
            self.last_prompt_phase_ms = res.prompt_phase_ms
            self.last_decode_phase_ms = res.decode_phase_ms
        finally:
            self._lock.release()

    def stats(self) -> dict:
        """Figures with the field names of the CLI's JSON."""
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
                       "thaws": st.thaws, "recoveries": dict(st.recoveries)},
            "recovery_log": list(st.recovery_log),
            "policy": self.policy.name,
            "model": self.model_path,
        }
