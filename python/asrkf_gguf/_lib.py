"""Locate the patched libllama built with this package and make llama-cpp-python load it.

llama-cpp-python reads LLAMA_CPP_LIB_PATH once, when `llama_cpp` is first imported, so this module must run
before that import; `asrkf_gguf/__init__.py` imports it first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


class LibraryNotFoundError(ImportError):
    pass


def lib_dir() -> Path:
    override = os.environ.get("ASRKF_GGUF_LIB_DIR")
    return Path(override) if override else PACKAGE_DIR / "lib"


def libllama_path() -> Path:
    names = {"linux": "libllama.so", "darwin": "libllama.dylib", "win32": "llama.dll"}
    name = names.get(sys.platform, "libllama.so")
    path = lib_dir() / name
    if not path.exists():
        raise LibraryNotFoundError(
            f"the patched libllama is missing ({path}); install the package with `pip install .` "
            "from the asrkf-gguf checkout (it builds libllama), or set ASRKF_GGUF_LIB_DIR to a folder holding it")
    return path


def libggml_path() -> Path:
    """libggml next to libllama (the one libllama loads: its device registry and backends)."""
    path = libllama_path()
    return path.with_name(path.name.replace("llama", "ggml"))


def rpc_server_path() -> Path:
    """llama.cpp's RPC server (ggml-rpc-server), built from the same source as the libraries and installed next to
    them; missing when the build had no RPC backend (-DASRKF_RPC=OFF)."""
    return lib_dir() / ("ggml-rpc-server.exe" if sys.platform == "win32" else "ggml-rpc-server")


def ensure_llama_cpp_uses_our_library() -> None:
    """Point llama-cpp-python at our libllama, or fail if it already loaded another one."""
    path = libllama_path()
    if "llama_cpp" in sys.modules or "llama_cpp.llama_cpp" in sys.modules:
        import llama_cpp.llama_cpp as bindings

        loaded = Path(getattr(bindings._lib, "_name", "")).resolve()
        if loaded != path.resolve():
            raise ImportError(
                f"llama_cpp was imported before asrkf_gguf and loaded {loaded}; import asrkf_gguf first "
                f"(or set LLAMA_CPP_LIB_PATH={path.parent}) so that both use the patched library")
        return
    os.environ["LLAMA_CPP_LIB_PATH"] = str(path.parent)
