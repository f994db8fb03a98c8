"""The few numbers every results table needs: harmonic mean, mean and standard deviation over seeds.

Conventions (the ones the CoOp family uses, stated once here):

* Harmonic mean of base and new accuracy: ``HM = 2·b·n / (b + n)``, computed from the **seed-averaged**
  base and new accuracies (muzairkhattak/multimodal-prompt-learning#3), not as the mean of per-seed HMs.
* The 11-dataset "Average" row: the mean of the per-dataset base (new) means, then the HM of those two
  averages — exactly how the papers' Average rows are computed.
* Standard deviation over seeds is the population std (``ddof = 0``), as CoOp's ``parse_test_res.py``
  prints it; a single seed gives 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

__all__ = ["harmonic_mean", "mean_std", "SeedStats", "seed_stats", "ci95"]


def harmonic_mean(base: Optional[float], new: Optional[float]) -> Optional[float]:
    """``2·b·n / (b + n)``; None when either is missing, 0 when both are 0."""
    if base is None or new is None:
        return None
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and population std (ddof = 0) of ``values``; (None, None) for no values."""
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    return mean, math.sqrt(var)


def ci95(std: float, n: int) -> float:
    """``1.96·std/√n`` (what ``parse_test_res.py --ci95`` prints instead of the std)."""
    return 1.96 * std / math.sqrt(n) if n > 0 else float("nan")


@dataclass(frozen=True)
class SeedStats:
    """Accuracy over seeds: mean, population std, the seeds used and their values."""

    mean: Optional[float]
    std: Optional[float]
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def fmt(self, digits: int = 2, show_n: bool = False) -> str:
        if self.mean is None:
            return "–"
        text = f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return f"{text} (n={self.n})" if show_n else text


def seed_stats(by_seed: dict[int, float] | Iterable[tuple[int, float]]) -> SeedStats:
    """:class:`SeedStats` of a ``{seed: accuracy}`` mapping (seeds sorted)."""
    items = sorted(dict(by_seed).items())
    values = tuple(float(v) for _, v in items)
    mean, std = mean_std(values)
    return SeedStats(mean, std, tuple(int(s) for s, _ in items), values)
