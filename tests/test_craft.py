"""Craft plug-in regularizer: losses against hand computations, static anchors, every host trainer.

CPU only, tiny random CLIP, synthetic DTD (and a synthetic ImageNet-Sketch as the OOD target).
"""

from __future__ import annotations

import json
import math
import os
import os.path as osp

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = ["CoOp", "CoCoOp", "KgCoOp", "IVLP", "VPT", "MaPLe", "PromptSRC", "MMRL", "RESTORE"]


# --------------------------------------------------------------------------- losses

def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _ce(scores, target):
    m = max(scores)
    return -(scores[target] - m - math.log(sum(math.exp(s - m) for s in scores)))


def test_mmd_zero_for_identical_samples():
    from trainers.craft.losses import mmd

    torch.manual_seed(0)
    x = torch.randn(6, 5)
    for minmax in (True, False):
        assert abs(mmd(x, x.clone(), minmax=minmax).item()) < 1e-6
    assert mmd(x, x + 3.0, minmax=False).item() > 1e-3  # and positive for a shifted sample


@pytest.mark.parametrize("minmax", [False, True])
def test_mmd_matches_double_loop(minmax):
    from trainers.craft.losses import mmd

    x = [[0.0, 1.0], [2.0, -1.0], [1.5, 0.5]]
    y = [[1.0, 1.0], [-0.5, 2.0]]
    bands = [0.5, 2.0, 7.0]

    def scale(rows):
        if not minmax:
            return rows
        cols = list(zip(*rows))
        lo, hi = [min(c) for c in cols], [max(c) for c in cols]
        return [[(v - lo[j]) / (hi[j] - lo[j] + 1e-8) for j, v in enumerate(r)] for r in rows]

    def k(a, b):
        d2 = sum((p - q) ** 2 for p, q in zip(a, b))
        return sum(math.exp(-d2 / (2.0 * s)) for s in bands)

    xs, ys = scale(x), scale(y)
    kxx = sum(k(a, b) for a in xs for b in xs) / (len(xs) ** 2)
    kyy = sum(k(a, b) for a in ys for b in ys) / (len(ys) ** 2)
    kxy = sum(k(a, b) for a in xs for b in ys) / (len(xs) * len(ys))
    expected = kxx + kyy - 2 * kxy
    got = mmd(torch.tensor(x), torch.tensor(y), bands, minmax=minmax).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _bf16_reference_inputs():
    """Relative representations like the MMD's (scale 100, 100 anchors) and features for the CE terms."""
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(16, 64) + 0.3, dim=-1)
    w = torch.nn.functional.normalize(torch.randn(100, 64), dim=-1)
    return f, g, w, torch.randint(0, 100, (16,))


@pytest.mark.parametrize("minmax", [True, False])
def test_mmd_is_fp32_under_bf16_autocast(minmax):
    """The trainer calls Craft inside its autocast: the distance expansion must not run in bf16."""
    from trainers.craft.losses import mmd, squared_distances

    f, g, w, _ = _bf16_reference_inputs()
    x, y = 100.0 * f @ w.t(), 100.0 * g @ w.t()
    expected = mmd(x, y, minmax=minmax)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mmd(x, y, minmax=minmax)
        d2 = squared_distances(x, y)
    assert got.dtype == torch.float32 and d2.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(d2, squared_distances(x, y), rtol=1e-6, atol=0)


def test_alignment_losses_are_fp32_under_bf16_autocast():
    from trainers.craft.losses import relative_logits, static_alignment_loss, stochastic_alignment_loss

    f, g, w, label = _bf16_reference_inputs()
    scale = torch.tensor(100.0)
    expected = (static_alignment_loss(f, w, label, scale), stochastic_alignment_loss(f, g, label, scale),
                relative_logits(f, w, scale))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (static_alignment_loss(f, w, label, scale), stochastic_alignment_loss(f, g, label, scale),
               relative_logits(f, w, scale))
    assert all(t.dtype == torch.float32 for t in got)
    assert got[0].item() == pytest.approx(expected[0].item(), rel=1e-6)
    assert got[1].item() == pytest.approx(expected[1].item(), rel=1e-6)
    assert torch.allclose(got[2], expected[2], rtol=1e-6, atol=1e-5)


