"""The loader pattern of group-robustness datasets (Waterbirds, CelebA: ``datasets/*.py`` subclass it).

Each image has a class label and a binary spurious attribute, kept in the Datum's ``domain``; the
group of an image is ``label * num_attributes + attribute``. A subclass names the folders its
release may come in (``layouts``, the first that exists is read) and turns that folder's metadata
into rows ``(relative image path, label, attribute, split)`` with split 0 train, 1 val, 2 test.

Training uses the train split: all images (``NUM_SHOTS -1``), K per class with CoOp's few-shot cache,
or K per group (``DATASET.GROUPS.SHOTS_PER_GROUP True``, cache ``shot_K_per_group-seed_S.pkl``); val
and test are kept whole (worst-group model selection needs every group). Every malformed input is one
DatasetNotFoundError naming the file.
"""

from __future__ import annotations

import os.path as osp
import random
from collections import Counter, defaultdict
from typing import Any, Sequence

from ..utils import atomic_write_bytes
from .dataset_base import (DatasetBase, cache_root, load_or_create_fewshot, make_datums, subsample_classes,
                           writable_cache)
from .datum import DatasetNotFoundError, Datum, dumps_datum_cache, load_datum_cache
from .split_datasets import BenchmarkMixin

__all__ = ["GroupDataset", "SPLIT_NAMES", "read_csv_table", "sample_per_group"]

SPLIT_NAMES = ("train", "val", "test")
Row = tuple[str, int, int, int]  # (path relative to the image folder, label, attribute, split)


