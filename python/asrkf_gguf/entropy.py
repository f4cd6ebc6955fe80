"""Entropy-guided recovery (the paper's proposed Sec. 3.6, implemented): spikes of the next-token entropy
against its running statistics escalate through four recovery levels while they persist.

  SR  soft reset:   unfreeze tokens whose freeze duration is above one period
  WR  window reset: unfreeze what was frozen in the last N steps
  FR  full reset:   clear all durations, bring back as much as the budget holds, most important first
  RR  rewalk:       FR, then regenerate the last k tokens
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class Recovery(enum.IntEnum):
    SR = 1
    WR = 2
    FR = 3
    RR = 4


def entropy_of(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits), computed stably."""
    # float32: a step's vocabulary (150k logits) costs a few hundred microseconds less, and the spike test
    # compares entropies against a running deviation far above float32's rounding
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {x.shape}")
    m = x.max()
    if not math.isfinite(m):
        raise ValueError("logits contain no finite maximum")
    z = x - m
    e = np.exp(z)
    s = float(e.sum(dtype=np.float64))
    return float(math.log(s) - float(np.dot(e, z)) / s)


@dataclass
class EntropyMonitor:
    """Running mean/variance of the entropy (exponential), spike detection and level escalation."""

    alpha: float = 0.05      # weight of the newest step in the running statistics
    z_spike: float = 2.5     # spike: entropy > mean + z_spike * std
    warmup: int = 16         # steps of statistics before any spike is judged
    cooldown: int = 8        # quiet steps after which the escalation starts again from SR

    mean: float = field(default=0.0, init=False)
    var: float = field(default=0.0, init=False)
    steps: int = field(default=0, init=False)
    level: int = field(default=0, init=False)
    quiet: int = field(default=0, init=False)
    threshold: float = field(default=math.inf, init=False)  # the spike threshold of the latest step

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.z_spike <= 0 or self.warmup < 1 or self.cooldown < 1:
            raise ValueError("z_spike, warmup and cooldown must be positive")

    def update(self, entropy: float) -> Optional[Recovery]:
        """Feed one step's entropy; returns the recovery level to apply now, or None."""
        if not math.isfinite(entropy):
            raise ValueError(f"entropy must be finite, got {entropy}")
        self.threshold = self.mean + self.z_spike * math.sqrt(max(self.var, 1e-12)) if self.steps >= self.warmup \
            else math.inf
        spike = entropy > self.threshold

        if spike:
            self.quiet = 0
            self.level = min(self.level + 1, int(Recovery.RR))
        else:
            self.quiet += 1
            if self.quiet >= self.cooldown:
                self.level = 0

        # a spike is kept out of the statistics so that it keeps counting as one while it persists; once the
        # escalation has reached RR the statistics take it in, so a lasting new regime stops escalating
        if not spike or self.level >= Recovery.RR:
            if self.steps == 0:
                self.mean, self.var = entropy, 0.0
            else:
                delta = entropy - self.mean
                self.mean += self.alpha * delta
                self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.steps += 1

        return Recovery(self.level) if spike else None
