"""DatasetBase (Dassl semantics) and the split helpers the CoOp-family loaders share.

One implementation each of: reading/writing ``split_zhou_*.json``, the 80/20 train/val split, the
"DTD split" of a folder-per-class tree, base/new class subsampling and the few-shot pickle cache.
All randomness uses Python's global ``random`` module, in the order Dassl/CoOp consume it, so a run
seeded with ``cfg.SEED`` picks the same few-shot images as CoOp.
"""

from __future__ import annotations

import contextlib
import math
import os.path as osp
import random
from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Iterator, Mapping, Sequence

from restore.log import get_logger
from ..utils import atomic_write_bytes, disk_full_error, listdir_nohidden, mkdir_if_missing, write_json
from .datum import CorruptSplitError, DatasetNotFoundError, Datum, MissingImageError, dumps_datum_cache, load_datum_cache

logger = get_logger(__name__)

__all__ = [
    "DatasetBase", "read_split", "save_split", "split_trainval", "read_and_split_data", "split_per_class",
    "subsample_classes", "read_classnames", "load_or_create_fewshot", "fewshot_cache_path",
    "cache_root", "make_datums", "writable_cache", "DatasetNotFoundError", "MissingImageError",
]


class DatasetBase:
    """A dataset = lists of Datum for train_x (labelled), train_u (unlabelled), val and test."""

    dataset_dir = ""  # the folder name under DATASET.ROOT (instances overwrite it with the full path)
    domains: list[str] = []  # domain names, for multi-domain datasets

    def __init__(self, train_x: list[Datum] | None = None, train_u: list[Datum] | None = None,
                 val: list[Datum] | None = None, test: list[Datum] | None = None) -> None:
        self._train_x = train_x
        self._train_u = train_u
        self._val = val
        self._test = test
        self._num_classes = self.get_num_classes(train_x)
        self._lab2cname, self._classnames = self.get_lab2cname(train_x)

    @property
    def train_x(self) -> list[Datum] | None:
        return self._train_x

    @property
    def train_u(self) -> list[Datum] | None:
        return self._train_u

    @property
    def val(self) -> list[Datum] | None:
        return self._val

    @property
    def test(self) -> list[Datum] | None:
        return self._test

    @property
    def lab2cname(self) -> dict[int, str]:
        return self._lab2cname

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @staticmethod
    def get_num_classes(data_source: Sequence[Datum]) -> int:
        """max(label) + 1 over ``data_source`` (not the number of distinct labels, as in Dassl)."""
        label_set = {item.label for item in data_source or ()}
        return max(label_set) + 1 if label_set else 0

    @staticmethod
    def get_lab2cname(data_source: Sequence[Datum]) -> tuple[dict[int, str], list[str]]:
        """{label: classname} from the (label, classname) pairs, and the names sorted by label."""
        container = {(item.label, item.classname) for item in data_source or ()}
        mapping = {label: classname for label, classname in container}
        labels = sorted(mapping)
        return mapping, [mapping[label] for label in labels]

    def check_input_domains(self, source_domains: Sequence[str], target_domains: Sequence[str]) -> None:
        assert len(source_domains) > 0, "source_domains (list) is empty"
        assert len(target_domains) > 0, "target_domains (list) is empty"
        self.is_input_domain_valid(source_domains)
        self.is_input_domain_valid(target_domains)

    def is_input_domain_valid(self, input_domains: Sequence[str]) -> None:
        for domain in input_domains:
            if domain not in self.domains:
                raise ValueError(f"Input domain must belong to {self.domains}, but got [{domain}]")

    def download_data(self, url: str, dst: str, from_gdrive: bool = True) -> None:
        """Download an archive to ``dst`` and extract it next to it (Google Drive needs ``gdown``)."""
        from ...datasets.prepare import download, extract

        mkdir_if_missing(osp.dirname(dst))
        if from_gdrive:
            try:
                import gdown
            except ImportError as err:
                raise ImportError("Downloading from Google Drive needs `pip install gdown`") from err
            gdown.download(url, dst, quiet=False)
        else:
            download(url, dst)
        logger.info("Extracting file ...")
        extract(dst, osp.dirname(dst))
        logger.info(f"File extracted to {osp.dirname(dst)}")

    def generate_fewshot_dataset(self, *data_sources: list[Datum], num_shots: int = -1,
                                 repeat: bool = False) -> Any:
        """K items per label, per source: ``random.sample`` per label in first-appearance order.

        ``num_shots < 1`` returns the input unchanged. With fewer than K items a label keeps all of
        them, or K drawn with replacement when ``repeat``. Uses the global ``random`` (as Dassl).
        """
        if num_shots < 1:
            return data_sources[0] if len(data_sources) == 1 else data_sources
        logger.info(f"Creating a {num_shots}-shot dataset")
        output = []
        for data_source in data_sources:
            tracker = self.split_dataset_by_label(data_source)
            dataset: list[Datum] = []
            for items in tracker.values():
                if len(items) >= num_shots:
                    sampled = random.sample(items, num_shots)
                elif repeat:
                    sampled = random.choices(items, k=num_shots)
                else:
                    sampled = items
                dataset.extend(sampled)
            output.append(dataset)
        return output[0] if len(output) == 1 else output

    @staticmethod
    def split_dataset_by_label(data_source: Iterable[Datum]) -> defaultdict[int, list[Datum]]:
        """Group items by label, labels in first-appearance order."""
        output: defaultdict[int, list[Datum]] = defaultdict(list)
        for item in data_source:
            output[item.label].append(item)
        return output

    @staticmethod
    def split_dataset_by_domain(data_source: Iterable[Datum]) -> defaultdict[int, list[Datum]]:
        """Group items by domain, domains in first-appearance order."""
        output: defaultdict[int, list[Datum]] = defaultdict(list)
        for item in data_source:
            output[item.domain].append(item)
        return output


