"""Group robustness: Waterbirds / CelebA loaders (both layouts), group metrics, the group-aware evaluator
through train.py for every registered trainer (and Craft), the groups protocol and its tables."""

from __future__ import annotations

import csv
import json
import os
import os.path as osp
import random

import numpy as np
import pytest
from helpers import run_train_py

import datasets  # noqa: F401  registers the loaders
import trainers  # noqa: F401  registers every trainer
from restore.datasets.group_synthetic import group_split_counts, make_group_synthetic
from restore.engine.config import get_cfg_default
from restore.engine.data import DatasetNotFoundError, build_dataset, load_datum_cache
from restore.engine.registry import TRAINER_REGISTRY
from restore.evaluation.groups import group_metrics, group_names

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLASSES = {"waterbirds": "Waterbirds", "celeba": "CelebA"}


def _cfg(root, name, shots=-1, seed=1, per_group=False):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME = str(root), CLASSES[name]
    cfg.DATASET.NUM_SHOTS, cfg.SEED = shots, seed
    cfg.DATASET.GROUPS.SHOTS_PER_GROUP = per_group
    return cfg


def _load(root, name, **kw):
    random.seed(kw.get("seed", 1))
    return build_dataset(_cfg(root, name, **kw))


def _items(ds):
    """(path relative to the layout folder, label, attribute, classname) per split."""
    return [sorted((osp.relpath(d.impath, ds.dataset_dir), d.label, d.domain, d.classname) for d in split)
            for split in (ds.train_x, ds.val, ds.test)]


# ------------------------------------------------------------------------------------------ metrics
def test_group_metrics_against_hand_computed_values():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    attrs = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    preds = [0, 0, 1, 0, 1, 1, 0, 0, 0, 1]
    names = group_names(["landbird", "waterbird"], ["land", "water"])
    m = group_metrics(labels, preds, attrs, names, 2, train_counts=[70, 5, 5, 20])
    # groups: (0,0): 3 items, 2 right; (0,1): 1, 1 right; (1,0): 2, 0 right; (1,1): 4, 3 right
    assert [(c, n) for _, c, n, _ in m.per_group] == [(2, 3), (1, 1), (0, 2), (3, 4)]
    assert m.accuracy == pytest.approx(60.0)
    assert m.worst_group_accuracy == 0.0 and m.worst_group == "waterbird / land"
    assert m.group_mean_accuracy == pytest.approx((200 / 3 + 100 + 0 + 75) / 4)
    assert m.weighted_accuracy == pytest.approx((70 * 200 / 3 + 5 * 100 + 5 * 0 + 20 * 75) / 100)
    assert m.gap == pytest.approx(60.0)
    rec = m.as_record()
    assert rec["per_group"][2] == {"group": "waterbird / land", "index": 2, "correct": 0, "total": 2,
                                   "accuracy": 0.0, "train_count": 5}
    with pytest.raises(ValueError, match="outside the 4 groups"):
        group_metrics([2], [0], [0], names, 2)


# ------------------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("name", ["waterbirds", "celeba"])
def test_both_layouts_load_the_same_items(tmp_path, name):
    for layout in ("original", "wilds"):
        make_group_synthetic(name, tmp_path / layout, layout, images_per_class=10, eval_per_group=2, spurious=0.8)
    original, wilds = _load(tmp_path / "original", name), _load(tmp_path / "wilds", name)
    assert osp.basename(original.dataset_dir) != osp.basename(wilds.dataset_dir)
    assert _items(original) == _items(wilds)
    counts = group_split_counts(name, 10, 2, 0.8)
    assert original.train_group_counts == [counts[(0, y, a)] for y in (0, 1) for a in (0, 1)] == [8, 2, 2, 8]
    for split, items in zip((1, 2), (original.val, original.test)):
        assert sorted((d.label, d.domain) for d in items) == sorted(
            (y, a) for (s, y, a), n in counts.items() if s == split for _ in range(n))
    assert original.classnames == (["landbird", "waterbird"] if name == "waterbirds"
                                   else ["person with non-blond hair", "person with blond hair"])
    # the attribute in the Datum is what the metadata says: the synthetic background colour encodes it
    from PIL import Image

    for d in original.test[:4]:
        corner = np.asarray(Image.open(d.impath).convert("RGB"))[:4, :4].mean(axis=(0, 1))
        assert (corner[2] > corner[1]) == (d.domain == 1)  # water / male: blue background