def test_static_alignment_loss_matches_hand_computation():
    from trainers.craft.losses import static_alignment_loss

    text = [[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]]
    anchors = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 1.0]]
    label = [2, 0]
    s = 10.0
    expected = sum(_ce([s * _cos(t, a) for a in anchors], y) for t, y in zip(text, label)) / 2
    got = static_alignment_loss(torch.tensor(text), torch.tensor(anchors), torch.tensor(label), s)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # Two anchors per class: -log of the softmax mass on the true class's anchors.
    anchors2 = anchors + [[0.0, 0.0, 1.0]]  # class-major: class 0 = rows 0, 1; class 1 = rows 2, 3
    label2 = [1, 0]
    expected2 = 0.0
    for t, y in zip(text, label2):
        e = [math.exp(s * _cos(t, a)) for a in anchors2]
        expected2 += -math.log((e[2 * y] + e[2 * y + 1]) / sum(e))
    got2 = static_alignment_loss(torch.tensor(text), torch.tensor(anchors2), torch.tensor(label2), s,
                                 clusters_per_class=2)
    assert got2.item() == pytest.approx(expected2 / 2, rel=1e-5)


def test_stochastic_alignment_loss_matches_hand_computation():
    from trainers.craft.losses import stochastic_alignment_loss

    image = [[1.0, 0.5], [0.2, 1.0], [-1.0, 0.3]]
    text = [[0.9, 0.1], [0.0, 1.0], [1.0, 1.0]]
    label = [4, 1, 4]
    s = 5.0
    logits = [[s * _cos(i, t) for t in text] for i in image]
    expected_index = sum(_ce(row, i) for i, row in enumerate(logits)) / 3
    got = stochastic_alignment_loss(torch.tensor(image), torch.tensor(text), torch.tensor(label), s, "index")
    assert got.item() == pytest.approx(expected_index, rel=1e-5)
    # "class" targets: uniform over the batch texts of the same class.
    expected_class = 0.0
    for i, row in enumerate(logits):
        pos = [j for j in range(3) if label[j] == label[i]]
        expected_class += sum(_ce(row, j) for j in pos) / len(pos)
    got = stochastic_alignment_loss(torch.tensor(image), torch.tensor(text), torch.tensor(label), s, "class")
    assert got.item() == pytest.approx(expected_class / 3, rel=1e-5)


def test_kmeans_one_cluster_is_mean_and_separates_blobs():
    from trainers.craft.anchors import kmeans

    torch.manual_seed(0)
    x = torch.randn(10, 4)
    assert torch.allclose(kmeans(x, 1).float(), x.mean(0, keepdim=True), atol=1e-6)
    a, b = torch.randn(8, 3) * 0.1, torch.randn(8, 3) * 0.1 + 5.0
    c = kmeans(torch.cat([a, b]), 2, seed=3).float()
    c = c[c[:, 0].argsort()]
    assert torch.allclose(c, torch.stack([a.mean(0), b.mean(0)]), atol=1e-5)
    assert kmeans(x[:2], 3).shape == (3, 4)  # fewer points than clusters: points repeated


def test_config_defaults_and_checks():
    from trainers.craft.config import check
    from restore.engine.config import ConfigError, extend_cfg, get_cfg_default

    import trainers.craft  # noqa: F401

    cfg = extend_cfg(get_cfg_default())
    node = cfg.TRAINER.CRAFT
    assert node.ENABLED is False
    assert node.WEIGHT_STATIC == 1.0 and node.WEIGHT_STOCHASTIC == 1.0 and node.MMD_WEIGHT == 0.0
    assert list(node.MMD_BANDWIDTHS) == [10.0, 15.0, 20.0, 50.0]
    assert node.ANCHOR_CLUSTERS == 1 and node.ANCHOR_NUM_SHOTS == 200 and node.TARGET_NUM_SHOTS == 16
    node.MMD_WEIGHT = 1.0
    with pytest.raises(ConfigError, match="TARGET_DATASET"):
        check(node)


# --------------------------------------------------------------------------- trainer-level

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    try:
        from restore.datasets.synthetic import make_synthetic
    except ImportError:
        pytest.skip("restore.datasets.synthetic is not available")
    root = tmp_path_factory.mktemp("craft_data")
    make_synthetic("dtd", str(root), num_classes=4, images_per_class=6)
    make_synthetic("imagenet_sketch", str(root), num_classes=4, images_per_class=3)
    return str(root)


