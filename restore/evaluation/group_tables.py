"""Group-robustness tables from an output folder: Markdown, CSV and per-group bar charts.

    python -m restore.evaluation.group_tables output/ [--out DIR] [--no-plot]

Reads every run's ``results.json`` that carries a ``groups`` record (runs of the ``groups`` protocol,
or any run evaluated with ``TEST.EVALUATOR GroupClassification``) and writes to ``DIR`` (default
``<folder>/aggregate``):

* ``groups.md`` (also printed): per dataset, one row per method / config / shots / backbone with the
  average accuracy, the worst-group accuracy, their gap, the train-weighted average (Waterbirds'
  convention) and the number of seeds — each mean ± population std over seeds;
* ``groups.csv``: the same rows plus the mean accuracy of every group;
* ``groups_<dataset>.png``: per-group accuracy bars of every method (mean over seeds, std as error bars).
"""

from __future__ import annotations

import argparse
import csv
import os
import os.path as osp
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .metrics import mean_std
from .results import RESULTS_FILE, collect_runs

__all__ = ["GroupRow", "group_rows", "group_markdown", "write_group_csv", "plot_groups", "aggregate_groups", "main"]


@dataclass
class GroupRow:
    """One method on one dataset: the seeds' numbers (percent) and per-group accuracies."""

    dataset: str
    method: str
    cfg: str
    shots: int
    backbone: str
    selection: str
    seeds: list[int] = field(default_factory=list)
    average: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    weighted: list[float] = field(default_factory=list)
    groups: dict[str, list[float]] = field(default_factory=dict)

    @property
    def gap(self) -> list[float]:
        return [a - w for a, w in zip(self.average, self.worst)]


