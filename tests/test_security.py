"""Nothing read from disk runs code: hostile pickles are refused, broken ones are called corrupted.

Every hostile file below carries a payload that would create a marker file when unpickled
(``os.system("touch MARKER")``); each test asserts the exact one-sentence refusal AND that the marker
was not created. Covered: checkpoints in our folder layout (``--eval-only --model-dir``), in the
released official layout (``MultiModalPromptLearner/model.pth.tar-5`` written by Dassl), under an
auto-resuming training run, with the payload hidden inside valid weights; few-shot caches, ImageNet's
``preprocessed.pkl``, Craft anchors and CLIP weight files; ``--trust-checkpoint``; truncated and
empty files; the ``checkpoint`` pointer file.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import types
import warnings

import pytest
import torch
from helpers import dassl_checkpoint, run_train_py, tiny_run_config

from restore.engine.data import DatasetNotFoundError
from restore.engine.serialization import TRUST_WARNING, checkpoint_safe_globals
from restore.engine.utils import CheckpointError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_run_config(extra="TRAINER:\n  COOP:\n    N_CTX: 4\n")
REFUSED = ("Refusing to load {path}: it refers to {name}, which a checkpoint of this library or of Dassl does not "
           "contain and whose unpickling could run code; if you trust where the file came from, re-run with "
           "--trust-checkpoint to unpickle it fully.")
CORRUPTED = "{path} is corrupted (empty, truncated or not a checkpoint): download it again or delete it."


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A synthetic DTD and a genuine one-epoch CoOp output folder (real weights to hide payloads in)."""
    from restore.datasets.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("security")
    make_synthetic("dtd", str(base / "data"), num_classes=4, images_per_class=4)
    (base / "coop.yaml").write_text(CFG)
    assert run_train_py(coop_args(base, base / "trained")) == 0
    return base


def coop_args(env, out, *extra, cache=None):
    return ["--root", str(env / "data"), "--seed", "1", "--trainer", "CoOp", "--config-file", str(env / "coop.yaml"),
            "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"), "--output-dir", str(out), *extra,
            "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base", "USE_CUDA", "False",
            "DATASET.CACHE_DIR", str(cache or env / "cache")]


def real_checkpoint(env) -> dict:
    return load_checkpoint(str(env / "trained" / "prompt_learner" / "model.pth.tar-1"))


def model_dir_with(env, tmp_path, checkpoint=None, raw: bytes | None = None):
    """A copy of the trained folder whose model.pth.tar-1 is replaced by ``checkpoint`` (or ``raw`` bytes)."""
    folder = tmp_path / "model_dir"
    shutil.copytree(env / "trained" / "prompt_learner", folder / "prompt_learner")
    path = folder / "prompt_learner" / "model.pth.tar-1"
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(checkpoint, path)
    return folder, str(path)


def eval_only(env, tmp_path, model_dir, *extra, out="eval"):
    return run_train_py(coop_args(env, tmp_path / out, "--eval-only", "--model-dir", str(model_dir),
                                  "--load-epoch", "1", *extra))


# ------------------------------------------------------------------ checkpoints


def test_payload_hidden_inside_valid_weights_is_refused_by_eval_only(env, tmp_path):
    marker = tmp_path / "MARKER"
    hostile = {**real_checkpoint(env), "extra": {"notes": Payload(str(marker))}}
    folder, path = model_dir_with(env, tmp_path, hostile)
    with pytest.raises(CheckpointError) as err:
        eval_only(env, tmp_path, folder)
    assert str(err.value) == REFUSED.format(path=path, name="posix.system")
    assert not marker.exists()
    assert not (tmp_path / "eval" / "results.json").exists()


