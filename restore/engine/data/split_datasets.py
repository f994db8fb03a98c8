"""The loader pattern shared by the CoOp-family benchmarks (``datasets/*.py`` subclass these).

``SplitDataset`` (the 11 few-shot datasets): read ``split_zhou_<Name>.json`` (or build the split from
the raw files and save it), K-shot subset with CoOp's cache, then base/new subsampling -- in CoOp's
order, so one cache serves base and new runs. ``ImageFolderTestset`` (ImageNet-V2/-Sketch/-A/-R):
test-only folder-per-class sets. Every missing or malformed input raises ONE DatasetNotFoundError
that names the path, the expected layout and the DATASETS.md section.
"""

from __future__ import annotations

import os
import os.path as osp
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from ..utils import listdir_nohidden
from .dataset_base import (DatasetBase, cache_root, load_or_create_fewshot, make_datums, read_and_split_data,
                           read_classnames, read_split, save_split, subsample_classes, writable_cache)
from .datum import CorruptSplitError, DatasetNotFoundError, Datum

__all__ = ["BenchmarkMixin", "SplitDataset", "ImageFolderTestset", "read_wnid_folders"]


class BenchmarkMixin:
    """Paths and error messages common to all benchmark loaders."""

    dataset_dir = ""  # folder name under DATASET.ROOT; instances hold the absolute path
    image_subdir = ""  # image root relative to the dataset folder ("" = the folder itself)
    anchor = ""  # DATASETS.md section (the yaml name)
    layout = ""  # expected layout, shown in errors

    def _setup_paths(self, cfg: Any) -> None:
        self.root = osp.abspath(osp.expanduser(cfg.DATASET.ROOT))
        self.dataset_dir = osp.join(self.root, type(self).dataset_dir)
        self.image_dir = osp.join(self.dataset_dir, self.image_subdir) if self.image_subdir else self.dataset_dir
        self.cache_dir = cache_root(cfg, self.dataset_dir)
        self.split_fewshot_dir = osp.join(self.cache_dir, "split_fewshot")
        if not str(cfg.DATASET.ROOT):
            raise self.error("DATASET.ROOT is empty: pass --root pointing at the folder that holds the datasets",
                             self.dataset_dir)
        self.require(self.dataset_dir, self.image_dir)

    @property
    def see(self) -> str:
        return f"See DATASETS.md#{self.anchor}"

    def error(self, detail: str, path: str) -> DatasetNotFoundError:
        """The one error type for a missing/malformed dataset, with path, layout and doc section."""
        layout = "\n".join("    " + line for line in self.layout.strip("\n").splitlines())
        return DatasetNotFoundError(
            f"{type(self).__name__}: {detail}\n  Looked at: {path}\n  Expected layout under DATASET.ROOT "
            f"({getattr(self, 'root', '?')}):\n{layout}\n  {self.see} for how to prepare it.")

    def require(self, *paths: str, what: str = "") -> None:
        """Raise the dataset error for the first path that does not exist."""
        for path in paths:
            if not osp.exists(path):
                raise self.error(what or "the dataset (or part of it) is missing", path)

    def check_labels(self, items: Sequence[Datum], where: str) -> None:
        """Every label 0..max must have at least one item (an empty class is an incomplete dataset)."""
        if not items:
            raise self.error(f"no images found for {where}", where)
        labels = {d.label for d in items}
        empty = sorted(set(range(max(labels) + 1)) - labels)
        if empty:
            raise self.error(f"classes {empty[:10]} have no images in {where} (incomplete dataset)", where)