def test_classnames_and_template_are_configurable(tmp_path):
    make_group_synthetic("waterbirds", tmp_path, images_per_class=4, eval_per_group=1)
    cfg = _cfg(tmp_path, "waterbirds")
    cfg.DATASET.GROUPS.CLASSNAMES = ["land bird", "water bird"]
    assert build_dataset(cfg).classnames == ["land bird", "water bird"]
    cfg.DATASET.GROUPS.CLASSNAMES = ["bird"]
    with pytest.raises(ValueError, match="must list 2 names"):
        build_dataset(cfg)
    from restore.datasets.templates import configured_template

    assert configured_template(cfg) == "a photo of a {}."
    cfg.DATASET.TEMPLATE = "a bird photo: {}."
    assert configured_template(cfg) == "a bird photo: {}."
    cfg.DATASET.TEMPLATE = "no slot"
    with pytest.raises(ValueError, match="no '{}'"):
        configured_template(cfg)


def test_fewshot_per_class_and_per_group_with_caches(tmp_path):
    d = make_group_synthetic("waterbirds", tmp_path, images_per_class=10, eval_per_group=2, spurious=0.8)
    per_class = _load(tmp_path, "waterbirds", shots=3)
    assert sorted(x.label for x in per_class.train_x) == [0, 0, 0, 1, 1, 1] and len(per_class.val) == 8
    assert per_class.train_group_counts == [8, 2, 2, 8]  # the weights come from the full train split
    cached = load_datum_cache(osp.join(d, "split_fewshot", "shot_3-seed_1.pkl"))
    assert set(cached) == {"train"} and sorted(cached["train"], key=str) == sorted(per_class.train_x, key=str)
    per_group = _load(tmp_path, "waterbirds", shots=2, per_group=True)
    assert sorted((x.label, x.domain) for x in per_group.train_x) == [(0, 0), (0, 0), (0, 1), (0, 1),
                                                                      (1, 0), (1, 0), (1, 1), (1, 1)]
    path = osp.join(d, "split_fewshot", "shot_2_per_group-seed_1.pkl")
    assert load_datum_cache(path)["train"] == per_group.train_x
    random.seed(99)  # another draw would differ: the cache is what is read
    assert build_dataset(_cfg(tmp_path, "waterbirds", shots=2, per_group=True)).train_x == per_group.train_x


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_bad_inputs_are_one_sentence_naming_the_file(tmp_path):
    d = make_group_synthetic("waterbirds", tmp_path, images_per_class=4, eval_per_group=1)
    meta = osp.join(d, "metadata.csv")
    original = open(meta).read()

    _rewrite_csv(meta, lambda rows: [r[:4] + r[5:] for r in rows])  # drop "place"
    with pytest.raises(DatasetNotFoundError, match=r"metadata.csv has no column 'place'") as err:
        _load(tmp_path, "waterbirds")
    assert meta in str(err.value) and "Traceback" not in str(err.value)

    open(meta, "w").write(original)
    _rewrite_csv(meta, lambda rows: [rows[0], rows[1][:2] + ["2"] + rows[1][3:], *rows[2:]])
    with pytest.raises(DatasetNotFoundError, match=r"class index 2 on line 2 of metadata.csv is out of range"):
        _load(tmp_path, "waterbirds")

    open(meta, "w").write(original)  # every test image of one group moved to val
    _rewrite_csv(meta, lambda rows: [rows[0], *[r[:3] + ["1"] + r[4:] if r[2:5] == ["1", "2", "0"] else r
                                                for r in rows[1:]]])
    with pytest.raises(DatasetNotFoundError, match=r"'waterbird / land background' have no test images in "
                                                   r"metadata.csv"):
        _load(tmp_path, "waterbirds")
    assert open(meta).read() != original  # nothing rewritten by the loader; restore and load fine
    open(meta, "w").write(original)
    assert len(_load(tmp_path, "waterbirds").test) == 4

    c = make_group_synthetic("celeba", tmp_path, images_per_class=4, eval_per_group=1)
    attrs = osp.join(c, "list_attr_celeba.txt")
    text = open(attrs).read().replace(" Male ", " Female ")
    open(attrs, "w").write(text)
    with pytest.raises(DatasetNotFoundError, match="list_attr_celeba.txt has no column 'Male'"):
        _load(tmp_path, "celeba")
    with pytest.raises(DatasetNotFoundError, match="none of the folders"):
        _load(tmp_path / "nowhere", "celeba")


