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


def _optim_and_sched(**overrides):
    cfg = get_cfg_default()
    for key, value in overrides.items():
        cfg.OPTIM[key] = value
    optim = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.OPTIM)
    return optim, build_lr_scheduler(optim, cfg.OPTIM)


def _lr_sequence(epochs, optim, sched):
    """The LR in effect during each of ``epochs`` epochs, stepping the scheduler once per epoch."""
    lrs = []
    for _ in range(epochs):
        lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    return lrs


def test_maple_lr_sequence_matches_dassl():
    lrs = _lr_sequence(5, *_optim_and_sched(NAME="sgd", LR=0.0035, MAX_EPOCH=5, LR_SCHEDULER="cosine",
                                            WARMUP_EPOCH=1, WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5))
    assert lrs == pytest.approx([1e-5, 0.0035, 0.003166, 0.002291, 0.001209], abs=1e-6)


def test_linear_warmup_and_no_recount_sequences():
    lrs = _lr_sequence(10, *_optim_and_sched(NAME="sgd", LR=0.01, MAX_EPOCH=10, LR_SCHEDULER="cosine",
                                             WARMUP_EPOCH=3, WARMUP_TYPE="linear"))
    assert lrs == pytest.approx([1e-5, 0.00333, 0.00667, 0.01, 0.00976, 0.00905, 0.00794, 0.00655, 0.005, 0.00345], abs=1e-5)
    lrs = _lr_sequence(10, *_optim_and_sched(NAME="sgd", LR=0.01, MAX_EPOCH=10, LR_SCHEDULER="cosine",
                                             WARMUP_EPOCH=2, WARMUP_TYPE="constant", WARMUP_RECOUNT=False))
    assert lrs == pytest.approx([1e-5, 1e-5, 0.01, 0.00878, 0.00724, 0.00553, 0.00382, 0.00228, 0.00106, 0.00027], abs=1e-5)


def test_warmup_scheduler_state_loads_weights_only_and_resumes(tmp_path):
    """A warmup scheduler saved after 2 epochs loads with weights_only=True and continues the same sequence."""
    kw = dict(NAME="sgd", LR=0.0035, MAX_EPOCH=5, LR_SCHEDULER="cosine", WARMUP_EPOCH=1, WARMUP_TYPE="constant")
    optim, sched = _optim_and_sched(**kw)
    _lr_sequence(2, optim, sched)
    torch.save({"scheduler": sched.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["scheduler"]
    assert state["successor"]["T_max"] == 5.0
    resumed_optim, resumed_sched = _optim_and_sched(**kw)
    resumed_sched.load_state_dict(state)
    resumed_optim.param_groups[0]["lr"] = resumed_sched.get_last_lr()[0]
    assert _lr_sequence(3, resumed_optim, resumed_sched) == pytest.approx([0.003166, 0.002291, 0.001209], abs=1e-6)


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
