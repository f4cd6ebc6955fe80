"""asrkf-gguf: reversible soft-freeze and host offload of the llama.cpp KV cache (ASR-KF-EGR)."""

from ._lib import ensure_llama_cpp_uses_our_library as _ensure

_ensure()

from .kv import AsrkfError, CellState, KVInfo, KVCache, default_params  # noqa: E402

__all__ = ["AsrkfError", "CellState", "KVCache", "KVInfo", "default_params"]
__version__ = "0.1.0"