def _fmt(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return "–" if mean is None else f"{mean:.1f} ± {std:.1f}"


def group_rows(root: str) -> list[GroupRow]:
    """Rows of every run below ``root`` whose results.json has a ``groups`` record, grouped over seeds."""
    rows: dict[tuple[str, ...], GroupRow] = {}
    for rec in collect_runs(root):
        groups = rec.info.get("groups") if rec.source == RESULTS_FILE else None
        if not isinstance(groups, dict):
            continue
        sel = rec.info.get("model_selection") or {}
        selection = ("last epoch" if sel.get("final_model") != "best_val"
                     else "none (not trained)" if sel.get("best_epoch") is None else f"val {sel.get('metric')}")
        key = (rec.dataset, rec.method, rec.cfg, str(rec.shots), rec.backbone, selection)
        row = rows.setdefault(key, GroupRow(rec.dataset, rec.method, rec.cfg, rec.shots, rec.backbone, selection))
        row.seeds.append(rec.seed)
        row.average.append(float(groups["average_accuracy"]))
        row.worst.append(float(groups["worst_group_accuracy"]))
        if groups.get("weighted_accuracy") is not None:
            row.weighted.append(float(groups["weighted_accuracy"]))
        for g in groups.get("per_group", []):
            if g.get("accuracy") is not None:
                row.groups.setdefault(str(g["group"]), []).append(float(g["accuracy"]))
    return sorted(rows.values(), key=lambda r: (r.dataset, r.method, r.cfg, r.shots, r.backbone, r.selection))


def group_markdown(rows: Sequence[GroupRow]) -> str:
    """One table per dataset: avg / worst-group / gap / train-weighted avg, mean ± std over seeds."""
    by_dataset: dict[str, list[GroupRow]] = defaultdict(list)
    for row in rows:
        by_dataset[row.dataset].append(row)
    out = ["## Group robustness",
           "Average = all test images; worst = lowest per-group test accuracy; gap = average − worst; "
           "train-weighted = per-group test accuracy weighted by the train split's group proportions "
           "(Waterbirds' usual \"average\"). Mean ± std (population) over seeds; selection = the val metric "
           "that picked the tested model."]
    for dataset, items in by_dataset.items():
        out += ["", f"### {dataset}", "",
                "| method | config | shots | backbone | selection | seeds | average | worst-group | gap | "
                "train-weighted |", "|" + "---|" * 10]
        for r in items:
            out.append(f"| {r.method} | {r.cfg} | {r.shots} | {r.backbone} | {r.selection} | {len(r.seeds)} | "
                       f"{_fmt(r.average)} | {_fmt(r.worst)} | {_fmt(r.gap)} | {_fmt(r.weighted)} |")
    return "\n".join(out) + "\n"


def write_group_csv(rows: Sequence[GroupRow], path: str) -> str:
    """``groups.csv``: the table's columns as numbers, plus one ``group: <name>`` mean column per group."""
    group_names = list(dict.fromkeys(name for r in rows for name in r.groups))
    header = ["dataset", "method", "cfg", "shots", "backbone", "selection", "seeds", "average_mean", "average_std",
              "worst_group_mean", "worst_group_std", "gap_mean", "gap_std", "weighted_mean", "weighted_std",
              *[f"group: {g}" for g in group_names]]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            stats = [x for values in (r.average, r.worst, r.gap, r.weighted) for x in mean_std(values)]
            means = [mean_std(r.groups[g])[0] if g in r.groups else None for g in group_names]
            writer.writerow([r.dataset, r.method, r.cfg, r.shots, r.backbone, r.selection,
                             " ".join(map(str, sorted(r.seeds))),
                             *["" if v is None else f"{v:.4f}" for v in [*stats, *means]]])
    return path


def plot_groups(rows: Sequence[GroupRow], dataset: str, path: str) -> Optional[str]:
    """Per-group accuracy bars (one colour per method row, std error bars); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    items = [r for r in rows if r.dataset == dataset]
    names = list(dict.fromkeys(name for r in items for name in r.groups))
    if not items or not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.2))
    width = 0.8 / len(items)
    for i, r in enumerate(items):
        stats = [mean_std(r.groups.get(g, [])) for g in names]
        xs = [k + (i - (len(items) - 1) / 2) * width for k in range(len(names))]
        shots = "all images" if r.shots < 1 else f"{r.shots} shots"
        label = f"{r.method} ({r.cfg}, {shots}, {len(r.seeds)} seeds): avg {_fmt(r.average)}, worst {_fmt(r.worst)}"
        bars = ax.bar(xs, [m or 0.0 for m, _ in stats], width, yerr=[s or 0.0 for _, s in stats], capsize=3,
                      label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)  # a 0% bar is otherwise invisible
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(" / ", "\n") for n in names], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 112)
    ax.set_title(f"{dataset}: accuracy per group (class / spurious attribute), mean ± std over seeds")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def aggregate_groups(root: str, out_dir: str = "", plot: bool = True) -> dict[str, Any]:
    """Write groups.md / groups.csv / groups_<dataset>.png for the runs below ``root``; return what was written."""
    rows = group_rows(root)
    out_dir = out_dir or osp.join(root, "aggregate")
    os.makedirs(out_dir, exist_ok=True)
    text = group_markdown(rows)
    with open(osp.join(out_dir, "groups.md"), "w") as f:
        f.write(text)
    written: dict[str, Any] = {"rows": rows, "markdown": text, "md": osp.join(out_dir, "groups.md"),
                               "csv": write_group_csv(rows, osp.join(out_dir, "groups.csv")), "png": []}
    if plot:
        for dataset in dict.fromkeys(r.dataset for r in rows):
            png = plot_groups(rows, dataset, osp.join(out_dir, f"groups_{dataset}.png"))
            if png:
                written["png"].append(png)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restore.evaluation.group_tables",
                                     description="Group-robustness tables (average / worst-group / gap per method "
                                                 "and dataset, mean ± std over seeds) and per-group bar charts.")
    parser.add_argument("root", help="output folder of the runs (e.g. output/)")
    parser.add_argument("--out", default="", help="where to write (default: ROOT/aggregate)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG charts")
    args = parser.parse_args(argv)
    if not osp.isdir(args.root):
        print(f"error: {args.root!r} is not a folder; pass the output folder of the runs (e.g. output/).",
              file=sys.stderr)
        return 2
    written = aggregate_groups(args.root, args.out, plot=not args.no_plot)
    if not written["rows"]:
        print(f"error: no run with group metrics below {args.root} (results.json written by the GroupClassification "
              "evaluator: scripts/groups/train.sh).", file=sys.stderr)
        return 2
    sys.stdout.write(written["markdown"])
    for key in ("md", "csv"):
        print(f"Wrote {written[key]}")
    for png in written["png"]:
        print(f"Wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
