"""Drop-in both ways: a CoOp-style codebase importing only ``dassl.*`` runs on this engine via the alias,
and a trainer file of this repository copied into such a codebase registers and runs there."""

from __future__ import annotations

import json
import os
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
