"""Results: harmonic mean and seed statistics, reading runs back, and the aggregate tables.

* :mod:`restore.evaluation.metrics` — ``harmonic_mean``, ``mean_std``, ``seed_stats`` (the conventions);
* :mod:`restore.evaluation.results` — the output layout, ``results.json`` / ``log.txt`` readers and a
  ``parse_test_res.py`` equivalent (``python -m restore.evaluation.results DIR``);
* :mod:`restore.evaluation.aggregate` — ``python -m restore.evaluation.aggregate output/``.

The readers of :mod:`~restore.evaluation.results` are imported on first use, so that
``python -m restore.evaluation.results`` runs a module nothing imported before.
"""

from typing import Any

from .metrics import SeedStats, harmonic_mean, mean_std, seed_stats

_FROM_RESULTS = ("RunRecord", "collect_runs", "parse_log", "read_log_accuracy")

__all__ = ["SeedStats", "harmonic_mean", "mean_std", "seed_stats", "RunRecord", "collect_runs", "parse_log",
           "read_log_accuracy"]


def __getattr__(name: str) -> Any:
    if name in _FROM_RESULTS:
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
