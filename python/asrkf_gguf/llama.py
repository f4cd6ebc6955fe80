"""Model and context setup on llama-cpp-python's low-level wrappers, with explicit positions.

llama-cpp-python's high-level Llama ties positions to n_ctx; a freeze/offload session decodes logical positions
far beyond the physical cache, so it decodes through llama_decode with its own positions.
"""

from __future__ import annotations

import ctypes
import logging
import os
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from . import _lib  # noqa: F401  (must load before llama_cpp)
from .errors import ClosedError
import llama_cpp
from llama_cpp import _internals

# llama.cpp's log goes to the logger "asrkf_gguf.llama": an application decides what it shows. Without any logging
# configuration Python prints warnings and errors (as llama.cpp would) and drops the INFO lines llama.cpp writes for
# every load and graph reservation; ASRKF_GGUF_VERBOSE=1 shows everything. The CLI shows nothing without --verbose.
log = logging.getLogger(__name__)
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_LOG_CONT = 5  # the continuation of the previous message, at its level
_last_level = [logging.INFO]
if os.environ.get("ASRKF_GGUF_VERBOSE"):
    log.setLevel(logging.DEBUG)
    log.addHandler(logging.StreamHandler())


@llama_cpp.llama_log_callback
def _log_callback(level, text, user_data):
    if level != _GGML_LOG_CONT:
        _last_level[0] = _GGML_LEVELS.get(level, logging.INFO)
    if log.isEnabledFor(_last_level[0]):
        log.log(_last_level[0], "%s", text.decode("utf-8", "replace").rstrip("\n"))


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))

# bytes of one K or V element in each cache type (the quantized ones: a block of 32 with its scale)
_KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class ModelLoadError(ValueError):
    """llama.cpp could not load the model file."""


class ContextCreateError(RuntimeError):
    """llama.cpp loaded the model but could not create a context: memory, or settings it refuses."""


def kv_cache_bytes(model, n_ctx: int, kv_type: str, kv_type_v: Optional[str] = None) -> int:
    """K and V bytes of n_ctx cells for a loaded model (llama_model *), from its dimensions. An upper bound for
    iSWA models, whose window layers keep only their window."""
    def meta_int(key: str) -> int:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return int(buf.value) if n > 0 and buf.value.isdigit() else 0

    arch = ctypes.create_string_buffer(64)
    llama_cpp.llama_model_meta_val_str(model, b"general.architecture", arch, len(arch))
    n_head = max(1, llama_cpp.llama_model_n_head(model))
    head_k = meta_int(f"{arch.value.decode()}.attention.key_length") or llama_cpp.llama_model_n_embd(model) // n_head
    head_v = meta_int(f"{arch.value.decode()}.attention.value_length") or head_k
    per_layer = llama_cpp.llama_model_n_head_kv(model) * (head_k * _KV_TYPE_BYTES[kv_type] +
                                                          head_v * _KV_TYPE_BYTES[kv_type_v or kv_type])
    return int(n_ctx * llama_cpp.llama_model_n_layer(model) * per_layer)

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}


@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int = 2048            # device KV cells
    n_batch: int = 512
    n_ubatch: int = 512
    kv_type: str = "f16"         # K and V cache type
    kv_type_v: Optional[str] = None  # V cache type when it differs from K's (llama.cpp allows it; quantized V needs FA)
    flash_attn: str = "auto"
    n_threads: Optional[int] = None        # None: the physical cores, as llama.cpp
    n_threads_batch: Optional[int] = None  # prompt batches; None: n_threads, as llama.cpp
    n_gpu_layers: int = 0
    n_seq_max: int = 1
    # llama.cpp's RPC servers ("HOST:PORT", asrkf_gguf.rpc): the layers n_gpu_layers offloads, and their KV, go to
    # their devices (and the local GPUs) by llama.cpp's rules
    rpc: Tuple[str, ...] = ()
    # llama.cpp's -nkvo when False: the KV cache and attention stay on the CPU while the layers' weights are offloaded
    kv_offload: bool = True

    def __post_init__(self):
        for t in (self.kv_type, self.kv_type_v or self.kv_type):
            if t not in KV_TYPES:
                raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {t!r}")
        if self.flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {sorted(FLASH_ATTN)}, got {self.flash_attn!r}")
        if self.n_ctx < 1 or self.n_batch < 1 or self.n_ubatch < 1:
            raise ValueError("n_ctx, n_batch and n_ubatch must be positive")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of threads, got {value!r}")
        if isinstance(self.rpc, str) or not all(isinstance(e, str) for e in self.rpc):
            raise ValueError(f"rpc must be a tuple of 'HOST:PORT' strings, got {self.rpc!r}")


