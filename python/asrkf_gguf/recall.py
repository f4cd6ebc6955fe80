"""Recall for a new query: score every token of the sequence, resident or offloaded, against the newest queries,
on the host, and give the device cells to the best.

Why host-side exact scoring: the importance output only sees resident cells, and a question asked after the
freeze/offload decisions is exactly the case where the answer sits in offloaded tokens. The native core exports
the last queries in the stored-K space (after RoPE, and after the rotation llama.cpp applies to quantized K) and
reads K rows of any position, so q.k here is the logit attention would compute. The mass is summed over heads,
queries and layers like the importance output, so the two are on the same scale.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8


def dequantize_rows(raw: np.ndarray, ggml_type: int, n_values: int) -> np.ndarray:
    """K rows in a KV cache type -> float32 [n, n_values] (f16, q8_0, q4_0: the types the KV cache takes)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if ggml_type == GGML_TYPE_F16:
        return raw.view(np.float16).reshape(n, n_values).astype(np.float32)
    if ggml_type == GGML_TYPE_Q8_0:  # blocks of 32: f16 scale + 32 int8
        blocks = raw.reshape(n, n_values // 32, 34)
        d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, :, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(n, n_values)
    if ggml_type == GGML_TYPE_Q4_0:  # blocks of 32: f16 scale + 16 bytes, low nibbles first, offset 8
        blocks = raw.reshape(n, n_values // 32, 18)
        d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, :, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0
        return (d * q).reshape(n, n_values)
    raise ValueError(f"recall cannot read K of ggml type {ggml_type}")


def attention_mass(q: np.ndarray, k: np.ndarray, scale: float, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """Causal softmax attention of queries q [n_q, n_head, d] at positions q_pos over keys k [n_tok, n_head_kv, d]
    at k_pos, summed over queries and heads: [n_tok]. GQA: head h reads KV head h // (n_head / n_head_kv).

    Keys stay in their row layout (a KV head's [n_tok, d] slice is a strided matrix BLAS takes as it is): one
    float32 matmul per KV head with the group's query heads as columns, then the softmax over tokens in place. At
    30k keys a layer is a [n_head_kv, 30k, group * n_q] block, and a transposed copy of K or an extra temporary of
    that size cost more than the product itself."""
    n_q, n_head, d = q.shape
    n_tok, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    k = np.asarray(k, dtype=np.float32)
    # columns (g, t) of KV head h: query head h * group + g at query t
    qg = (np.asarray(q, dtype=np.float32).reshape(n_q, n_head_kv, group, d).transpose(1, 3, 2, 0)
          .reshape(n_head_kv, d, group * n_q) * np.float32(scale))
    logits = np.matmul(k.transpose(1, 0, 2), qg)                                   # [n_head_kv, n_tok, group*n_q]
    later = np.asarray(k_pos)[:, None] > np.asarray(q_pos)[None, :]                # [n_tok, n_q]: no later key
    if later.any():
        logits += np.tile(np.where(later, np.float32(-np.inf), np.float32(0)), (1, group))
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits.sum(axis=(0, 2))


def recall_mass(kv, positions: np.ndarray, layers, seq_id: int = 0, others: np.ndarray = None,
                timing: Optional[dict] = None, native: bool = False) -> np.ndarray:
    """Attention mass the latest decode's last queries (the newest positions of the sequence) give each of
    `positions`, resident or offloaded.

    `others`: positions that stay where they are whatever recall decides (sinks, the recent window). They are keys
    of the softmax too, so that each head's mass on `positions` is what it really gives them: a head that looks at
    the sinks or at the question itself gives the document little, and without those keys in the denominator its
    near-uniform leftovers would count as much as a retrieval head's peak.

    `timing`: seconds added under "read" (queries and K rows out of the native core, waiting for the handle
    included), "dequantize" and "softmax" (the products and softmax), summed over the threads that score layers
    side by side.

    `native`: the same sum computed by the backend that holds K (KVCache.recall_mass, llama-kv-recall.cpp); on a
    GPU the products and softmax take milliseconds where numpy took ~1 s for 30k tokens (docs/gpu.md). Timed
    under "native"."""
    positions = np.asarray(positions)
    keys = positions if others is None or not len(others) else np.concatenate([positions, np.asarray(others)])
    if native:
        t0 = time.perf_counter()
        mass = kv.recall_mass(list(layers), keys, len(positions), seq_id).astype(np.float64)
        if timing is not None:
            timing["native"] = timing.get("native", 0.0) + time.perf_counter() - t0
        return mass
    info = kv.info()
    d = info.n_embd_head_k
    newest = int(kv.cells(seq_id)[0].max())

    native = threading.Lock()  # one call into the handle at a time; the numpy work runs beside it

    spent = {"read": 0.0, "dequantize": 0.0, "softmax": 0.0}

    def layer_mass(il: int) -> np.ndarray:
        t0 = time.perf_counter()
        with native:
            q, scale = kv.query(il)
            raw = kv.k_rows(il, keys, seq_id)
        t1 = time.perf_counter()
        q_pos = np.arange(newest - q.shape[0] + 1, newest + 1)
        # numpy here, on the layer threads, measured faster on the H200 than ggml's row conversion under the handle's
        # lock (recall 0.85 s vs 1.24-1.28 s for a 30k prompt)
        k = dequantize_rows(raw, info.type_k, info.n_head_kv * d)
        t2 = time.perf_counter()
        mass = attention_mass(q, k.reshape(len(keys), info.n_head_kv, d), scale, q_pos, keys)
        with native:
            spent["read"] += t1 - t0
            spent["dequantize"] += t2 - t1
            spent["softmax"] += time.perf_counter() - t2
        return mass

    layers = list(layers)
    # layers are independent and numpy's conversions, exps and reductions release the GIL: one thread per layer
    # (up to the cores) keeps every core busy where a single thread would leave all but BLAS's idle, within ~2 GiB
    # of temporaries (a layer holds its keys and its logits as float32)
    n_q = kv.query(layers[0])[0].shape[0] if layers else 0
    per_layer = 4 * len(keys) * (info.n_head_kv * d + info.n_head * n_q)
    workers = min(len(layers), os.cpu_count() or 1, 16, max(1, (2 << 30) // max(1, per_layer)))
    if workers > 1 and len(keys) * info.n_head >= 1 << 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(layer_mass, layers))
    else:
        parts = [layer_mass(il) for il in layers]
    mass = np.sum(parts, axis=0, dtype=np.float64) if parts else np.zeros(len(keys), np.float64)
    if timing is not None:
        for k_, v in spent.items():
            timing[k_] = timing.get(k_, 0.0) + v
    return mass[: len(positions)]
