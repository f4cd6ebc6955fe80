"""Tiny random-weight GGUF models (llama / qwen2 / mamba) for fast tests.

Written with the ``gguf`` package (gguf-py) in the layout llama.cpp's loader
expects for these architectures; llama.cpp loads and runs them like real
models, only the outputs are meaningless.

llama and qwen2 are attention models with a standard KV cache; mamba (Mamba
v1) is a recurrent model whose memory is not a KV cache, for testing that
unsupported architectures are refused cleanly.
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

import gguf  # a runtime dependency (pyproject.toml): the scripts and benchmarks write these models too
import numpy as np

__all__ = ["TinyModelSpec", "write_tiny_model", "tiny_model"]

# Bump when the file layout or weight recipe changes, so tiny_model() caches
# written by an older version are not reused. One version for the attention
# archs (llama, qwen2) and one for mamba, so either can change alone.
_FORMAT_VERSION = 1
_MAMBA_FORMAT_VERSION = 1

_ATTENTION_ARCHS = ("llama", "qwen2", "gemma3")
_SSM_ARCHS = ("mamba",)
_ARCHS = _ATTENTION_ARCHS + _SSM_ARCHS
_DTYPES = {"f32": np.float32, "f16": np.float16}
_RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "gemma3": 1e-6, "mamba": 1e-5}
# llama.cpp's Gemma 3 with a sliding window: every 6th layer attends the whole context, the others the window
_GEMMA3_SWA_PATTERN = 6
# Fields only the attention archs use, and fields only mamba uses. Each kind of
# spec leaves the other's fields out of its cache key, so adding the mamba
# fields did not change the keys (and cached files) of llama/qwen2 specs.
_ATTENTION_FIELDS = ("n_head", "n_head_kv", "head_dim", "n_ff", "rope_theta")
_SSM_FIELDS = ("ssm_d_conv", "ssm_d_state", "ssm_dt_rank")
# Mamba defaults (those of the reference implementation and of
# convert_hf_to_gguf.py); dt_rank defaults to ceil(n_embd / 16).
_SSM_D_CONV = 4
_SSM_D_STATE = 16
# q4_0 stores 32 values in 18 bytes: a KV row of a multiple of 64 values is a
# multiple of 36 bytes, so rows of a q4_0 KV cache stay 4-byte aligned.
_KV_ROW_MULTIPLE = 64
_QUANT_BLOCK = 32
_MIN_VOCAB = 3 + 256


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. head_dim defaults to n_embd // n_head.

    arch="mamba" writes a Mamba (v1) model: it uses n_layer, n_embd, n_vocab,
    n_ctx_train, seed, dtype and the ssm_* fields (d_inner is 2 * n_embd, the
    only expansion llama.cpp supports; ssm_d_conv defaults to 4, ssm_d_state
    to 16, ssm_dt_rank to ceil(n_embd / 16)). The attention fields (n_head,
    n_head_kv, head_dim, n_ff, rope_theta) must stay at their defaults there,
    and the ssm_* fields must stay None for llama/qwen2.
    """

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
    # mamba only (None: the mamba default; must stay None for llama/qwen2)
    ssm_d_conv: int | None = None   # conv1d kernel width
    ssm_d_state: int | None = None  # SSM state size per channel
    ssm_dt_rank: int | None = None  # rank of the time-step projection
    # tokenizer.chat_template (a Jinja template), as converters write a model's own; None: no template
    chat_template: str | None = None
    # gemma3 only: the window of its sliding-window layers (llama.cpp's iSWA cache: every 6th layer attends the
    # whole context, so n_layer >= 6); None: every layer attends the whole context
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {self.arch!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.arch in _SSM_ARCHS:
            self._check_mamba()
        else:
            self._check_attention()
        # <unk> <s> </s> + all 256 byte tokens: llama.cpp's SPM tokenizer falls
        # back to byte tokens and aborts (std::out_of_range) if one is missing.
        if self.n_vocab < _MIN_VOCAB:
            raise ValueError(
                f"n_vocab must be at least {_MIN_VOCAB} (3 special + 256 byte tokens), got {self.n_vocab}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def _check_attention(self) -> None:
        for field in _SSM_FIELDS:
            if getattr(self, field) is not None:
                raise ValueError(
                    f"{field} is a Mamba setting; arch={self.arch!r} does not use it, leave it None"
                )
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
        if self.sliding_window is not None:
            if self.arch != "gemma3":
                raise ValueError(f"sliding_window is a gemma3 setting; arch={self.arch!r} does not use it")
            if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ValueError(f"sliding_window must be a positive int, got {self.sliding_window!r}")
            if self.n_layer < _GEMMA3_SWA_PATTERN:
                raise ValueError(f"a gemma3 with a sliding window needs n_layer >= {_GEMMA3_SWA_PATTERN} (every "
                                 f"{_GEMMA3_SWA_PATTERN}th layer attends the whole context), got {self.n_layer}")
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        # 10000 and 10000.0 are the same spec: keep cache_key the same too.
        object.__setattr__(self, "rope_theta", float(self.rope_theta))

    def _check_mamba(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field in _ATTENTION_FIELDS:
            if getattr(self, field) != defaults[field]:
                raise ValueError(
                    f"{field} is an attention setting; arch={self.arch!r} does not use it, "
                    f"leave it at its default ({defaults[field]!r})"
                )
        for field in ("n_layer", "n_embd", "n_vocab", "n_ctx_train"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        resolved = {
            "ssm_d_conv": _SSM_D_CONV,
            "ssm_d_state": _SSM_D_STATE,
            "ssm_dt_rank": -(-self.n_embd // 16),
        }
        for field, default in resolved.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, default)
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        # the conv state holds the last d_conv - 1 inputs: a width of 1 leaves it empty
        if self.ssm_d_conv < 2:
            raise ValueError(f"ssm_d_conv must be at least 2, got {self.ssm_d_conv}")

    @property
    def ssm_d_inner(self) -> int | None:
        """Mamba's inner width: 2 * n_embd (the only expansion llama.cpp supports); None for attention archs."""
        return 2 * self.n_embd if self.arch in _SSM_ARCHS else None

    @property
    def cache_key(self) -> str:
        """Stable hash of the spec and the writer's format version."""
        fields = dataclasses.asdict(self)
        if self.arch in _SSM_ARCHS:
            unused, version = _ATTENTION_FIELDS, _MAMBA_FORMAT_VERSION
        else:
            unused, version = _SSM_FIELDS, _FORMAT_VERSION
        for field in unused:
            del fields[field]
        for late in ("chat_template", "sliding_window"):
            if fields[late] is None:
                del fields[late]  # the models written before the field existed keep their key
        data = {"format": version, **fields}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_tiny_model(path: str | os.PathLike, spec: TinyModelSpec) -> Path:
    """Write a random-weight GGUF for spec to path (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, spec.arch)
        _add_metadata(writer, spec)
        for name, array in _tensors(spec):
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


def _add_metadata(writer, spec: TinyModelSpec) -> None:
    writer.add_name(f"tiny-{spec.arch}-{spec.cache_key}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if spec.dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    if spec.arch in _SSM_ARCHS:
        # As convert_hf_to_gguf.py writes Mamba: no attention heads, no FFN.
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        writer.add_ssm_conv_kernel(spec.ssm_d_conv)
        writer.add_ssm_inner_size(spec.ssm_d_inner)
        writer.add_ssm_state_size(spec.ssm_d_state)
        writer.add_ssm_time_step_rank(spec.ssm_dt_rank)
        writer.add_ssm_dt_b_c_rms(False)  # classic Mamba (not Falcon-Mamba)
    else:
        writer.add_feed_forward_length(spec.n_ff)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        # Explicit head sizes so head_dim != n_embd // n_head works (llama arch).
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(float(spec.rope_theta))
        if spec.sliding_window is not None:
            writer.add_sliding_window(spec.sliding_window)
    writer.add_layer_norm_rms_eps(_RMS_EPS[spec.arch])
    writer.add_vocab_size(spec.n_vocab)

    # A real (if tiny) SentencePiece vocab rather than tokenizer "none": with
    # it llama.cpp tokenizes/detokenizes and has bos/eos, so code paths that
    # touch the vocab work as on real models.
    tokens, scores, types = _spm_vocab(spec.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)


def _spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
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


def _tensors(spec: TinyModelSpec):
    """Yield (name, array) in llama.cpp's layout: numpy shape (out, in)."""
    rng = np.random.default_rng(spec.seed)
    wtype = _DTYPES[spec.dtype]
    names = gguf.TENSOR_NAMES
    M = gguf.MODEL_TENSOR

    def weight(rows: int, cols: int, std: float | None = None, dtype=None) -> np.ndarray:
        # std 1/sqrt(fan_in) keeps activations O(1) through each projection,
        # so attention scores and logits have real spread (std 0.02 would make
        # attention almost uniform and logits almost flat, hiding KV-cache errors).
        std = 1.0 / np.sqrt(cols) if std is None else std
        return (rng.standard_normal((rows, cols)) * std).astype(wtype if dtype is None else dtype)

    def vector(n: int, std: float) -> np.ndarray:
        return (rng.standard_normal(n) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    if spec.arch in _SSM_ARCHS:
        yield names[M.TOKEN_EMBD] + ".weight", weight(spec.n_vocab, spec.n_embd, std=1.0)
        d_inner, d_state, dt_rank = spec.ssm_d_inner, spec.ssm_d_state, spec.ssm_dt_rank
        # Mamba's S4D-real init: A = -exp(A_log) = -(1..d_state) for every channel.
        ssm_a = np.tile(-np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1))
        for il in range(spec.n_layer):
            n = lambda t: names[t].format(bid=il)  # noqa: E731,B023 - used within this iteration
            yield n(M.ATTN_NORM) + ".weight", ones(spec.n_embd)
            yield n(M.SSM_IN) + ".weight", weight(2 * d_inner, spec.n_embd)  # x and z halves
            # llama.cpp's ssm_conv and ssm_scan want the conv kernel and A in f32
            yield n(M.SSM_CONV1D) + ".weight", weight(d_inner, spec.ssm_d_conv, dtype=np.float32)
            yield n(M.SSM_CONV1D) + ".bias", vector(d_inner, 0.1)
            yield n(M.SSM_X) + ".weight", weight(dt_rank + 2 * d_state, d_inner)  # dt, B, C
            yield n(M.SSM_DT) + ".weight", weight(d_inner, dt_rank)
            # bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1], as Mamba initializes it
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d_inner))
            yield n(M.SSM_DT) + ".bias", (dt + np.log(-np.expm1(-dt))).astype(np.float32)
            yield n(M.SSM_A), ssm_a  # no ".weight" suffix for A and D
            yield n(M.SSM_D), ones(d_inner)
            yield n(M.SSM_OUT) + ".weight", weight(spec.n_embd, d_inner)
        yield names[M.OUTPUT_NORM] + ".weight", ones(spec.n_embd)
        yield names[M.OUTPUT] + ".weight", weight(spec.n_vocab, spec.n_embd)
        return

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
        if spec.arch == "gemma3":  # per-head q/k norms and norms after attention and after the FFN
            yield n(M.ATTN_Q_NORM) + ".weight", ones(spec.head_dim)
            yield n(M.ATTN_K_NORM) + ".weight", ones(spec.head_dim)
            yield n(M.ATTN_POST_NORM) + ".weight", ones(spec.n_embd)
        yield n(M.FFN_NORM) + ".weight", ones(spec.n_embd)
        yield n(M.FFN_GATE) + ".weight", weight(spec.n_ff, spec.n_embd)
        yield n(M.FFN_UP) + ".weight", weight(spec.n_ff, spec.n_embd)
        yield n(M.FFN_DOWN) + ".weight", weight(spec.n_embd, spec.n_ff)
        if spec.arch == "gemma3":
            yield n(M.FFN_POST_NORM) + ".weight", ones(spec.n_embd)
    yield names[M.OUTPUT_NORM] + ".weight", ones(spec.n_embd)
    yield names[M.OUTPUT] + ".weight", weight(spec.n_vocab, spec.n_embd)
