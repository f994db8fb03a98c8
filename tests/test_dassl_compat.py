"""Drop-in both ways: a CoOp-style codebase importing only ``dassl.*`` runs on this engine via the alias,
and a trainer file of this repository copied into such a codebase registers and runs there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from restore import dassl_alias

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MINI_TRAIN = '''
import argparse
from dassl.config import get_cfg_default
from dassl.engine import build_trainer
from dassl.utils import setup_logger, set_random_seed
import datasets.folder  # noqa: F401
import trainers.linear  # noqa: F401
{extra_import}

def extend_cfg(cfg):
    from yacs.config import CfgNode as CN
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    {extra_extend}

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root"); p.add_argument("--output-dir"); p.add_argument("--trainer")
    p.add_argument("--seed", type=int, default=1); p.add_argument("--eval-only", action="store_true")
    p.add_argument("--model-dir", default=""); p.add_argument("--load-epoch", type=int)
    p.add_argument("opts", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cfg = get_cfg_default(); extend_cfg(cfg)
    cfg.DATASET.ROOT = a.root; cfg.OUTPUT_DIR = a.output_dir; cfg.TRAINER.NAME = a.trainer; cfg.SEED = a.seed
    cfg.DATASET.NAME = "Folder"; cfg.DATALOADER.NUM_WORKERS = 0; cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 2
    cfg.OPTIM.NAME = "sgd"; cfg.OPTIM.LR = 0.01; cfg.OPTIM.MAX_EPOCH = 2; cfg.OPTIM.LR_SCHEDULER = "cosine"
    cfg.OPTIM.WARMUP_EPOCH = 1; cfg.OPTIM.WARMUP_TYPE = "constant"
    cfg.merge_from_list(a.opts)
    cfg.freeze()
    set_random_seed(cfg.SEED)
    setup_logger(cfg.OUTPUT_DIR)
    trainer = build_trainer(cfg)
    if a.eval_only:
        trainer.load_model(a.model_dir, epoch=a.load_epoch); trainer.test(); return
    trainer.train()

if __name__ == "__main__":
    main()
'''

MINI_DATASET = '''
import os
from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase
from dassl.utils import listdir_nohidden

@DATASET_REGISTRY.register()
class Folder(DatasetBase):
    """<root>/folder/<split>/<class>/<image>.jpg"""
    dataset_dir = "folder"

    def __init__(self, cfg):
        root = os.path.join(cfg.DATASET.ROOT, self.dataset_dir)
        splits = {s: self._read(os.path.join(root, s)) for s in ("train", "test")}
        super().__init__(train_x=splits["train"], val=splits["test"], test=splits["test"])

    @staticmethod
    def _read(folder):
        items = []
        for label, cname in enumerate(sorted(listdir_nohidden(folder))):
            for name in sorted(listdir_nohidden(os.path.join(folder, cname))):
                items.append(Datum(impath=os.path.join(folder, cname, name), label=label, classname=cname))
        return items
'''

MINI_TRAINER = '''
import torch.nn as nn
import torch.nn.functional as F
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer, build_lr_scheduler

@TRAINER_REGISTRY.register()
class Linear(TrainerX):
    def build_model(self):
        self.model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, self.num_classes)).to(self.device)
        self.optim = build_optimizer(self.model, self.cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
        self.register_model("model", self.model, self.optim, self.sched)

    def forward_backward(self, batch):
        image, label, _ = self.parse_batch_train(batch)
        output = self.model(image)
        loss = F.cross_entropy(output, label)
        self.model_backward_and_update(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return {"loss": loss.item(), "acc": compute_accuracy(output, label)[0].item()}
'''


def _write_images(root: str) -> None:
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for split, count in (("train", 4), ("test", 2)):
        for cname, colour in colours.items():
            folder = os.path.join(root, "folder", split, cname)
            os.makedirs(folder)
            for i in range(count):
                Image.new("RGB", (32, 32), colour).save(os.path.join(folder, f"{i}.jpg"))


@pytest.fixture
def mini_codebase(tmp_path):
    code = tmp_path / "codebase"
    (code / "datasets").mkdir(parents=True)
    (code / "trainers").mkdir()
    (code / "datasets" / "__init__.py").write_text("")
    (code / "trainers" / "__init__.py").write_text("")
    (code / "datasets" / "folder.py").write_text(textwrap.dedent(MINI_DATASET))
    (code / "trainers" / "linear.py").write_text(textwrap.dedent(MINI_TRAINER))
    _write_images(str(tmp_path / "data"))
    site = tmp_path / "site"
    site.mkdir()
    pth = dassl_alias.install(str(site))
    assert open(pth).read().startswith("import restore.dassl_alias")
    return code, tmp_path / "data", site


def _run(code, site, args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), ROOT]))
    cmd = [sys.executable, "-c",
           f"import site, runpy, sys; site.addsitedir({str(site)!r}); sys.argv = ['train.py'] + {args!r}; "
           "runpy.run_path('train.py', run_name='__main__')"]
    return subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=240)


def test_coop_style_codebase_trains_and_evaluates_through_alias(mini_codebase):
    code, data, site = mini_codebase
    (code / "train.py").write_text(MINI_TRAIN.format(extra_import="", extra_extend=""))
    out = code / "out"
    proc = _run(code, site, ["--root", str(data), "--output-dir", str(out), "--trainer", "Linear"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "epoch [2/2] batch [4/4]" in log and "Finish training" in log and "* accuracy:" in log
    assert (out / "model" / "model.pth.tar-2").exists()
    assert json.load(open(out / "results.json"))["accuracy"] == 100.0  # colours are separable
    proc = _run(code, site, ["--root", str(data), "--output-dir", str(code / "ev"), "--trainer", "Linear",
                             "--eval-only", "--model-dir", str(out), "--load-epoch", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(epoch = 2)" in (code / "ev" / "log.txt").read_text()


def test_trainer_file_of_this_repo_runs_in_a_coop_codebase(mini_codebase):
    """Copy trainers/coop.py into the codebase; its train.py adds our keys with one extend_cfg line."""
    code, data, site = mini_codebase
    shutil.copy(os.path.join(ROOT, "trainers", "coop.py"), code / "trainers" / "our_coop.py")
    (code / "train.py").write_text(MINI_TRAIN.format(
        extra_import="import trainers.our_coop  # noqa: F401",
        extra_extend="from restore.engine.config import extend_cfg as restore_extend; restore_extend(cfg)"))
    out = code / "coop_out"
    proc = _run(code, site, ["--root", str(data), "--output-dir", str(out), "--trainer", "CoOp",
                             "MODEL.BACKBONE.NAME", "tiny", "TRAINER.COOP.N_CTX", "2",
                             "INPUT.PIXEL_MEAN", "[0.48145466, 0.4578275, 0.40821073]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "prompt_learner" / "model.pth.tar-2").exists()
    record = json.load(open(out / "results.json"))
    assert record["trainer"] == "CoOp" and record["num_classes"] == 2


def test_alias_is_inactive_when_real_dassl_exists(tmp_path, monkeypatch):
    fake = tmp_path / "dassl"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert dassl_alias.real_dassl_installed()
    code = ("import sys; sys.path.insert(0, %r); import restore.dassl_alias as a; "
            "print(a.activate()); import dassl; print(getattr(dassl, 'REAL', False))") % str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.split() == ["False", "True"], proc.stderr


_PICKLE_DATUM = '''
import io, pickle, sys
{activate}
from {module} import Datum
from restore.engine.data.datum import dumps_datum_cache, load_datum_cache
d = Datum(impath=sys.argv[1], label=3, classname="cat")
blobs = [pickle.dumps({{"train": [d, d], "val": [d]}}, protocol=p) for p in (0, 2, pickle.HIGHEST_PROTOCOL)]
for blob in blobs:  # plain pickle (CoOp's own code) and restore's reader both load it back here
    assert pickle.loads(blob)["train"][0] == d and load_datum_cache(io.BytesIO(blob))["train"][1] == d
assert load_datum_cache(io.BytesIO(dumps_datum_cache({{"train": [d]}})))["train"] == [d]
with open(sys.argv[2], "wb") as f:
    pickle.dump(blobs, f)
'''


def _pickle_datum_in_subprocess(tmp_path, alias: bool):
    from PIL import Image

    img, out = tmp_path / "a.jpg", tmp_path / f"blobs_{alias}.pkl"
    Image.new("RGB", (4, 4)).save(img)
    code = _PICKLE_DATUM.format(
        activate="import restore.dassl_alias as a; assert a.activate()" if alias else "",
        module="dassl.data.datasets" if alias else "restore.engine.data")
    proc = subprocess.run([sys.executable, "-c", code, str(img), str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pickle

    with open(out, "rb") as f:
        return pickle.load(f), str(img)


def test_plain_pickle_of_datum_under_alias_names_dassls_class(tmp_path):
    """CoOp's datasets write their few-shot cache with plain pickle.dump: under the alias it must carry
    Dassl's class path (the real Dassl loads nothing else); without the alias nothing changes."""
    import io

    from restore.engine.data.datum import DASSL_DATUM_MODULE, Datum, load_datum_cache
    from test_data_engine import _install_fake_dassl, _remove_fake_dassl

    blobs, img = _pickle_datum_in_subprocess(tmp_path, alias=True)
    for blob in blobs:
        assert DASSL_DATUM_MODULE.encode() in blob and b"restore.engine" not in blob
        got = load_datum_cache(io.BytesIO(blob))["train"][0]
        assert type(got) is Datum and (got.impath, got.label, got.classname) == (img, 3, "cat")
    import pickle

    saved, FakeDatum = _install_fake_dassl()  # what the real Dassl does with such a file
    try:
        data = pickle.loads(blobs[-1])
    finally:
        _remove_fake_dassl(saved)
    assert type(data["train"][0]) is FakeDatum and data["train"][0]._label == 3

    plain, _ = _pickle_datum_in_subprocess(tmp_path, alias=False)
    for blob in plain:  # no alias: our own class path, as before
        assert b"restore.engine.data.datum" in blob and DASSL_DATUM_MODULE.encode() not in blob
        assert pickle.loads(blob)["val"][0].label == 3


