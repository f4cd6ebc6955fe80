"""Exceptions shared by the wrappers; no native import here."""

from __future__ import annotations


class ClosedError(RuntimeError):
    """An Engine, LlamaSession or KVCache was used after close(): its native objects are gone."""


class HostBudgetError(RuntimeError):
    """An offload would take the host copies past their budget (ControllerConfig.host_budget_bytes, --host-budget).
    Refused before anything moved: the cache is as it was."""
