"""asrkf-gguf: reversible soft-freeze and host offload of the llama.cpp KV cache (ASR-KF-EGR)."""

from ._lib import ensure_llama_cpp_uses_our_library as _ensure

_ensure()

from .states import CellState  # noqa: E402

# the KV wrapper loads libllama (cffi dlopen): import it on first use, so that `asrkf_gguf.states`, the schedule
# and the policies stay usable without it
_FROM_KV = ("AsrkfError", "ClosedError", "KVInfo", "KVCache", "default_params")


def __getattr__(name):
    if name in _FROM_KV:
        from . import kv

        return getattr(kv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AsrkfError", "CellState", "ClosedError", "KVCache", "KVInfo", "default_params"]
__version__ = "0.1.0"
