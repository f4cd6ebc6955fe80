"""Owning wrapper of an asrkf KV handle attached to a llama.cpp context.

Every per-token quantity crosses the boundary as a numpy array in one call: no Python loop over cells.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ._cffi import ffi, lib
from .errors import ClosedError
from .states import CellState  # noqa: F401  (re-exported: kv.CellState predates states.py)

Positions = Union[Sequence[int], np.ndarray, Iterable[int]]


_CODES = {
    -1: "invalid argument",
    -2: "refused",
    -3: "checksum mismatch",
    -4: "context freed",
    -5: "unsupported",
    -6: "backend failure",
}


class AsrkfError(RuntimeError):
    """A failed native call: `code` is the asrkf.h return code, `op` the call and `message` the C message."""

    def __init__(self, op: str, code: int, message: str):
        self.op = op
        self.code = code
        self.message = message
        super().__init__(f"{message} [{_CODES.get(code, 'error')} ({code})]")


class KVClosedError(AsrkfError, ClosedError):
    """A KVCache used after close(): an AsrkfError (as it always was) and a ClosedError like the other wrappers'."""

    def __init__(self):
        super().__init__("handle", -1, "the KVCache is closed")


def _check(op: str, code: int) -> None:
    if code != 0:
        raise AsrkfError(op, code, ffi.string(lib.asrkf_last_error()).decode("utf-8", "replace"))


def _ctx_pointer(ctx) -> "ffi.CData":
    """Accept llama-cpp-python's Llama or LlamaContext, a ctypes pointer or an int address."""
    ctx = getattr(ctx, "_ctx", ctx)  # Llama -> LlamaContext
    ctx = getattr(ctx, "ctx", ctx)  # LlamaContext -> llama_context_p
    if isinstance(ctx, ctypes.c_void_p):
        ctx = ctx.value
    if not ctx:
        raise ValueError("the llama context is NULL (closed?)")
    if not isinstance(ctx, int):
        raise TypeError(f"expected a llama context (LlamaContext, ctypes pointer or address), got {type(ctx).__name__}")
    return ffi.cast("struct llama_context *", ctx)


_I32_MAX = int(np.iinfo(np.int32).max)  # built once: np.iinfo costs more than the check (per decode step on a GPU)