def test_hostile_released_official_folder_is_refused(env, tmp_path, tiny_clip):
    """The official layout users download: Dassl's file with scheduler and optimizer objects, one of
    them carrying the payload."""
    from test_official_checkpoints import official_layout
    from test_trainers import BASE_CLASSES, build_model

    marker = tmp_path / "MARKER"
    ours = build_model("MaPLe", tiny_clip, BASE_CLASSES, N_CTX=2, PROMPT_DEPTH=9).checkpoint_state()
    checkpoint = dassl_checkpoint(official_layout("MaPLe", ours, 2), epoch=5)
    checkpoint["scheduler"]["successor"].hook = Payload(str(marker))
    released = tmp_path / "released" / "seed1" / "MultiModalPromptLearner"
    released.mkdir(parents=True)
    torch.save(checkpoint, released / "model.pth.tar-5")
    args = ["--root", str(env / "data"), "--trainer", "MaPLe", "--seed", "1", "--eval-only",
            "--model-dir", str(released.parent), "--load-epoch", "5", "--output-dir", str(tmp_path / "eval"),
            "--config-file", os.path.join(ROOT, "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"),
            "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"), "MODEL.BACKBONE.NAME", "tiny",
            "DATALOADER.NUM_WORKERS", "0", "USE_CUDA", "False", "DATASET.SUBSAMPLE_CLASSES", "new",
            "DATASET.CACHE_DIR", str(env / "cache")]
    with pytest.raises(CheckpointError) as err:
        run_train_py(args)
    assert str(err.value) == REFUSED.format(path=released / "model.pth.tar-5", name="posix.system")
    assert not marker.exists()


def test_auto_resume_refuses_a_hostile_checkpoint_and_keeps_it(env, tmp_path):
    """A plain training command in an output folder holding a hostile last checkpoint (no flag)."""
    marker = tmp_path / "MARKER"
    out = tmp_path / "out"
    (out / "prompt_learner").mkdir(parents=True)
    hostile = {**real_checkpoint(env), "epoch": 1, "payload": Payload(str(marker))}
    torch.save(hostile, out / "prompt_learner" / "model.pth.tar-1")
    (out / "prompt_learner" / "checkpoint").write_text("model.pth.tar-1\n")
    with pytest.raises(CheckpointError) as err:
        run_train_py(coop_args(env, out, "OPTIM.MAX_EPOCH", "2"))
    assert str(err.value) == REFUSED.format(path=out / "prompt_learner" / "model.pth.tar-1", name="posix.system")
    assert not marker.exists()
    assert sorted(os.listdir(out / "prompt_learner")) == ["checkpoint", "model.pth.tar-1"]  # nothing destroyed
    assert not (out / "results.json").exists()


def test_trust_checkpoint_loads_a_dassl_file_with_an_unknown_class_and_says_so(env, tmp_path):
    checkpoint = dassl_checkpoint(real_checkpoint(env)["state_dict"], epoch=1)
    checkpoint["args"] = argparse.Namespace(lr=0.002)  # benign, but not something a safe load rebuilds
    folder, path = model_dir_with(env, tmp_path, checkpoint)
    with pytest.raises(CheckpointError) as err:
        eval_only(env, tmp_path, folder)
    assert str(err.value) == REFUSED.format(path=path, name="argparse.Namespace")

    assert eval_only(env, tmp_path, folder, "--trust-checkpoint", out="trusted") == 0
    log = (tmp_path / "trusted" / "log.txt").read_text()
    assert TRUST_WARNING in log
    assert (f"WARNING: fully unpickling {path} (trusted checkpoints): it refers to argparse.Namespace, which a "
            "safe load refuses; any code in it runs now") in log
    assert json.loads((tmp_path / "trusted" / "results.json").read_text())["epoch"] == 1


