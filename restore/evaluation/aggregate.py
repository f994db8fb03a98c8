"""Result tables of every protocol from an output folder: Markdown, CSV and a bar chart.

    python -m restore.evaluation.aggregate output/ [--out DIR] [--no-plot]

Reads every run below the folder (``results.json``; ``log.txt`` for runs of other CoOp-family code,
see :mod:`restore.evaluation.results`) and writes to ``DIR`` (default ``<folder>/aggregate``):

* ``summary.md`` (also printed): per method/config/backbone, the base-to-novel table (base, new, HM
  per dataset and the 11-dataset average), the cross-dataset and domain-generalization tables and the
  few-shot table, each with the published number and the difference where the paper gives one;
* ``base2new.csv``, ``cross_dataset.csv``, ``domain_generalization.csv``, ``few_shot.csv`` (the same
  tables, plus cost: training wall time, training / evaluation images per second, peak memory) and
  ``runs.csv`` (one row per run);
* ``base2new_<method>.png``: base / new / HM bars per dataset.

Conventions (see :mod:`restore.evaluation.metrics`): mean ± population std over seeds; HM of the
seed-averaged base and new accuracy; Average rows = mean over the protocol's own datasets only (the 11
base-to-novel datasets; the 10 cross-dataset targets; the 4 domain-generalization targets) of the
per-dataset means (HM of the two averages), marked "partial k/N" unless all N are present (then no
paper average is compared). Runs on other datasets are listed as "not a target" and never averaged.

Published numbers are in ``restore/evaluation/published/*.csv``. Which row a run is compared with
depends on its method *and* config, as each method declares (:func:`published_method`): a variant
config can name its own row, or none. The paper's per-dataset HM is recomputed
from its base and new accuracy (several printed HMs are not HM(base, new)); the printed value is kept
in the CSV (``paper_hm_printed``) and used only where base / new are not published.
"""

from __future__ import annotations

import argparse
import csv
import os
import os.path as osp
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from .metrics import SeedStats, harmonic_mean, seed_stats
from .results import RunRecord, collect_runs

__all__ = ["DISPLAY_NAMES", "BASE2NEW_DATASETS", "XD_TARGETS", "DG_TARGETS", "load_published", "published_method",
           "Base2NewRow", "base2new_tables", "transfer_tables", "fewshot_tables", "aggregate", "main"]

BASE2NEW_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                     "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_TARGETS = BASE2NEW_DATASETS[1:]
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
DISPLAY_NAMES = {
    "imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets", "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102", "food101": "Food101", "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397",
    "dtd": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101", "imagenetv2": "ImageNetV2",
    "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R",
}
PUBLISHED_DIR = osp.join(osp.dirname(osp.abspath(__file__)), "published")
RANDOM_BACKBONES = {"tiny", "tiny-rn"}  # restore.clip.loader's random test backbones (not imported: no torch here)
#: The published tables are 16-shot runs; other shot counts get no paper column.
PUBLISHED_SHOTS = 16


def display(dataset: str) -> str:
    return DISPLAY_NAMES.get(dataset, dataset)


def published_method(method: str, cfg: str = "") -> Optional[str]:
    """The row name in the published tables for an output label and config; None: no published row.

    Read from the method's registered spec (:meth:`restore.methods.MethodSpec.published_row`: by config
    first, then the method's published name); a label no plugin registers is its own row name.
    """
    from restore.methods import find_method, load_plugins

    spec = find_method(method)
    if spec is None:
        load_plugins()
        spec = find_method(method)
    return method if spec is None else spec.published_row(cfg)


def paper_numbers(row: dict[str, Any]) -> dict[str, Optional[float]]:
    """Base / new / HM of a published row, HM recomputed from base and new where both are published.

    The papers' per-dataset HMs are not always HM(base, new) (RESTORE Table 1: EuroSAT in every method,
    PromptSRC FGVCAircraft 31.27 vs 32.30, ...; restore.md §2.8), so the comparison uses the recomputed
    value; ``hm_printed`` keeps the printed one.
    """
    base, new, printed = row.get("base"), row.get("new"), row.get("hm")
    hm = harmonic_mean(base, new) if base is not None and new is not None else printed
    return {"base": base, "new": new, "hm": hm, "hm_printed": printed}


def _float(text: str) -> Optional[float]:
    text = (text or "").strip()
    return float(text) if text else None