# ------------------------------------------------------------------------------------------ train.py
TINY = {"CoOp": ["TRAINER.COOP.N_CTX", "4"], "CoCoOp": ["TRAINER.COCOOP.N_CTX", "4"]}


@pytest.fixture(scope="module")
def spurious_waterbirds(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups_data")
    make_group_synthetic("waterbirds", root, images_per_class=6, eval_per_group=2, spurious=0.95)
    return str(root)


def _train(root, out, trainer, *opts):
    args = ["--root", root, "--output-dir", str(out), "--trainer", trainer, "--seed", "1",
            "--dataset-config-file", osp.join(ROOT, "configs", "datasets", "waterbirds.yaml"),
            "MODEL.BACKBONE.NAME", "tiny", "USE_CUDA", "False", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "1",
            "TEST.FINAL_MODEL", "best_val", "TEST.SELECTION_METRIC", "worst_group_accuracy", "OPTIM.LR", "0.01",
            *TINY.get(trainer, []), *opts]
    assert run_train_py(args) == 0
    return json.loads((out / "results.json").read_text())


def _check_run(out, result):
    """results.json's group record agrees with predictions.csv, recomputed here by hand."""
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["num_test_images"] == 8
    per_group = {i: [0, 0] for i in range(4)}
    for r in rows:
        g = int(r["label"]) * 2 + int(r["attribute"])
        assert int(r["group"]) == g and int(r["correct"]) == (r["label"] == r["prediction"])
        per_group[g][0] += int(r["correct"])
        per_group[g][1] += 1
    groups = result["groups"]
    for i, (correct, total) in per_group.items():
        assert groups["per_group"][i]["correct"] == correct and groups["per_group"][i]["total"] == total == 2
    accs = [100.0 * c / n for c, n in per_group.values()]
    assert groups["worst_group_accuracy"] == pytest.approx(min(accs))
    assert result["accuracy"] == groups["average_accuracy"] == pytest.approx(np.mean(accs))
    assert groups["weighted_accuracy"] == pytest.approx(np.dot(accs, [6, 0, 0, 6]) / 12)  # round(0.95*6)=6
    log = (out / "log.txt").read_text()
    assert "=> per-group result" in log and f"* worst-group accuracy: {min(accs):.1f}%" in log


@pytest.mark.parametrize("trainer", sorted(TRAINER_REGISTRY.registered_names()))
def test_every_trainer_reports_group_metrics(spurious_waterbirds, tmp_path, trainer):
    result = _train(spurious_waterbirds, tmp_path / trainer, trainer)
    _check_run(tmp_path / trainer, result)
    sel = result["model_selection"]
    assert sel["metric"] == "worst_group_accuracy" and sel["final_model"] == "best_val"
    if trainer != "ZeroshotCLIP":  # trained: the val metric of epoch 1 picked the model
        assert sel["best_epoch"] == 1 and 0.0 <= sel["best_val"] <= 100.0


def test_craft_on_groups_with_class_mean_anchors(spurious_waterbirds, tmp_path):
    result = _train(spurious_waterbirds, tmp_path / "craft", "CoOp", "TRAINER.CRAFT.ENABLED", "True",
                    "TRAINER.CRAFT.ANCHOR_NUM_SHOTS", "-1", "TRAINER.COOP.PREC", "fp32")
    _check_run(tmp_path / "craft", result)
    import torch

    anchors = torch.load(tmp_path / "craft" / "craft_anchors.pt", weights_only=True)
    assert tuple(anchors["anchors"].shape[:1]) == (2,)  # one anchor per class: the class mean


def test_selection_metric_needs_the_group_evaluator(spurious_waterbirds, tmp_path):
    import train

    args = ["--root", spurious_waterbirds, "--output-dir", str(tmp_path / "x"), "--trainer", "ZeroshotCLIP",
            "--dataset-config-file", osp.join(ROOT, "configs", "datasets", "waterbirds.yaml"),
            "MODEL.BACKBONE.NAME", "tiny", "USE_CUDA", "False", "DATALOADER.NUM_WORKERS", "0",
            "TEST.EVALUATOR", "Classification", "TEST.SELECTION_METRIC", "worst_group_accuracy"]
    from restore.engine.trainer import build_trainer

    trainer = build_trainer(train.setup_cfg(train.build_parser().parse_args(args)))
    with pytest.raises(ValueError, match="is not computed by TEST.EVALUATOR 'Classification'"):
        trainer.selection_value({"accuracy": 50.0})


# ------------------------------------------------------------------------------------------ protocol, tables
def test_groups_protocol_steps(tmp_path):
    from restore import protocols as P

    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=-1, opts=["MODEL.BACKBONE.NAME", "tiny"])
    jobs = P.build_jobs(ctx, "groups", "coop", [1, 2])
    assert [len(j) for j in jobs] == [1, 1, 1, 1]
    step = jobs[0][0]
    assert step.output_dir == osp.join(str(tmp_path / "out"), "groups", "train", "waterbirds", "shots_-1", "CoOp",
                                       "vit_b16_ep50", "seed1")
    argv = step.argv
    assert argv[argv.index("--dataset-config-file") + 1].endswith(osp.join("configs", "datasets", "waterbirds.yaml"))
    text = " ".join(argv)
    assert "PROTOCOL groups DATASET.NUM_SHOTS -1 TEST.FINAL_MODEL best_val TEST.SELECTION_METRIC " \
           "worst_group_accuracy" in text and text.endswith("MODEL.BACKBONE.NAME tiny")
    assert [j[0].output_dir.split(os.sep)[-5] for j in jobs] == ["waterbirds", "waterbirds", "celeba", "celeba"]
    with pytest.raises(P.ProtocolError, match="dtd is not a group-robustness dataset"):
        P.groups_train(ctx, "coop", "dtd", 1)


