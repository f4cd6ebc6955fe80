"""Cell states shared by the KV wrapper, the token table and the policies; no native import here, so that code
which only reads tables or results (reports, plots) can use them without loading libllama."""

from __future__ import annotations

import enum


class CellState(enum.IntEnum):
    ACTIVE = 1
    FROZEN = 2
    OFFLOADED = 3
    DROPPED = 4  # eviction baselines only (window, h2o): removed for good; never produced by the native core