def physical_cores() -> int:
    """CPU cores without their SMT siblings, within this process's affinity (llama.cpp's default thread count,
    cpu_get_num_math); the logical CPUs where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    siblings = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings.add(f.read().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(siblings))


class LlamaSession:
    """Owns a model, a context and a batch; decodes token ids at explicit positions of sequence 0."""

    def __init__(self, model_path: str, options: ContextOptions = ContextOptions(), *, verbose: bool = False):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"model file not found: {model_path}")
        self.options = options
        self._stack = ExitStack()
        self._closed = False

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        self.devices = None
        if options.rpc:
            from .rpc import ModelDevices

            self.devices = ModelDevices(options.rpc)  # RpcError (a ValueError) before anything loads
            mparams.devices = self.devices.pointer
        try:
            self.model = self._stack.enter_context(closing(
                _internals.LlamaModel(path_model=model_path, params=mparams, verbose=verbose)))
        except ValueError as err:
            raise ModelLoadError(str(err)) from None

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = options.n_ctx
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_ubatch
        cparams.n_seq_max = options.n_seq_max
        cparams.type_k = KV_TYPES[options.kv_type]
        cparams.type_v = KV_TYPES[options.kv_type_v or options.kv_type]
        cparams.flash_attn_type = FLASH_ATTN[options.flash_attn]
        cparams.swa_full = False  # window layers keep only their window; the managed cache is the full one
        cparams.kv_unified = True
        cparams.offload_kqv = options.kv_offload
        n_threads = options.n_threads or physical_cores()
        cparams.n_threads = n_threads
        cparams.n_threads_batch = options.n_threads_batch or n_threads
        try:
            self.context = self._stack.enter_context(closing(
                _internals.LlamaContext(model=self.model, params=cparams, verbose=verbose)))
        except ValueError:
            gib = kv_cache_bytes(self.model.model, options.n_ctx, options.kv_type, options.kv_type_v) / 2**30
            self._stack.close()
            kv_types = options.kv_type if not options.kv_type_v else f"{options.kv_type}/{options.kv_type_v}"
            raise ContextCreateError(
                f"llama.cpp could not create a context of {options.n_ctx} cells (a {gib:.2f} GiB {kv_types} KV "
                f"cache): not enough memory, or settings it refuses (a quantized V cache needs flash attention)"
            ) from None
        self.batch = self._stack.enter_context(closing(
            _internals.LlamaBatch(n_tokens=options.n_batch, embd=0, n_seq_max=1, verbose=verbose)))
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)

    @property
    def ctx(self):
        self._live()
        return self.context.ctx

    def close(self) -> None:
        self._closed = True
        self._stack.close()

    def _live(self) -> None:
        # after close the model and context pointers are freed: llama.cpp would crash or abort on them
        if self._closed:
            raise ClosedError("the LlamaSession is closed")

    def __enter__(self) -> "LlamaSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def decode(self, tokens: Sequence[int], pos0: int, seq_id: int = 0) -> np.ndarray:
        """Decode tokens at positions pos0.. of seq_id in chunks of n_batch; returns the logits of the last token
        (copy). A seq_id other than 0 needs n_seq_max > seq_id."""
        self._live()
        tokens = list(tokens)
        if not tokens:
            raise ValueError("nothing to decode")
        for start in range(0, len(tokens), self.options.n_batch):
            chunk = tokens[start:start + self.options.n_batch]
            self.batch.set_batch(chunk, n_past=pos0 + start, logits_all=False)
            if seq_id:
                for i in range(len(chunk)):
                    self.batch.batch.seq_id[i][0] = seq_id
            rc = llama_cpp.llama_decode(self.ctx, self.batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at positions {pos0 + start}..{pos0 + start + len(chunk) - 1}"
                                   + (" (no free KV cell: offload or raise n_ctx)" if rc == 1 else ""))
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).copy()

    # ---- text

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list:
        self._live()
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.model.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise ValueError(f"tokenization failed ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        self._live()
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        self._live()
        return bool(llama_cpp.llama_vocab_is_eog(self.model.vocab, token))

    def chat_prompt(self, messages: Sequence[dict], *, add_assistant: bool = True,
                    template: Optional[str] = None) -> str:
        """A chat template applied to [{role, content}, ...]: the model's own (from the GGUF), or `template`, a
        Jinja template or the name of one of llama.cpp's built-ins ("chatml", "gemma", "llama3", ...)."""
        self._live()
        tmpl = template.encode() if template else llama_cpp.llama_model_chat_template(self.model.model, None)
        if not tmpl:
            raise ValueError("the model has no chat template")
        chat = (llama_cpp.llama_chat_message * len(messages))()
        keep = []  # the encoded strings must outlive the call
        for i, m in enumerate(messages):
            role, content = m["role"].encode(), m["content"].encode()
            keep += [role, content]
            chat[i].role, chat[i].content = role, content
        size = 256 + 2 * sum(len(m["content"]) + len(m["role"]) for m in messages)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_assistant, buf, size)
            if n < 0:
                raise ValueError("the model's chat template is not one llama.cpp can apply")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
        raise ValueError("chat template output kept growing")

    @staticmethod
    def n_ctx_train(model_path: str) -> int:
        """The training context of a GGUF, from its metadata (loads the vocabulary only)."""
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
        if not model:
            raise ValueError(f"could not load {model_path}")
        try:
            def meta(key: str) -> str:
                buf = ctypes.create_string_buffer(256)
                n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
                return buf.value.decode() if n >= 0 else ""

            value = meta(meta("general.architecture") + ".context_length")
            if not value.isdigit():
                raise ValueError(f"{model_path} does not say its training context")
            return int(value)
        finally:
            llama_cpp.llama_model_free(model)

    def clear(self) -> None:
        """Empty the KV cache (every sequence; an attached KVCache drops its host copies too)."""
        self._live()
        llama_cpp.llama_memory_clear(self.context.memory, True)

    def seq_rm(self, p0: int, p1: int) -> bool:
        self._live()
        return bool(llama_cpp.llama_memory_seq_rm(self.context.memory, 0, p0, p1))

    def pos_max(self) -> int:
        self._live()
        return int(llama_cpp.llama_memory_seq_pos_max(self.context.memory, 0))