def _args(root, out, trainer, opts=()):
    import train

    from restore.engine.registry import TRAINER_REGISTRY

    node = TRAINER_REGISTRY.get(trainer).cfg_node_name() if trainer in TRAINER_REGISTRY else trainer.upper()
    return train.build_parser().parse_args([
        "--root", root, "--output-dir", str(out), "--trainer", trainer, "--seed", "1",
        "--dataset-config-file", osp.join(ROOT, "configs/datasets/dtd.yaml"),
        "MODEL.BACKBONE.NAME", "tiny", "USE_CUDA", "False", "DATASET.NUM_SHOTS", "2",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "OPTIM.MAX_EPOCH", "1",
        "OPTIM.NAME", "sgd", "OPTIM.LR", "0.01", "INPUT.TRANSFORMS", "['normalize']",
        "TRAINER.CRAFT.ANCHOR_NUM_SHOTS", "1", f"TRAINER.{node}.PREC", "fp32", *opts])


def _cfg(root, out, trainer, opts=()):
    import train

    return train.setup_cfg(_args(root, out, trainer, opts))


def _build(cfg):
    from restore.engine.trainer import build_trainer
    from restore.engine.utils import set_random_seed

    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def _first_batch(trainer):
    trainer.set_model_mode("train")
    return trainer.parse_batch_train(next(iter(trainer.train_loader_x)))


def _registered_hosts():
    import trainers  # noqa: F401

    from restore.engine.registry import TRAINER_REGISTRY

    return [h for h in HOSTS if h in TRAINER_REGISTRY]


def _hosts():
    try:
        return _registered_hosts()
    except Exception:  # noqa: BLE001 - still collected when the trainers package is broken
        return ["CoOp"]


def test_anchor_command_writes_class_means(data_root, tmp_path):
    from PIL import Image

    from restore.clip import load_clip
    from trainers.craft import anchors as craft_anchors
    from restore.engine.data import build_transform

    out = tmp_path / "run"
    argv = ["--cpu", "--root", data_root, "--output-dir", str(out), "--trainer", "CoOp", "--seed", "1",
            "--dataset-config-file", osp.join(ROOT, "configs/datasets/dtd.yaml"),
            "MODEL.BACKBONE.NAME", "tiny", "USE_CUDA", "False", "DATALOADER.NUM_WORKERS", "0",
            "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base", "INPUT.TRANSFORMS", "['normalize']",
            "TRAINER.CRAFT.ANCHOR_NUM_SHOTS", "-1", "TRAINER.CRAFT.ANCHOR_BATCH_SIZE", "4"]
    assert craft_anchors.main(argv) == 0
    path = out / "craft_anchors.pt"
    data = torch.load(path, map_location="cpu", weights_only=True)

    # Expected: class means of every base-class training image, computed here from the split file.
    cfg = _cfg(data_root, out, "CoOp", ["INPUT.TRANSFORMS", "['normalize']"])
    tfm = build_transform(cfg, is_train=False)
    with open(osp.join(data_root, "dtd", "split_zhou_DescribableTextures.json")) as f:
        train_split = json.load(f)["train"]
    clip_model = load_clip("tiny").model.float().eval()
    n_classes = len({e[1] for e in train_split})
    base = list(range(math.ceil(n_classes / 2)))
    expected, names = [], []
    with torch.no_grad():
        for c in base:
            rows = [e for e in train_split if e[1] == c]
            imgs = torch.stack([tfm(Image.open(osp.join(data_root, "dtd", "images", e[0])).convert("RGB"))
                                for e in rows])
            expected.append(clip_model.encode_image(imgs).mean(0))
            names.append(rows[0][2])
    expected = torch.stack(expected)
    assert data["anchors"].shape == expected.shape  # base classes only
    assert torch.allclose(data["anchors"], expected, atol=1e-4)
    assert data["classnames"] == names and data["labels"].tolist() == base
    assert data["clusters"] == 1 and data["backbone"] == "tiny"

    # An existing matching file is reused, not recomputed.
    mtime = os.stat(path).st_mtime_ns
    assert craft_anchors.main(argv) == 0
    assert os.stat(path).st_mtime_ns == mtime


