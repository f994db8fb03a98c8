"""Whole runs through train.py on a synthetic DTD with the tiny CLIP: round-trips and reliability.

Covers: save / auto-resume / eval-only / --load-epoch, the log block, results.json, a run killed
mid-epoch resuming to the same final result as an uninterrupted one, bit-identical deterministic
runs, weights-only loading of every checkpoint written, and bad input giving one clear sentence.
train.py runs in this process (``train.cli``, as ``python train.py`` calls it), except the run that is
killed with SIGKILL, which needs a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import run_train_py, tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = tiny_run_config(max_epoch=3, extra="""
INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]
TRAIN:
  PRINT_FREQ: 1
TRAINER:
  COOP:
    N_CTX: 4
""")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from restore.datasets.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("runs")
    make_synthetic("dtd", str(base / "data"))
    cfg = base / "coop_tiny.yaml"
    cfg.write_text(CFG)
    return base


@pytest.fixture(autouse=True)
def _global_torch_flags_restored():
    """DETERMINISTIC True switches torch's process-wide deterministic mode: undo it for the next tests."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]


def train_args(env, out, *extra, trainer="CoOp", shots=4, sub="base"):
    return ["--root", str(env / "data"), "--seed", "1", "--trainer", trainer,
            "--dataset-config-file", os.path.join(ROOT, "configs", "datasets", "dtd.yaml"),
            "--config-file", str(env / "coop_tiny.yaml"), "--output-dir", str(out), *extra,
            "DATASET.NUM_SHOTS", str(shots), "DATASET.SUBSAMPLE_CLASSES", sub, "DATASET.CACHE_DIR", str(env / "cache")]


def train(env, out, *extra, opts=(), **kw) -> int:
    """``python train.py ...`` in this process; its exit status."""
    return run_train_py([*train_args(env, out, *extra, **kw), *opts], as_cli=True)


@pytest.fixture(scope="module")
def roundtrip(env):
    """A finished 3-epoch CoOp run on the base classes (read, never changed, by the tests below)."""
    assert train(env, env / "roundtrip") == 0
    return env / "roundtrip"


@pytest.fixture(scope="module")
def deterministic_reference(env):
    """An uninterrupted DETERMINISTIC run (8 shots asked: all 3 images per class)."""
    out = env / "uninterrupted"
    assert train(env, out, shots=8, opts=["DETERMINISTIC", "True"]) == 0
    return out


def test_train_then_eval_only_round_trip(env, roundtrip, capsys):
    out = roundtrip
    log = (out / "log.txt").read_text()
    for line in ("Finish training", "Deploy the last-epoch model", "=> result", "* accuracy:", "* macro_f1:"):
        assert line in log
    assert "epoch [3/3] batch [" in log and " lr " in log and " eta " in log
    assert sorted(os.listdir(out / "prompt_learner")) == ["checkpoint", "model.pth.tar-3"]
    train_record = json.load(open(out / "results.json"))
    assert train_record["split"] == "base" and train_record["epoch"] == 3 and train_record["seed"] == 1
    assert train_record["shots_per_class"] == [3, 3]  # 4 shots asked, 3 train images per class: all kept
    for key in ("accuracy", "macro_f1", "trainer", "dataset", "num_classes", "backbone", "wall_time_s"):
        assert key in train_record
    # the printed accuracy equals results.json's
    assert f"* accuracy: {train_record['accuracy']:.1f}%" in log

    # eval-only with --load-epoch on base gives the same accuracy; on new classes it evaluates the new split
    assert train(env, env / "eval_base", "--eval-only", "--model-dir", str(out), "--load-epoch", "3") == 0
    assert json.load(open(env / "eval_base" / "results.json"))["accuracy"] == train_record["accuracy"]
    assert train(env, env / "eval_new", "--eval-only", "--model-dir", str(out), "--load-epoch", "3", sub="new") == 0
    record = json.load(open(env / "eval_new" / "results.json"))
    assert record["split"] == "new" and record["epoch"] == 3

    # re-running a finished run is skipped, outputs untouched; --overwrite redoes it
    mtime = os.path.getmtime(out / "results.json")
    capsys.readouterr()
    assert train(env, out) == 0 and "skipping" in capsys.readouterr().out
    assert os.path.getmtime(out / "results.json") == mtime

    # every checkpoint the library writes loads with weights_only=True
    ckpt = torch.load(out / "prompt_learner" / "model.pth.tar-3", weights_only=True)
    assert set(ckpt) >= {"state_dict", "epoch", "optimizer", "scheduler", "val_result", "rng_state"}
    assert list(ckpt["state_dict"]) == ["prompt_learner.ctx"]  # only what is learned, no copy of CLIP


def _final_state(out):
    return torch.load(out / "prompt_learner" / "model.pth.tar-3", weights_only=True)["state_dict"]


def test_killed_run_resumes_to_the_same_result(env, deterministic_reference, capsys):
    reference = deterministic_reference
    killed = env / "killed"
    # one intra-op thread, as in this process (conftest): the same float sums before and after the kill
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(env, killed, shots=8), "DETERMINISTIC", "True"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("epoch [2/3] batch [2/"):
            proc.send_signal(signal.SIGKILL)  # mid-epoch 2, after epoch 1's checkpoint
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()
    assert (killed / "prompt_learner" / "checkpoint").read_text().strip() == "model.pth.tar-1"

    capsys.readouterr()
    assert train(env, killed, shots=8, opts=["DETERMINISTIC", "True"]) == 0
    resumed = capsys.readouterr().out
    assert "Found checkpoint" in resumed and "Previous epoch: 1" in resumed
    assert torch.equal(_final_state(killed)["prompt_learner.ctx"], _final_state(reference)["prompt_learner.ctx"])
    a, b = json.load(open(killed / "results.json")), json.load(open(reference / "results.json"))
    assert (a["accuracy"], a["macro_f1"]) == (b["accuracy"], b["macro_f1"])


