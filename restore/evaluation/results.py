"""Reading finished runs: the output-folder layout, ``results.json`` and CoOp-style ``log.txt``.

Output layout written by ``scripts/`` (``restore.protocols``) and read back here — one definition::

    <root>/<protocol>/<phase>/<dataset>/shots_<K>/<METHOD>/<cfg>/seed<S>/

=============  ==============================  ===================================================
protocol dir   phases                          meaning
=============  ==============================  ===================================================
``base2new``   ``train_base``, ``test_new``,   train on base classes (its own test = base accuracy);
               ``test_base``                   evaluate that model on new (or again on base) classes
``xd``         ``train`` (dataset imagenet),   train on ImageNet (all classes); evaluate on the 10
               ``test``                        other datasets (cross-dataset transfer)
``dg``         ``test``                        the same ImageNet model on ImageNetV2/-Sketch/-A/-R
``fewshot``    ``train``                       train and test on all classes with K shots
=============  ==============================  ===================================================

``K`` is the number of *training* shots (also for the evaluation folders), ``METHOD`` the method label
(``RESTORE``, ``CoOp``, ``MaPLe+Craft``, ...) and ``cfg`` the trainer config name.

A run's accuracy comes from its ``results.json`` (written by every evaluation of this library); runs
of other CoOp-family code bases, which have only ``log.txt``, are read like ``parse_test_res.py`` does
(see :func:`parse_log`). ``python -m restore.evaluation.results DIR [--test-log] [--ci95] [--multi-exp]``
is a drop-in for ``parse_test_res.py``. Folders that ``--overwrite`` moved aside
(``seed<S>.old-<YYYYmmdd-HHMMSS>``) are not read.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from .metrics import ci95, mean_std

__all__ = [
    "RESULTS_FILE", "LOCK_FILE", "DEFAULT_OUTPUT_ROOT", "RANDOM_OUTPUT_ROOT", "PROTOCOL_DIRS", "PHASES", "RunRecord",
    "run_dir", "parse_run_dir", "parse_log", "read_log_accuracy", "read_results_json", "collect_runs",
    "parse_directory", "main",
]

RESULTS_FILE = "results.json"  # == restore.engine.trainer.RESULTS_FILE (kept import-free of torch)
LOG_FILE = "log.txt"
LOCK_FILE = "run.lock"  # held by the run in progress in a folder (restore.engine.output_dir); deleted at its end
#: The default output root, and the one that runs of a backbone with RANDOM weights (``tiny``...) get
#: instead, so that a test or demo run never lands among real results.
DEFAULT_OUTPUT_ROOT = "output"
RANDOM_OUTPUT_ROOT = "output_random"

# protocol folder -> cfg.PROTOCOL value
PROTOCOL_DIRS: dict[str, str] = {
    "base2new": "base2new",
    "xd": "cross_dataset",
    "dg": "domain_generalization",
    "fewshot": "few_shot",
}
# (protocol folder, phase) -> evaluated class split
PHASES: dict[tuple[str, str], str] = {
    ("base2new", "train_base"): "base",
    ("base2new", "test_new"): "new",
    ("base2new", "test_base"): "base",
    ("xd", "train"): "all",
    ("xd", "test"): "all",
    ("dg", "test"): "all",
    ("fewshot", "train"): "all",
}

# Dassl's end signals: "Finish training" (CoOp, Dassl >= 0.6.1), "Finished training" (MaPLe/PromptSRC
# copies, older Dassl), "=> result" (``--test-log``: evaluation-only runs).
END_SIGNALS = ("Finish training", "Finished training", "=> result")


def run_dir(root: str, protocol_dir: str, phase: str, dataset: str, shots: int, method: str, cfg: str,
            seed: int) -> str:
    """The output folder of one run (see the module docstring)."""
    if (protocol_dir, phase) not in PHASES:
        raise ValueError(f"Unknown protocol/phase {protocol_dir}/{phase}; known: {sorted(PHASES)}")
    return osp.join(root, protocol_dir, phase, dataset, f"shots_{shots}", method, cfg, f"seed{seed}")


@dataclass
class RunRecord:
    """One evaluated run: where it is, what it is, its accuracy and its cost figures."""

    path: str
    protocol_dir: str
    phase: str
    dataset: str
    shots: int
    method: str
    cfg: str
    seed: int
    accuracy: float
    source: str = RESULTS_FILE  # or "log.txt"
    backbone: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return PHASES.get((self.protocol_dir, self.phase), self.info.get("split", "all"))

    @property
    def protocol(self) -> str:
        return PROTOCOL_DIRS.get(self.protocol_dir, self.protocol_dir)


_SEED_RE = re.compile(r"^seed(-?\d+)$")
_SHOTS_RE = re.compile(r"^shots_(-?\d+)$")


def parse_run_dir(path: str) -> Optional[dict[str, Any]]:
    """Split a run folder of the layout into its fields; None if ``path`` does not follow it."""
    parts = osp.normpath(osp.abspath(path)).split(os.sep)
    if len(parts) < 7:
        return None
    protocol_dir, phase, dataset, shots, method, cfg, seed = parts[-7:]
    m_seed, m_shots = _SEED_RE.match(seed), _SHOTS_RE.match(shots)
    if not (m_seed and m_shots and (protocol_dir, phase) in PHASES):
        return None
    return {"protocol_dir": protocol_dir, "phase": phase, "dataset": dataset, "shots": int(m_shots.group(1)),
            "method": method, "cfg": cfg, "seed": int(m_seed.group(1))}


def parse_log(path: str, end_signal: str | Sequence[str] = "Finish training", keyword: str = "accuracy",
              ) -> Optional[float]:
    """``parse_test_res.py``'s rule: the last ``* <keyword>: X%`` after the first end-signal line.

    ``end_signal`` may be a tuple (any of them starts the region). None when nothing matched.
    """
    signals = (end_signal,) if isinstance(end_signal, str) else tuple(end_signal)
    pattern = re.compile(r"\* " + re.escape(keyword) + r": ([\.\deE+-]+)%")
    good_to_go, value = False, None
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not good_to_go and any(sig in line for sig in signals):
                good_to_go = True
            if good_to_go:
                match = pattern.search(line)
                if match:
                    try:
                        value = float(match.group(1))
                    except ValueError:
                        pass
    return value


def read_log_accuracy(run_folder: str) -> Optional[float]:
    """Accuracy of a run from its ``log.txt`` alone (any of Dassl's end signals), or None."""
    path = osp.join(run_folder, LOG_FILE)
    return parse_log(path, END_SIGNALS) if osp.isfile(path) else None


def read_results_json(path: str) -> Optional[dict[str, Any]]:
    """A ``results.json`` as a dict; None (with a warning) if unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        warnings.warn(f"Skipping unreadable {path}: {err}")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("accuracy"), (int, float)):
        warnings.warn(f"Skipping {path}: no numeric 'accuracy' field")
        return None
    return data


def _dataset_key(name: str) -> str:
    try:
        from restore.datasets.catalog import resolve

        return resolve(name)
    except (ImportError, ValueError):
        return name


_SPLIT_TO_PHASE = {"base2new": {"base": "train_base", "new": "test_new"}}
_PROTOCOL_TO_DIR = {v: k for k, v in PROTOCOL_DIRS.items()}


def _record_from(folder: str, data: Optional[dict[str, Any]], accuracy: float, source: str) -> Optional[RunRecord]:
    fields = parse_run_dir(folder)
    data = data or {}
    if fields is None:
        if not data:
            return None  # a log outside the layout: nothing says what it is
        protocol_dir = _PROTOCOL_TO_DIR.get(data.get("protocol", ""), "base2new")
        split = data.get("split", "all")
        phase = _SPLIT_TO_PHASE.get(protocol_dir, {}).get(split) or ("test" if data.get("epoch") == 0 else "train")
        if (protocol_dir, phase) not in PHASES:
            phase = "train" if (protocol_dir, "train") in PHASES else "test"
        fields = {"protocol_dir": protocol_dir, "phase": phase, "dataset": _dataset_key(str(data.get("dataset", "?"))),
                  "shots": int(data.get("num_shots", -1)), "method": str(data.get("trainer", "?")), "cfg": "",
                  "seed": int(data["seed"]) if isinstance(data.get("seed"), int) else -1}  # -1: "unseeded"
    return RunRecord(path=folder, accuracy=float(accuracy), source=source, backbone=str(data.get("backbone", "")),
                     info=data, **fields)


#: A run folder that ``restore.protocols`` moved aside before redoing the run: ``<folder>.old-<YYYYmmdd-HHMMSS>[-n]``.
OLD_RUN_SUFFIX = ".old-"
OLD_RUN_RE = re.compile(re.escape(OLD_RUN_SUFFIX) + r"\d{8}-\d{6}(-\d+)?$")


def collect_runs(root: str) -> list[RunRecord]:
    """Every run below ``root``: from ``results.json`` when present, else from a ``log.txt``.

    Folders moved aside by ``--overwrite`` (``<run>.old-<time>``) are skipped: they are replaced runs.
    """
    if not osp.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a folder; pass the output folder of the scripts (e.g. output/)")
    records = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "tensorboard" and not OLD_RUN_RE.search(d))
        if RESULTS_FILE in files:
            data = read_results_json(osp.join(folder, RESULTS_FILE))
            if data is not None:
                rec = _record_from(folder, data, data["accuracy"], RESULTS_FILE)
                if rec is not None:
                    records.append(rec)
                continue
        if LOG_FILE in files and parse_run_dir(folder) is not None:
            acc = read_log_accuracy(folder)
            if acc is not None:
                rec = _record_from(folder, None, acc, LOG_FILE)
                if rec is not None:
                    records.append(rec)
    return records


# ---------------------------------------------------------------- parse_test_res.py equivalent
def _iter_subdirs(directory: str) -> Iterator[str]:
    for name in sorted(os.listdir(directory)):
        path = osp.join(directory, name)
        if not name.startswith(".") and not OLD_RUN_RE.search(name) and osp.isdir(path):
            yield path


def parse_directory(directory: str, end_signal: str | Sequence[str] = "Finish training",
                    keyword: str = "accuracy") -> list[tuple[str, float]]:
    """``(log path, value)`` for every sub-folder of ``directory`` with a ``log.txt`` that has a result.

    Unlike ``parse_test_res.py`` a sub-folder without ``log.txt`` is skipped with a warning, not an
    AssertionError.
    """
    out = []
    for sub in _iter_subdirs(directory):
        fpath = osp.join(sub, LOG_FILE)
        if not osp.isfile(fpath):
            warnings.warn(f"{sub} has no {LOG_FILE}; skipped")
            continue
        value = parse_log(fpath, end_signal, keyword)
        if value is not None:
            out.append((fpath, value))
    return out


def _print_summary(directory: str, values: list[float], keyword: str, use_ci95: bool) -> tuple[float, float]:
    mean, std = mean_std(values)
    spread = ci95(std, len(values)) if use_ci95 else std
    print("===")
    print(f"Summary of directory: {directory}")
    print(f"* {keyword}: {mean:.2f}% +- {spread:.2f}%")
    print("===")
    return mean, spread


def main(argv: Sequence[str] | None = None) -> int:
    """CLI equivalent to CoOp's ``parse_test_res.py`` (mean ± population std over seed folders)."""
    parser = argparse.ArgumentParser(prog="python -m restore.evaluation.results", description=main.__doc__)
    parser.add_argument("directory", help="folder whose sub-folders (seed1, seed2, ...) hold log.txt")
    parser.add_argument("--ci95", action="store_true", help="print the 95%% confidence interval instead of std")
    parser.add_argument("--test-log", action="store_true", help="evaluation-only logs (end signal '=> result')")
    parser.add_argument("--multi-exp", action="store_true", help="each sub-folder is an experiment of seed folders")
    parser.add_argument("--keyword", default="accuracy", help="metric line to read (default accuracy)")
    parser.add_argument("--end-signal", default=None, help="override the end signal")
    args = parser.parse_args(argv)
    end_signal = args.end_signal or ("=> result" if args.test_log else ("Finish training", "Finished training"))
    if not osp.isdir(args.directory):
        print(f"error: {args.directory!r} is not a folder", file=sys.stderr)
        return 2
    experiments = list(_iter_subdirs(args.directory)) if args.multi_exp else [args.directory]
    means = []
    for exp in experiments:
        found = parse_directory(exp, end_signal, args.keyword)
        for fpath, value in found:
            print(f"file: {fpath}. {args.keyword}: {value:.2f}%. ")
        if not found:
            print(f"error: nothing found in {exp} (end signal {end_signal!r}; try --test-log for evaluation-only "
                  "runs)", file=sys.stderr)
            return 1
        means.append(_print_summary(exp, [v for _, v in found], args.keyword, args.ci95)[0])
    if args.multi_exp:
        print("===")
        print("Average performance")
        print(f"* {args.keyword}: {sum(means) / len(means):.2f}%")
        print("===")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