@pytest.mark.parametrize("host", _hosts())
def test_craft_on_host_trains_one_step(host, data_root, tmp_path, capsys):
    if host not in _registered_hosts():
        pytest.skip(f"{host} is not registered")
    cfg = _cfg(data_root, tmp_path / host, host, ["TRAINER.CRAFT.ENABLED", "True",
                                                  "TRAINER.CRAFT.WEIGHT_STOCHASTIC_T2I", "0.5"])
    trainer = _build(cfg)
    assert len(trainer.regularizers) == 1
    reg = trainer.regularizers[0]
    image, label = _first_batch(trainer)
    loss, summary, output = trainer.compute_loss(image, label)
    assert {"craft_static", "craft_stoch", "craft_t2i"} <= set(summary)
    assert "computing them now" in capsys.readouterr().out
    assert osp.isfile(tmp_path / host / "craft_anchors.pt")
    assert reg.anchors.shape[0] == trainer.num_classes
    with torch.no_grad():
        host_loss, _ = trainer.model.loss(output, label)
    craft = summary["craft_static"] + summary["craft_stoch"] + 0.5 * summary["craft_t2i"]
    assert loss.item() == pytest.approx(host_loss.item() + craft, rel=1e-4, abs=1e-5)
    assert summary["loss"] == pytest.approx(loss.item())

    # The optimisation step on that loss moves the learned parameters.
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.optimizer_step(loss)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


@pytest.mark.parametrize("host", _hosts())
def test_craft_off_leaves_host_loss_unchanged(host, data_root, tmp_path):
    if host not in _registered_hosts():
        pytest.skip(f"{host} is not registered")
    cfg_off = _cfg(data_root, tmp_path / "off", host)
    assert cfg_off.TRAINER.CRAFT.ENABLED is False
    cfg_none = cfg_off.clone()
    cfg_none.defrost()
    cfg_none.TRAINER.pop("CRAFT")  # a config that never heard of Craft
    cfg_none.OUTPUT_DIR = str(tmp_path / "none")
    cfg_none.freeze()

    def host_loss(cfg):
        trainer = _build(cfg)
        assert trainer.regularizers == []
        image, label = _first_batch(trainer)
        loss, summary, _ = trainer.compute_loss(image, label)
        return loss.item(), summary

    loss_off, summary_off = host_loss(cfg_off)
    loss_none, summary_none = host_loss(cfg_none)
    assert loss_off == loss_none and summary_off == summary_none
    assert not any(k.startswith("craft") for k in summary_off)
    assert not osp.exists(tmp_path / "off" / "craft_anchors.pt")


def test_craft_mmd_draws_target_batches_in_step(data_root, tmp_path):
    host = "MaPLe" if "MaPLe" in _registered_hosts() else "CoOp"
    cfg = _cfg(data_root, tmp_path / "ood", host, [
        "TRAINER.CRAFT.ENABLED", "True", "TRAINER.CRAFT.WEIGHT_STATIC", "0.0",
        "TRAINER.CRAFT.WEIGHT_STOCHASTIC", "0.0", "TRAINER.CRAFT.MMD_WEIGHT", "1.0",
        "TRAINER.CRAFT.TARGET_DATASET", "ImageNetSketch", "TRAINER.CRAFT.TARGET_NUM_SHOTS", "2",
        "TRAINER.CRAFT.TARGET_BATCH_SIZE", "3"])
    trainer = _build(cfg)
    reg = trainer.regularizers[0]
    image, label = _first_batch(trainer)
    loss, summary, output = trainer.compute_loss(image, label)
    assert set(summary) >= {"craft_mmd"} and "craft_static" not in summary
    assert not osp.exists(tmp_path / "ood" / "craft_anchors.pt")  # no static anchors needed
    assert len(reg._target_loader.dataset) == 8  # 2 per class x 4 sketch classes
    with torch.no_grad():
        host_loss, _ = trainer.model.loss(output, label)
    assert loss.item() == pytest.approx(host_loss.item() + summary["craft_mmd"], rel=1e-4, abs=1e-6)
    loss.backward()
    # The target loader restarts when exhausted (2 batches of 3, last one dropped): more draws than batches work.
    for _ in range(5):
        assert reg.next_target_batch().shape[0] == 3


def test_anchor_path_mismatch_is_an_error(data_root, tmp_path):
    from trainers.craft.anchors import ensure_anchors, save_anchors

    bogus = tmp_path / "other.pt"
    save_anchors({"version": 1, "anchors": torch.zeros(2, 48), "labels": torch.arange(2),
                  "classnames": ["a", "b"], "clusters": 1, "backbone": "tiny"}, str(bogus))
    cfg = _cfg(data_root, tmp_path / "run", "CoOp", ["TRAINER.CRAFT.ANCHOR_PATH", str(bogus)])
    with pytest.raises(ValueError, match="does not fit this run"):
        ensure_anchors(cfg, None, ["x", "y", "z", "w"])