def _positions(pos: Positions) -> np.ndarray:
    arr = np.asarray(list(pos) if not isinstance(pos, np.ndarray) else pos)
    if arr.ndim != 1:
        raise ValueError(f"positions must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind == "f":
        # a cast to int would turn 1.7 into 1 and NaN into garbage: a position is a whole number or an error
        finite = np.isfinite(arr)
        bad = arr[~finite] if not finite.all() else arr[arr != np.round(arr)]
        if bad.size:
            raise ValueError(f"positions must be whole numbers, got {float(bad[0])}")
    elif arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"positions must be integers, got {arr.dtype} values")
    if arr.size and (arr.min() < 0 or arr.max() > _I32_MAX):
        raise ValueError(f"positions must be in [0, 2^31), got [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int32) if arr.size else np.empty(0, np.int32)


def _i32(arr: np.ndarray):
    return ffi.cast("int32_t *", ffi.from_buffer(arr)) if arr.size else ffi.NULL


@dataclass(frozen=True)
class KVInfo:
    n_layer: int
    n_layer_kv: int
    n_head: int
    n_head_kv: int
    n_embd_head_k: int
    n_cells: int
    n_cells_used: int
    n_frozen: int
    n_offloaded: int
    type_k: int
    type_v: int
    v_trans: bool
    iswa: bool
    device_kv_bytes: int
    kv_bytes_per_token: int
    host_bytes: int
    host_bytes_used: int
    n_copies: int
    n_gathers: int
    hashed_bytes: int
    hash_us: int


def default_params(*, pinned_host: bool = True, host_chunk_cells: int = 0, force_gather: bool = False,
                   scratch_bytes: int = 0):
    params = lib.asrkf_kv_default_params()
    params.pinned_host = pinned_host
    params.host_chunk_cells = host_chunk_cells
    params.force_gather = force_gather
    params.scratch_bytes = scratch_bytes
    return params


class KVCache:
    """The freeze / offload / thaw / importance interface of one llama.cpp context.

    Keep the llama context alive while this is open; if it is freed first, every call raises AsrkfError (code -4).
    """

    def __init__(self, *, ctx, pinned_host: bool = True, host_chunk_cells: int = 0, force_gather: bool = False,
                 scratch_bytes: int = 0):
        self._ctx_ref = ctx  # keeps llama-cpp-python's wrapper (and so the context) alive
        if scratch_bytes < 0:
            raise ValueError("scratch_bytes cannot be negative")
        params = default_params(pinned_host=pinned_host, host_chunk_cells=host_chunk_cells, force_gather=force_gather,
                                scratch_bytes=scratch_bytes)
        ctx_ptr = _ctx_pointer(ctx)
        self._ctx_address = int(ffi.cast("uintptr_t", ctx_ptr))
        handle = lib.asrkf_kv_attach(ctx_ptr, params)
        if handle == ffi.NULL:
            raise AsrkfError("attach", lib.asrkf_last_error_code(), ffi.string(lib.asrkf_last_error()).decode("utf-8", "replace"))
        self.handle = handle
        self._n_cells = None  # the context's cell count, read once (it never changes)
        self._entropy_out = None
        self._release_buf = None  # release_ahead's output, reused every step

    # ---- lifetime

    def close(self, *, force: bool = True) -> None:
        """Detach. With offloaded positions left, force=False raises instead of losing them."""
        if self.handle is None:
            return
        _check("free", lib.asrkf_kv_free(self.handle, force))
        self.handle = None
        self._ctx_ref = None

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _h(self):
        if self.handle is None:
            raise KVClosedError()
        return self.handle

    # ---- state

    def info(self) -> KVInfo:
        out = ffi.new("struct asrkf_kv_info *")
        _check("info", lib.asrkf_kv_get_info(self._h(), out))
        return KVInfo(**{f: (bool(getattr(out, f)) if f in ("v_trans", "iswa") else int(getattr(out, f)))
                         for f in KVInfo.__dataclass_fields__})

    def cells(self, seq_id: int = 0):
        """Resident cells of seq_id ordered by position: (pos, state, cell) int32 / uint8 / int32 arrays."""
        h = self._h()
        n = ffi.new("int32_t *")
        # one call with room for every cell: a count taken by a separate call can be stale by the time the arrays
        # are filled when another thread shares the handle
        if self._n_cells is None:
            self._n_cells = self.info().n_cells
        cap = self._n_cells
        pos = np.empty(cap, np.int32)
        state = np.empty(cap, np.uint8)
        cell = np.empty(cap, np.int32)
        _check("cells", lib.asrkf_kv_cells(h, seq_id, _i32(pos), ffi.cast("uint8_t *", ffi.from_buffer(state)),
                                           _i32(cell), cap, n))
        k = n[0]
        return pos[:k].copy(), state[:k].copy(), cell[:k].copy()

    def offloaded(self, seq_id: int = 0) -> np.ndarray:
        h = self._h()
        n = ffi.new("int32_t *")
        _check("offloaded", lib.asrkf_kv_offloaded(h, seq_id, ffi.NULL, 0, n))
        # the count can change between the two calls when another thread shares the handle: retry until it fits
        while True:
            cap = n[0]
            pos = np.empty(cap, np.int32)
            _check("offloaded", lib.asrkf_kv_offloaded(h, seq_id, _i32(pos), cap, n))
            if n[0] <= cap:
                return pos[:n[0]].copy()

    # ---- operations

    def freeze(self, pos: Positions, seq_id: int = 0) -> None:
        p = _positions(pos)
        _check("freeze", lib.asrkf_kv_freeze(self._h(), seq_id, _i32(p), p.size))

    def unfreeze(self, pos: Positions, seq_id: int = 0) -> None:
        p = _positions(pos)
        _check("unfreeze", lib.asrkf_kv_unfreeze(self._h(), seq_id, _i32(p), p.size))

    def offload(self, pos: Positions, seq_id: int = 0) -> None:
        p = _positions(pos)
        _check("offload", lib.asrkf_kv_offload(self._h(), seq_id, _i32(p), p.size))

    def offload_ahead(self, pos: Positions, seq_id: int = 0) -> None:
        """Copy resident positions to host memory now and leave them resident: a later offload() of one of them
        only frees its cell. The copies made ahead for seq_id become exactly those of pos (empty: none)."""
        p = _positions(pos)
        _check("offload_ahead", lib.asrkf_kv_offload_ahead(self._h(), seq_id, _i32(p), p.size))

    def ahead(self, seq_id: int = -1) -> int:
        """How many positions of seq_id (-1: every sequence) have a copy made ahead."""
        n = ffi.new("int32_t *")
        _check("ahead", lib.asrkf_kv_ahead(self._h(), seq_id, n))
        return int(n[0])

    def release_ahead(self, n: int, seq_id: int = 0, *, lo: int = 0, hi: int = _I32_MAX) -> np.ndarray:
        """Offload the next n positions copied ahead, in the order offload_ahead() was given them, skipping those
        whose copy was released and those outside [lo, hi): only their cells are freed. Returns the positions
        offloaded (int32, n of them; a view of a buffer the next call overwrites), or an empty array, nothing
        changed and the queue emptied, when fewer than n are left. One native call per decoded token."""
        buf = self._release_buf
        if buf is None or buf.size < n:
            buf = self._release_buf = np.empty(max(n, 16), np.int32)
            self._release_ptr = _i32(buf)
            self._release_n = ffi.new("int32_t *")
        _check("release_ahead", lib.asrkf_kv_release_ahead(self._h(), seq_id, n, lo, hi, self._release_ptr,
                                                           self._release_n))
        return buf[: self._release_n[0]]

    def ahead_queued(self, seq_id: int = 0) -> np.ndarray:
        """The positions still queued to leave by release_ahead() (with their copies), in their order."""
        h = self._h()
        n = ffi.new("int32_t *")
        _check("ahead_queued", lib.asrkf_kv_ahead_queued(h, seq_id, ffi.NULL, 0, n))
        pos = np.empty(n[0], np.int32)
        _check("ahead_queued", lib.asrkf_kv_ahead_queued(h, seq_id, _i32(pos), pos.size, n))
        return pos[: n[0]].copy()

    def thaw(self, pos: Positions, seq_id: int = 0, *, frozen: bool = False) -> None:
        p = _positions(pos)
        _check("thaw", lib.asrkf_kv_thaw(self._h(), seq_id, _i32(p), p.size, frozen))

    def reserve_host(self, n_bytes: int) -> None:
        """Have host memory for n_bytes more offloaded rows allocated ahead (pages faulted in) on a background
        thread; returns at once. Reserved memory counts in info().host_bytes.

        The controller calls it before a prompt when the host memory is pageable (ControllerConfig.reserve_ahead).
        With pinned host memory it does not: on the H200, pinning while a prompt decoded slowed the decode by about
        the time the allocations took (CUDA serializes pinning with the launches)."""
        if n_bytes < 0:
            raise ValueError("reserve_host: the number of bytes cannot be negative")
        _check("reserve_host", lib.asrkf_kv_reserve_host(self._h(), int(n_bytes)))

    def reserve_staging(self, n_bytes: int) -> None:
        """Have the pinned staging of device moves hold n_bytes now (a GPU with a pageable host store), not inside
        the first offloads of a prompt; nothing happens on a CPU cache."""
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        _check("reserve_staging", lib.asrkf_kv_reserve_staging(self._h(), int(n_bytes)))

    def drop(self, pos: Positions, seq_id: int = 0) -> None:
        """Remove positions for good (llama_memory_seq_rm, one call per run of consecutive positions).

        Only the eviction baselines do this; their host copies, if any, go too.
        """
        import llama_cpp

        self._h()
        p = np.unique(_positions(pos))
        if p.size == 0:
            return
        mem = llama_cpp.llama_get_memory(ctypes.c_void_p(self._ctx_address))
        for run in np.split(p, np.flatnonzero(np.diff(p) != 1) + 1):
            llama_cpp.llama_memory_seq_rm(mem, seq_id, int(run[0]), int(run[-1]) + 1)

    # ---- importance

    def set_importance(self, enabled: bool = True, *, n_q: int = 1, layers: Optional[Sequence[int]] = None,
                       export_q: bool = False) -> None:
        ls = _positions([] if layers is None else layers)
        _check("set_importance", lib.asrkf_kv_set_importance(self._h(), enabled, n_q, _i32(ls), ls.size, export_q))

    def importance(self, seq_id: int = 0):
        """(pos, score) of the resident cells after the latest decode; frozen cells are scored too."""
        h = self._h()
        n = ffi.new("int32_t *")
        # one call into a buffer of the context's size: the native side reads the scores off the device each call
        cap = self.info().n_cells if self._n_cells is None else self._n_cells
        self._n_cells = cap
        pos = np.empty(cap, np.int32)
        score = np.empty(cap, np.float32)
        _check("importance", lib.asrkf_kv_importance(h, seq_id, _i32(pos), ffi.cast("float *", ffi.from_buffer(score)),
                                                     cap, n))
        return pos[: n[0]], score[: n[0]]

    def importance_fold(self, score: np.ndarray, mass: np.ndarray, n_pos: int, *, ema: float, n_queries: int = 1,
                        seq_id: int = 0) -> None:
        """Fold the latest importance into per-position float32 arrays in place, natively and in one pass:
        score[p] = (1 - ema) * score[p] + ema * s / n_queries and mass[p] += s for every resident position p."""
        for name, arr in (("score", score), ("mass", mass)):
            if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.ndim != 1 or arr.size < n_pos:
                raise ValueError(f"{name} must be a contiguous float32 vector of at least n_pos = {n_pos} entries")
        _check("importance_fold", lib.asrkf_kv_importance_fold(
            self._h(), seq_id, ema, n_queries, ffi.cast("float *", ffi.from_buffer(score)),
            ffi.cast("float *", ffi.from_buffer(mass)), n_pos))

    def set_entropy(self, enabled: bool = True) -> None:
        """Compute the entropy of each decode's last logits row inside the graph (see entropy())."""
        _check("set_entropy", lib.asrkf_kv_set_entropy(self._h(), enabled))

    def entropy(self) -> float:
        """Entropy (nats) of the next-token distribution of the latest decode, computed where the logits were."""
        if self._entropy_out is None:
            self._entropy_out = ffi.new("float *")  # once: the call runs every step
        _check("entropy", lib.asrkf_kv_entropy(self._h(), self._entropy_out))
        return float(self._entropy_out[0])

    def query(self, layer: int):
        """Query vectors of the latest decode for one importance layer, [n_q, n_head, n_embd_head] float32, and
        the scale the model applies to q.k in that layer."""
        h = self._h()
        nq, nh, nd = ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *")
        scale = ffi.new("float *")
        _check("query", lib.asrkf_kv_query(h, layer, ffi.NULL, 0, nq, nh, nd, scale))
        out = np.empty((nq[0], nh[0], nd[0]), np.float32)
        _check("query", lib.asrkf_kv_query(h, layer, ffi.cast("float *", ffi.from_buffer(out)), out.size,
                                           nq, nh, nd, scale))
        return out, float(scale[0])

    def layers(self) -> np.ndarray:
        """Model layer ids whose K/V the handle manages (iSWA models: the full-attention layers)."""
        h = self._h()
        n = ffi.new("int32_t *")
        _check("layers", lib.asrkf_kv_layers(h, ffi.NULL, 0, n))
        out = np.empty(n[0], np.int32)
        _check("layers", lib.asrkf_kv_layers(h, _i32(out), n[0], n))
        return out

    def row_bytes(self, layer: int):
        """(K, V) bytes of one token in one layer, in the cache's types."""
        k, v = ffi.new("size_t *"), ffi.new("size_t *")
        _check("row_bytes", lib.asrkf_kv_row_bytes(self._h(), layer, k, v))
        return int(k[0]), int(v[0])

    def k_rows(self, layer: int, pos: Positions, seq_id: int = 0) -> np.ndarray:
        """Raw K rows (cache type, stored space) of positions, offloaded or resident: [n, K row bytes] uint8."""
        p = _positions(pos)
        out = np.empty((p.size, self.row_bytes(layer)[0]), np.uint8)
        _check("k_rows", lib.asrkf_kv_k_rows(self._h(), seq_id, layer, _i32(p), p.size,
                                             ffi.from_buffer(out), out.nbytes))
        return out

    def recall_mass(self, layers, keys: Positions, n_out: int, seq_id: int = 0) -> np.ndarray:
        """Attention mass the latest decode's exported queries give keys[:n_out], in a causal softmax over all of
        keys (resident or offloaded), summed over layers, heads and queries, computed by the backend that holds K
        (asrkf_kv_recall_mass): [n_out] float32."""
        p = _positions(keys)
        ls = np.ascontiguousarray(layers, dtype=np.int32)
        out = np.zeros(int(n_out), np.float32)
        _check("recall_mass", lib.asrkf_kv_recall_mass(self._h(), seq_id, _i32(ls), ls.size, _i32(p), p.size, int(n_out),
                                                       ffi.cast("float *", ffi.from_buffer(out))))
        return out

    # ---- sessions

    def session_save(self, seq_id: int = 0) -> bytearray:
        """Every position of seq_id, resident or offloaded, with cells, frozen flags, rows and checksums, as one
        buffer (asrkf_kv_session_save); nothing in the cache changes."""
        h = self._h()
        n = ffi.new("size_t *", self.session_size(seq_id))
        while True:  # the size can change between the two calls when another thread shares the handle
            out = bytearray(n[0])
            cap = len(out)
            rc = lib.asrkf_kv_session_save(h, seq_id, ffi.from_buffer(out), cap, n)
            if rc == 0 or n[0] <= cap:
                _check("session_save", rc)
                return out if n[0] == cap else out[: n[0]]

    def session_size(self, seq_id: int = 0) -> int:
        """Bytes session_save(seq_id) writes now."""
        n = ffi.new("size_t *")
        _check("session_save", lib.asrkf_kv_session_save(self._h(), seq_id, ffi.NULL, 0, n))
        return int(n[0])

    def session_save_into(self, out, seq_id: int = 0) -> int:
        """session_save into a writable buffer of at least session_size() bytes (e.g. a slice of a larger one, so
        that a multi-GB session is not copied again); returns the bytes written."""
        buf = ffi.from_buffer(out, require_writable=True)
        n = ffi.new("size_t *")
        _check("session_save", lib.asrkf_kv_session_save(self._h(), seq_id, buf, len(buf), n))
        return int(n[0])

    def session_load(self, data, seq_id: int = 0, *, check_only: bool = False) -> None:
        """Replace seq_id's content with a session_save buffer; validated before anything changes (check_only:
        only the format, geometry and cells, not the rows' checksums, and nothing changes)."""
        buf = ffi.from_buffer(data)
        _check("session_load", lib.asrkf_kv_session_load(self._h(), seq_id, buf, len(buf), check_only))

    def park(self, park_id: int, seq_id: int = 0) -> None:
        """Move every position of seq_id into the host store under park_id and empty the sequence (the resident
        rows are copied, the offloaded ones change owner); unpark() restores it into an empty sequence."""
        _check("park", lib.asrkf_kv_park(self._h(), seq_id, park_id))

    def unpark(self, park_id: int, seq_id: int = 0) -> None:
        """Restore a parked sequence into seq_id (which must be empty): the resident rows back into their cells,
        checked first; the offloaded ones stay on the host."""
        _check("unpark", lib.asrkf_kv_unpark(self._h(), park_id, seq_id))

    def drop_parked(self, park_id: int) -> None:
        """Release a parked sequence's host memory."""
        _check("drop_parked", lib.asrkf_kv_drop_parked(self._h(), park_id))

    def parked_tokens(self, park_id: int) -> int:
        """Positions parked under park_id."""
        n = ffi.new("int32_t *")
        _check("parked_tokens", lib.asrkf_kv_parked_tokens(self._h(), park_id, n))
        return int(n[0])

    def parked_size(self, park_id: int) -> int:
        """Bytes parked_save_into(park_id) writes."""
        n = ffi.new("size_t *")
        _check("parked_save", lib.asrkf_kv_parked_save(self._h(), park_id, ffi.NULL, 0, n))
        return int(n[0])

    def parked_save_into(self, out, park_id: int) -> int:
        """A parked sequence as session_save wrote it before it was parked, into a writable buffer of at least
        parked_size() bytes; returns the bytes written. Every host copy is checked first."""
        buf = ffi.from_buffer(out, require_writable=True)
        n = ffi.new("size_t *")
        _check("parked_save", lib.asrkf_kv_parked_save(self._h(), park_id, buf, len(buf), n))
        return int(n[0])

    def check(self) -> None:
        _check("check", lib.asrkf_kv_check(self._h()))

    def debug_corrupt(self, pos: int, byte: int = 0, seq_id: int = 0) -> None:
        """Testing only: flip one byte of an offloaded position's host copy."""
        _check("debug_corrupt", lib.asrkf_kv_debug_corrupt(self._h(), seq_id, pos, byte))

    def debug_corrupt_parked(self, park_id: int, pos: int, byte: int = 0) -> None:
        """Testing only: flip one byte of the host copy of a position parked under park_id."""
        _check("debug_corrupt", lib.asrkf_kv_debug_corrupt_parked(self._h(), park_id, pos, byte))
