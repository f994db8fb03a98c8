"""DataManager: dataset -> transforms -> loaders, with Dassl's attributes and printed summary."""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed import shard_sampler
from ..registry import DATASET_REGISTRY, check_availability
from ..utils import read_image
from .datum import Datum
from .samplers import build_sampler
from .transforms import INTERPOLATION_MODES, build_transform

__all__ = ["DataManager", "DatasetWrapper", "build_data_loader", "build_dataset", "format_table",
           "loader_workers", "seed_worker"]

_SAID: set[tuple] = set()  # notes printed once per process


def _say_once(key: tuple, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        print(message)


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low} to {high}"


def loader_workers(cfg: Any) -> int:
    """``DATALOADER.NUM_WORKERS``, capped at the CPUs this process may run on (one line says so)."""
    requested = int(cfg.DATALOADER.NUM_WORKERS)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if requested <= cpus:
        return requested
    _say_once(("workers", requested, cpus), f"DATALOADER.NUM_WORKERS {requested} is more than the {cpus} CPUs "
                                            f"available: using {cpus} loader workers")
    return cpus


def build_dataset(cfg: Any) -> Any:
    """Instantiate the registered dataset ``cfg.DATASET.NAME`` (an unknown name says 'did you mean')."""
    avai = DATASET_REGISTRY.registered_names()
    try:
        check_availability(cfg.DATASET.NAME, avai)
    except ValueError as err:
        hint = "" if avai else " No dataset is registered: import a dataset plugin (restore.methods.load_plugins() loads the installed ones)."
        raise ValueError(f"Unknown DATASET.NAME: {err}{hint}") from None
    if cfg.VERBOSE:
        print(f"Loading dataset: {cfg.DATASET.NAME}")
    return DATASET_REGISTRY.get(cfg.DATASET.NAME)(cfg)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from torch's per-worker seed (from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_data_loader(cfg: Any, sampler_type: str = "SequentialSampler", data_source: Sequence[Datum] | None = None,
                      batch_size: int = 64, n_domain: int = 0, n_ins: int = 2, tfm: Any = None,
                      is_train: bool = True, dataset_wrapper: Any = None, shard: bool = True,
                      generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over ``data_source`` (Dassl semantics: train drops the last incomplete batch).

    Under DDP each rank loads its shard of every global batch; ``shard=False`` gives every rank
    the whole loader (for work that one rank does alone, e.g. Craft's anchors).

    Shuffling and random transforms draw from the global torch RNG, as Dassl's loaders do, so a
    seeded run gets Dassl's batches for that seed; resuming restores the global RNG states saved in
    the checkpoint, and under DDP every rank draws the same and rank 0's order is used. A loader
    with its own stream (e.g. Craft's target images, which must not change the training batches)
    passes ``generator``: its order and worker seeds then come from it alone.
    """
    data_source = list(data_source or [])
    sampler = build_sampler(sampler_type, cfg=cfg, data_source=data_source, batch_size=batch_size,
                            n_domain=n_domain, n_ins=n_ins, generator=generator)
    # DDP: batch_size is global; each rank loads its shard of every global batch (no-op in one process)
    if shard:
        sampler, batch_size = shard_sampler(sampler, batch_size, is_train, len(data_source))
    wrapper = dataset_wrapper or DatasetWrapper
    loader = DataLoader(
        wrapper(cfg, data_source, transform=tfm, is_train=is_train),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=loader_workers(cfg),
        drop_last=is_train and len(data_source) >= batch_size,
        pin_memory=torch.cuda.is_available() and cfg.USE_CUDA,
        generator=generator,
        worker_init_fn=seed_worker if generator is not None else None,
    )
    if len(loader) == 0:
        raise ValueError(f"Empty data loader ({len(data_source)} items, batch size {batch_size}): the split "
                         "is empty. Check DATASET.ROOT and the dataset layout (DATASETS.md).")
    return loader


def format_table(rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned two-space-separated columns between dashed rules (tabulate's 'simple' look)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([rule, *body, rule])


class DataManager:
    """Builds the dataset and its train_x / train_u / val / test loaders from ``cfg``."""

    def __init__(self, cfg: Any, custom_tfm_train: Any = None, custom_tfm_test: Any = None,
                 dataset_wrapper: Any = None) -> None:
        dataset = build_dataset(cfg)
        if custom_tfm_train is None:
            tfm_train = build_transform(cfg, is_train=True)
        else:
            print("* Using custom transform for training")
            tfm_train = custom_tfm_train
        if custom_tfm_test is None:
            tfm_test = build_transform(cfg, is_train=False)
        else:
            print("* Using custom transform for testing")
            tfm_test = custom_tfm_test
        dl = cfg.DATALOADER
        self.train_loader_x = build_data_loader(
            cfg, sampler_type=dl.TRAIN_X.SAMPLER, data_source=dataset.train_x, batch_size=dl.TRAIN_X.BATCH_SIZE,
            n_domain=dl.TRAIN_X.N_DOMAIN, n_ins=dl.TRAIN_X.N_INS, tfm=tfm_train, is_train=True,
            dataset_wrapper=dataset_wrapper)
        self.train_loader_u = None
        if dataset.train_u:
            u = dl.TRAIN_X if dl.TRAIN_U.SAME_AS_X else dl.TRAIN_U
            self.train_loader_u = build_data_loader(
                cfg, sampler_type=u.SAMPLER, data_source=dataset.train_u, batch_size=u.BATCH_SIZE,
                n_domain=u.N_DOMAIN, n_ins=u.N_INS, tfm=tfm_train, is_train=True, dataset_wrapper=dataset_wrapper)
        self.val_loader = None
        if dataset.val:
            self.val_loader = build_data_loader(
                cfg, sampler_type=dl.TEST.SAMPLER, data_source=dataset.val, batch_size=dl.TEST.BATCH_SIZE,
                tfm=tfm_test, is_train=False, dataset_wrapper=dataset_wrapper)
        self.test_loader = build_data_loader(
            cfg, sampler_type=dl.TEST.SAMPLER, data_source=dataset.test, batch_size=dl.TEST.BATCH_SIZE,
            tfm=tfm_test, is_train=False, dataset_wrapper=dataset_wrapper)

        self._num_classes = dataset.num_classes
        self._num_source_domains = len(cfg.DATASET.SOURCE_DOMAINS)
        self._lab2cname = dataset.lab2cname
        self.dataset = dataset
        self.shots_per_class = self._shots_per_class(cfg, dataset)
        if cfg.VERBOSE:
            self.show_dataset_summary(cfg)

    def _shots_per_class(self, cfg: Any, dataset: Any) -> list[int] | None:
        """Train images per label (index = label) of a few-shot run; None without NUM_SHOTS or for a test-only
        set. Classes with fewer images than NUM_SHOTS keep all theirs (as Dassl): said once, never silently."""
        shots = int(cfg.DATASET.NUM_SHOTS)
        if shots < 1 or not dataset.train_x or dataset.train_x is dataset.test:
            return None
        counts = Counter(item.label for item in dataset.train_x)
        per_class = [counts.get(label, 0) for label in range(self.num_classes)]
        short = [n for n in per_class if n < shots]
        if short:
            _say_once(("shots", cfg.DATASET.NAME, shots, tuple(per_class)),
                      f"Warning: DATASET.NUM_SHOTS {shots} is more than the train images of {len(short)} of the "
                      f"{len(per_class)} classes; they keep all theirs ({_span(short)} images). "
                      "results.json records the shots used per class (shots_per_class).")
        return per_class

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_source_domains(self) -> int:
        return self._num_source_domains

    @property
    def lab2cname(self) -> dict[int, str]:
        return self._lab2cname

    def show_dataset_summary(self, cfg: Any) -> None:
        """Print the Dataset / # classes / # train_x / # val / # test table."""
        rows: list[list[Any]] = [["Dataset", cfg.DATASET.NAME]]
        if cfg.DATASET.SOURCE_DOMAINS:
            rows.append(["Source", list(cfg.DATASET.SOURCE_DOMAINS)])
        if cfg.DATASET.TARGET_DOMAINS:
            rows.append(["Target", list(cfg.DATASET.TARGET_DOMAINS)])
        rows.append(["# classes", f"{self.num_classes:,}"])
        rows.append(["# train_x", f"{len(self.dataset.train_x):,}"])
        if self.dataset.train_u:
            rows.append(["# train_u", f"{len(self.dataset.train_u):,}"])
        if self.dataset.val:
            rows.append(["# val", f"{len(self.dataset.val):,}"])
        rows.append(["# test", f"{len(self.dataset.test):,}"])
        print(format_table(rows))


class DatasetWrapper(Dataset):
    """Reads one Datum as a dict: img (transformed), label, domain, impath, index (+ img0)."""

    def __init__(self, cfg: Any, data_source: Sequence[Datum], transform: Any = None, is_train: bool = False) -> None:
        self.cfg = cfg
        self.data_source = data_source
        self.transform = transform
        self.is_train = is_train
        self.k_tfm = cfg.DATALOADER.K_TRANSFORMS if is_train else 1
        self.return_img0 = cfg.DATALOADER.RETURN_IMG0
        if self.k_tfm > 1 and transform is None:
            raise ValueError(f"Cannot augment the image {self.k_tfm} times because transform is None")
        from torchvision.transforms import Compose, Normalize, Resize, ToTensor

        to_tensor: list[Callable] = [Resize(tuple(cfg.INPUT.SIZE), interpolation=INTERPOLATION_MODES.get(
            cfg.INPUT.INTERPOLATION, INTERPOLATION_MODES["bilinear"])), ToTensor()]
        if "normalize" in cfg.INPUT.TRANSFORMS:
            to_tensor.append(Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD))
        self.to_tensor = Compose(to_tensor)

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = self.data_source[idx]
        output: dict[str, Any] = {"label": item.label, "domain": item.domain, "impath": item.impath, "index": idx}
        img0 = read_image(item.impath)
        if self.transform is not None:
            if isinstance(self.transform, (list, tuple)):
                for i, tfm in enumerate(self.transform):
                    output["img" if i == 0 else f"img{i + 1}"] = self._transform_image(tfm, img0)
            else:
                output["img"] = self._transform_image(self.transform, img0)
        else:
            output["img"] = img0
        if self.return_img0:
            output["img0"] = self.to_tensor(img0)
        return output

    def _transform_image(self, tfm: Callable, img0: Any) -> Any:
        imgs = [tfm(img0) for _ in range(self.k_tfm)]
        return imgs[0] if len(imgs) == 1 else imgs