def _fake_run(root, method, seed, per_group, trained=True):
    from restore.evaluation.results import run_dir

    folder = run_dir(str(root), "groups", "train", "waterbirds", 16, method, "cfg", seed)
    os.makedirs(folder)
    names = group_names(["landbird", "waterbird"], ["land", "water"])
    m = group_metrics(*zip(*[(y, p, a) for (y, a), accs in zip([(0, 0), (0, 1), (1, 0), (1, 1)], per_group)
                             for p in [y] * accs + [1 - y] * (4 - accs)]), names=names, num_attributes=2,
                      train_counts=[3, 1, 1, 3])
    rec = {"accuracy": m.accuracy, "trainer": method, "dataset": "Waterbirds", "seed": seed, "backbone": "tiny",
           "groups": m.as_record(), "model_selection": {"final_model": "best_val", "metric": "worst_group_accuracy",
                                                        "best_epoch": 1 if trained else None, "best_val": 50.0}}
    with open(osp.join(folder, "results.json"), "w") as f:
        json.dump(rec, f)


def test_group_tables_mean_std_csv_and_png(tmp_path):
    from PIL import Image

    from restore.evaluation.group_tables import aggregate_groups, main

    _fake_run(tmp_path, "CoOp", 1, [4, 2, 1, 4])  # correct of 4 per group: avg 68.75, worst 25
    _fake_run(tmp_path, "CoOp", 2, [4, 0, 3, 4])  # avg 68.75, worst 0
    _fake_run(tmp_path, "ZeroshotCLIP", 1, [4, 0, 0, 4], trained=False)  # avg 50, worst 0
    written = aggregate_groups(str(tmp_path), str(tmp_path / "agg"))
    md = open(written["md"]).read()
    assert ("| CoOp | cfg | 16 | tiny | val worst_group_accuracy | 2 | 68.8 ± 0.0 | 12.5 ± 12.5 | 56.2 ± 12.5 |"
            in md)
    assert "| ZeroshotCLIP | cfg | 16 | tiny | none (not trained) | 1 | 50.0 ± 0.0 | 0.0 ± 0.0 | 50.0 ± 0.0 |" in md
    with open(written["csv"]) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    coop = rows["CoOp"]
    assert float(coop["worst_group_mean"]) == pytest.approx(12.5) and float(coop["gap_std"]) == pytest.approx(12.5)
    assert float(coop["group: waterbird / land"]) == pytest.approx(50.0)  # (25 + 75) / 2
    # train-weighted: (3*100 + 1*50 + 1*25 + 3*100) / 8 and (3*100 + 0 + 1*75 + 3*100) / 8
    assert float(coop["weighted_mean"]) == pytest.approx((84.375 + 84.375) / 2)
    assert coop["seeds"] == "1 2"
    assert written["png"] == [str(tmp_path / "agg" / "groups_waterbirds.png")]
    assert Image.open(written["png"][0]).size[0] > 400
    assert main([str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2


def test_group_evaluator_state_merges_over_ranks_like_one_process(tmp_path):
    """DDP gathers an evaluator's int/float/list/dict state from every rank; the group constants survive."""
    import torch

    from restore.engine.distributed import _EVAL_SKIP, _merge
    from restore.engine.evaluator import GroupClassification

    make_group_synthetic("waterbirds", tmp_path, images_per_class=4, eval_per_group=1)
    cfg = _cfg(tmp_path, "waterbirds")
    ds = build_dataset(cfg)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    attrs = torch.tensor([0, 1, 0, 1, 1, 0])
    logits = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])

    def run(sl):
        ev = GroupClassification(cfg, lab2cname=ds.lab2cname)
        ev.bind_dataset(ds)
        ev.observe_batch({"domain": attrs[sl], "impath": [f"im{i}" for i in range(6)][sl]})
        ev.process(logits[sl], labels[sl])
        return ev

    whole = run(slice(0, 6)).evaluate()
    ranks = [run(slice(0, 3)), run(slice(3, 6))]
    states = [{k: v for k, v in vars(e).items() if k not in _EVAL_SKIP and isinstance(v, (int, float, list, dict))}
              for e in ranks]
    merged = ranks[0]
    for key, value in _merge(states).items():
        setattr(merged, key, value)
    assert merged.evaluate() == whole
    assert whole["worst_group_accuracy"] == 50.0 and whole["accuracy"] == pytest.approx(100 * 4 / 6)
    assert merged.last_metrics.per_group[1][0] == "landbird / water background"
    with pytest.raises(RuntimeError, match="observe_batch"):
        ranks[1].process(logits, labels)  # no batch observed