def test_run_launcher_activates_the_alias_for_one_process(mini_codebase):
    """``python -m restore.dassl_alias run train.py ...``: nothing written into site-packages."""
    code, data, _ = mini_codebase
    (code / "train.py").write_text(MINI_TRAIN.format(extra_import="", extra_extend=""))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), ROOT]))
    args = ["train.py", "--root", str(data), "--output-dir", str(code / "out"), "--trainer", "Linear",
            "OPTIM.MAX_EPOCH", "1"]
    if subprocess.run([sys.executable, "-c", "import dassl"], cwd=code, env=env, capture_output=True).returncode:
        # (unless this environment has the .pth installed or a real Dassl) plain python cannot run it
        plain = subprocess.run([sys.executable, *args], cwd=code, env=env, capture_output=True, text=True, timeout=120)
        assert plain.returncode != 0 and "No module named 'dassl'" in plain.stderr
    proc = subprocess.run([sys.executable, "-m", "restore.dassl_alias", "run", *args], cwd=code, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch [1/1]" in (code / "out" / "log.txt").read_text()
    assert json.load(open(code / "out" / "results.json"))["accuracy"] == 100.0
    failing = subprocess.run([sys.executable, "-m", "restore.dassl_alias", "run", "-m", "train", "--bad-flag"],
                             cwd=code, env=env, capture_output=True, text=True, timeout=120)
    assert failing.returncode == 2 and "--bad-flag" in failing.stderr  # -m form; the script's exit status


def test_status_and_reinstall_with_the_alias_installed(mini_codebase):
    """`python -m restore.dassl_alias status` in an interpreter where the .pth already activated the alias."""
    _, _, site = mini_codebase

    def cli(*args):
        cmd = [sys.executable, "-c", f"import site, runpy, sys; site.addsitedir({str(site)!r}); "
               f"sys.argv = ['x'] + {list(args)!r}; runpy.run_module('restore.dassl_alias', run_name='__main__')"]
        return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                              timeout=120)

    status = cli("status", "--site-dir", str(site))
    assert status.returncode == 0 and "alias installed" in status.stdout and "real Dassl" not in status.stdout
    assert "RuntimeWarning" not in status.stderr, status.stderr  # the .pth imports the package, not __main__
    again = cli("install", "--site-dir", str(site))
    assert again.returncode == 0 and "Wrote" in again.stdout