class SplitDataset(BenchmarkMixin, DatasetBase):
    """CoOp's few-shot benchmark loader: split JSON -> K-shot cache -> base/new subsample."""

    split_file = ""  # split_zhou_<Name>.json, or "" when the dataset has its own fixed split files
    ignored_classes: Sequence[str] = ()  # class folders left out of the DTD split
    new_cnames: Mapping[str, str] | None = None  # folder name -> class name in the DTD split

    def __init__(self, cfg: Any) -> None:
        self._setup_paths(cfg)
        self.split_path = osp.join(self.dataset_dir, self.split_file) if self.split_file else ""
        train, val, test = self.load_splits(cfg)
        self.check_labels(train, f"the train split of {self.split_path or self.dataset_dir}")
        train, fewshot_val = load_or_create_fewshot(cfg, self.dataset_dir, train, val, cfg.DATASET.NUM_SHOTS, cfg.SEED)
        train, val, test = subsample_classes(train, fewshot_val, test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
        super().__init__(train_x=train, val=val, test=test)

    def load_splits(self, cfg: Any) -> tuple[list[Datum], list[Datum], list[Datum]]:
        """The split JSON (dataset folder first, then the cache folder), else built and saved."""
        cached = osp.join(self.cache_dir, self.split_file)
        for path in dict.fromkeys([self.split_path, cached]):
            if osp.isfile(path):
                try:
                    return read_split(path, self.image_dir)
                except CorruptSplitError as err:
                    raise CorruptSplitError(f"{type(self).__name__}: {err}") from None
                except DatasetNotFoundError as err:
                    raise self.error(str(err), path) from None
        print(f"Warning: {self.split_path} not found; building the split from the raw files (a random split: "
              f"results will not be comparable to published numbers). {self.see}")
        train, val, test = self.build_split()
        with writable_cache(cached, "the split file"):
            save_split(train, val, test, cached, self.image_dir)
        return train, val, test

    def build_split(self) -> tuple[list[Datum], list[Datum], list[Datum]]:
        """Without the JSON: CoOp's random 50/20/30 split of the class folders (differs from CoOp's JSON)."""
        return read_and_split_data(self.image_dir, ignored=self.ignored_classes, new_cnames=self.new_cnames)

    def read_lines(self, relpath: str, what: str) -> list[str]:
        """Non-empty stripped lines of a raw annotation file (missing -> the dataset error)."""
        path = osp.join(self.dataset_dir, relpath)
        absent = f" (needed because {self.split_file} is absent)" if self.split_file else ""
        self.require(path, what=f"{what} is missing{absent}")
        with open(path, "r") as f:
            return [line.strip() for line in f if line.strip()]


def read_wnid_folders(split_dir: str, classnames: Mapping[str, str], owner: BenchmarkMixin) -> list[Datum]:
    """Images of ``split_dir/<wnid>/`` with labels = index of the sorted wnid folders (files are skipped).

    Within a class the order is ``os.listdir``'s, as in CoOp (few-shot picks depend on it).
    """
    folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir() and not f.name.startswith("."))
    if not folders:
        raise owner.error("no class folders found", split_dir)
    items: list[Any] = []
    for label, folder in enumerate(folders):
        if folder not in classnames:
            raise owner.error(f"class folder {folder!r} is not listed in classnames.txt", osp.join(split_dir, folder))
        imnames = listdir_nohidden(osp.join(split_dir, folder))
        if not imnames:
            raise owner.error(f"class folder {folder!r} is empty (incomplete extraction?)", osp.join(split_dir, folder))
        items.extend((osp.join(split_dir, folder, im), label, classnames[folder]) for im in imnames)
    return make_datums(items, split_dir, owner.see)


class ImageFolderTestset(BenchmarkMixin, DatasetBase):
    """A test-only ImageNet variant: ``<image_subdir>/<wnid>/`` + ``classnames.txt``; train_x = test."""

    def __init__(self, cfg: Any) -> None:
        self._setup_paths(cfg)
        classnames = self.read_classnames()
        data = self.read_data(classnames)
        self.check_labels(data, self.image_dir)
        super().__init__(train_x=data, test=data)

    def read_classnames(self) -> OrderedDict[str, str]:
        path = osp.join(self.dataset_dir, "classnames.txt")
        self.require(path, what="classnames.txt is missing (a copy of ImageNet's)")
        classnames = read_classnames(path)
        if not classnames:
            raise self.error("classnames.txt is empty", path)
        return classnames

    def read_data(self, classnames: OrderedDict[str, str]) -> list[Datum]:
        return read_wnid_folders(self.image_dir, classnames, self)