def load_published(directory: str = PUBLISHED_DIR) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """``{protocol: {(method, dataset): row}}`` from ``published/<protocol>.csv``."""
    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for protocol in ("base2new", "cross_dataset", "domain_generalization", "few_shot"):
        path = osp.join(directory, f"{protocol}.csv")
        table: dict[tuple[str, str], dict[str, Any]] = {}
        if osp.isfile(path):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    parsed = {k: (_float(v) if k in ("base", "new", "hm", "accuracy") else v) for k, v in row.items()}
                    table[(row["method"], row["dataset"])] = parsed
        out[protocol] = table
    return out


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _delta(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _max(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _cost(records: Sequence[RunRecord], key: str, how: str = "mean") -> Optional[float]:
    vals = [r.info.get(key) for r in records if isinstance(r.info.get(key), (int, float))]
    return (_max if how == "max" else _mean)(vals)


GroupKey = tuple[str, str, int, str]  # method, cfg, shots, backbone


def _group_title(key: GroupKey, protocol: str) -> str:
    method, cfg, shots, backbone = key
    parts = [f"cfg `{cfg}`" if cfg else "", f"{shots} shots" if shots > 0 else "", f"backbone `{backbone}`" if backbone else ""]
    return f"{method} — " + ", ".join(p for p in parts if p)


def _random_note(backbone: str) -> str:
    return (f"\n> Backbone `{backbone}` has RANDOM weights: these numbers only show that the pipeline runs; "
            "they are meaningless as accuracies.\n") if backbone in RANDOM_BACKBONES else ""


# ------------------------------------------------------------------------------ base-to-novel
@dataclass
class Base2NewRow:
    dataset: str
    base: SeedStats
    new: SeedStats
    hm: Optional[float]
    paper: dict[str, Optional[float]] = field(default_factory=dict)
    cost: dict[str, Optional[float]] = field(default_factory=dict)
    is_average: bool = False
    n_datasets: int = 0
    n_targets: int = len(BASE2NEW_DATASETS)
    other: bool = False  # a dataset outside the protocol's 11: listed, never averaged

    @property
    def partial(self) -> bool:
        return self.is_average and self.n_datasets < self.n_targets

    def seeds_text(self) -> str:
        if self.is_average:
            return _coverage(self.n_datasets, self.n_targets)
        nb, nn = self.base.n, self.new.n
        return str(nb) if nb == nn else f"{nb} / {nn}"


def _coverage(n: int, total: int) -> str:
    return f"{n}/{total} datasets" if n >= total else f"partial {n}/{total} datasets"


def base2new_tables(records: Sequence[RunRecord], published: Optional[dict] = None,
                    ) -> dict[GroupKey, list[Base2NewRow]]:
    """Per (method, cfg, shots, backbone): a row per dataset plus the Average row."""
    published = load_published() if published is None else published
    paper_table = published.get("base2new", {})
    groups: dict[GroupKey, dict[str, dict[str, dict[int, RunRecord]]]] = defaultdict(
        lambda: defaultdict(lambda: {"base": {}, "new": {}, "test_base": {}}))
    for r in records:
        if r.protocol_dir != "base2new":
            continue
        slot = {"train_base": "base", "test_new": "new", "test_base": "test_base"}[r.phase]
        groups[(r.method, r.cfg, r.shots, r.backbone)][r.dataset][slot][r.seed] = r
    tables: dict[GroupKey, list[Base2NewRow]] = {}
    for key, by_dataset in groups.items():
        rows = []
        pname = published_method(key[0], key[1]) if key[2] == PUBLISHED_SHOTS else None
        for dataset in _ordered(by_dataset, BASE2NEW_DATASETS):
            runs = by_dataset[dataset]
            base_runs = {**runs["test_base"], **runs["base"]}  # the training run's own test wins
            base = seed_stats({s: r.accuracy for s, r in base_runs.items()})
            new = seed_stats({s: r.accuracy for s, r in runs["new"].items()})
            paper = paper_numbers(paper_table.get((pname, dataset), {}))
            trained = list(runs["base"].values())
            evals = list(runs["new"].values())
            cost = {
                "train_wall_time_s": _cost(trained, "wall_time_s"),
                "train_images_per_s": _cost(trained, "train_images_per_s"),
                "eval_images_per_s": _cost(evals or trained, "eval_images_per_s"),
                "peak_memory_mb": _cost(trained + evals, "peak_memory_mb", "max"),
            }
            rows.append(Base2NewRow(dataset, base, new, harmonic_mean(base.mean, new.mean), paper, cost,
                                    other=dataset not in BASE2NEW_DATASETS))
        # the Average is over the protocol's 11 datasets only; with fewer it is partial and has no paper value
        complete = [r for r in rows if not r.other and r.base.mean is not None and r.new.mean is not None]
        if complete:
            avg_base = _mean(r.base.mean for r in complete)
            avg_new = _mean(r.new.mean for r in complete)
            paper = paper_table.get((pname, "average"), {}) if len(complete) == len(BASE2NEW_DATASETS) else {}
            rows.append(Base2NewRow(
                "average", SeedStats(avg_base, None, (), ()), SeedStats(avg_new, None, (), ()),
                harmonic_mean(avg_base, avg_new), paper_numbers(paper),
                {"train_wall_time_s": _mean(r.cost["train_wall_time_s"] for r in complete),
                 "peak_memory_mb": _max(r.cost["peak_memory_mb"] for r in complete)},
                is_average=True, n_datasets=len(complete)))
        tables[key] = rows
    return dict(sorted(tables.items()))


def _ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    keys = list(keys)
    return [d for d in order if d in keys] + sorted(d for d in keys if d not in order)


def _stat_text(s: SeedStats) -> str:
    if s.mean is None:
        return "–"
    return f"{s.mean:.2f}" if s.std is None else f"{s.mean:.2f} ± {s.std:.2f}"


def _paper_note(key: GroupKey) -> str:
    """Which published row the Paper column shows for this group (or why there is none)."""
    if key[2] != PUBLISHED_SHOTS:
        return f"Paper: none ({key[2]}-shot runs; the published tables are {PUBLISHED_SHOTS}-shot).\n"
    name = published_method(key[0], key[1])
    if name is None:
        return f"Paper: none (no published row for config `{key[1]}`).\n"
    return f"Paper: `{name}`.\n"


def base2new_markdown(key: GroupKey, rows: Sequence[Base2NewRow]) -> str:
    lines = [f"### Base-to-novel: {_group_title(key, 'base2new')}", _random_note(key[3]), _paper_note(key),
             "| Dataset | Seeds | Base | New | HM | Paper Base / New / HM | Δ Base | Δ New | Δ HM | Train time (s) "
             "| Peak mem (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "**Average**" if r.is_average else display(r.dataset) + (" (not a benchmark dataset)" if r.other else "")
        paper = " / ".join(_fmt(r.paper.get(k)) for k in ("base", "new", "hm")) if any(
            r.paper.get(k) is not None for k in ("base", "new", "hm")) else "–"
        deltas = " | ".join(_fmt(_delta(ours, r.paper.get(k))) for ours, k in
                            ((r.base.mean, "base"), (r.new.mean, "new"), (r.hm, "hm")))
        lines.append(f"| {name} | {r.seeds_text()} | {_stat_text(r.base)} | {_stat_text(r.new)} | {_fmt(r.hm)} | "
                     f"{paper} | {deltas} | "
                     f"{_fmt(r.cost.get('train_wall_time_s'), 1)} | {_fmt(r.cost.get('peak_memory_mb'), 0)} |")
    return "\n".join(lines) + "\n"


def base2new_csv_rows(key: GroupKey, rows: Sequence[Base2NewRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        out.append({
            "method": key[0], "cfg": key[1], "shots": key[2], "backbone": key[3],
            "dataset": "average" if r.is_average else r.dataset,
            "n_seeds_base": r.base.n, "n_seeds_new": r.new.n, "n_datasets": r.n_datasets if r.is_average else "",
            "n_targets": r.n_targets if r.is_average else "", "partial": r.partial if r.is_average else "",
            "role": "average" if r.is_average else ("other" if r.other else "target"),
            "base_mean": r.base.mean, "base_std": r.base.std, "new_mean": r.new.mean, "new_std": r.new.std,
            "hm": r.hm, "base_values": " ".join(f"{v:g}" for v in r.base.values),
            "new_values": " ".join(f"{v:g}" for v in r.new.values),
            "paper_base": r.paper.get("base"), "paper_new": r.paper.get("new"), "paper_hm": r.paper.get("hm"),
            "paper_hm_printed": r.paper.get("hm_printed"),
            "delta_base": _delta(r.base.mean, r.paper.get("base")), "delta_new": _delta(r.new.mean, r.paper.get("new")),
            "delta_hm": _delta(r.hm, r.paper.get("hm")), **r.cost,
        })
    return out


# ------------------------------------------------------------------------------ transfer (xd, dg)
@dataclass
class TransferRow:
    dataset: str
    stats: SeedStats
    paper: Optional[float]
    role: str  # source, target, other (a dataset outside the protocol's targets: never averaged), average
    cost: dict[str, Optional[float]] = field(default_factory=dict)
    n_datasets: int = 0
    n_targets: int = 0

    @property
    def partial(self) -> bool:
        return self.role == "average" and self.n_datasets < self.n_targets


def transfer_tables(records: Sequence[RunRecord], protocol_dir: str, published: Optional[dict] = None,
                    ) -> dict[GroupKey, list[TransferRow]]:
    """Cross-dataset (``xd``) or domain-generalization (``dg``) tables: source, targets, target average."""
    published = load_published() if published is None else published
    pkey = "cross_dataset" if protocol_dir == "xd" else "domain_generalization"
    targets = XD_TARGETS if protocol_dir == "xd" else DG_TARGETS
    paper_table = published.get(pkey, {})
    groups: dict[GroupKey, dict[str, dict[int, RunRecord]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.protocol_dir == protocol_dir and r.phase == "test":
            groups[(r.method, r.cfg, r.shots, r.backbone)][r.dataset][r.seed] = r
    sources: dict[GroupKey, dict[int, RunRecord]] = defaultdict(dict)
    for r in records:
        if r.protocol_dir == "xd" and r.phase == "train":
            sources[(r.method, r.cfg, r.shots, r.backbone)][r.seed] = r
    tables = {}
    for key, by_dataset in groups.items():
        pname = published_method(key[0], key[1]) if key[2] == PUBLISHED_SHOTS else None
        rows = []
        if key in sources:
            src = sources[key]
            rows.append(TransferRow("imagenet", seed_stats({s: r.accuracy for s, r in src.items()}),
                                    paper_table.get((pname, "imagenet"), {}).get("accuracy"), "source",
                                    {"train_wall_time_s": _cost(list(src.values()), "wall_time_s"),
                                     "peak_memory_mb": _cost(list(src.values()), "peak_memory_mb", "max")}))
        present = _ordered(by_dataset, targets)
        for dataset in present:
            runs = by_dataset[dataset]
            role = "target" if dataset in targets else "other"
            rows.append(TransferRow(dataset, seed_stats({s: r.accuracy for s, r in runs.items()}),
                                    paper_table.get((pname, dataset), {}).get("accuracy") if role == "target" else None,
                                    role,
                                    {"eval_images_per_s": _cost(list(runs.values()), "eval_images_per_s"),
                                     "peak_memory_mb": _cost(list(runs.values()), "peak_memory_mb", "max")}))
        # the average is over the protocol's own targets only; with fewer it is partial, without a paper value
        target_rows = [r for r in rows if r.role == "target"]
        if target_rows:
            complete = len(target_rows) == len(targets)
            rows.append(TransferRow("average", SeedStats(_mean(r.stats.mean for r in target_rows), None, (), ()),
                                    paper_table.get((pname, "average"), {}).get("accuracy") if complete else None,
                                    "average", n_datasets=len(target_rows), n_targets=len(targets)))
        tables[key] = rows
    return dict(sorted(tables.items()))


def transfer_markdown(key: GroupKey, rows: Sequence[TransferRow], protocol_dir: str) -> str:
    title = "Cross-dataset transfer" if protocol_dir == "xd" else "Domain generalization"
    n_targets = len(XD_TARGETS if protocol_dir == "xd" else DG_TARGETS)
    lines = [f"### {title}: {_group_title(key, protocol_dir)}", _random_note(key[3]), _paper_note(key),
             "| Dataset | Seeds | Accuracy | Paper | Δ |", "|---|---|---|---|---|"]
    for r in rows:
        if r.role == "average":
            name, seeds = "**Average (targets)**", _coverage(r.n_datasets, r.n_targets or n_targets)
        else:
            suffix = {"source": " (source)", "other": " (not a target, not averaged)"}.get(r.role, "")
            name = display(r.dataset) + suffix
            seeds = str(r.stats.n)
        lines.append(f"| {name} | {seeds} | {_stat_text(r.stats)} | {_fmt(r.paper)} | "
                     f"{_fmt(_delta(r.stats.mean, r.paper))} |")
    return "\n".join(lines) + "\n"


def transfer_csv_rows(key: GroupKey, rows: Sequence[TransferRow]) -> list[dict[str, Any]]:
    return [{"method": key[0], "cfg": key[1], "shots": key[2], "backbone": key[3], "dataset": r.dataset,
             "role": r.role, "n_seeds": r.stats.n, "n_datasets": r.n_datasets or "",
             "n_targets": r.n_targets or "", "partial": r.partial if r.role == "average" else "", "mean": r.stats.mean,
             "std": r.stats.std, "values": " ".join(f"{v:g}" for v in r.stats.values), "paper": r.paper,
             "delta": _delta(r.stats.mean, r.paper), **r.cost} for r in rows]


# ------------------------------------------------------------------------------ few-shot
def fewshot_tables(records: Sequence[RunRecord]) -> dict[tuple[str, str, str], dict[str, dict[int, SeedStats]]]:
    """Per (method, cfg, backbone): ``{dataset: {shots: stats}}``."""
    groups: dict[tuple[str, str, str], dict[str, dict[int, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        if r.protocol_dir == "fewshot":
            groups[(r.method, r.cfg, r.backbone)][r.dataset][r.shots][r.seed] = r.accuracy
    return {key: {d: {k: seed_stats(v) for k, v in sorted(by_shots.items())} for d, by_shots in by_ds.items()}
            for key, by_ds in sorted(groups.items())}


def fewshot_markdown(key: tuple[str, str, str], table: dict[str, dict[int, SeedStats]]) -> str:
    shots = sorted({k for by_shots in table.values() for k in by_shots})
    lines = [f"### Few-shot: {key[0]} — cfg `{key[1]}`" + (f", backbone `{key[2]}`" if key[2] else ""),
             _random_note(key[2]),
             "| Dataset | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for dataset in _ordered(table, BASE2NEW_DATASETS):
        cells = [table[dataset][k].fmt(show_n=True) if k in table[dataset] else "–" for k in shots]
        lines.append(f"| {display(dataset)} | " + " | ".join(cells) + " |")
    avgs = []
    for k in shots:
        vals = [table[d][k].mean for d in table if k in table[d]]
        avgs.append(f"{_mean(vals):.2f} ({len(vals)} datasets)" if vals else "–")
    lines.append("| **Average** | " + " | ".join(avgs) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plot, files, CLI
def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "_".join(str(p) for p in parts if p != "")).strip("_")


def plot_base2new(key: GroupKey, rows: Sequence[Base2NewRow], path: str) -> str:
    """Grouped bars of base / new / HM per dataset (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["Average" if r.is_average else display(r.dataset) for r in rows]
    series: list[tuple[str, list[float | None], list[float | None]]] = [("Base", [r.base.mean for r in rows], [r.base.std for r in rows]),
              ("New", [r.new.mean for r in rows], [r.new.std for r in rows]),
              ("HM", [r.hm for r in rows], [None] * len(rows))]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 2), 4.4))
    for i, (label, means, stds) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ys = [m if m is not None else 0.0 for m in means]
        err = [s if s is not None else 0.0 for s in stds]
        ax.bar(xs, ys, width, label=label, yerr=err if any(err) else None, capsize=2)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    title = f"Base-to-novel: {key[0]} ({key[1]})\n{key[2]} shots, backbone {key[3] or '?'}"
    if key[3] in RANDOM_BACKBONES:
        title += " (RANDOM weights: meaningless numbers)"
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


_RUN_FIELDS = ("accuracy", "macro_f1", "epoch", "wall_time_s", "eval_time_s", "train_images_per_s",
               "eval_images_per_s", "peak_memory_mb", "device", "trainer", "num_classes", "num_test_images")


def runs_csv_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in sorted(records, key=lambda r: (r.protocol_dir, r.method, r.cfg, r.dataset, r.phase, r.shots, r.seed)):
        row = {"protocol": r.protocol, "phase": r.phase, "split": r.split, "dataset": r.dataset, "shots": r.shots,
               "method": r.method, "cfg": r.cfg, "seed": r.seed, "backbone": r.backbone}
        row.update({k: r.info.get(k) for k in _RUN_FIELDS})
        row["accuracy"] = r.accuracy
        row["source"], row["path"] = r.source, r.path
        rows.append(row)
    return rows


CONVENTIONS = ("Conventions: mean ± population std (ddof 0, as CoOp's parse_test_res.py) over seeds; HM = "
               "2·B·N/(B+N) of the seed-averaged base (B) and new (N) accuracy; Average = mean over the protocol's "
               "own datasets (11 base-to-novel, 10 cross-dataset targets, 4 domain-generalization targets) of the "
               "per-dataset means, HM of those two averages (as the papers compute it); \"partial k/N\" = only k "
               "of them, no paper average compared. Paper = published number for the method and config "
               "(restore/evaluation/published/, 16-shot runs only), paper HM recomputed from its base and new "
               "(some printed per-dataset HMs are not HM(base, new)); Δ = ours − paper.")


def aggregate(root: str, out: Optional[str] = None, plot: bool = True) -> tuple[str, dict[str, str]]:
    """Collect runs below ``root``, write the tables to ``out``; returns (markdown, {name: path})."""
    records = collect_runs(root)
    out = out or osp.join(root, "aggregate")
    os.makedirs(out, exist_ok=True)
    published = load_published()
    files: dict[str, str] = {}
    sections = [f"# Results in `{root}`\n", f"{len(records)} runs. {CONVENTIONS}\n"]
    b2n = base2new_tables(records, published)
    if b2n:
        sections.append("## Base-to-novel generalization\n")
        csv_rows = []
        for key, rows in b2n.items():
            sections.append(base2new_markdown(key, rows))
            csv_rows += base2new_csv_rows(key, rows)
            if plot:
                png = plot_base2new(key, rows, osp.join(out, f"base2new_{_slug(*key[:2], key[3])}.png"))
                files[osp.basename(png)] = png
                sections.append(f"![base/new/HM]({osp.basename(png)})\n")
        files["base2new.csv"] = osp.join(out, "base2new.csv")
        _write_csv(files["base2new.csv"], csv_rows)
    for protocol_dir, title, fname in (("xd", "Cross-dataset transfer", "cross_dataset.csv"),
                                       ("dg", "Domain generalization", "domain_generalization.csv")):
        tables = transfer_tables(records, protocol_dir, published)
        if tables:
            sections.append(f"## {title}\n")
            csv_rows = []
            for tkey, trows in tables.items():
                sections.append(transfer_markdown(tkey, trows, protocol_dir))
                csv_rows += transfer_csv_rows(tkey, trows)
            files[fname] = osp.join(out, fname)
            _write_csv(files[fname], csv_rows)
    few = fewshot_tables(records)
    if few:
        sections.append("## Few-shot classification\n")
        csv_rows = []
        for fkey, table in few.items():
            sections.append(fewshot_markdown(fkey, table))
            for dataset, by_shots in table.items():
                for k, s in by_shots.items():
                    csv_rows.append({"method": fkey[0], "cfg": fkey[1], "backbone": fkey[2], "dataset": dataset,
                                     "shots": k, "n_seeds": s.n, "mean": s.mean, "std": s.std,
                                     "values": " ".join(f"{v:g}" for v in s.values)})
        files["few_shot.csv"] = osp.join(out, "few_shot.csv")
        _write_csv(files["few_shot.csv"], csv_rows)
    if records:
        files["runs.csv"] = osp.join(out, "runs.csv")
        _write_csv(files["runs.csv"], runs_csv_rows(records))
    else:
        sections.append("No finished runs found (no results.json, no log.txt with a result).\n")
    markdown = "\n".join(sections)
    files["summary.md"] = osp.join(out, "summary.md")
    with open(files["summary.md"], "w") as f:
        f.write(markdown)
    return markdown, files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restore.evaluation.aggregate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="output", help="output folder of the scripts (default output)")
    parser.add_argument("--out", default=None, help="where to write the tables (default ROOT/aggregate)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG bar charts")
    args = parser.parse_args(argv)
    try:
        markdown, files = aggregate(args.root, args.out, plot=not args.no_plot)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    print("Wrote: " + ", ".join(sorted(files.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
