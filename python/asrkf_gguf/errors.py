"""Exceptions shared by the wrappers; no native import here."""

from __future__ import annotations


class ClosedError(RuntimeError):
    """An Engine, LlamaSession or KVCache was used after close(): its native objects are gone."""
