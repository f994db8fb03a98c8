"""Results: harmonic mean and seed statistics, reading runs back, and the aggregate tables.

* :mod:`restore.evaluation.metrics` — ``harmonic_mean``, ``mean_std``, ``seed_stats`` (the conventions);
* :mod:`restore.evaluation.results` — the output layout, ``results.json`` / ``log.txt`` readers and a
  ``parse_test_res.py`` equivalent (``python -m restore.evaluation.results DIR``);
* :mod:`restore.evaluation.aggregate` — ``python -m restore.evaluation.aggregate output/``.
"""

from .metrics import SeedStats, harmonic_mean, mean_std, seed_stats
from .results import RunRecord, collect_runs, parse_log, read_log_accuracy

__all__ = ["SeedStats", "harmonic_mean", "mean_std", "seed_stats", "RunRecord", "collect_runs", "parse_log",
           "read_log_accuracy"]
