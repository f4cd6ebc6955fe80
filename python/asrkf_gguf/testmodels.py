"""Tiny random-weight GGUF models (llama / qwen2) for fast tests.

Written with the ``gguf`` package (gguf-py) in the layout llama.cpp's loader
expects for these architectures; llama.cpp loads and runs them like real
models, only the outputs are meaningless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TinyModelSpec", "write_tiny_model", "tiny_model"]

# Bump when the file layout or weight recipe changes, so tiny_model() caches
# written by an older version are not reused.
_FORMAT_VERSION = 1

_ARCHS = ("llama", "qwen2")
_DTYPES = {"f32": np.float32, "f16": np.float16}
_RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6}
# q4_0 stores 32 values in 18 bytes: a KV row of a multiple of 64 values is a
# multiple of 36 bytes, so rows of a q4_0 KV cache stay 4-byte aligned.
_KV_ROW_MULTIPLE = 64
_QUANT_BLOCK = 32
_MIN_VOCAB = 3 + 256


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. head_dim defaults to n_embd // n_head."""

    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None
    n_ff: int = 256
    n_vocab: int = 512
    n_ctx_train: int = 4096
    rope_theta: float = 10000.0
    seed: int = 0
    dtype: str = "f32"  # 2-D weights: "f32" or "f16" (norms and biases stay f32)

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {self.arch!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                    "unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {self.head_dim!r}")
        # llama.cpp refuses a quantized KV cache whose block size (32 for q4_0
        # and q8_0) does not divide the head size.
        if self.head_dim % _QUANT_BLOCK:
            raise ValueError(
                f"head_dim ({self.head_dim}) must be a multiple of {_QUANT_BLOCK} so q4_0/q8_0 KV caches work"
            )
        if self.n_head % self.n_head_kv:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})"
            )
        if (self.n_head_kv * self.head_dim) % _KV_ROW_MULTIPLE:
            raise ValueError(
                f"n_head_kv * head_dim ({self.n_head_kv} * {self.head_dim} = "
                f"{self.n_head_kv * self.head_dim}) must be a multiple of {_KV_ROW_MULTIPLE} "
                "so q4_0 KV cache rows stay 4-byte aligned"
            )
        # llama.cpp's qwen2 loader sizes attn_q/attn_output as n_embd x n_embd.
        if self.arch == "qwen2" and self.n_head * self.head_dim != self.n_embd:
            raise ValueError(
                f"qwen2 needs n_head * head_dim == n_embd, got {self.n_head} * {self.head_dim} != {self.n_embd}"
            )
        # <unk> <s> </s> + all 256 byte tokens: llama.cpp's SPM tokenizer falls
        # back to byte tokens and aborts (std::out_of_range) if one is missing.
        if self.n_vocab < _MIN_VOCAB:
            raise ValueError(
                f"n_vocab must be at least {_MIN_VOCAB} (3 special + 256 byte tokens), got {self.n_vocab}"
            )
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        # 10000 and 10000.0 are the same spec: keep cache_key the same too.
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @property
    def cache_key(self) -> str:
        """Stable hash of the spec and the writer's format version."""
        data = {"format": _FORMAT_VERSION, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_tiny_model(path: str | os.PathLike, spec: TinyModelSpec) -> Path:
    """Write a random-weight GGUF for spec to path (atomically) and return it."""
    import gguf  # imported lazily: only test code needs gguf-py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, spec.arch)
        _add_metadata(writer, spec, gguf)
        for name, array in _tensors(spec, gguf):
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def tiny_model(spec: TinyModelSpec, directory: str | os.PathLike | None = None) -> Path:
    """Path of the tiny model for spec, written once into directory.

    directory defaults to cache_dir()/"tiny-models".
    """
    if directory is None:
        from .models import cache_dir

        directory = cache_dir() / "tiny-models"
    path = Path(directory) / f"tiny-{spec.arch}-{spec.cache_key}.gguf"
    if not path.is_file():
        write_tiny_model(path, spec)
    return path


def _add_metadata(writer, spec: TinyModelSpec, gguf) -> None:
    writer.add_name(f"tiny-{spec.arch}-{spec.cache_key}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if spec.dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    # Explicit head sizes so head_dim != n_embd // n_head works (llama arch).
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(float(spec.rope_theta))
    writer.add_layer_norm_rms_eps(_RMS_EPS[spec.arch])
    writer.add_vocab_size(spec.n_vocab)

    # A real (if tiny) SentencePiece vocab rather than tokenizer "none": with
    # it llama.cpp tokenizes/detokenizes and has bos/eos, so code paths that
    # touch the vocab work as on real models.
    tokens, scores, types = _spm_vocab(spec.n_vocab, gguf)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _spm_vocab(n_vocab: int, gguf) -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then filler pieces."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(T.BYTE)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["\u2581", *letters, *("\u2581" + c for c in letters)]
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(pieces[i] if i < len(pieces) else f"\u2581w{i}")
        types.append(T.NORMAL)
        i += 1
    # SPM scores: higher merges first; byte/control tokens score 0 as in real vocabs.
    scores = [0.0 if t != T.NORMAL else -float(k) for k, t in enumerate(types)]
    return tokens, scores, [int(t) for t in types]


def _tensors(spec: TinyModelSpec, gguf):
    """Yield (name, array) in llama.cpp's layout: numpy shape (out, in)."""
    rng = np.random.default_rng(spec.seed)
    wtype = _DTYPES[spec.dtype]
    names = gguf.TENSOR_NAMES
    M = gguf.MODEL_TENSOR

    def weight(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        # std 1/sqrt(fan_in) keeps activations O(1) through each projection,
        # so attention scores and logits have real spread (std 0.02 would make
        # attention almost uniform and logits almost flat, hiding KV-cache errors).
        std = 1.0 / np.sqrt(cols) if std is None else std
        return (rng.standard_normal((rows, cols)) * std).astype(wtype)

    def vector(n: int, std: float) -> np.ndarray:
        return (rng.standard_normal(n) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    n_q = spec.n_head * spec.head_dim
    n_kv = spec.n_head_kv * spec.head_dim

    yield names[M.TOKEN_EMBD] + ".weight", weight(spec.n_vocab, spec.n_embd, std=1.0)
    for il in range(spec.n_layer):
        n = lambda t: names[t].format(bid=il)  # noqa: E731,B023 - used within this iteration
        yield n(M.ATTN_NORM) + ".weight", ones(spec.n_embd)
        yield n(M.ATTN_Q) + ".weight", weight(n_q, spec.n_embd)
        yield n(M.ATTN_K) + ".weight", weight(n_kv, spec.n_embd)
        yield n(M.ATTN_V) + ".weight", weight(n_kv, spec.n_embd)
        if spec.arch == "qwen2":  # qwen2 has q/k/v biases
            yield n(M.ATTN_Q) + ".bias", vector(n_q, 0.1)
            yield n(M.ATTN_K) + ".bias", vector(n_kv, 0.1)
            yield n(M.ATTN_V) + ".bias", vector(n_kv, 0.1)
        yield n(M.ATTN_OUT) + ".weight", weight(spec.n_embd, n_q)
        yield n(M.FFN_NORM) + ".weight", ones(spec.n_embd)
        yield n(M.FFN_GATE) + ".weight", weight(spec.n_ff, spec.n_embd)
        yield n(M.FFN_UP) + ".weight", weight(spec.n_ff, spec.n_embd)
        yield n(M.FFN_DOWN) + ".weight", weight(spec.n_embd, spec.n_ff)
    yield names[M.OUTPUT_NORM] + ".weight", ones(spec.n_embd)
    yield names[M.OUTPUT] + ".weight", weight(spec.n_vocab, spec.n_embd)