@pytest.mark.parametrize("opt,value,key", [("TRAINER.CRAFT.ANCHOR_NUM_SHOTS", "2", "num_shots"),
                                           ("TRAINER.CRAFT.ANCHOR_SEED", "7", "seed"),
                                           ("TRAINER.CRAFT.ANCHOR_TRANSFORM", "train", "transform"),
                                           ("DATASET.NAME", None, "dataset")])
def test_stale_anchor_cache_is_recomputed(opt, value, key, data_root, tmp_path, capsys):
    """A rerun / resume in the same OUTPUT_DIR with other anchor settings recomputes the anchors (naming
    the setting), keeps the replaced file as <path>.stale and leaves everything else in the folder alone."""
    from restore.clip import load_clip
    from trainers.craft.anchors import STALE_SUFFIX, ensure_anchors, load_anchors, save_anchors
    from restore.engine.data import build_dataset

    out = tmp_path / "run"
    cfg = _cfg(data_root, out, "CoOp")  # ANCHOR_NUM_SHOTS 1, seed 1, test transform, DescribableTextures
    classnames = build_dataset(cfg).classnames
    clip_model = load_clip("tiny").model.float().eval()
    first = ensure_anchors(cfg, clip_model, classnames)
    path = out / "craft_anchors.pt"
    if value is None:  # another dataset with the same class names: recorded under another name
        save_anchors({**first, "dataset": "OtherDataset"}, str(path))
        stale_value = "OtherDataset"
        cfg2 = cfg
    else:
        stale_value = first[key]
        cfg2 = _cfg(data_root, out, "CoOp", [opt, value])
    (out / "user_notes.txt").write_text("keep me")
    capsys.readouterr()

    data = ensure_anchors(cfg2, clip_model, classnames)
    log = capsys.readouterr().out
    assert "do not fit this run" in log and opt in log and "recomputing" in log
    expected = {"num_shots": 2, "seed": 7, "transform": "train", "dataset": "DescribableTextures"}[key]
    assert data[key] == expected and load_anchors(str(path))[key] == expected
    assert load_anchors(str(path) + STALE_SUFFIX)[key] == stale_value  # the replaced file is kept
    assert (out / "user_notes.txt").read_text() == "keep me"

    # Now it fits: reused as is; an explicit ANCHOR_PATH that does not fit is an error, not recomputed.
    mtime = os.stat(path).st_mtime_ns
    ensure_anchors(cfg2, clip_model, classnames)
    assert os.stat(path).st_mtime_ns == mtime and "loaded static image anchors" in capsys.readouterr().out
    if value is not None:
        explicit = _cfg(data_root, tmp_path / "other", "CoOp", ["TRAINER.CRAFT.ANCHOR_PATH", str(path)])
        with pytest.raises(ValueError, match=opt.replace(".", r"\.")):
            ensure_anchors(explicit, clip_model, classnames)


def test_anchors_match_names_every_differing_setting():
    from trainers.craft.anchors import FORMAT_VERSION, anchors_match

    recorded = {"version": FORMAT_VERSION, "classnames": ["a", "b"], "clusters": 1, "backbone": "tiny",
                "dataset": "DTD", "subsample": "base", "num_shots": 200, "seed": 1, "transform": "test"}
    run = {"backbone": "tiny", "dataset": "DTD", "subsample": "base", "num_shots": 200, "seed": 1,
           "transform": "test", "kmeans_iters": 100}
    assert anchors_match(recorded, ["a", "b"], "tiny", 1, run) == ""  # kmeans_iters not recorded: not compared
    why = anchors_match(recorded, ["a", "b"], "tiny", 1, {**run, "num_shots": 16, "transform": "train"})
    assert "ANCHOR_NUM_SHOTS 200 != 16" in why and "ANCHOR_TRANSFORM 'test' != 'train'" in why
    assert "DATASET.SUBSAMPLE_CLASSES" in anchors_match(recorded, ["a", "b"], "tiny", 1, {**run, "subsample": "all"})
    # With every image and one cluster (the exact class mean) the seed draws nothing: not a mismatch.
    every = {**recorded, "num_shots": -1}
    assert anchors_match(every, ["a", "b"], "tiny", 1, {**run, "num_shots": 0, "seed": 5}) == ""
    assert "ANCHOR_SEED" in anchors_match(every, ["a", "b"], "tiny", 2, {**run, "num_shots": -1, "seed": 5})


