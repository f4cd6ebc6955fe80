"""Write a random-weight GGUF of Llama-3-8B's shape in Q4_K_M's per-tensor types, for speed and memory work.

  python scripts/write_bench_model.py OUT.gguf                 # 32 layers, 4096 wide, GQA 32/8, vocab 128256
  python scripts/write_bench_model.py OUT.gguf --n-layer 4 --n-embd 1024 --n-ff 3584 --n-vocab 32000  # small

The blocks are random bytes with bounded scales, written straight in the quantized layouts: what llama-quantize
would make of random f16 weights, without writing and reading 16 GB of f16 first (that costs minutes of GPU-
machine time). Q4_K_M's mix, as llama.cpp's llama_tensor_get_type picks it: Q6_K for output.weight and for
attn_v / ffn_down of the layers use_more_bits selects, Q4_K for every other matrix, f32 norms. The tokenizer is
"no_vocab": token ids go straight in, nothing is ever detokenized. With --vocab FILE (scripts/extract_vocab.py
of a real model) it takes that vocabulary, its merges, special ids and chat template instead, and n_vocab becomes
its size: then `python -m asrkf_gguf run` and `Engine` run on it as on a real model (their text is noise).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import gguf
import numpy as np

QK_K = 256
Q4_K_BLOCK_BYTES = 144  # f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit quants
Q6_K_BLOCK_BYTES = 210  # 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, f16 d
# scales chosen so that the weights have a standard deviation of about 0.02, like trained ones; random bytes
# everywhere else. dmin ~ 7.5 d centres Q4_K's d*sc*q - dmin*m around zero.
Q4_K_D, Q4_K_DMIN = 8e-5, 6e-4
Q6_K_D = 1.5e-5


@dataclass(frozen=True)
class BenchModelShape:
    n_layer: int = 32
    n_embd: int = 4096
    n_head: int = 32
    n_head_kv: int = 8
    n_ff: int = 14336
    n_vocab: int = 128256
    n_ctx_train: int = 131072
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    # llama.cpp src/llama-quant.cpp: the first and last eighth of the layers, and every third in between
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def tensor_plan(shape: BenchModelShape):
    """(name, ne0, ne1, type) in file order; type is "f32", "q4_k" or "q6_k"."""
    kv_width = shape.n_head_kv * shape.head_dim
    plan = [("token_embd.weight", shape.n_embd, shape.n_vocab, "q4_k"),
            ("output_norm.weight", shape.n_embd, 1, "f32"),
            ("output.weight", shape.n_embd, shape.n_vocab, "q6_k")]
    for i in range(shape.n_layer):
        more = "q6_k" if use_more_bits(i, shape.n_layer) else "q4_k"
        plan += [(f"blk.{i}.attn_norm.weight", shape.n_embd, 1, "f32"),
                 (f"blk.{i}.attn_q.weight", shape.n_embd, shape.n_embd, "q4_k"),
                 (f"blk.{i}.attn_k.weight", shape.n_embd, kv_width, "q4_k"),
                 (f"blk.{i}.attn_v.weight", shape.n_embd, kv_width, more),
                 (f"blk.{i}.attn_output.weight", shape.n_embd, shape.n_embd, "q4_k"),
                 (f"blk.{i}.ffn_norm.weight", shape.n_embd, 1, "f32"),
                 (f"blk.{i}.ffn_gate.weight", shape.n_embd, shape.n_ff, "q4_k"),
                 (f"blk.{i}.ffn_up.weight", shape.n_embd, shape.n_ff, "q4_k"),
                 (f"blk.{i}.ffn_down.weight", shape.n_ff, shape.n_embd, more)]
    return plan


def random_blocks(rng: np.random.Generator, ne0: int, ne1: int, kind: str) -> np.ndarray:
    """ne1 rows of ne0 values as raw quantized bytes (uint8, shape (ne1, bytes per row))."""
    if ne0 % QK_K:
        raise ValueError(f"row length {ne0} is not a multiple of {QK_K}")
    block = Q4_K_BLOCK_BYTES if kind == "q4_k" else Q6_K_BLOCK_BYTES
    n_blocks = ne1 * ne0 // QK_K
    raw = np.frombuffer(rng.bytes(n_blocks * block), dtype=np.uint8).reshape(n_blocks, block).copy()
    if kind == "q4_k":
        raw[:, 0:2] = np.frombuffer(np.float16(Q4_K_D).tobytes(), dtype=np.uint8)
        raw[:, 2:4] = np.frombuffer(np.float16(Q4_K_DMIN).tobytes(), dtype=np.uint8)
    else:
        raw[:, 208:210] = np.frombuffer(np.float16(Q6_K_D).tobytes(), dtype=np.uint8)
    return raw.reshape(ne1, -1)


def load_vocab(path: str) -> dict:
    import gzip
    import json

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def add_vocab(w, vocab: dict) -> None:
    """The tokenizer fields of scripts/extract_vocab.py's file, with their types."""
    import gguf

    for name, field in vocab.items():
        if not name.startswith("tokenizer."):
            continue
        value = field["value"]
        if "array" in field:
            sub = None if field["array"] == "string" else gguf.GGUFValueType[field["array"]]
            if sub is None:
                value = [v.encode("utf-8", "surrogateescape") for v in value]
            w.add_array(name, value) if sub is None else w.add_key_value(name, value, gguf.GGUFValueType.ARRAY,
                                                                           sub_type=sub)
        elif field["type"] == "string":
            w.add_string(name, value)
        else:
            w.add_key_value(name, value, gguf.GGUFValueType[field["type"]])


def write_bench_model(path: str, shape: BenchModelShape = BenchModelShape(), seed: int = 0,
                      vocab: dict = None) -> int:
    """Writes the model; returns its size in bytes. Tensors are generated and written one at a time."""
    q = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("random Llama-3-8B shape (asrkf-gguf benchmark)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.n_vocab)
    if vocab is None:
        w.add_tokenizer_model("no_vocab")
    else:
        add_vocab(w, vocab)
    plan = tensor_plan(shape)
    for name, ne0, ne1, kind in plan:
        if kind == "f32":
            w.add_tensor_info(name, (ne0,), np.dtype(np.float32), ne0 * 4)
        else:
            nbytes = ne1 * ne0 // QK_K * (Q4_K_BLOCK_BYTES if kind == "q4_k" else Q6_K_BLOCK_BYTES)
            w.add_tensor_info(name, (ne1, nbytes // ne1), np.dtype(np.uint8), nbytes, raw_dtype=q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for name, ne0, ne1, kind in plan:
        data = np.ones(ne0, dtype=np.float32) if kind == "f32" else random_blocks(rng, ne0, ne1, kind)
        w.write_tensor_data(data)
        total += data.nbytes
    w.close()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    d = BenchModelShape()
    for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab"):
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(d, field))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", help="tokenizer of a real model (scripts/extract_vocab.py); sets n_vocab")
    args = ap.parse_args()
    vocab = load_vocab(args.vocab) if args.vocab else None
    n_vocab = len(vocab["tokenizer.ggml.tokens"]["value"]) if vocab else args.n_vocab
    shape = BenchModelShape(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                            n_head_kv=args.n_head_kv, n_ff=args.n_ff, n_vocab=n_vocab)
    nbytes = write_bench_model(args.out, shape, args.seed, vocab)
    print(f"{args.out}: {nbytes / 2**30:.2f} GiB of tensor data, {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
