"""Which divergence to compute, validated once and shared by every backend.

Conventions (the same as TRL's ``generalized_jsd_loss`` and liger's JSD, so users can switch):
p is the student distribution, q the teacher's.

* ``reverse_kl``: KL(p || q), the SDFT paper's default (mode seeking, on-policy).
* ``forward_kl``: KL(q || p).
* ``jsd``: beta * KL(q || m) + (1 - beta) * KL(p || m) with m = beta * q + (1 - beta) * p.
  As in TRL and liger, beta == 0 means forward KL and beta == 1 reverse KL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class DivergenceSpec:
    """A validated divergence: ``kind`` is one of reverse_kl, forward_kl, jsd (0 < beta < 1)."""

    kind: str
    beta: float
    temperature: float

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def make_spec(divergence: str, beta: float = 0.5, temperature: float = 1.0) -> DivergenceSpec:
    """Validate the user's choice and fold jsd's end points into the two KLs."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    beta = float(beta)
    if not (0.0 <= beta <= 1.0) or math.isnan(beta):
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    return DivergenceSpec(divergence, beta, temperature)
