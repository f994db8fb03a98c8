"""The 15 benchmark loaders on synthetic copies: layouts, splits, few-shot cache, base/new, errors."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import yaml

import datasets  # noqa: F401  (registers the loaders)
from restore.datasets.catalog import BENCHMARKS
from restore.datasets.synthetic import make_synthetic, split_sizes
from restore.datasets.templates import CUSTOM_TEMPLATES
from restore.engine.config import get_cfg_default
from restore.engine.data import DataManager, DatasetNotFoundError, dumps_datum_cache, load_datum_cache
from restore.engine.registry import DATASET_REGISTRY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, N = 4, 6  # classes, images per class
N_TRAIN, N_VAL, N_TEST = split_sizes(N)
TEST_ONLY = {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
# Class names after each loader's renaming rules (label order).
EXPECTED_NAMES = {
    "imagenet": ["tench", "goldfish", "great white shark", "tiger shark"],
    "caltech101": ["face", "leopard", "motorbike", "airplane"],  # sorted folders: upper case first; renamed
    "oxford_pets": ["abyssinian", "american_bulldog", "beagle", "bengal"],
    "stanford_cars": [f"{2000 + i} Make{i} Model{i} Sedan" for i in range(4)],  # year moved to the front
    "oxford_flowers": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"],
    "food101": ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"],
    "fgvc_aircraft": ["A300B4", "707-320", "Cessna 172", "DC-3"],  # variants.txt order, not sorted
    "sun397": ["abbey", "outdoor apartment_building", "bedroom", "indoor church"],
    "dtd": ["banded", "blotchy", "braided", "bubbly"],
    "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road"],
    "ucf101": ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling"],
    "imagenetv2": ["tench", "goldfish", "great white shark", "tiger shark"],
    "imagenet_sketch": ["tench", "goldfish", "great white shark", "tiger shark"],
    # A/R: 200 of the 1000 wnids, relabelled 0.. in sorted-wnid order (the synthetic copy keeps every other one)
    "imagenet_a": ["goldfish", "tiger shark", "electric ray", "rooster"],
    "imagenet_r": ["goldfish", "tiger shark", "electric ray", "rooster"],
}


def make_cfg(root, name, shots=-1, sub="all", seed=1, cache_dir=""):
    cfg = get_cfg_default()
    cfg.merge_from_file(os.path.join(REPO, "configs", "datasets", f"{name}.yaml"))
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = sub
    cfg.DATASET.CACHE_DIR = str(cache_dir)
    cfg.SEED = seed
    cfg.VERBOSE = False
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 2
    cfg.DATALOADER.TEST.BATCH_SIZE = 8
    cfg.INPUT.SIZE = (16, 16)
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    return cfg


def load(cfg):
    random.seed(cfg.SEED)  # as train.py does right before building the trainer
    return DataManager(cfg)


def snapshot(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_loader_on_synthetic_copy(tmp_path, name):
    cls, folder = BENCHMARKS[name]
    assert make_synthetic(name, tmp_path, num_classes=C, images_per_class=N) == str(tmp_path / folder)
    dm = load(make_cfg(tmp_path, name))
    ds = dm.dataset
    assert type(ds).__name__ == cls and ds.dataset_dir == str(tmp_path / folder)
    assert dm.num_classes == C and ds.classnames == EXPECTED_NAMES[name]
    assert dm.lab2cname == dict(enumerate(EXPECTED_NAMES[name]))
    if name in TEST_ONLY:
        assert ds.train_x is ds.test and len(ds.test) == C * N and not ds.val and dm.val_loader is None
        assert not os.path.exists(os.path.join(ds.dataset_dir, "split_fewshot"))
    elif name == "imagenet":
        assert (len(ds.train_x), len(ds.test)) == (C * N, C * N_TEST) and ds.val is ds.test
    else:
        assert (len(ds.train_x), len(ds.val), len(ds.test)) == (C * N_TRAIN, C * N_VAL, C * N_TEST)
    batch = next(iter(dm.test_loader))
    assert batch["img"].shape[1:] == (3, 16, 16) and set(batch) >= {"img", "label", "domain", "impath", "index"}
    for item in ds.test:  # every label names the class whose folder/file the image came from
        assert os.path.isfile(item.impath) and item.classname == EXPECTED_NAMES[name][item.label]
    if name in TEST_ONLY:
        return

    # 2-shot train (val: min(K, 4) per class, capped by what exists), then base / new.
    for sub, names in (("base", EXPECTED_NAMES[name][:2]), ("new", EXPECTED_NAMES[name][2:])):
        ds = load(make_cfg(tmp_path, name, shots=2, sub=sub)).dataset
        assert ds.classnames == names and ds.num_classes == 2
        assert sorted(d.label for d in ds.train_x) == [0, 0, 1, 1]
        if name == "imagenet":
            assert ds.val is ds.test and len(ds.test) == 2 * N_TEST
        else:
            assert len(ds.val) == 2 * min(2, N_VAL) and len(ds.test) == 2 * N_TEST
    cache = os.path.join(ds.dataset_dir, "split_fewshot", "shot_2-seed_1.pkl")
    data = load_datum_cache(cache)
    assert set(data) == ({"train"} if name == "imagenet" else {"train", "val"}) and len(data["train"]) == 2 * C


@pytest.mark.parametrize("name", ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "sun397",
                                  "ucf101", "eurosat", "dtd"])
def test_split_built_from_raw_files_without_json(tmp_path, name):
    """Without split_zhou_*.json the loader builds the split from the raw files and saves the JSON."""
    make_synthetic(name, tmp_path, num_classes=C, images_per_class=N, split_json=False)
    cls, folder = BENCHMARKS[name]
    ds = load(make_cfg(tmp_path, name)).dataset
    assert ds.classnames == EXPECTED_NAMES[name]
    assert len(ds.train_x) + len(ds.val) + len(ds.test) == C * N
    assert {d.label for d in ds.val} == set(range(C))
    saved = json.load(open(os.path.join(tmp_path, folder, f"split_zhou_{cls}.json")))
    assert [len(saved[k]) for k in ("train", "val", "test")] == [len(ds.train_x), len(ds.val), len(ds.test)]
    assert not os.path.isabs(saved["train"][0][0])


def test_fewshot_picks_follow_coop_rule_and_cache(tmp_path):
    make_synthetic("dtd", tmp_path, num_classes=C, images_per_class=9)
    split = json.load(open(tmp_path / "dtd" / "split_zhou_DescribableTextures.json"))
    K, seed = 3, 5
    random.seed(seed)  # independent re-computation from the JSON
    expected = {}
    for key, k in (("train", K), ("val", min(K, 4))):
        groups = {}
        for rel, label, _ in split[key]:
            groups.setdefault(label, []).append(str(tmp_path / "dtd" / "images" / rel))
        expected[key] = [p for lab in groups for p in (random.sample(groups[lab], k) if len(groups[lab]) >= k
                                                       else groups[lab])]
    ds = load(make_cfg(tmp_path, "dtd", shots=K, seed=seed)).dataset
    assert [d.impath for d in ds.train_x] == expected["train"]
    assert [d.impath for d in ds.val] == expected["val"]
    # The cache is reused regardless of the global random state (and serves base as well).
    random.seed(12345)
    ds2 = DataManager(make_cfg(tmp_path, "dtd", shots=K, seed=seed, sub="base")).dataset
    assert [d.impath for d in ds2.train_x] == [p for p in expected["train"] if "/banded/" in p or "/blotchy/" in p]


def test_cache_dir_redirect_leaves_dataset_folder_untouched(tmp_path):
    for name in ("dtd", "imagenet"):
        make_synthetic(name, tmp_path / "data", num_classes=C, images_per_class=N, split_json=False)
    before = snapshot(tmp_path / "data")
    cache = tmp_path / "cache"
    picks = {}
    for name in ("dtd", "imagenet"):
        ds = load(make_cfg(tmp_path / "data", name, shots=2, cache_dir=cache)).dataset
        assert len(ds.train_x) == 2 * C
        assert os.path.isfile(cache / name / "split_fewshot" / "shot_2-seed_1.pkl")
        picks[name] = [d.impath for d in ds.train_x]
    assert snapshot(tmp_path / "data") == before
    assert os.path.isfile(cache / "dtd" / "split_zhou_DescribableTextures.json")
    assert os.path.isfile(cache / "imagenet" / "preprocessed.pkl")
    # a second run reads everything back from the cache folder: same split, same picks
    random.seed(777)
    again = DataManager(make_cfg(tmp_path / "data", "dtd", shots=2, cache_dir=cache)).dataset
    assert [d.impath for d in again.train_x] == picks["dtd"]
    assert snapshot(tmp_path / "data") == before


def test_existing_fewshot_pickle_in_dataset_folder_wins_over_cache_dir(tmp_path):
    """A split_fewshot pickle shipped with the data (CoOp's / Dassl's) is read even with CACHE_DIR set."""
    make_synthetic("dtd", tmp_path / "data", num_classes=C, images_per_class=N)
    first = load(make_cfg(tmp_path / "data", "dtd", shots=2)).dataset  # writes data/dtd/split_fewshot/...
    shipped = tmp_path / "data" / "dtd" / "split_fewshot" / "shot_2-seed_1.pkl"
    data = load_datum_cache(str(shipped))
    data["train"] = data["train"][::-1]  # a recognisably different (but valid) pick order
    shipped.write_bytes(dumps_datum_cache(data))
    before = snapshot(tmp_path / "data")
    random.seed(99)
    ds = DataManager(make_cfg(tmp_path / "data", "dtd", shots=2, cache_dir=tmp_path / "cache")).dataset
    assert [d.impath for d in ds.train_x] == [d.impath for d in first.train_x][::-1]
    assert not os.path.exists(tmp_path / "cache" / "dtd" / "split_fewshot")
    assert snapshot(tmp_path / "data") == before


def test_missing_dataset_folder_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load(make_cfg(tmp_path, "dtd"))
    msg = str(err.value)
    assert str(tmp_path / "dtd") in msg and "DATASETS.md#dtd" in msg and "images/<class>/" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_malformed_split_and_missing_images_errors(tmp_path):
    d = make_synthetic("eurosat", tmp_path, num_classes=C, images_per_class=N)
    path = os.path.join(d, "split_zhou_EuroSAT.json")
    split = json.load(open(path))
    split["test"].append(["Forest/Forest_999.jpg", 1, "Forest"])
    json.dump(split, open(path, "w"))
    with pytest.raises(DatasetNotFoundError, match=r"(?s)1 of .* do not exist.*Forest_999\.jpg.*DATASETS\.md#eurosat"):
        load(make_cfg(tmp_path, "eurosat"))
    open(path, "w").write("{not json")
    with pytest.raises(DatasetNotFoundError, match=r"(?s)Malformed split file.*split_zhou_EuroSAT\.json"):
        load(make_cfg(tmp_path, "eurosat"))


def test_empty_class_and_missing_raw_files_errors(tmp_path):
    d = make_synthetic("food101", tmp_path, num_classes=C, images_per_class=N, split_json=False)
    os.makedirs(os.path.join(d, "images", "zz_empty"))
    with pytest.raises(DatasetNotFoundError, match="zz_empty"):
        load(make_cfg(tmp_path, "food101"))
    d = make_synthetic("imagenet_sketch", tmp_path, num_classes=C, images_per_class=N)
    first = sorted(os.listdir(os.path.join(d, "images")))[0]
    shutil.rmtree(os.path.join(d, "images", first))
    os.makedirs(os.path.join(d, "images", first))
    with pytest.raises(DatasetNotFoundError, match=f"(?s){first}.*empty.*DATASETS.md#imagenet_sketch"):
        load(make_cfg(tmp_path, "imagenet_sketch"))
    d = make_synthetic("fgvc_aircraft", tmp_path, num_classes=C, images_per_class=N)
    os.remove(os.path.join(d, "variants.txt"))
    with pytest.raises(DatasetNotFoundError, match=r"(?s)variants\.txt is missing.*fgvc_aircraft"):
        load(make_cfg(tmp_path, "fgvc_aircraft"))


def test_corrupted_image_reported_by_path(tmp_path):
    d = make_synthetic("dtd", tmp_path, num_classes=C, images_per_class=N)
    split = json.load(open(os.path.join(d, "split_zhou_DescribableTextures.json")))
    victim = os.path.join(d, "images", split["test"][0][0])
    with open(victim, "r+b") as f:
        f.truncate(20)
    dm = load(make_cfg(tmp_path, "dtd"))
    with pytest.raises(OSError, match=f"(?s){victim}.*re-extract"):
        next(iter(dm.test_loader))


def test_unknown_dataset_name_suggests(tmp_path):
    cfg = make_cfg(tmp_path, "dtd")
    cfg.DATASET.NAME = "DescribableTexture"
    with pytest.raises(ValueError, match="Did you mean 'DescribableTextures'"):
        DataManager(cfg)


def test_configs_docs_and_templates_cover_all_15():
    assert set(DATASET_REGISTRY.registered_names()) >= {c for c, _ in BENCHMARKS.values()}
    doc = open(os.path.join(REPO, "DATASETS.md")).read()
    headings = {line.lstrip("#").strip() for line in doc.splitlines() if line.startswith("#")}
    for name, (cls, _) in BENCHMARKS.items():
        assert yaml.safe_load(open(os.path.join(REPO, "configs", "datasets", f"{name}.yaml"))) == {
            "DATASET": {"NAME": cls}}
        assert DATASET_REGISTRY.get(cls).anchor == name and name in headings
        assert "{}" in CUSTOM_TEMPLATES[cls]
