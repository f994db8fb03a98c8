"""Engine pieces against Dassl's documented behaviour: LR numerics, registry, config, evaluator, logging."""

from __future__ import annotations

import os

import pytest
import torch

from restore.engine.config import ConfigError, get_cfg_default, merge_file, merge_opts
from restore.engine.evaluator import Classification, compute_accuracy, macro_f1
from restore.engine.optim import build_lr_scheduler, build_optimizer
from restore.engine.registry import Registry, check_availability
from restore.engine.utils import load_checkpoint, save_checkpoint, setup_logger


def _lr_sequence(**overrides):
    cfg = get_cfg_default()
    for key, value in overrides.items():
        cfg.OPTIM[key] = value
    param = torch.nn.Parameter(torch.zeros(1))
    optim = build_optimizer([param], cfg.OPTIM)
    sched = build_lr_scheduler(optim, cfg.OPTIM)
    lrs = []
    for _ in range(cfg.OPTIM.MAX_EPOCH):
        lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    return lrs, optim, sched


def test_maple_lr_sequence_matches_dassl():
    lrs, _, _ = _lr_sequence(NAME="sgd", LR=0.0035, MAX_EPOCH=5, LR_SCHEDULER="cosine", WARMUP_EPOCH=1,
                             WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5)
    assert lrs == pytest.approx([1e-5, 0.0035, 0.003166, 0.002291, 0.001209], abs=1e-6)


def test_linear_warmup_and_no_recount_sequences():
    lrs, _, _ = _lr_sequence(NAME="sgd", LR=0.01, MAX_EPOCH=10, LR_SCHEDULER="cosine", WARMUP_EPOCH=3, WARMUP_TYPE="linear")
    assert lrs == pytest.approx([1e-5, 0.00333, 0.00667, 0.01, 0.00976, 0.00905, 0.00794, 0.00655, 0.005, 0.00345], abs=1e-5)
    lrs, _, _ = _lr_sequence(NAME="sgd", LR=0.01, MAX_EPOCH=10, LR_SCHEDULER="cosine", WARMUP_EPOCH=2,
                             WARMUP_TYPE="constant", WARMUP_RECOUNT=False)
    assert lrs == pytest.approx([1e-5, 1e-5, 0.01, 0.00878, 0.00724, 0.00553, 0.00382, 0.00228, 0.00106, 0.00027], abs=1e-5)


def test_warmup_scheduler_state_loads_weights_only_and_resumes(tmp_path):
    kw = dict(NAME="sgd", LR=0.0035, MAX_EPOCH=5, LR_SCHEDULER="cosine", WARMUP_EPOCH=1, WARMUP_TYPE="constant")
    _, optim, sched = _lr_sequence(**{**kw, "MAX_EPOCH": 5})
    path = tmp_path / "s.pt"
    torch.save({"scheduler": sched.state_dict()}, path)
    state = torch.load(path, weights_only=True)["scheduler"]
    # a fresh scheduler restored at epoch 2 continues the same sequence
    cfg = get_cfg_default()
    for k, v in kw.items():
        cfg.OPTIM[k] = v
    p = torch.nn.Parameter(torch.zeros(1))
    o2 = build_optimizer([p], cfg.OPTIM)
    s2 = build_lr_scheduler(o2, cfg.OPTIM)
    o2.step(); s2.step(); o2.step(); s2.step()
    mid_state = s2.state_dict()
    o3 = build_optimizer([p], cfg.OPTIM)
    s3 = build_lr_scheduler(o3, cfg.OPTIM)
    s3.load_state_dict(torch.load(_save(tmp_path / "m.pt", mid_state), weights_only=True))
    o3.param_groups[0]["lr"] = s3.get_last_lr()[0]
    seq = []
    for _ in range(3):
        seq.append(o3.param_groups[0]["lr"])
        o3.step(); s3.step()
    assert seq == pytest.approx([0.003166, 0.002291, 0.001209], abs=1e-6)
    assert state["successor"]["T_max"] == 5.0


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_registry_duplicate_and_did_you_mean():
    reg = Registry("TRAINER")

    @reg.register()
    class MaPLe:  # noqa: N801
        pass

    with pytest.raises(KeyError, match="already registered"):
        reg.register(type("MaPLe", (), {}))
    with pytest.raises(KeyError, match=r"Did you mean .{1,3}MaPLe"):
        reg.get("Maple2")
    with pytest.raises(ValueError, match="Did you mean 'MaPLe'"):
        check_availability("MAPLE", reg.registered_names())


def test_unknown_config_key_and_type_mismatch(tmp_path):
    cfg = get_cfg_default()
    with pytest.raises(ConfigError, match="Unknown config key 'OPTIM.LRR'.*Did you mean OPTIM.LR"):
        merge_opts(cfg, ["OPTIM.LRR", "0.1"])
    with pytest.raises(ConfigError, match="Bad config value"):
        merge_opts(cfg, ["OPTIM.LR", "1"])  # int vs float is a mismatch in yacs
    merge_opts(cfg, ["OPTIM.LR", "1e-5", "INPUT.SIZE", "(32, 32)"])
    assert cfg.OPTIM.LR == 1e-5 and cfg.INPUT.SIZE == (32, 32)
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAINER:\n  NOPE:\n    X: 1\n")
    with pytest.raises(ConfigError, match="Unknown config key"):
        merge_file(cfg, str(bad))
    with pytest.raises(ConfigError, match="not found"):
        merge_file(cfg, str(tmp_path / "missing.yaml"))


def test_evaluator_block_and_metrics(capsys):
    cfg = get_cfg_default()
    evaluator = Classification(cfg, lab2cname={0: "a", 1: "b", 2: "c"})
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0], [0, 0, 3.0]])
    labels = torch.tensor([0, 1, 1, 1])
    evaluator.process(logits, labels)
    res = evaluator.evaluate()
    out = capsys.readouterr().out
    assert "=> result\n* total: 4\n* correct: 2\n* accuracy: 50.0%\n* error: 50.0%" in out
    # per-class F1 over labels present in y_true {0, 1}: class0 2/3, class1 2*1/(2+0+2)=0.5 -> 58.33
    assert res["macro_f1"] == pytest.approx(100 * (2 / 3 + 0.5) / 2)
    assert macro_f1(labels.numpy(), logits.argmax(1).numpy()) == pytest.approx((2 / 3 + 0.5) / 2)
    assert compute_accuracy(logits, labels)[0].item() == 50.0


def test_checkpoint_files_and_weights_only(tmp_path, capsys):
    state = {"state_dict": {"module.ctx": torch.ones(2)}, "epoch": 3, "optimizer": None, "scheduler": None,
             "val_result": None}
    path = save_checkpoint(state, str(tmp_path / "prompt_learner"))
    assert os.path.basename(path) == "model.pth.tar-3"
    assert (tmp_path / "prompt_learner" / "checkpoint").read_text() == "model.pth.tar-3\n"
    loaded = torch.load(path, weights_only=True)
    assert list(loaded["state_dict"]) == ["ctx"]
    assert load_checkpoint(path)["epoch"] == 3
    assert not [p for p in os.listdir(tmp_path / "prompt_learner") if p.endswith(".tmp")]


def test_logger_renames_existing_log(tmp_path):
    import sys

    original = sys.stdout
    try:
        first = setup_logger(str(tmp_path))
        print("hello")
        second = setup_logger(str(tmp_path))
    finally:
        if hasattr(sys.stdout, "close"):
            sys.stdout.close()
        sys.stdout = original
    assert first.endswith("log.txt") and second.startswith(first + "-")
    assert "hello" in open(first).read()