def _val_values(log):
    """The worst-group accuracies of the val evaluations, in log order."""
    values, in_val = [], False
    for line in log.splitlines():
        if "Evaluate on the *" in line:
            in_val = "*val*" in line
        if in_val and line.startswith("* worst-group accuracy:"):
            values.append(float(line.split(":")[1].split("%")[0]))
    return values


def test_resumed_run_keeps_the_best_val_so_far(spurious_waterbirds, tmp_path):
    """A run resumed after epoch 1 selects the model an uninterrupted run would (best val is restored)."""
    out = tmp_path / "run"
    epochs = ["OPTIM.LR", "0.5", "TRAIN.CHECKPOINT_FREQ", "1"]
    _train(spurious_waterbirds, out, "CoOp", *epochs, "OPTIM.MAX_EPOCH", "1")
    first = _val_values((out / "log.txt").read_text())
    (out / "results.json").unlink()  # as if killed after epoch 1's checkpoint
    result = _train(spurious_waterbirds, out, "CoOp", *epochs, "OPTIM.MAX_EPOCH", "3")
    log = (out / "log.txt").read_text()
    assert "Best val result so far:" in log
    values = first + _val_values(log.split("Best val result so far:")[-1])
    assert len(values) == 3
    assert result["model_selection"]["best_epoch"] == values.index(max(values)) + 1
    assert result["model_selection"]["best_val"] == max(values)