def make_datums(items: Iterable[tuple], source: str, hint: str = "") -> list[Datum]:
    """Build Datum objects from (impath, label, classname[, domain]); missing files give ONE error listing them.

    ``source`` names the split file (or folder) the paths came from, ``hint`` is appended (e.g. the
    DATASETS.md section).
    """
    items = list(items)
    missing = [item[0] for item in items if not osp.isfile(item[0])]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetNotFoundError(
            f"{len(missing)} of {len(items)} images listed in {source} do not exist, e.g.:\n  {shown}{more}\n"
            f"The dataset is incomplete or extracted into a different layout.{(' ' + hint) if hint else ''}")
    return [Datum(impath=item[0], label=int(item[1]), classname=item[2], domain=int(item[3]) if len(item) > 3 else 0)
            for item in items]


def read_split(filepath: str, path_prefix: str, hint: str = "") -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Read a ``split_zhou_*.json`` ({"train"|"val"|"test": [[relpath, label, classname], ...]})."""
    import json

    logger.info(f"Reading split from {filepath}")
    try:
        with open(filepath, "r") as f:
            split = json.load(f)
        triples = {key: [(osp.join(path_prefix, str(rel)), int(label), str(cname)) for rel, label, cname in split[key]]
                   for key in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptSplitError(
            f"Malformed split file {filepath} ({type(err).__name__}: {err}). Expected a JSON object with keys "
            f"'train', 'val', 'test', each a list of [relative_path, label, classname]. Re-download it."
            f"{(' ' + hint) if hint else ''}") from None
    _check_label_range(triples, filepath, hint)
    return tuple(make_datums(triples[key], filepath, hint) for key in ("train", "val", "test"))  # type: ignore[return-value]


def _check_label_range(triples: Mapping[str, list[tuple[str, int, str]]], filepath: str, hint: str) -> None:
    """Labels of a split file must run 0, 1, ..., N-1 without gaps: name the first entry outside that run."""
    labels = {label for items in triples.values() for _, label, _ in items}
    run = 0
    while run in labels:
        run += 1
    outside = sorted(labels - set(range(run)))
    if not outside:
        return
    key, label, cname = next((key, label, cname) for key, items in triples.items()
                             for _, label, cname in items if label in outside)
    has = f"0..{run - 1}" if run else "no label 0"
    rest = ", ".join(str(x) for x in outside[:5]) + (", ..." if len(outside) > 5 else "")
    raise CorruptSplitError(
        f"Label {label} (class {cname!r}) in the {key!r} split of {filepath} is outside the class range: labels "
        f"must run 0..N-1 without gaps, and the file has {has}, then {rest}. The split file is corrupted or was "
        f"edited; re-download it.{(' ' + hint) if hint else ''}")


def save_split(train: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum], filepath: str,
               path_prefix: str) -> None:
    """Write a split JSON with paths relative to ``path_prefix`` (CoOp's format, indent 4)."""

    def _extract(items: Sequence[Datum]) -> list[list[Any]]:
        out = []
        for item in items:
            impath = item.impath.replace(path_prefix, "")
            if impath.startswith("/"):
                impath = impath[1:]
            out.append([impath, item.label, item.classname])
        return out

    write_json({"train": _extract(train), "val": _extract(val), "test": _extract(test)}, filepath)
    logger.info(f"Saved split to {filepath}")


def split_trainval(trainval: Sequence[Datum], p_val: float = 0.2) -> tuple[list[Datum], list[Datum]]:
    """Per label (first-appearance order): shuffle, put round(n * p_val) items in val, the rest in train."""
    p_trn = 1 - p_val
    logger.info(f"Splitting trainval into {p_trn:.0%} train and {p_val:.0%} val")
    tracker = DatasetBase.split_dataset_by_label(trainval)
    train: list[Datum] = []
    val: list[Datum] = []
    for label, items in tracker.items():
        idxs = list(range(len(items)))
        random.shuffle(idxs)
        n_val = round(len(idxs) * p_val)
        if n_val <= 0:
            raise DatasetNotFoundError(
                f"Class {label} ({items[0].classname!r}) has only {len(items)} train+val images: too few "
                f"to hold out {p_val:.0%} for validation.")
        for n, idx in enumerate(idxs):
            (val if n < n_val else train).append(items[idx])
    return train, val


def split_per_class(per_class: Iterable[tuple[int, str, list[str]]], p_trn: float = 0.5, p_val: float = 0.2,
                    where: str = "") -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Shuffle each class's image paths and cut them into train/val/test by ``round`` of the ratios.

    ``per_class`` yields (label, classname, impaths) in the order the classes are processed (the
    order of ``random`` calls matters for reproducing CoOp's splits).
    """
    train: list[Datum] = []
    val: list[Datum] = []
    test: list[Datum] = []
    for label, classname, impaths in per_class:
        impaths = list(impaths)
        random.shuffle(impaths)
        n_total = len(impaths)
        n_train = round(n_total * p_trn)
        n_val = round(n_total * p_val)
        n_test = n_total - n_train - n_val
        if n_train <= 0 or n_val <= 0 or n_test <= 0:
            raise DatasetNotFoundError(
                f"Class {classname!r} in {where or 'the dataset'} has {n_total} images: too few (or none) to "
                f"split into train/val/test ({p_trn:.0%}/{p_val:.0%}/rest). The dataset looks incomplete.")
        train.extend(Datum(impath=p, label=label, classname=classname) for p in impaths[:n_train])
        val.extend(Datum(impath=p, label=label, classname=classname) for p in impaths[n_train:n_train + n_val])
        test.extend(Datum(impath=p, label=label, classname=classname) for p in impaths[n_train + n_val:])
    return train, val, test


def read_and_split_data(image_dir: str, p_trn: float = 0.5, p_val: float = 0.2, ignored: Sequence[str] = (),
                        new_cnames: Mapping[str, str] | None = None) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """The "DTD split" of a folder-per-class tree: labels = sorted folder index, 50/20/30 per class."""
    categories = sorted(c for c in listdir_nohidden(image_dir) if c not in ignored)
    p_tst = 1 - p_trn - p_val
    logger.info(f"Splitting into {p_trn:.0%} train, {p_val:.0%} val, and {p_tst:.0%} test")

    def _classes():
        for label, category in enumerate(categories):
            category_dir = osp.join(image_dir, category)
            impaths = [osp.join(category_dir, im) for im in listdir_nohidden(category_dir)]
            classname = new_cnames.get(category, category) if new_cnames else category
            yield label, classname, impaths

    return split_per_class(_classes(), p_trn, p_val, where=image_dir)


def subsample_classes(*args: list[Datum], subsample: str = "all") -> list[list[Datum]]:
    """Keep the base (first ceil(n/2) sorted labels of the first dataset) or new classes; relabel from 0."""
    assert subsample in ("all", "base", "new"), f"SUBSAMPLE_CLASSES must be all, base or new, got {subsample!r}"
    if subsample == "all":
        return list(args)
    labels = sorted({item.label for item in args[0]})
    m = math.ceil(len(labels) / 2)
    logger.info(f"SUBSAMPLE {subsample.upper()} CLASSES!")
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {label: new for new, label in enumerate(selected)}
    output = []
    for dataset in args:
        output.append([_relabel(item, relabeler[item.label]) for item in dataset if item.label in relabeler])
    return output


def _relabel(item: Datum, label: int) -> Datum:
    new = Datum.__new__(Datum)  # the image was checked when ``item`` was made (or comes from a cache)
    new.__dict__.update(item.__dict__)
    new._label = label
    return new


def read_classnames(text_file: str) -> OrderedDict[str, str]:
    """``<wnid> <class name with spaces>`` per line -> ordered {wnid: name} (ImageNet and variants)."""
    classnames: OrderedDict[str, str] = OrderedDict()
    with open(text_file, "r") as f:
        for line in f:
            parts = line.strip().split(" ")
            if parts and parts[0]:
                classnames[parts[0]] = " ".join(parts[1:])
    return classnames


def cache_root(cfg: Any, dataset_dir: str) -> str:
    """Where a loader writes what it derives: the dataset folder, or CACHE_DIR/<folder name>."""
    cache_dir = str(getattr(cfg.DATASET, "CACHE_DIR", "") or "")
    if not cache_dir:
        return dataset_dir
    return osp.join(osp.abspath(osp.expanduser(cache_dir)), osp.basename(osp.normpath(dataset_dir)))


def fewshot_cache_path(cfg: Any, dataset_dir: str, num_shots: int, seed: int) -> str:
    """``split_fewshot/shot_{K}-seed_{S}.pkl`` (CoOp's name; the key is only K and seed).

    An existing file in the dataset folder wins (one written by CoOp / Dassl or shared with other
    repos: the same few-shot images), as for the split JSON; otherwise the path under the cache root.
    """
    name = osp.join("split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")
    in_dataset = osp.join(dataset_dir, name)
    return in_dataset if osp.exists(in_dataset) else osp.join(cache_root(cfg, dataset_dir), name)


def load_or_create_fewshot(cfg: Any, dataset_dir: str, train: list[Datum], val: list[Datum] | None,
                           num_shots: int, seed: int) -> tuple[list[Datum], list[Datum] | None]:
    """K-shot train (and min(K, 4)-shot val) from the cache pickle, or sampled now and cached.

    The pickle is CoOp's: {"train": [...], "val": [...]} ({"train"} only when ``val`` is None, as
    for ImageNet), Datum under Dassl's class path, written atomically. ``num_shots < 1`` is a no-op;
    an unseeded run (``seed < 0``) samples afresh without the cache.
    """
    if num_shots < 1:
        return train, val
    if seed < 0:  # a cache file is keyed by its seed: an unseeded run neither reads nor writes one
        logger.info("Unseeded run: drawing the few-shot images afresh (the few-shot cache is only for seeded runs)")
        return _sample_fewshot(train, val, num_shots)
    path = fewshot_cache_path(cfg, dataset_dir, num_shots, seed)
    if osp.exists(path):
        logger.info(f"Loading preprocessed few-shot data from {path}")
        data = load_datum_cache(path)
        new_train, new_val = data["train"], data.get("val") if val is not None else None
        missing = [d.impath for d in new_train + (new_val or []) if not osp.isfile(d.impath)]
        if missing:
            raise DatasetNotFoundError(
                f"The few-shot cache {path} lists images that do not exist (e.g. {missing[0]}): the dataset "
                "was moved or changed since the cache was written. Delete the cache file to re-sample.")
        return new_train, new_val
    new_train, new_val = _sample_fewshot(train, val, num_shots)
    data = {"train": new_train}
    if new_val is not None:
        data["val"] = new_val
    logger.info(f"Saving preprocessed few-shot data to {path}")
    with writable_cache(path, "the few-shot cache"):
        atomic_write_bytes(dumps_datum_cache(data), path)
    return new_train, new_val


def _sample_fewshot(train: list[Datum], val: list[Datum] | None,
                    num_shots: int) -> tuple[list[Datum], list[Datum] | None]:
    base = DatasetBase()  # generate_fewshot_dataset needs no data of its own
    new_train = base.generate_fewshot_dataset(train, num_shots=num_shots)
    new_val = base.generate_fewshot_dataset(val, num_shots=min(num_shots, 4)) if val is not None else None
    return new_train, new_val


@contextlib.contextmanager
def writable_cache(path: str, what: str) -> Iterator[None]:
    """Turn a failed write of ``what`` (a file a loader derives: split JSON, few-shot cache) into one
    sentence: free space for a full disk, else a writable dataset folder or ``DATASET.CACHE_DIR``."""
    try:
        yield
    except OSError as err:
        if disk_full_error(err) is not None:
            raise
        raise OSError(f"Cannot write {what} {path} ({err.strerror or err}). Make the dataset folder writable or set "
                      "DATASET.CACHE_DIR to a writable folder.") from None
