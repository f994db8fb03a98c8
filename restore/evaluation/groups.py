"""Group-robustness metrics: per-group accuracy, worst-group accuracy and the train-weighted average.

A *group* is a (class, spurious attribute) pair; with ``A`` attribute values its index is
``label * A + attribute`` (the convention of Sagawa et al.'s Waterbirds / CelebA code). Definitions
(all accuracies in percent):

* ``accuracy`` — the plain average accuracy over every test image (the test set's own group mix);
* ``worst_group_accuracy`` — the lowest per-group accuracy over the groups that have test images;
* ``group_mean_accuracy`` — the unweighted mean of the per-group accuracies;
* ``weighted_accuracy`` — the per-group test accuracies weighted by the groups' share of the
  **training** split (Waterbirds' conventional "average accuracy", whose test split is group-balanced
  while training is not); None when the train counts are not known;
* ``gap`` — ``accuracy - worst_group_accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["GroupMetrics", "group_index", "group_names", "group_metrics", "format_group_table"]


def group_index(labels: Sequence[int] | np.ndarray, attributes: Sequence[int] | np.ndarray,
                num_attributes: int) -> np.ndarray:
    """``label * num_attributes + attribute`` for each item."""
    return np.asarray(labels, dtype=np.int64) * num_attributes + np.asarray(attributes, dtype=np.int64)


def group_names(classnames: Sequence[str], attribute_names: Sequence[str]) -> list[str]:
    """``"<class> / <attribute>"`` for every group, in group-index order."""
    return [f"{c} / {a}" for c in classnames for a in attribute_names]


@dataclass
class GroupMetrics:
    """The numbers of one evaluation; ``per_group`` rows are (name, correct, total, accuracy or None)."""

    accuracy: float
    worst_group_accuracy: float
    worst_group: str
    group_mean_accuracy: float
    weighted_accuracy: Optional[float]
    per_group: list[tuple[str, int, int, Optional[float]]] = field(default_factory=list)
    train_counts: Optional[list[int]] = None

    @property
    def gap(self) -> float:
        return self.accuracy - self.worst_group_accuracy

    def as_record(self) -> dict[str, object]:
        """A JSON-ready dict (what ``results.json`` stores under ``groups``)."""
        return {
            "average_accuracy": self.accuracy,
            "worst_group_accuracy": self.worst_group_accuracy,
            "worst_group": self.worst_group,
            "group_mean_accuracy": self.group_mean_accuracy,
            "weighted_accuracy": self.weighted_accuracy,
            "gap": self.gap,
            "per_group": [{"group": name, "index": i, "correct": c, "total": n, "accuracy": a,
                           **({"train_count": self.train_counts[i]} if self.train_counts else {})}
                          for i, (name, c, n, a) in enumerate(self.per_group)],
            "definitions": {
                "average_accuracy": "all test images, the test split's own group mix",
                "worst_group_accuracy": "lowest per-group accuracy (groups with test images)",
                "group_mean_accuracy": "unweighted mean of the per-group accuracies",
                "weighted_accuracy": "per-group test accuracy weighted by the train split's group proportions",
            },
        }


def group_metrics(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray,
                  attributes: Sequence[int] | np.ndarray, names: Sequence[str], num_attributes: int = 2,
                  train_counts: Optional[Sequence[int]] = None) -> GroupMetrics:
    """Metrics of predictions ``preds`` for items with ``labels`` and spurious ``attributes``.

    ``names`` has one entry per group (``num_classes * num_attributes``, see :func:`group_names`);
    ``train_counts`` (same length) are the training split's images per group.
    Raises ValueError when no item was given or a group index falls outside ``names``.
    """
    y, p, a = (np.asarray(v, dtype=np.int64) for v in (labels, preds, attributes))
    if y.size == 0:
        raise ValueError("No predictions to evaluate: the evaluation set is empty.")
    num_groups = len(names)
    g = group_index(y, a, num_attributes)
    if g.min() < 0 or g.max() >= num_groups:
        raise ValueError(f"Group index {int(g.max())} is outside the {num_groups} groups {list(names)}.")
    correct = (y == p)
    per_group: list[tuple[str, int, int, Optional[float]]] = []
    accs: list[float] = []
    for i, name in enumerate(names):
        mask = g == i
        n, c = int(mask.sum()), int(correct[mask].sum())
        acc = 100.0 * c / n if n else None
        per_group.append((name, c, n, acc))
        if acc is not None:
            accs.append(acc)
    worst = min(range(num_groups), key=lambda i: (per_group[i][3] is None, per_group[i][3] or 0.0))
    weighted = None
    if train_counts is not None:
        w = np.asarray(train_counts, dtype=np.float64)
        present = np.array([r[3] is not None for r in per_group])
        if w.shape == (num_groups,) and w[present].sum() > 0:
            vals = np.array([r[3] if r[3] is not None else 0.0 for r in per_group])
            weighted = float((vals * w * present).sum() / (w * present).sum())
    return GroupMetrics(
        accuracy=100.0 * float(correct.mean()), worst_group_accuracy=float(per_group[worst][3] or 0.0),
        worst_group=per_group[worst][0], group_mean_accuracy=float(np.mean(accs)), weighted_accuracy=weighted,
        per_group=per_group, train_counts=[int(x) for x in train_counts] if train_counts is not None else None)


def format_group_table(m: GroupMetrics) -> str:
    """The per-group block printed after Dassl's ``=> result`` (one ``* group:`` line per group)."""
    lines = ["=> per-group result (group = class / spurious attribute)"]
    for i, (name, c, n, acc) in enumerate(m.per_group):
        train = f"\ttrain: {m.train_counts[i]:,}" if m.train_counts else ""
        shown = f"{acc:.1f}%" if acc is not None else "n/a"
        lines.append(f"* group: {i} ({name})\ttotal: {n:,}\tcorrect: {c:,}\tacc: {shown}{train}")
    lines.append(f"* average accuracy (all test images): {m.accuracy:.1f}%")
    lines.append(f"* worst-group accuracy: {m.worst_group_accuracy:.1f}% ({m.worst_group})")
    lines.append(f"* group-mean accuracy (unweighted): {m.group_mean_accuracy:.1f}%")
    if m.weighted_accuracy is not None:
        lines.append(f"* train-weighted average accuracy (per-group test acc x train group share): "
                     f"{m.weighted_accuracy:.1f}%")
    lines.append(f"* gap (average - worst-group): {m.gap:.1f}")
    return "\n".join(lines)
