"""The cffi declarations against native/include/asrkf.h: same functions, same signatures, same struct layouts."""

import re
import subprocess
import sys
from pathlib import Path

from asrkf_gguf import _cffi

HEADER = Path(__file__).resolve().parents[1] / "native" / "include" / "asrkf.h"


def _normalized(decl: str) -> str:
    """One spelling per declaration: comments gone, one space between words, none around * ( ) ,"""
    decl = re.sub(r"//[^\n]*|/\*.*?\*/", " ", decl, flags=re.S)
    decl = re.sub(r"\s+", " ", decl).strip()
    return re.sub(r"\s*([*(),;{}])\s*", r"\1", decl)


def _functions(text: str, prefix: str = "") -> dict:
    """name -> normalized prototype of every asrkf_ function declared in text (after `prefix`, e.g. ASRKF_API)."""
    protos = re.findall(prefix + r"([^;{}#]*?\b(asrkf_\w+)\s*\([^;{}]*\))\s*;", text)
    return {name: _normalized(proto) for proto, name in protos}


def _structs(text: str) -> dict:
    return {name: _normalized(body) for name, body in re.findall(r"struct\s+(asrkf_\w+)\s*\{(.*?)\};", text, re.S)}


def test_cdef_declares_every_exported_function_with_its_signature():
    header = HEADER.read_text()
    exported = _functions(header, r"ASRKF_API\s+")
    declared = _functions(_cffi.CDEF)
    assert len(exported) >= 20, "the header's ASRKF_API prototypes were not found"
    assert set(exported) == set(declared)
    for name in exported:
        assert declared[name] == exported[name], f"{name}: the cdef says {declared[name]}, asrkf.h {exported[name]}"


def test_cdef_structs_match_the_header():
    header, declared = _structs(HEADER.read_text()), _structs(_cffi.CDEF)
    assert set(declared) == {"asrkf_kv_params", "asrkf_kv_info"}
    for name, body in declared.items():
        assert body == header[name], f"struct {name} differs from asrkf.h"


def test_signature_comparison_sees_a_changed_parameter():
    # the comparison itself: a parameter type changed in the cdef must not look equal
    header = _functions(HEADER.read_text(), r"ASRKF_API\s+")
    changed = _functions(_cffi.CDEF.replace("int32_t asrkf_kv_freeze(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos",
                                            "int32_t asrkf_kv_freeze(asrkf_kv_t kv, int32_t seq_id, int32_t * pos"))
    assert changed["asrkf_kv_freeze"] != header["asrkf_kv_freeze"]


def test_library_exports_the_api():
    missing = []
    for name in _functions(_cffi.CDEF):
        try:
            getattr(_cffi.lib, name)  # a symbol the library lacks raises here
        except AttributeError:
            missing.append(name)
    assert missing == []


def test_cell_states_load_without_libllama():
    # reports and tables use CellState; importing it must not dlopen the native library
    code = ("import sys, asrkf_gguf.states\n"
            "from asrkf_gguf import CellState\n"
            "assert CellState.OFFLOADED == 3\n"
            "maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''\n"
            "print('llama_cpp' in sys.modules, 'asrkf_gguf._cffi' in sys.modules, 'libllama' in maps)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]
