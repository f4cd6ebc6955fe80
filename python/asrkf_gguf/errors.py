"""Exceptions shared by the wrappers; no native import here."""

from __future__ import annotations


class ClosedError(RuntimeError):
    """An Engine, LlamaSession or KVCache was used after close(): its native objects are gone."""


class HostBudgetError(RuntimeError):
    """An offload would take the host copies past their budget (ControllerConfig.host_budget_bytes, --host-budget).
    Refused before anything moved: the cache is as it was."""


class SessionError(ValueError):
    """A session file or blob that cannot be loaded into this Engine (not a session, damaged, or saved with another
    model, cache type, context or budget): the message says which. Refused before anything changed."""
