"""Engine data layer: Datum, DatasetBase numerics, pickle compatibility, transforms, samplers, loaders."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

from restore.engine.config import get_cfg_default
from restore.engine.data import (DASSL_DATUM_MODULE, DatasetBase, DatasetNotFoundError, DatasetWrapper, Datum,
                                 MissingImageError, build_data_loader, build_transform, dumps_datum_cache,
                                 format_table, load_datum_cache, load_or_create_fewshot, read_and_split_data,
                                 read_split, save_split, split_trainval, subsample_classes)
from restore.engine.data.samplers import build_sampler


def _img(path, color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


@pytest.fixture
def items(tmp_path):
    """9 real files with labels [2, 0, 2, 1, 0, 2, 1, 2, 0] (first-appearance order 2, 0, 1)."""
    labels = [2, 0, 2, 1, 0, 2, 1, 2, 0]
    return [Datum(_img(tmp_path / f"im{i}.png"), label=l, classname=f"c{l}") for i, l in enumerate(labels)]


def _cfg(**dataset):
    cfg = get_cfg_default()
    cfg.DATALOADER.NUM_WORKERS = 0
    for k, v in dataset.items():
        cfg.DATASET[k] = v
    return cfg


# ---------------------------------------------------------------- Datum


def test_datum_checks_file_and_is_read_only(tmp_path):
    path = _img(tmp_path / "a.png")
    d = Datum(path, label=3, domain=1, classname="cat")
    assert (d.impath, d.label, d.domain, d.classname) == (path, 3, 1, "cat")
    assert vars(d) == {"_impath": path, "_label": 3, "_domain": 1, "_classname": "cat"}
    with pytest.raises(AttributeError):
        d.label = 4
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(MissingImageError, match="nope.jpg") as err:
        Datum(missing)
    assert isinstance(err.value, AssertionError) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(AssertionError):
        Datum(123)  # type: ignore[arg-type]


# ---------------------------------------------------------------- DatasetBase numerics


def test_num_classes_is_max_label_plus_one_and_names_sorted_by_label(tmp_path):
    p = _img(tmp_path / "x.png")
    ds = DatasetBase(train_x=[Datum(p, 5, classname="five"), Datum(p, 1, classname="one")], test=[])
    assert ds.num_classes == 6
    assert ds.lab2cname == {1: "one", 5: "five"}
    assert ds.classnames == ["one", "five"]


def test_generate_fewshot_matches_dassl_rule(items):
    K = 2
    random.seed(123)
    got = DatasetBase().generate_fewshot_dataset(items, num_shots=K)
    # Independent: group in first-appearance order, random.sample per label from a fresh seed.
    random.seed(123)
    order, groups = [], {}
    for it in items:
        if it.label not in groups:
            order.append(it.label)
            groups[it.label] = []
        groups[it.label].append(it)
    expected = [x for lab in order for x in random.sample(groups[lab], K)]
    assert [d.impath for d in got] == [d.impath for d in expected]
    assert [d.label for d in got] == [2, 2, 0, 0, 1, 1]
    # Fewer items than K: all kept (label 1 has 2 items); repeat=True draws with replacement.
    got5 = DatasetBase().generate_fewshot_dataset(items, num_shots=5)
    assert sum(d.label == 1 for d in got5) == 2 and sum(d.label == 2 for d in got5) == 4
    random.seed(0)
    rep = DatasetBase().generate_fewshot_dataset(items, num_shots=5, repeat=True)
    assert len(rep) == 15
    assert DatasetBase().generate_fewshot_dataset(items, num_shots=-1) is items


def test_fewshot_cache_val_min_k_4_atomic_and_reused(tmp_path, items, capsys):
    dataset_dir = tmp_path / "ds"
    dataset_dir.mkdir()
    cfg = _cfg()
    K = 5
    val = items[:]  # 4 items of label 2, 3 of label 0, 2 of label 1
    random.seed(7)
    train_fs, val_fs = load_or_create_fewshot(cfg, str(dataset_dir), items, val, K, seed=7)
    random.seed(7)
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    exp_train = [x for lab in groups for x in (random.sample(groups[lab], K) if len(groups[lab]) >= K else groups[lab])]
    exp_val = [x for lab in groups for x in (random.sample(groups[lab], 4) if len(groups[lab]) >= 4 else groups[lab])]
    assert train_fs == exp_train and val_fs == exp_val
    cache = dataset_dir / "split_fewshot" / "shot_5-seed_7.pkl"
    assert sorted(os.listdir(cache.parent)) == ["shot_5-seed_7.pkl"]  # no temp file left behind
    raw = cache.read_bytes()
    assert DASSL_DATUM_MODULE.encode() in raw and b"restore" not in raw
    assert set(load_datum_cache(str(cache))) == {"train", "val"}
    capsys.readouterr()
    random.seed(999)  # a different global state: the cache must win
    again = load_or_create_fewshot(cfg, str(dataset_dir), items, val, K, seed=7)
    assert again == (exp_train, exp_val)
    assert f"Loading preprocessed few-shot data from {cache}" in capsys.readouterr().out
    # ImageNet style: no val -> {"train"} only.
    tr, v = load_or_create_fewshot(cfg, str(dataset_dir), items, None, 1, seed=7)
    assert v is None and set(load_datum_cache(str(dataset_dir / "split_fewshot" / "shot_1-seed_7.pkl"))) == {"train"}


def test_stale_cache_paths_give_clear_error(tmp_path, items):
    ds = tmp_path / "ds"
    ds.mkdir()
    load_or_create_fewshot(_cfg(), str(ds), items, items, 1, seed=1)
    os.remove(items[0].impath)
    with pytest.raises(DatasetNotFoundError, match="Delete the cache file"):
        load_or_create_fewshot(_cfg(), str(ds), items, items, 1, seed=1)


def test_subsample_base_new_relabel_from_zero(tmp_path):
    p = _img(tmp_path / "x.png")
    labels = [7, 3, 9, 1, 5]  # sorted: 1 3 5 | 7 9
    train = [Datum(p, l, classname=f"c{l}") for l in labels]
    test = [Datum(p, l, classname=f"c{l}") for l in labels * 2]
    base_tr, base_te = subsample_classes(train, test, subsample="base")
    new_tr, new_te = subsample_classes(train, test, subsample="new")
    assert sorted((d.label, d.classname) for d in base_tr) == [(0, "c1"), (1, "c3"), (2, "c5")]
    assert sorted((d.label, d.classname) for d in new_tr) == [(0, "c7"), (1, "c9")]
    assert len(base_te) == 6 and len(new_te) == 4
    assert subsample_classes(train, test, subsample="all") == [train, test]
    with pytest.raises(AssertionError):
        subsample_classes(train, subsample="novel")


# ---------------------------------------------------------------- split files


def test_split_json_round_trip_and_errors(tmp_path, items):
    path = str(tmp_path / "split.json")
    save_split(items[:5], items[5:7], items[7:], path, str(tmp_path))
    import json

    data = json.load(open(path))
    assert data["train"][0] == ["im0.png", 2, "c2"]
    tr, va, te = read_split(path, str(tmp_path))
    assert (len(tr), len(va), len(te)) == (5, 2, 2)
    assert tr[0].impath == items[0].impath and te[-1].label == items[-1].label
    # pointing at missing images: one error listing them
    data["test"].append(["gone/missing_1.jpg", 0, "c0"])
    json.dump(data, open(path, "w"))
    with pytest.raises(DatasetNotFoundError, match="missing_1.jpg"):
        read_split(path, str(tmp_path))
    open(path, "w").write('{"train": [["a.jpg", 0]]')
    with pytest.raises(DatasetNotFoundError, match="Malformed split file"):
        read_split(path, str(tmp_path))


def test_split_trainval_and_folder_split_ratios(tmp_path):
    p = _img(tmp_path / "x.png")
    trainval = [Datum(p, l) for l in [0] * 10 + [1] * 5]
    random.seed(0)
    train, val = split_trainval(trainval, p_val=0.2)
    assert sum(d.label == 0 for d in val) == 2 and sum(d.label == 1 for d in val) == 1
    assert len(train) == 12
    for cname, n in (("b_cls", 10), ("a_cls", 4)):
        for i in range(n):
            _img(tmp_path / "imgs" / cname / f"{i}.png")
    tr, va, te = read_and_split_data(str(tmp_path / "imgs"), new_cnames={"a_cls": "A class"})
    # sorted folders: a_cls -> 0 (renamed), b_cls -> 1; per class round(0.5n) / round(0.2n) / rest
    assert [sum(d.label == k for d in tr) for k in (0, 1)] == [2, 5]
    assert [sum(d.label == k for d in va) for k in (0, 1)] == [1, 2]
    assert [sum(d.label == k for d in te) for k in (0, 1)] == [1, 3]
    assert {d.classname for d in tr if d.label == 0} == {"A class"}
    (tmp_path / "imgs" / "c_empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="c_empty"):
        read_and_split_data(str(tmp_path / "imgs"))


# ---------------------------------------------------------------- pickle compatibility


_FAKE_NAMES = ["dassl", "dassl.data", "dassl.data.datasets", DASSL_DATUM_MODULE]


def _install_fake_dassl():
    """Put a stand-in for the real Dassl in sys.modules; returns (saved entries, the fake Datum class)."""
    saved = {n: sys.modules.get(n) for n in _FAKE_NAMES}
    mods = {n: types.ModuleType(n) for n in _FAKE_NAMES}

    class FakeDatum:  # stands in for the real Dassl class while pickling
        pass

    FakeDatum.__module__ = DASSL_DATUM_MODULE
    FakeDatum.__qualname__ = FakeDatum.__name__ = "Datum"
    mods[DASSL_DATUM_MODULE].Datum = FakeDatum
    sys.modules.update(mods)
    return saved, FakeDatum


def _remove_fake_dassl(saved):
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:  # e.g. the restore.dassl_alias modules another test imported
            sys.modules[name] = module


def test_reads_pickles_written_by_real_dassl_without_dassl(tmp_path):
    saved, FakeDatum = _install_fake_dassl()
    try:
        blobs = []
        for proto in (0, 2, pickle.HIGHEST_PROTOCOL):
            d = FakeDatum.__new__(FakeDatum)
            d.__dict__.update(_impath="/abs/a.jpg", _label=4, _domain=0, _classname="dog")
            blobs.append(pickle.dumps({"train": [d, d], "val": [d]}, protocol=proto))
    finally:
        _remove_fake_dassl(saved)
    assert getattr(sys.modules.get(DASSL_DATUM_MODULE), "Datum", None) is not FakeDatum  # fake is gone
    for blob in blobs:
        assert DASSL_DATUM_MODULE.encode() in blob
        data = load_datum_cache(io.BytesIO(blob))
        d = data["train"][0]
        assert type(d) is Datum and (d.impath, d.label, d.classname) == ("/abs/a.jpg", 4, "dog")
        assert data["train"][1] is d and len(data["val"]) == 1


def test_written_cache_loads_under_dassl_class_path(tmp_path):
    d = Datum(_img(tmp_path / "a.png"), 2, 0, "cat")
    blob = dumps_datum_cache({"train": [d], "val": []})
    saved, FakeDatum = _install_fake_dassl()
    try:
        data = pickle.loads(blob)  # what the real Dassl would do
    finally:
        _remove_fake_dassl(saved)
    got = data["train"][0]
    assert type(got) is FakeDatum
    assert vars(got) == {"_impath": d.impath, "_label": 2, "_domain": 0, "_classname": "cat"}
    assert load_datum_cache(io.BytesIO(blob))["train"] == [d]


def test_unpickler_refuses_other_globals():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    blob = pickle.dumps({"train": [Evil()]})
    with pytest.raises(DatasetNotFoundError) as err:
        load_datum_cache(io.BytesIO(blob))
    assert str(err.value) == (
        "Refusing to load the dataset cache: it refers to posix.system, which a dataset cache does not contain and "
        "whose unpickling could run code; delete it (a cache, rebuilt on the next run).")


# ---------------------------------------------------------------- transforms


def test_build_transform_clip_pipeline_and_printed_lines(capsys):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (32, 32)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    tr = build_transform(cfg, is_train=True)
    te = build_transform(cfg, is_train=False)
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == ["Building transform_train", "+ random resized crop (size=(32, 32), scale=(0.08, 1.0))",
                       "+ random flip", "+ to torch tensor of range [0, 1]",
                       f"+ normalization (mean={cfg.INPUT.PIXEL_MEAN}, std={cfg.INPUT.PIXEL_STD})"]
    assert out[5:9] == ["Building transform_test", "+ resize the smaller edge to 32", "+ 32x32 center crop",
                        "+ to torch tensor of range [0, 1]"]
    assert [type(t).__name__ for t in tr.transforms] == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor",
                                                        "Normalize"]
    assert [type(t).__name__ for t in te.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    img = Image.new("RGB", (48, 40), (255, 0, 0))
    x = te(img)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.full((32, 32), (1 - cfg.INPUT.PIXEL_MEAN[0]) / cfg.INPUT.PIXEL_STD[0]), atol=1e-5)


def test_build_transform_all_choices_and_errors():
    from restore.engine.data.transforms import AVAI_CHOICES

    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (24, 24)
    cfg.INPUT.GB_K = 3
    for choice in AVAI_CHOICES:
        tfm = build_transform(cfg, is_train=True, choices=[choice])
        out = tfm(Image.new("RGB", (30, 28), (10, 200, 30)))
        assert out.shape == (3, 24, 24), choice
    with pytest.raises(ValueError, match="random_flp.*random_flip"):
        build_transform(cfg, choices=["random_flp"])
    cfg.INPUT.NO_TRANSFORM = True
    assert build_transform(cfg) is None


# ---------------------------------------------------------------- samplers and loaders


def test_samplers(tmp_path):
    p = _img(tmp_path / "x.png")
    data = [Datum(p, label=i % 4, domain=i % 2) for i in range(32)]
    with pytest.raises(ValueError, match="Unknown sampler type: Nope"):
        build_sampler("Nope", data_source=data)
    random.seed(0)
    idx = list(build_sampler("RandomDomainSampler", data_source=data, batch_size=8, n_domain=2))
    assert len(idx) == 32
    for b in range(0, 32, 8):
        doms = [data[i].domain for i in idx[b:b + 8]]
        assert sorted(doms) == [0] * 4 + [1] * 4
    idx = list(build_sampler("RandomClassSampler", data_source=data, batch_size=8, n_ins=4))
    for b in range(0, len(idx), 8):
        labs = [data[i].label for i in idx[b:b + 8]]
        assert len(set(labs)) == 2 and all(labs.count(l) == 4 for l in set(labs))
    idx = list(build_sampler("SeqDomainSampler", data_source=data, batch_size=8))
    assert [data[i].domain for i in idx[:8]] == [0] * 4 + [1] * 4 and sorted(idx) == list(range(32))


def test_loader_drop_last_and_seeded_order(tmp_path):
    p = _img(tmp_path / "x.png")
    data = [Datum(p, label=i) for i in range(10)]  # 1-shot EuroSAT
    cfg = _cfg()
    cfg.SEED = 3
    cfg.INPUT.SIZE = (8, 8)
    tfm = build_transform(cfg, is_train=False)
    loader = build_data_loader(cfg, "RandomSampler", data, batch_size=4, is_train=True)
    assert loader.drop_last and len(loader) == 2
    small = build_data_loader(cfg, "RandomSampler", data[:3], batch_size=4, is_train=True)
    assert not small.drop_last and len(small) == 1
    test = build_data_loader(cfg, "SequentialSampler", data, batch_size=4, is_train=False)
    assert not test.drop_last and len(test) == 3

    def order(seed):
        cfg.SEED = seed
        torch.manual_seed(1000 + seed * 7)  # the global RNG must not matter
        ld = build_data_loader(cfg, "RandomSampler", data, batch_size=4, tfm=tfm, is_train=True)
        return [b["label"].tolist() for b in ld]

    assert order(3) == order(3)
    assert order(3) != order(4)
    with pytest.raises(ValueError, match="Empty data loader"):
        build_data_loader(cfg, "SequentialSampler", [], batch_size=4, is_train=False)


def test_wrapper_outputs_and_corrupted_image(tmp_path):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (16, 16)
    cfg.INPUT.TRANSFORMS = ("normalize",)
    cfg.DATALOADER.K_TRANSFORMS = 2
    cfg.DATALOADER.RETURN_IMG0 = True
    good = Datum(_img(tmp_path / "g.png"), label=1, domain=2)
    tfm = build_transform(cfg, is_train=False)
    out = DatasetWrapper(cfg, [good], transform=tfm, is_train=True)[0]
    assert set(out) == {"img", "img0", "label", "domain", "impath", "index"}
    assert isinstance(out["img"], list) and len(out["img"]) == 2 and out["img0"].shape == (3, 16, 16)
    assert (out["label"], out["domain"], out["index"]) == (1, 2, 0)
    out2 = DatasetWrapper(cfg, [good], transform=[tfm, tfm], is_train=False)[0]
    assert out2["img"].shape == (3, 16, 16) and out2["img2"].shape == (3, 16, 16)
    bad_path = tmp_path / "bad.jpg"
    bad_path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    bad = Datum(str(bad_path))
    with pytest.raises(OSError, match=r"bad\.jpg.*re-extract"):
        DatasetWrapper(cfg, [bad], transform=tfm)[0]


def test_summary_table_format():
    table = format_table([["Dataset", "DescribableTextures"], ["# classes", "3"], ["# train_x", "12"],
                          ["# val", "6"], ["# test", "9"]])
    assert table == ("---------  -------------------\n"
                     "Dataset    DescribableTextures\n"
                     "# classes  3\n"
                     "# train_x  12\n"
                     "# val      6\n"
                     "# test     9\n"
                     "---------  -------------------")


def test_import_needs_no_optional_packages():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; import restore.engine.data, datasets, restore.datasets.synthetic, restore.datasets.prepare; "
            "print(sorted(m for m in ('tensorboard', 'pandas', 'wilds', 'tabulate', 'gdown') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