def test_deterministic_runs_are_bit_identical(env, deterministic_reference):
    outs = [deterministic_reference, env / "det1"]
    assert train(env, outs[1], shots=8, opts=["DETERMINISTIC", "True"]) == 0
    assert torch.equal(_final_state(outs[0])["prompt_learner.ctx"], _final_state(outs[1])["prompt_learner.ctx"])
    logs = [[l for l in (o / "log.txt").read_text().splitlines() if l.startswith("epoch [")] for o in outs]
    numbers = [[re.findall(r"(?:loss|acc|lr) (\S+)", line) for line in log] for log in logs]
    assert len(numbers[0]) == 9 and numbers[0] == numbers[1]


def test_zeroshot_clip_evaluates(env):
    out = env / "zs"
    assert train(env, out, "--eval-only", trainer="zsclip", shots=-1, sub="all") == 0
    record = json.load(open(out / "results.json"))
    assert record["trainer"] == "ZeroshotCLIP" and record["split"] == "all" and 0 <= record["accuracy"] <= 100


BAD_INPUTS = [  # (name, flags, opts, expected sentence)
    ("unknown trainer", ["--trainer", "MaPLee"], [], "Unknown trainer 'MaPLee'. Did you mean 'MaPLe'"),
    ("unknown dataset", [], ["DATASET.NAME", "DTDD"], "Unknown dataset 'DTDD'"),
    ("unknown config key", [], ["OPTIM.LRR", "0.1"], "Unknown config key 'OPTIM.LRR'"),
    ("missing data root", ["--root", "/nonexistent/data"], [], "DATASETS.md"),
    ("--model-dir without checkpoints", ["--eval-only", "--model-dir", "/tmp"], [], "Model not found"),
    ("--load-epoch that does not exist", ["--eval-only", "--model-dir", "@roundtrip", "--load-epoch", "7"], [],
     "Available in"),
    ("checkpoint from another trainer", ["--trainer", "VPT", "--eval-only", "--model-dir", "@roundtrip",
                                         "--load-epoch", "3"], [], "was written by trainer 'CoOp'"),
    ("checkpoint from another backbone", ["--eval-only", "--model-dir", "@roundtrip", "--load-epoch", "3"],
     ["MODEL.BACKBONE.NAME", "@tiny_file"], "was trained with backbone 'tiny'"),
    ("checkpoint with another class count", ["--eval-only", "--model-dir", "@csc", "--load-epoch", "3"],
     ["TRAINER.COOP.CSC", "True", "DATASET.SUBSAMPLE_CLASSES", "all"], "different class count"),
]


@pytest.mark.parametrize("name,flags,opts,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_sentence(env, roundtrip, capsys, name, flags, opts, message):
    if "@csc" in flags and not (env / "csc" / "results.json").exists():
        assert train(env, env / "csc", opts=["TRAINER.COOP.CSC", "True"]) == 0
    if "@tiny_file" in opts and not (env / "tiny.pt").exists():
        from restore.clip import load_clip, save_openai_state_dict

        save_openai_state_dict(load_clip("tiny").model, str(env / "tiny.pt"))
    places = {"@roundtrip": str(env / "roundtrip"), "@csc": str(env / "csc"), "@tiny_file": str(env / "tiny.pt")}
    flags = [places.get(a, a) for a in flags]
    opts = [places.get(a, a) for a in opts]
    args = train_args(env, env / f"bad_{name.replace(' ', '_')}")
    split = args.index("DATASET.NUM_SHOTS")  # argparse: the last --flag wins; opts stay at the end
    capsys.readouterr()
    assert run_train_py(args[:split] + flags + args[split:] + opts, as_cli=True) != 0
    stderr = capsys.readouterr().err
    assert message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(env, monkeypatch):
    import train as train_script
    from restore.engine.trainer import build_trainer

    out = env / "nan"
    args = train_script.build_parser().parse_args(train_args(env, out) + ["OPTIM.MAX_EPOCH", "2"])
    cfg = train_script.setup_cfg(args)
    trainer = build_trainer(cfg)
    calls = {"n": 0}
    original = trainer.model.loss

    def loss_that_explodes(output, label):
        calls["n"] += 1
        loss, summary = original(output, label)
        return (loss * float("nan") if trainer.epoch == 1 else loss), summary

    monkeypatch.setattr(trainer.model, "loss", loss_that_explodes)
    with pytest.raises(FloatingPointError, match=r"epoch 2/2, batch 1/\d+.*last good checkpoint"):
        trainer.train()
    assert (out / "prompt_learner" / "checkpoint").read_text().strip() == "model.pth.tar-1"
    state = torch.load(out / "prompt_learner" / "model.pth.tar-1", weights_only=True)["state_dict"]
    assert torch.isfinite(state["prompt_learner.ctx"]).all()
    assert not (out / "results.json").exists()