# --------------------------------------------------------------------------- drop-in into real-shaped hosts
# A host shaped like the official MaPLe / CoOp repositories: its own trainers registered under the real
# names, datasets importing dassl.data.datasets, a train.py with extend_cfg and setup_cfg. It imports our
# methods from the installed package (restore_plugins.trainers.<method>) and makes the one documented call.

HOST_TRAINER = '''
from dassl.engine import TRAINER_REGISTRY, TrainerX


@TRAINER_REGISTRY.register()
class {name}(TrainerX):
    """The host's own {name} (a stub: never built in these tests)."""

    def build_model(self):
        raise NotImplementedError("the host's {name}")
'''

HOST_DTD = '''
import json
import math
import os
import re

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase


def _read(path, image_dir):
    with open(path) as f:
        split = json.load(f)
    return [[Datum(impath=os.path.join(image_dir, p), label=int(y), classname=c) for p, y, c in split[k]]
            for k in ("train", "val", "test")]


def _half(which, *splits):
    """Base (first half of the labels) or new (the rest) classes, relabelled from 0."""
    if which == "all":
        return splits
    labels = sorted({d.label for d in splits[0]})
    n = math.ceil(len(labels) / 2)
    keep = labels[:n] if which == "base" else labels[n:]
    relabel = {y: i for i, y in enumerate(keep)}
    return [[Datum(impath=d.impath, label=relabel[d.label], classname=d.classname) for d in s if d.label in relabel]
            for s in splits]


@DATASET_REGISTRY.register()
class DescribableTextures(DatasetBase):
    dataset_dir = "dtd"

    def __init__(self, cfg):
        folder = os.path.join(os.path.abspath(cfg.DATASET.ROOT), self.dataset_dir)
        train, val, test = _read(os.path.join(folder, "split_zhou_DescribableTextures.json"),
                                 os.path.join(folder, "images"))
        train, val, test = _half(cfg.DATASET.SUBSAMPLE_CLASSES, train, val, test)
        super().__init__(train_x=train, val=val, test=test)
'''