def read_csv_table(path: str, required: Sequence[str], owner: BenchmarkMixin, sep: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV file with a header as dicts; a missing column is the dataset error naming the file."""
    import csv

    with open(path, newline="") as f:
        if sep == ",":
            reader = csv.DictReader(f)
        else:
            reader = csv.DictReader(f, delimiter=sep, skipinitialspace=True)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise owner.error(f"{osp.basename(path)} has no column {', '.join(map(repr, missing))} (its columns: "
                              f"{', '.join(columns[:12]) or 'none'}{' ...' if len(columns) > 12 else ''})", path)
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def sample_per_group(items: Sequence[Datum], num_shots: int, num_attributes: int) -> list[Datum]:
    """``num_shots`` items per (label, domain) group (all of a smaller group), ``random.sample`` per group
    in first-appearance order, as Dassl's per-class sampling."""
    by_group: dict[int, list[Datum]] = defaultdict(list)
    for item in items:
        by_group[item.label * num_attributes + item.domain].append(item)
    out: list[Datum] = []
    for group_items in by_group.values():
        out.extend(random.sample(group_items, num_shots) if len(group_items) >= num_shots else group_items)
    return out


class GroupDataset(BenchmarkMixin, DatasetBase):
    """A dataset of (class, spurious attribute) groups read from a metadata file; see the module docstring."""

    layouts: Sequence[str] = ()  # folder names under DATASET.ROOT, in the order they are tried
    default_classnames: Sequence[str] = ()
    default_attribute_names: Sequence[str] = ()
    metadata_name = ""  # the file the rows come from (named in errors), set by read_rows

    def __init__(self, cfg: Any) -> None:
        self.root = osp.abspath(osp.expanduser(cfg.DATASET.ROOT))
        if not str(cfg.DATASET.ROOT):
            raise self.error("DATASET.ROOT is empty: pass --root pointing at the folder that holds the datasets",
                             self.root)
        found = [name for name in self.layouts if osp.isdir(osp.join(self.root, name))]
        if not found:
            raise self.error(f"none of the folders {', '.join(self.layouts)} exists",
                             osp.join(self.root, self.layouts[0]))
        self.layout_name = found[0]
        self.dataset_dir = osp.join(self.root, self.layout_name)
        self.cache_dir = cache_root(cfg, self.dataset_dir)
        self.split_fewshot_dir = osp.join(self.cache_dir, "split_fewshot")
        node = cfg.DATASET.GROUPS
        self.group_classnames = self._names(list(node.CLASSNAMES), self.default_classnames, "DATASET.GROUPS.CLASSNAMES")
        self.attribute_names = self._names(list(node.ATTRIBUTE_NAMES), self.default_attribute_names,
                                           "DATASET.GROUPS.ATTRIBUTE_NAMES")
        rows = self.read_rows(self.layout_name)
        splits = self.build_splits(rows)
        train, val, test = splits
        self.train_group_counts = self.group_counts(train)
        self.check_groups(test, "test")
        train = self.fewshot(cfg, train)
        train, val, test = subsample_classes(train, val, test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
        super().__init__(train_x=train, val=val, test=test)

    @property
    def num_attributes(self) -> int:
        return len(self.default_attribute_names)

    @property
    def group_names(self) -> list[str]:
        return [f"{c} / {a}" for c in self.group_classnames for a in self.attribute_names]

    def _names(self, given: list[str], default: Sequence[str], key: str) -> list[str]:
        if not given:
            return list(default)
        if len(given) != len(default):
            raise ValueError(f"{key} must list {len(default)} names for {type(self).__name__} (got {len(given)}: "
                             f"{given}).")
        return [str(x) for x in given]

    def read_rows(self, layout: str) -> list[Row]:
        """``(relpath, label, attribute, split)`` for every image of the folder ``layout``."""
        raise NotImplementedError

    def image_root(self, layout: str) -> str:
        """The folder image paths of the rows are relative to (default: the dataset folder)."""
        return self.dataset_dir

    def read_file(self, relpath: str) -> str:
        """Absolute path of a metadata file of the dataset folder (missing -> the dataset error)."""
        path = osp.join(self.dataset_dir, relpath)
        self.require(path, what=f"{relpath} is missing")
        return path

    def int_value(self, value: str, column: str, line: int, path: str, allowed: Sequence[int]) -> int:
        """``value`` as an int in ``allowed``; anything else is one sentence naming the file and line."""
        try:
            number = int(float(value))
        except ValueError:
            raise self.error(f"{column} {value!r} on line {line} of {osp.basename(path)} is not a number",
                             path) from None
        if number not in allowed:
            what = {"y": "class index", "split": "split", "partition": "split"}.get(column, column)
            raise self.error(f"{what} {number} on line {line} of {osp.basename(path)} is out of range (allowed: "
                             f"{', '.join(map(str, allowed))})", path)
        return number

    def build_splits(self, rows: Sequence[Row]) -> list[list[Datum]]:
        image_root = self.image_root(self.layout_name)
        per_split: list[list[tuple[str, int, str, int]]] = [[], [], []]
        for relpath, label, attribute, split in rows:
            per_split[split].append((osp.join(image_root, relpath), label, self.group_classnames[label], attribute))
        source = osp.join(self.dataset_dir, self.metadata_name)
        return [make_datums(items, source, self.see) for items in per_split]

    def group_counts(self, items: Sequence[Datum]) -> list[int]:
        counts = Counter(d.label * self.num_attributes + d.domain for d in items)
        return [counts.get(g, 0) for g in range(len(self.group_names))]

    def check_groups(self, items: Sequence[Datum], split: str) -> None:
        """Every group needs images in ``split`` (worst-group accuracy is undefined otherwise)."""
        empty = [name for name, n in zip(self.group_names, self.group_counts(items)) if n == 0]
        if empty:
            source = osp.join(self.dataset_dir, self.metadata_name)
            raise self.error(f"group(s) {', '.join(map(repr, empty))} have no {split} images in "
                             f"{self.metadata_name}: worst-group accuracy needs every group", source)

    def fewshot(self, cfg: Any, train: list[Datum]) -> list[Datum]:
        """K per class (CoOp's cache, train only) or K per group (its own cache); val is kept whole."""
        k, seed = int(cfg.DATASET.NUM_SHOTS), int(cfg.SEED)
        if k < 1:
            return train
        if not cfg.DATASET.GROUPS.SHOTS_PER_GROUP:
            return load_or_create_fewshot(cfg, self.dataset_dir, train, None, k, seed)[0]
        if seed < 0:
            return sample_per_group(train, k, self.num_attributes)
        path = osp.join(self.split_fewshot_dir, f"shot_{k}_per_group-seed_{seed}.pkl")
        if osp.exists(path):
            print(f"Loading preprocessed few-shot data from {path}")
            data = load_datum_cache(path)["train"]
            missing = [d.impath for d in data if not osp.isfile(d.impath)]
            if missing:
                raise DatasetNotFoundError(
                    f"The few-shot cache {path} lists images that do not exist (e.g. {missing[0]}): the dataset "
                    "was moved or changed since the cache was written. Delete the cache file to re-sample.")
            return list(data)
        data = sample_per_group(train, k, self.num_attributes)
        print(f"Saving preprocessed few-shot data to {path}")
        with writable_cache(path, "the few-shot cache"):
            atomic_write_bytes(dumps_datum_cache({"train": data}), path)
        return data
