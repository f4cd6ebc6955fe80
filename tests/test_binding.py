import re
from pathlib import Path

from asrkf_gguf import _cffi

HEADER = Path(__file__).resolve().parents[1] / "native" / "include" / "asrkf.h"


def test_cdef_declares_every_exported_function():
    exported = set(re.findall(r"ASRKF_API\s+[^;(]*?\b(asrkf_\w+)\s*\(", HEADER.read_text()))
    declared = set(re.findall(r"\b(asrkf_\w+)\s*\(", _cffi.CDEF))
    assert exported, "no ASRKF_API function found in the header"
    assert exported == declared


def test_library_exports_the_api():
    # a missing symbol raises on attribute access
    for name in re.findall(r"\b(asrkf_\w+)\s*\(", _cffi.CDEF):
        assert getattr(_cffi.lib, name) is not None