HOST_TRAIN = '''
import argparse

import torch
from dassl.config import get_cfg_default
from dassl.engine import build_trainer
from dassl.utils import collect_env_info, set_random_seed, setup_logger

import datasets.dtd  # noqa: F401
{host_imports}
# --- drop-in: our methods from the installed package, registering only themselves
{our_imports}
from restore.engine.config import extend_cfg as restore_extend_cfg
from restore.methods import apply_dataset_overrides


def extend_cfg(cfg):
    from yacs.config import CfgNode as CN

    cfg.TRAINER.HOSTONLY = CN()
    cfg.TRAINER.HOSTONLY.N_CTX = 16
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    restore_extend_cfg(cfg)  # TRAINER.<METHOD> nodes of our imported methods


def setup_cfg(args):
    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.merge_from_file(args.dataset_config_file)
    cfg.merge_from_file(args.config_file)
    cfg.DATASET.ROOT = args.root
    cfg.OUTPUT_DIR = args.output_dir
    cfg.SEED = args.seed
    cfg.TRAINER.NAME = args.trainer
    cfg.merge_from_list(args.opts)
    apply_dataset_overrides(cfg, args.opts)  # the one call: our methods' published per-dataset values
    cfg.freeze()
    return cfg


def main():
    p = argparse.ArgumentParser()
    for flag in ("--root", "--output-dir", "--trainer", "--config-file", "--dataset-config-file"):
        p.add_argument(flag, default="")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cfg = setup_cfg(args)
    set_random_seed(cfg.SEED)
    setup_logger(cfg.OUTPUT_DIR)
    print("** Config **")
    print(cfg)
    print(collect_env_info())
    trainer = build_trainer(cfg)
    trainer.train()


if __name__ == "__main__":
    main()
'''


def _host(tmp_path, kind: str, ours: list[str]):
    """A MaPLe-style (CoOp, CoCoOp, IVLP, VPT, MaPLe) or CoOp-style (CoOp, CoCoOp, ZeroshotCLIP) codebase."""
    names = {"maple": ["CoOp", "CoCoOp", "IVLP", "VPT", "MaPLe"], "coop": ["CoOp", "CoCoOp", "ZeroshotCLIP"]}[kind]
    code = tmp_path / f"{kind}_host"
    for folder in ("trainers", "datasets", "configs"):
        (code / folder).mkdir(parents=True)
    (code / "trainers" / "__init__.py").write_text("")
    (code / "datasets" / "__init__.py").write_text("")
    for name in names:
        (code / "trainers" / f"{name.lower()}.py").write_text(HOST_TRAINER.format(name=name))
    (code / "datasets" / "dtd.py").write_text(textwrap.dedent(HOST_DTD))
    (code / "configs" / "dtd.yaml").write_text('DATASET:\n  NAME: "DescribableTextures"\n')
    (code / "train.py").write_text(HOST_TRAIN.format(
        host_imports="\n".join(f"import trainers.{n.lower()}  # noqa: F401" for n in names),
        our_imports="\n".join(f"import restore_plugins.trainers.{m}  # noqa: F401" for m in ours)))
    return code


