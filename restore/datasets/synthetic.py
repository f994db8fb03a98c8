"""Tiny synthetic copies of the 15 benchmarks in exactly their real on-disk layouts (for tests and demos).

Each class gets a distinct colour and stripe pattern, so a model can learn them; the split, label
and class-name files are written in the real formats (split JSON and the raw annotation files), so
the real loaders read them unchanged::

    python -m restore.datasets.synthetic dtd --root /tmp/data --classes 4 --images-per-class 6
    python -m restore.datasets.synthetic all --root /tmp/data

Per class with n images: test = max(1, n // 3), val = max(1, n // 6), train = the rest
(ImageNet: n train + test-size val images; test-only variants: n test images).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import os.path as osp
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .catalog import BENCHMARKS, CALTECH101_IGNORED, CALTECH101_NEW_CNAMES, EUROSAT_NEW_CNAMES, resolve

__all__ = ["make_synthetic", "split_sizes", "main"]

_EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
            "Residential", "River", "SeaLake"]
_CALTECH = ["airplanes", "Faces", "Leopards", "Motorbikes", "accordion", "anchor", "ant", "barrel"]
_PETS = ["Abyssinian", "american_bulldog", "Bengal", "beagle", "Birman", "boxer", "Bombay", "chihuahua"]
_FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
            "tiger lily", "moon orchid", "bird of paradise"]
_AIRCRAFT = ["A300B4", "707-320", "Cessna 172", "DC-3", "737-200", "F-16A/B", "DHC-1", "Tu-134"]
_SUN = ["a/abbey", "a/apartment_building/outdoor", "b/bedroom", "c/church/indoor", "d/desert/sand", "f/forest_path",
        "h/highway", "k/kitchen"]
_UCF = ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching", "Basketball",
        "BlowDryHair"]
_IMAGENET = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
             "stingray", "rooster"]


def _names(base: Sequence[str], n: int, extra: Callable[[int], str]) -> list[str]:
    return [base[i] if i < len(base) else extra(i) for i in range(n)]


def split_sizes(images_per_class: int) -> tuple[int, int, int]:
    """(train, val, test) images per class in the synthetic split files."""
    n_test = max(1, images_per_class // 3)
    n_val = max(1, images_per_class // 6)
    return images_per_class - n_val - n_test, n_val, n_test


class _Writer:
    """Writes class-coloured JPEGs and remembers nothing else; one RNG for the whole copy."""

    def __init__(self, num_classes: int, seed: int, size: int = 32) -> None:
        self.num_classes, self.size = num_classes, size
        self.rng = np.random.RandomState(seed)

    def image(self, path: str, label: int) -> str:
        s = self.size
        r, g, b = colorsys.hsv_to_rgb((label / max(self.num_classes, 1) + 0.05) % 1.0, 0.8, 0.9)
        yy, xx = np.mgrid[0:s, 0:s]
        period = 3 + label % 5
        stripes = ((xx if label % 2 else yy) // period) % 2
        img = np.stack([np.full((s, s), c * 255.0) for c in (r, g, b)], axis=-1)
        img *= (0.6 + 0.4 * stripes)[..., None]
        img += self.rng.normal(0, 8, size=img.shape)
        os.makedirs(osp.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        return path


def _write_json_split(path: str, splits: dict[str, list[list]]) -> None:
    with open(path, "w") as f:
        json.dump(splits, f, indent=4, separators=(",", ": "))


def _per_class_split(entries: list[tuple[str, int, str]], n: int) -> dict[str, list[list]]:
    """Cut per-class runs of ``n`` consecutive entries into the train/val/test split JSON."""
    n_train, n_val, _ = split_sizes(n)
    out: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for i, (rel, label, cname) in enumerate(entries):
        j = i % n
        key = "train" if j < n_train else "val" if j < n_train + n_val else "test"
        out[key].append([rel, label, cname])
    return out


def _folder_split(d: str, image_sub: str, split_name: str, folders: list[str], cnames: dict[str, str],
                  w: _Writer, n: int, stem: Callable[[str, int], str], split_json: bool) -> None:
    """Folder-per-class datasets (DTD split): labels = index of the sorted folder names."""
    entries = []
    for label, folder in enumerate(sorted(folders)):
        for j in range(n):
            rel = f"{folder}/{stem(folder, j)}.jpg"
            w.image(osp.join(d, image_sub, rel), label)
            entries.append((rel, label, cnames.get(folder, folder)))
    if split_json:
        _write_json_split(osp.join(d, split_name), _per_class_split(entries, n))


def make_synthetic(name: str, root: str, num_classes: int = 4, images_per_class: int = 6, seed: int = 0,
                   split_json: bool = True) -> str:
    """Write a synthetic copy of dataset ``name`` (yaml or class name) under ``root``; return its folder.

    ``split_json=False`` leaves out ``split_zhou_*.json`` so the loader builds the split from the raw
    files, as CoOp does without the JSON.
    """
    key = resolve(name)
    if images_per_class < (3 if split_json else 4):
        raise ValueError("images_per_class must be >= 3 (train, val and test each need one image), >= 4 "
                         "without the split JSON (the loaders' random 50/20/30 split rounds)")
    _, folder = BENCHMARKS[key]
    d = osp.join(osp.abspath(osp.expanduser(root)), folder)
    os.makedirs(d, exist_ok=True)
    w = _Writer(num_classes, seed)
    globals()[f"_make_{key}"](d, w, num_classes, images_per_class, split_json)
    return d


def _make_dtd(d, w, c, n, sj):
    names = _names(["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cracked", "dotted"], c,
                   lambda i: f"texture{i}")
    _folder_split(d, "images", "split_zhou_DescribableTextures.json", names, {}, w, n,
                  lambda f, j: f"{f}_{j + 1:04d}", sj)


def _make_food101(d, w, c, n, sj):
    names = _names(["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beignets", "bibimbap"], c,
                   lambda i: f"dish_{i}")
    _folder_split(d, "images", "split_zhou_Food101.json", names, {}, w, n, lambda f, j: f"{100000 + j}", sj)


def _make_eurosat(d, w, c, n, sj):
    names = _names(_EUROSAT, c, lambda i: f"Class{i}")
    _folder_split(d, "2750", "split_zhou_EuroSAT.json", names, EUROSAT_NEW_CNAMES, w, n, lambda f, j: f"{f}_{j + 1}", sj)


def _make_caltech101(d, w, c, n, sj):
    names = _names(_CALTECH, c, lambda i: f"object_{i}")
    _folder_split(d, "101_ObjectCategories", "split_zhou_Caltech101.json", names, CALTECH101_NEW_CNAMES, w, n,
                  lambda f, j: f"image_{j + 1:04d}", sj)
    for ignored in CALTECH101_IGNORED:  # present in the real archive, left out by the loader
        w.image(osp.join(d, "101_ObjectCategories", ignored, "image_0001.jpg"), 0)


def _make_oxford_pets(d, w, c, n, sj):
    names = sorted(_names(_PETS, c, lambda i: f"breed_{i}"), key=str.lower)
    n_train, n_val, n_test = split_sizes(n)
    entries, trainval, test = [], [], []
    for label, breed in enumerate(names):
        species = 1 if breed[0].isupper() else 2
        for j in range(n):
            stem = f"{breed}_{j + 1}"
            w.image(osp.join(d, "images", stem + ".jpg"), label)
            entries.append((stem + ".jpg", label, breed.lower()))
            (test if j >= n - n_test else trainval).append(f"{stem} {label + 1} {species} {label + 1}")
    os.makedirs(osp.join(d, "annotations"), exist_ok=True)
    for fname, lines in (("trainval.txt", trainval), ("test.txt", test)):
        with open(osp.join(d, "annotations", fname), "w") as f:
            f.write("\n".join(lines) + "\n")
    if sj:
        _write_json_split(osp.join(d, "split_zhou_OxfordPets.json"), _per_class_split(entries, n))


def _make_stanford_cars(d, w, c, n, sj):
    from scipy.io import savemat

    names = [f"Make{i} Model{i} Sedan {2000 + i}" for i in range(c)]
    n_train, n_val, n_test = split_sizes(n)
    annos: dict[str, list] = {"cars_train": [], "cars_test": []}
    split: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(names):
        words = cname.split(" ")
        words.insert(0, words.pop(-1))
        for j in range(n):
            sub = "cars_test" if j >= n - n_test else "cars_train"
            fname = f"{len(annos[sub]) + 1:05d}.jpg"
            w.image(osp.join(d, sub, fname), label)
            annos[sub].append((fname, label + 1))
            key = "test" if sub == "cars_test" else "train" if j < n_train else "val"
            split[key].append([f"{sub}/{fname}", label, " ".join(words)])

    def _struct(rows):
        arr = np.zeros((1, len(rows)), dtype=[("fname", "O"), ("class", "O")])
        for i, (fname, cls) in enumerate(rows):
            arr[0, i] = (fname, np.array([[cls]], dtype=np.uint8))
        return arr

    os.makedirs(osp.join(d, "devkit"), exist_ok=True)
    savemat(osp.join(d, "devkit", "cars_train_annos.mat"), {"annotations": _struct(annos["cars_train"])})
    savemat(osp.join(d, "cars_test_annos_withlabels.mat"), {"annotations": _struct(annos["cars_test"])})
    meta = np.empty((1, c), dtype=object)
    for i, cname in enumerate(names):
        meta[0, i] = cname
    savemat(osp.join(d, "devkit", "cars_meta.mat"), {"class_names": meta})
    if sj:
        _write_json_split(osp.join(d, "split_zhou_StanfordCars.json"), split)


def _make_oxford_flowers(d, w, c, n, sj):
    from scipy.io import savemat

    names = _names(_FLOWERS, c, lambda i: f"flower {i}")
    labels, entries = [], []
    for j in range(n):  # images interleave classes, as in the real numbering
        for label in range(c):
            fname = f"image_{len(labels) + 1:05d}.jpg"
            w.image(osp.join(d, "jpg", fname), label)
            labels.append(label + 1)
            entries.append((fname, label, names[label]))
    savemat(osp.join(d, "imagelabels.mat"), {"labels": np.array([labels], dtype=np.uint8)})
    with open(osp.join(d, "cat_to_name.json"), "w") as f:
        json.dump({str(i + 1): name for i, name in enumerate(names)}, f)
    if sj:
        by_class = sorted(entries, key=lambda e: e[1])  # stable: per-class runs of n
        _write_json_split(osp.join(d, "split_zhou_OxfordFlowers.json"), _per_class_split(by_class, n))


def _make_fgvc_aircraft(d, w, c, n, sj):
    names = _names(_AIRCRAFT, c, lambda i: f"Variant {i}")
    n_train, n_val, _ = split_sizes(n)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, variant in enumerate(names):
        for j in range(n):
            imid = f"{1000000 + label * 1000 + j:07d}"
            w.image(osp.join(d, "images", imid + ".jpg"), label)
            key = "train" if j < n_train else "val" if j < n_train + n_val else "test"
            lines[key].append(f"{imid} {variant}")
    with open(osp.join(d, "variants.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    for key, rows in lines.items():
        with open(osp.join(d, f"images_variant_{key}.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")


def _make_sun397(d, w, c, n, sj):
    names = sorted(_names(_SUN, c, lambda i: f"{chr(97 + i % 26)}/scene_{i}"))
    n_test = split_sizes(n)[2]
    entries, train_lines, test_lines = [], [], []
    for label, cls in enumerate(names):
        cname = " ".join(cls.split("/")[1:][::-1])
        for j in range(n):
            rel = f"{cls}/sun_{label:03d}{j:04d}.jpg"
            w.image(osp.join(d, "SUN397", rel), label)
            entries.append((rel, label, cname))
            (test_lines if j >= n - n_test else train_lines).append("/" + rel)
    with open(osp.join(d, "ClassName.txt"), "w") as f:
        f.write("\n".join("/" + cls for cls in names) + "\n")
    for fname, rows in (("Training_01.txt", train_lines), ("Testing_01.txt", test_lines)):
        with open(osp.join(d, fname), "w") as f:
            f.write("\n".join(rows) + "\n")
    if sj:
        _write_json_split(osp.join(d, "split_zhou_SUN397.json"), _per_class_split(entries, n))


def _make_ucf101(d, w, c, n, sj):
    import re

    actions = sorted(_names(_UCF, c, lambda i: f"ActionNumber{i}"))
    n_test = split_sizes(n)[2]
    entries, train_lines, test_lines = [], [], []
    for label, action in enumerate(actions):
        renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))
        for j in range(n):
            video = f"v_{action}_g{j + 1:02d}_c01"
            w.image(osp.join(d, "UCF-101-midframes", renamed, video + ".jpg"), label)
            entries.append((f"{renamed}/{video}.jpg", label, renamed))
            if j >= n - n_test:
                test_lines.append(f"{action}/{video}.avi")
            else:
                train_lines.append(f"{action}/{video}.avi {label + 1}")
    lst = osp.join(d, "ucfTrainTestlist")
    os.makedirs(lst, exist_ok=True)
    for fname, rows in (("classInd.txt", [f"{i + 1} {a}" for i, a in enumerate(actions)]),
                        ("trainlist01.txt", train_lines), ("testlist01.txt", test_lines)):
        with open(osp.join(lst, fname), "w") as f:
            f.write("\n".join(rows) + "\n")
    if sj:
        _write_json_split(osp.join(d, "split_zhou_UCF101.json"), _per_class_split(entries, n))


def _wnids(c: int) -> list[tuple[str, str]]:
    return [(f"n{1440764 + 1000 * i:08d}", name) for i, name in enumerate(_names(_IMAGENET, c, lambda i: f"class {i}"))]


def _write_classnames(d: str, pairs: list[tuple[str, str]]) -> None:
    with open(osp.join(d, "classnames.txt"), "w") as f:
        f.write("\n".join(f"{wnid} {name}" for wnid, name in pairs) + "\n")


def _make_imagenet(d, w, c, n, sj):
    pairs = _wnids(c)
    _write_classnames(d, pairs)
    n_test = split_sizes(n)[2]
    for label, (wnid, _) in enumerate(pairs):
        for j in range(n):
            w.image(osp.join(d, "images", "train", wnid, f"{wnid}_{j + 1}.JPEG"), label)
        for j in range(n_test):
            w.image(osp.join(d, "images", "val", wnid, f"ILSVRC2012_val_{label * 100 + j + 1:08d}.JPEG"), label)


def _make_imagenetv2(d, w, c, n, sj):
    _write_classnames(d, _wnids(c))
    for label in range(c):
        for j in range(n):
            w.image(osp.join(d, "imagenetv2-matched-frequency-format-val", str(label), f"{label:03d}{j:04d}.jpeg"),
                    label)


def _make_imagenet_sketch(d, w, c, n, sj):
    pairs = _wnids(c)
    _write_classnames(d, pairs)
    for label, (wnid, _) in enumerate(pairs):
        for j in range(n):
            w.image(osp.join(d, "images", wnid, f"sketch_{j + 1}.JPEG"), label)


def _subset_variant(d, w, c, n, image_sub):
    """ImageNet-A/-R: the full classnames.txt, class folders for a subset (every other wnid) + README."""
    pairs = _wnids(2 * c)
    _write_classnames(d, pairs)
    for label, (wnid, _) in enumerate(pairs[1::2]):
        for j in range(n):
            w.image(osp.join(d, image_sub, wnid, f"{j:04d}.jpg"), label)
    with open(osp.join(d, image_sub, "README.txt"), "w") as f:
        f.write("synthetic copy\n")


def _make_imagenet_a(d, w, c, n, sj):
    _subset_variant(d, w, c, n, "imagenet-a")


def _make_imagenet_r(d, w, c, n, sj):
    _subset_variant(d, w, c, n, "imagenet-r")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"dataset (yaml or class name) or 'all': {', '.join(BENCHMARKS)}")
    parser.add_argument("--root", required=True, help="DATASET.ROOT to write into")
    parser.add_argument("--classes", type=int, default=4, help="number of classes (default: %(default)s)")
    parser.add_argument("--images-per-class", type=int, default=6,
                        help="images per class n; with a split file: test max(1, n // 3), val max(1, n // 6), "
                             "train the rest (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the image noise; the same seed writes the same files (default: %(default)s)")
    parser.add_argument("--no-split-json", action="store_true", help="leave out split_zhou_*.json")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        path = make_synthetic(name, args.root, args.classes, args.images_per_class, args.seed,
                              split_json=not args.no_split_json)
        print(f"Wrote synthetic {name} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