def test_dassl_file_without_unknown_classes_needs_no_trust(env, tmp_path):
    """Dassl's scheduler/optimizer objects load safely (no full unpickling, no warning); the same
    accuracy as our own file."""
    assert eval_only(env, tmp_path, env / "trained") == 0
    ours = json.loads((tmp_path / "eval" / "results.json").read_text())["accuracy"]
    folder, _ = model_dir_with(env, tmp_path, dassl_checkpoint(real_checkpoint(env)["state_dict"], epoch=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert eval_only(env, tmp_path, folder, out="dassl") == 0
    assert not [w for w in caught if "unpickl" in str(w.message)]
    log = (tmp_path / "dassl" / "log.txt").read_text()
    assert f"Loading weights to prompt_learner from \"{folder / 'prompt_learner' / 'model.pth.tar-1'}\"" in log
    assert "fully unpickling" not in log and TRUST_WARNING not in log
    assert json.loads((tmp_path / "dassl" / "results.json").read_text())["accuracy"] == ours


def _truncated_with_payload(marker) -> bytes:
    blob = pickle.dumps({"payload": Payload(str(marker)), "state_dict": {"w": list(range(2000))}}, protocol=2)
    return blob[: len(blob) // 2]  # cut after the payload: a full unpickle would run it, then fail


@pytest.mark.parametrize("kind", ["empty", "truncated", "truncated_zip", "not_a_pickle"])
def test_corrupted_checkpoint_is_reported_as_corrupted_and_never_unpickled(env, tmp_path, kind):
    marker = tmp_path / "MARKER"
    real = (env / "trained" / "prompt_learner" / "model.pth.tar-1").read_bytes()
    raw = {"empty": b"", "truncated": _truncated_with_payload(marker), "truncated_zip": real[: len(real) // 2],
           "not_a_pickle": b"<html>404 Not Found</html>"}[kind]
    folder, path = model_dir_with(env, tmp_path, raw=raw)
    with pytest.raises(CheckpointError) as err:
        eval_only(env, tmp_path, folder)
    assert str(err.value) == CORRUPTED.format(path=path)
    with pytest.raises(CheckpointError) as err:  # trusting checkpoints does not retry a corrupted one either
        eval_only(env, tmp_path, folder, "--trust-checkpoint", out="trusted")
    assert str(err.value) == CORRUPTED.format(path=path)
    assert not marker.exists()


def test_corrupted_checkpoint_met_when_resuming_says_how_to_go_on(env, tmp_path):
    marker = tmp_path / "MARKER"
    out = tmp_path / "out"
    (out / "prompt_learner").mkdir(parents=True)
    (out / "prompt_learner" / "model.pth.tar-2").write_bytes(_truncated_with_payload(marker))
    (out / "prompt_learner" / "checkpoint").write_text("model.pth.tar-2\n")
    pointer = out / "prompt_learner" / "checkpoint"
    with pytest.raises(CheckpointError) as err:
        run_train_py(coop_args(env, out, "OPTIM.MAX_EPOCH", "3"))
    assert str(err.value) == (f"{out / 'prompt_learner' / 'model.pth.tar-2'} is corrupted (empty, truncated or not a "
                              f"checkpoint): delete it and {pointer} to train from scratch (no earlier checkpoint "
                              "is left).")
    shutil.copy(env / "trained" / "prompt_learner" / "model.pth.tar-1", out / "prompt_learner" / "model.pth.tar-1")
    with pytest.raises(CheckpointError) as err:
        run_train_py(coop_args(env, out, "OPTIM.MAX_EPOCH", "3"))
    assert str(err.value).endswith(f"delete it and write one of model.pth.tar-1 into {pointer} to resume from there.")
    assert not marker.exists()


def test_empty_checkpoint_pointer_is_one_correct_sentence(env, tmp_path):
    out = tmp_path / "out"
    (out / "prompt_learner").mkdir(parents=True)
    pointer = out / "prompt_learner" / "checkpoint"
    pointer.write_text("")
    with pytest.raises(CheckpointError) as err:
        run_train_py(coop_args(env, out))
    assert str(err.value) == (f"{pointer} should name the last checkpoint saved in {out / 'prompt_learner'} but is "
                              "empty: delete it, as that folder holds no checkpoint.")
    shutil.copy(env / "trained" / "prompt_learner" / "model.pth.tar-1", out / "prompt_learner" / "model.pth.tar-1")
    pointer.write_text("model.pth.tar-7\n")
    with pytest.raises(CheckpointError) as err:  # --eval-only without --load-epoch follows the pointer too
        run_train_py(coop_args(env, tmp_path / "eval", "--eval-only", "--model-dir", str(out)))
    assert str(err.value) == (f"{pointer} names model.pth.tar-7, which is not in {out / 'prompt_learner'}: write one "
                              "of model.pth.tar-1 into it.")


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle2", "pickle5"])
def test_every_file_format_names_the_offending_global(tmp_path, fmt):
    """torch.save (zip and legacy) and plain pickles (GLOBAL and STACK_GLOBAL opcodes)."""
    marker, path = tmp_path / "MARKER", tmp_path / "model.pth.tar-1"
    obj = {"payload": Payload(str(marker)), "state_dict": {"w": torch.ones(3)}}  # first: named first
    if fmt in ("zip", "legacy"):
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(fmt[-1])))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(path))
    assert str(err.value) == REFUSED.format(path=path, name="posix.system")
    assert not marker.exists()


def test_dassl_class_paths_resolve_without_dassl_and_torch_allow_list_is_left_alone(tmp_path, monkeypatch):
    """A checkpoint naming ``dassl.optim.lr_scheduler.ConstantWarmupScheduler`` loads into our class with
    no ``dassl`` importable; the allowed names are not left in torch's process-wide list."""
    from restore.engine.optim import ConstantWarmupScheduler

    fake = {n: types.ModuleType(n) for n in ("dassl", "dassl.optim", "dassl.optim.lr_scheduler")}

    class DasslWarmup:
        pass

    DasslWarmup.__module__, DasslWarmup.__qualname__ = "dassl.optim.lr_scheduler", "ConstantWarmupScheduler"
    fake["dassl.optim.lr_scheduler"].ConstantWarmupScheduler = DasslWarmup
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    sched = DasslWarmup()
    sched.__dict__.update(warmup_epoch=1, cons_lr=1e-5, last_epoch=3)
    torch.save({"state_dict": {}, "epoch": 3, "scheduler_object": sched}, tmp_path / "ckpt")
    monkeypatch.undo()  # the fake Dassl is gone again

    loaded = load_checkpoint(str(tmp_path / "ckpt"))["scheduler_object"]
    assert type(loaded) is ConstantWarmupScheduler and loaded.last_epoch == 3 and loaded.cons_lr == 1e-5
    left = set(torch.serialization.get_safe_globals())
    assert not [pair for pair in checkpoint_safe_globals() if pair in left]


def test_numpy_results_load_without_full_unpickling(tmp_path):
    import numpy as np

    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 2, "val_result": np.float64(71.25),
                "dtype": np.dtype("float32")}, tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_checkpoint(str(tmp_path / "ckpt"))
    assert not [w for w in caught if "unpickl" in str(w.message)]
    assert loaded["val_result"] == 71.25 and type(loaded["val_result"]) is np.float64
    assert loaded["dtype"] == np.dtype("float32")