_TINY = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0",
         "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "DATALOADER.TEST.BATCH_SIZE", "8", "DATASET.NUM_SHOTS", "-1",
         "DATASET.SUBSAMPLE_CLASSES", "base"]


def _state(folder, model):
    from restore.engine.utils import load_checkpoint

    return load_checkpoint(os.path.join(folder, model, "model.pth.tar-1"))["state_dict"]


def _host_and_ours(tmp_path, code, trainer, method_cfg, model, extra=()):
    """Run ``trainer`` in the host (subprocess, alias active) and with our own train.py; both outputs."""
    import torch
    from helpers import run_train_py

    from restore.datasets.synthetic import make_synthetic

    data = tmp_path / "data"
    if not data.exists():
        make_synthetic("dtd", str(data), num_classes=4, images_per_class=3)
    site = tmp_path / "site"
    if not site.exists():
        site.mkdir()
        dassl_alias.install(str(site))
    args = ["--root", str(data), "--seed", "1", "--trainer", trainer, "--config-file", os.path.join(ROOT, method_cfg)]
    host_out, our_out = code / f"out_{trainer}", tmp_path / f"ours_{trainer}"
    host_args = args + ["--dataset-config-file", str(code / "configs" / "dtd.yaml"), "--output-dir", str(host_out),
                        *_TINY, *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), ROOT]), OMP_NUM_THREADS="1")
    env.pop("RESTORE_PLUGINS", None)
    cmd = [sys.executable, "-c", f"import site, runpy, sys; site.addsitedir({str(site)!r}); "
           f"sys.argv = ['train.py'] + {host_args!r}; runpy.run_path('train.py', run_name='__main__')"]
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_train_py(args + ["--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"),
                                "--output-dir", str(our_out), *_TINY, *extra]) == 0
    theirs, mine = _state(host_out, model), _state(our_out, model)
    assert theirs.keys() == mine.keys()
    for key in mine:
        assert torch.equal(theirs[key], mine[key]), key
    host_result, our_result = (json.load(open(d / "results.json")) for d in (host_out, our_out))
    assert host_result["accuracy"] == our_result["accuracy"]
    return (host_out / "log.txt").read_text(), host_result


def test_restore_and_mmrl_drop_into_a_maple_style_codebase(tmp_path):
    """The host registers CoOp, CoCoOp, IVLP, VPT and MaPLe of its own; importing our RESTORE and MMRL
    registers those two only, the per-dataset values reach the host's config (its log shows them), and
    the trained weights equal our own train.py's run on the same seed and data."""
    code = _host(tmp_path, "maple", ["restore_trainer", "mmrl"])
    log, record = _host_and_ours(tmp_path, code, "RESTORE", "configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2ctx.yaml",
                                 "MultiModalPromptLearner")
    restore_node = log.split("\n  RESTORE:\n", 1)[1]
    assert re.search(r"\n    VISION_RATIO: 0\.15\n", restore_node), "DTD's RESTORE ratio in the host's log"
    assert re.search(r"\n    FS_WEIGHT: 0\.5\n", restore_node), "DTD's RESTORE override in the host's log"
    assert record["restore"]["fs_weight"] == 0.5
    log, _ = _host_and_ours(tmp_path, code, "MMRL", "configs/trainers/MMRL/vit_b16_base2new.yaml",
                            "MultiModalRepresentationLearner", extra=["TRAINER.MMRL.REP_DIM", "16"])
    mmrl_node = log.split("\n  MMRL:\n", 1)[1]
    assert re.search(r"\n    REG_WEIGHT: 6\.0\n", mmrl_node), "DTD's MMRL lambda in the host's log"
    assert re.search(r"\n    REP_DIM: 16\n", mmrl_node), "the host's command line wins over the overrides"


def test_coop_family_method_drops_into_a_coop_style_codebase(tmp_path):
    """The host registers CoOp, CoCoOp and ZeroshotCLIP; our KgCoOp (built on our CoOp model) registers
    itself only and trains as with our own train.py."""
    code = _host(tmp_path, "coop", ["kgcoop"])
    _host_and_ours(tmp_path, code, "KgCoOp", "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml", "prompt_learner",
                   extra=["TRAINER.KGCOOP.N_CTX", "2"])