def test_craft_on_cocoop_uses_image_conditioned_class_texts(data_root, tmp_path):
    """CoCoOp's text features are per image (B, C, D): sample b's stochastic text anchor is its class's
    text feature conditioned on its own image, and every term (incl. the MMD) trains the meta-net."""
    if "CoCoOp" not in _registered_hosts():
        pytest.skip("CoCoOp is not registered")
    cfg = _cfg(data_root, tmp_path / "cocoop", "CoCoOp", [
        "TRAINER.CRAFT.ENABLED", "True", "TRAINER.CRAFT.MMD_WEIGHT", "1.0",
        "TRAINER.CRAFT.TARGET_DATASET", "ImageNetSketch", "TRAINER.CRAFT.TARGET_NUM_SHOTS", "2"])
    trainer = _build(cfg)
    reg = trainer.regularizers[0]
    assert reg.text_mode == "class"  # no deep text prompts
    image, label = _first_batch(trainer)
    model = trainer.model
    output = model(image)
    assert output.text_features is None
    text = reg.stochastic_text(model, label, output)
    with torch.no_grad():
        ctx = model.prompt_learner.conditional_ctx(output.image_features)
        for b in range(len(label)):
            own = torch.nn.functional.normalize(model.encode_text(ctx[b]).float(), dim=-1)[label[b]]
            assert torch.allclose(text[b], own, atol=1e-6)
        plain = torch.nn.functional.normalize(model.encode_text().float(), dim=-1)[label]  # no image bias
    assert not torch.allclose(text, plain, atol=1e-4)  # the anchors are the image-conditioned ones

    loss, summary, output = trainer.compute_loss(image, label)
    assert {"craft_static", "craft_stoch", "craft_mmd"} <= set(summary)
    with torch.no_grad():
        host_loss, _ = model.loss(output, label)
    craft = summary["craft_static"] + summary["craft_stoch"] + summary["craft_mmd"]
    assert loss.item() == pytest.approx(host_loss.item() + craft, rel=1e-4, abs=1e-5)
    # The static term alone (text anchors vs the fixed image anchors) trains the context and the
    # meta-net (its output bias; the tiny backbone's 3 hidden ReLU units may all be off) through W(x_b).
    model.zero_grad(set_to_none=True)
    reg.w_stochastic, reg.w_mmd = 0.0, 0.0
    extra, summary = reg(trainer, image, label, model(image))
    assert set(summary) == {"craft_static"}
    extra.backward()
    grads = [model.prompt_learner.context.ctx.grad, model.prompt_learner.meta_net.linear2.bias.grad]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_template_anchors_train_deep_text_prompts_only(data_root, tmp_path):
    """Official semantics on MaPLe: the static term reaches the deep text prompts, not the layer-0 context."""
    if "MaPLe" not in _registered_hosts():
        pytest.skip("MaPLe is not registered")
    cfg = _cfg(data_root, tmp_path / "grad", "MaPLe", ["TRAINER.CRAFT.ENABLED", "True",
                                                       "TRAINER.CRAFT.WEIGHT_STOCHASTIC", "0.0"])
    trainer = _build(cfg)
    reg = trainer.regularizers[0]
    assert reg.text_mode == "template"
    image, label = _first_batch(trainer)
    output = trainer.model(image)
    extra, summary = reg(trainer, image, label, output)
    assert set(summary) == {"craft_static"}
    extra.backward()
    learner = trainer.model.prompt_learner
    assert learner.ctx.grad is None or torch.count_nonzero(learner.ctx.grad) == 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in learner.compound_prompts_text)


@pytest.mark.parametrize("name", ["maple_vit_b16_c2_ep5_batch4_2ctx", "maple_vit_b16_c2_ep5_batch4_2ctx_imagenet",
                                  "maple_vit_b16_c2_ep2_batch128_2ctx_ood"])
