"""Tiny synthetic Waterbirds / CelebA in their real layouts, with a controllable spurious correlation.

Each image is a background whose colour encodes the spurious attribute (land / water; female / male)
with a small centred patch whose colour encodes the class (landbird / waterbird; non-blond / blond),
so a model that looks at the background is right on the majority groups and wrong on the others.
In the train split a fraction ``spurious`` of each class has its majority attribute (class ``c`` with
attribute ``c``); Waterbirds' val and test are balanced over the attribute within each class (as in the
real release), CelebA's follow the same correlation as train (as in the real one). Every group gets
at least one val and one test image.

    python -m restore.datasets.synthetic waterbirds --root /tmp/data --spurious 0.95 [--layout original|wilds|both]
"""

from __future__ import annotations

import csv
import os
import os.path as osp
from typing import Sequence

import numpy as np
from PIL import Image

from .catalog import GROUP_BENCHMARKS

__all__ = ["LAYOUTS", "make_group_synthetic", "group_split_counts"]

LAYOUTS = ("original", "wilds")
_SPECIES = (("094.White_breasted_Nuthatch", "129.Song_Sparrow"), ("001.Black_footed_Albatross", "086.Pacific_Loon"))
_CELEBA_ATTRS = ("5_o_Clock_Shadow", "Arched_Eyebrows", "Blond_Hair", "Male", "Young")
# background (attribute) and patch (class) colours
_BACKGROUND = ((60, 140, 60), (50, 90, 200))
_PATCH = ((150, 90, 40), (240, 240, 235))


def group_split_counts(name: str, images_per_class: int, eval_per_group: int, spurious: float
                       ) -> dict[tuple[int, int, int], int]:
    """Images per (split, class, attribute) of a synthetic copy; split 0 train, 1 val, 2 test."""
    if not 0.0 <= spurious <= 1.0:
        raise ValueError(f"spurious must be in [0, 1] (the share of each class with its majority attribute), got "
                         f"{spurious}")
    if images_per_class < 2 or eval_per_group < 1:
        raise ValueError("images_per_class must be >= 2 and eval_per_group >= 1")
    counts: dict[tuple[int, int, int], int] = {}
    for c in (0, 1):
        major = int(round(spurious * images_per_class))
        counts[(0, c, c)], counts[(0, c, 1 - c)] = major, images_per_class - major
        for split in (1, 2):
            if name == "waterbirds":
                counts[(split, c, c)] = counts[(split, c, 1 - c)] = eval_per_group
            else:  # CelebA: the train correlation, at least one image per group
                total = 2 * eval_per_group
                minor = max(1, int(round((1 - spurious) * total)))
                counts[(split, c, c)], counts[(split, c, 1 - c)] = max(1, total - minor), minor
    return counts


def _image(path: str, label: int, attribute: int, rng: np.random.RandomState, size: int = 32) -> None:
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = _BACKGROUND[attribute]
    lo, hi = size * 3 // 8, size * 5 // 8  # the class patch: a quarter of the side, centred
    img[lo:hi, lo:hi] = _PATCH[label]
    img += rng.normal(0, 10, size=img.shape)
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)


def _items(name: str, counts: dict[tuple[int, int, int], int]) -> list[tuple[str, int, int, int]]:
    """(relative path, label, attribute, split) of every image, in a fixed interleaved order."""
    items = []
    number = 0
    for (split, label, attribute), n in sorted(counts.items()):
        for j in range(n):
            number += 1
            if name == "waterbirds":
                species = _SPECIES[label][j % 2]
                rel = f"{species}/{species.split('.', 1)[1]}_{number:04d}_{split}{attribute}.jpg"
            else:
                rel = f"{number:06d}.jpg"
            items.append((rel, label, attribute, split))
    order = np.random.RandomState(1234).permutation(len(items))  # metadata rows are not sorted by group
    return [items[i] for i in order]


def make_group_synthetic(name: str, root: str, layout: str = "original", images_per_class: int = 20,
                         eval_per_group: int = 4, spurious: float = 0.95, seed: int = 0) -> str:
    """Write a synthetic ``waterbirds`` or ``celeba`` under ``root`` in ``layout``; return its folder.

    The same arguments write the same images and rows in either layout.
    """
    if name not in GROUP_BENCHMARKS:
        raise ValueError(f"Unknown group dataset {name!r}; choose one of {', '.join(GROUP_BENCHMARKS)}.")
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    folder = GROUP_BENCHMARKS[name][1][LAYOUTS.index(layout)]
    d = osp.join(osp.abspath(osp.expanduser(root)), folder)
    os.makedirs(d, exist_ok=True)
    items = _items(name, group_split_counts(name, images_per_class, eval_per_group, spurious))
    rng = np.random.RandomState(seed)
    image_dir = d if name == "waterbirds" else osp.join(d, "img_align_celeba")
    for rel, label, attribute, _ in items:
        _image(osp.join(image_dir, rel), label, attribute, rng)
    if name == "waterbirds":
        _write_csv(osp.join(d, "metadata.csv"), ["img_id", "img_filename", "y", "split", "place", "place_filename"],
                   [[i + 1, rel, y, s, a, f"/{'lw'[a]}/synthetic/{i:05d}.jpg"]
                    for i, (rel, y, a, s) in enumerate(items)])
    else:
        _write_celeba(d, items, layout)
    return d


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_celeba(d: str, items: Sequence[tuple[str, int, int, int]], layout: str) -> None:
    ordered = sorted(items)  # CelebA's files list the images in file-name order
    attrs = []
    for k, (rel, label, attribute, _) in enumerate(ordered):
        values = {"Blond_Hair": label, "Male": attribute, "Young": k % 2, "5_o_Clock_Shadow": 0,
                  "Arched_Eyebrows": (k // 2) % 2}
        attrs.append([rel] + [1 if values[a] else -1 for a in _CELEBA_ATTRS])
    if layout == "wilds":
        _write_csv(osp.join(d, "list_attr_celeba.csv"), ["image_id", *_CELEBA_ATTRS], attrs)
        _write_csv(osp.join(d, "list_eval_partition.csv"), ["image_id", "partition"],
                   [[rel, split] for rel, _, _, split in ordered])
        return
    with open(osp.join(d, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{len(attrs)}\n{' '.join(_CELEBA_ATTRS)} \n")
        for row in attrs:
            f.write(f"{row[0]} " + " ".join(f"{v:2d}" for v in row[1:]) + "\n")
    with open(osp.join(d, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{rel} {split}\n" for rel, _, _, split in ordered)