# ------------------------------------------------------------------ caches, anchors, CLIP weights

CACHE_ADVICE = "delete it (a cache, rebuilt on the next run)."


@pytest.mark.parametrize("kind", ["hostile", "truncated_hostile", "empty", "truncated"])
def test_fewshot_cache_is_refused_or_called_corrupted(env, tmp_path, kind):
    marker = tmp_path / "MARKER"
    cache = tmp_path / "cache"
    path = cache / "dtd" / "split_fewshot" / "shot_2-seed_1.pkl"
    path.parent.mkdir(parents=True)
    benign = pickle.dumps({"train": [str(i) for i in range(200)]})
    path.write_bytes({"hostile": pickle.dumps({"train": [Payload(str(marker))]}),
                      "truncated_hostile": _truncated_with_payload(marker), "empty": b"",
                      "truncated": benign[: len(benign) // 2]}[kind])
    with pytest.raises(DatasetNotFoundError) as err:
        run_train_py(coop_args(env, tmp_path / "out", cache=cache))
    if kind in ("hostile", "truncated_hostile"):  # the payload's global comes before the cut
        assert str(err.value) == (f"Refusing to load {path}: it refers to posix.system, which a dataset cache does "
                                  f"not contain and whose unpickling could run code; {CACHE_ADVICE}")
    else:
        assert str(err.value) == f"{path} is corrupted (empty, truncated or not a dataset cache): {CACHE_ADVICE}"
    assert not marker.exists()


def test_imagenet_preprocessed_pkl_is_refused(tmp_path):
    import datasets  # noqa: F401  registers the loaders
    from restore.datasets.synthetic import make_synthetic
    from restore.engine.config import get_cfg_default
    from restore.engine.registry import DATASET_REGISTRY

    marker = tmp_path / "MARKER"
    folder = make_synthetic("imagenet", str(tmp_path / "data"), num_classes=2, images_per_class=3)
    path = os.path.join(folder, "preprocessed.pkl")
    with open(path, "wb") as f:
        pickle.dump({"train": [], "test": [Payload(str(marker))]}, f)
    cfg = get_cfg_default()
    cfg.merge_from_file(os.path.join(ROOT, "configs/datasets/imagenet.yaml"))
    cfg.DATASET.ROOT = str(tmp_path / "data")
    with pytest.raises(DatasetNotFoundError) as err:
        DATASET_REGISTRY.get("ImageNet")(cfg)
    assert str(err.value) == (f"Refusing to load {path}: it refers to posix.system, which a dataset cache does not "
                              f"contain and whose unpickling could run code; {CACHE_ADVICE}")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["hostile", "truncated"])
def test_craft_anchor_file_is_refused_or_called_corrupted(tmp_path, kind):
    from trainers.craft.anchors import load_anchors

    marker, path = tmp_path / "MARKER", tmp_path / "anchors.pt"
    torch.save({"version": 1, "anchors": torch.zeros(2, 4), "note": Payload(str(marker))}, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as err:
        load_anchors(str(path))
    advice = "delete it (anchors missing at their path are computed again)."
    assert str(err.value) == (
        f"Refusing to load {path}: it refers to posix.system, which a Craft anchor file does not contain and whose "
        f"unpickling could run code; {advice}" if kind == "hostile" else
        f"{path} is corrupted (empty, truncated or not a Craft anchor file): {advice}")
    assert not marker.exists()


def test_clip_weight_file_is_refused(tmp_path):
    from restore.clip import load_clip

    marker, path = tmp_path / "MARKER", tmp_path / "ViT-B-16.pt"
    torch.save({"visual.conv1.weight": torch.zeros(2), "x": Payload(str(marker))}, path)
    with pytest.raises(RuntimeError) as err:
        load_clip(str(path))
    assert str(err.value) == (f"Refusing to load {path}: it refers to posix.system, which a state dict of tensors does "
                              "not contain and whose unpickling could run code; re-save the weights with "
                              "torch.save(model.state_dict(), path).")
    assert not marker.exists()


def test_torchscript_archive_with_a_foreign_global_is_not_run(tmp_path):
    """OpenAI's files are TorchScript archives: their unpickler knows no Python globals, so a hostile
    ``data.pkl`` inside one is a corrupted file, and nothing runs."""
    import zipfile

    from restore.clip.loader import read_state_dict

    marker, good, bad = tmp_path / "MARKER", tmp_path / "good.pt", tmp_path / "ViT-B-32.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, OpenAI's files are still TorchScript
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, pickle.dumps(Payload(str(marker)), protocol=2) if item.filename.endswith("/data.pkl")
                         else data)
    assert sorted(read_state_dict(str(good))) == ["bias", "weight"]
    with pytest.raises(RuntimeError) as err:
        read_state_dict(str(bad))
    assert str(err.value) == f"{bad} is corrupted (empty, truncated or not a CLIP weight file): download it again."
    assert not marker.exists()