def test_craft_configs_merge(name):
    if "MaPLe" not in _registered_hosts():
        pytest.skip("MaPLe is not registered")
    from trainers.craft.config import check
    from restore.engine.config import extend_cfg, get_cfg_default, merge_file

    cfg = extend_cfg(get_cfg_default())
    merge_file(cfg, osp.join(ROOT, "configs", "trainers", "Craft", name + ".yaml"))
    assert cfg.TRAINER.CRAFT.ENABLED is True and cfg.TRAINER.NAME == "MaPLe"
    check(cfg.TRAINER.CRAFT)
    if name.endswith("_ood"):
        assert cfg.TRAINER.CRAFT.MMD_WEIGHT == 1.0 and cfg.TRAINER.CRAFT.TARGET_DATASET == "ImageNetSketch"
        assert cfg.TRAINER.CRAFT.WEIGHT_STATIC == 0.0 and cfg.TRAINER.MAPLE.PROMPT_DEPTH == 3
    else:
        assert cfg.TRAINER.CRAFT.WEIGHT_STATIC == 1.0 and cfg.TRAINER.CRAFT.MMD_WEIGHT == 0.0


class _Stop(Exception):
    pass


def test_craft_resume_continues_the_target_stream_exactly(data_root, tmp_path):
    """Train 2 epochs; vs stop after epoch 1's checkpoint and resume: bit-identical prompts. Epoch 1 ends
    one batch into the second pass over the targets (4 steps; 12 target images in batches of 4)."""
    opts = ["TRAINER.CRAFT.ENABLED", "True", "TRAINER.CRAFT.WEIGHT_STATIC", "0.0",
            "TRAINER.CRAFT.WEIGHT_STOCHASTIC", "0.0", "TRAINER.CRAFT.MMD_WEIGHT", "1.0",
            "TRAINER.CRAFT.TARGET_DATASET", "ImageNetSketch", "TRAINER.CRAFT.TARGET_NUM_SHOTS", "3",
            "TRAINER.CRAFT.TARGET_BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "2", "TEST.NO_TEST", "True"]
    reference = _build(_cfg(data_root, tmp_path / "ref", "CoOp", opts))
    reference.train()
    assert reference.regularizers[0].state_dict()["target_drawn"] == 8 - 2 * 3  # 8 draws, 3 per pass

    first = _build(_cfg(data_root, tmp_path / "run", "CoOp", opts))
    original_after_epoch = first.after_epoch

    def stop_after_first_epoch():
        original_after_epoch()
        raise _Stop  # a crash right after epoch 1's checkpoint

    first.after_epoch = stop_after_first_epoch
    with pytest.raises(_Stop):
        first.train()
    saved = first.regularizers[0].state_dict()
    assert saved["target_drawn"] == 1  # one batch into the second pass
    resumed = _build(_cfg(data_root, tmp_path / "run", "CoOp", opts))
    resumed.train()
    assert resumed.start_epoch == 1
    assert torch.equal(resumed.model.prompt_learner.ctx, reference.model.prompt_learner.ctx)


def test_craft_target_stream_state_round_trips(data_root, tmp_path):
    opts = ["TRAINER.CRAFT.ENABLED", "True", "TRAINER.CRAFT.WEIGHT_STATIC", "0.0",
            "TRAINER.CRAFT.WEIGHT_STOCHASTIC", "0.0", "TRAINER.CRAFT.MMD_WEIGHT", "1.0",
            "TRAINER.CRAFT.TARGET_DATASET", "ImageNetSketch", "TRAINER.CRAFT.TARGET_NUM_SHOTS", "3",
            "TRAINER.CRAFT.TARGET_BATCH_SIZE", "4"]
    a = _build(_cfg(data_root, tmp_path / "a", "CoOp", opts))
    reg_a = a.regularizers[0]
    assert reg_a.state_dict() == {}  # nothing drawn yet
    reg_a.prepare(a)
    for _ in range(4):
        reg_a.next_target_batch()
    state = reg_a.state_dict()
    expected = [reg_a.next_target_batch() for _ in range(4)]  # crosses into a third pass
    b = _build(_cfg(data_root, tmp_path / "b", "CoOp", opts))
    reg_b = b.regularizers[0]
    reg_b.load_state_dict(state)
    reg_b.prepare(b)
    got = [reg_b.next_target_batch() for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    fresh = _build(_cfg(data_root, tmp_path / "c", "CoOp", opts)).regularizers[0]
    fresh.prepare(b)
    assert not torch.equal(fresh.next_target_batch(), expected[0])  # without the state: another batch
