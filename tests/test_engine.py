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


def test_log_lines_reach_the_file_without_flush_and_written_files_follow_the_umask(tmp_path):
    """A killed run keeps every printed line; checkpoints / results are readable by the group as umask says."""
    import stat

    from restore.engine.utils import Logger, atomic_write_json

    log = Logger(str(tmp_path / "log.txt"))
    log.console = open(os.devnull, "w")
    log.write("epoch [63/300] loss 1.0\n")  # no flush(), as before a SIGKILL
    assert open(tmp_path / "log.txt").read() == "epoch [63/300] loss 1.0\n"
    log.close()
    old = os.umask(0o022)
    try:
        atomic_write_json({"accuracy": 1.0}, str(tmp_path / "results.json"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == 0o644


# ---------------------------------------------------------------- DDP: trainers stepping their optimizers themselves

_DDP_STEPS = 3


def _ddp_losses(model, rank, step):
    """Rank-dependent data (each rank has its own shard); step 0 on rank 0 overflows in the scaler case."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _ddp_trainer():
    from restore.engine.trainer import TrainerBase

    class Tiny(TrainerBase):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = torch.nn.Linear(3, 2)
            self.optim = torch.optim.SGD(self.model.parameters(), lr=0.5, momentum=0.9)
            self.register_model("model", self.model, self.optim)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
            self.install_scaler_sync()

    return Tiny()


def _ddp_worker(rank, world, port, out):
    """Three styles of step on 2 Gloo ranks: the engine's, the official MaPLe/IVLP one, CoOp's amp branch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):  # the flattened gradients: 3 * 2 weights + 2 biases
        if tensor.numel() == 8:
            calls.append(1)
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    result = {}
    for style in ("engine", "direct", "scaler"):
        trainer = _ddp_trainer()
        counts = []
        for step in range(_DDP_STEPS):
            calls.clear()
            loss = _ddp_losses(trainer.model, rank, step)
            if style == "engine":
                trainer.model_backward_and_update(loss)
            elif style == "direct":
                trainer.optim.zero_grad()
                loss.backward()
                trainer.optim.step()
            else:  # a non-finite gradient on rank 0 only: every rank must skip that step together
                trainer.optim.zero_grad()
                trainer.scaler.scale(loss * (float("inf") if step == 0 and rank == 0 else 1.0)).backward()
                trainer.scaler.step(trainer.optim)
                trainer.scaler.update()
            counts.append(len(calls))
        result[style] = {"weight": [p.detach().clone() for p in trainer.model.parameters()], "counts": counts,
                         "scale": trainer.scaler.get_scale()}
    torch.save(result, f"{out}.{rank}.pt")
    dist.all_reduce = all_reduce
    dist.barrier()  # both ranks done before either tears down its Gloo pairs (else: abort at exit)
    dist.destroy_process_group()


def _ddp_reference(skip_first):
    """One process, the mean of both ranks' losses (= the average of their gradients)."""
    trainer = _ddp_trainer()
    for step in range(_DDP_STEPS):
        if skip_first and step == 0:
            continue
        trainer.optim.zero_grad()
        ((_ddp_losses(trainer.model, 0, step) + _ddp_losses(trainer.model, 1, step)) / 2).backward()
        trainer.optim.step()
    return [p.detach() for p in trainer.model.parameters()]


def test_ddp_averages_gradients_once_for_trainers_stepping_optimizers_themselves(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path / "r"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():  # mismatched collectives hang: that is a failure too
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"r.{r}.pt") for r in range(2)]
    for style in ("engine", "direct", "scaler"):
        expected = _ddp_reference(skip_first=style == "scaler")
        for r in ranks:
            for got, want in zip(r[style]["weight"], expected):
                assert torch.allclose(got, want, atol=1e-6), (style, got, want)
            assert r[style]["counts"] == [1] * _DDP_STEPS, style  # averaged exactly once per step
    assert ranks[0]["scaler"]["scale"] == ranks[1]["scaler"]["scale"] == 2.0 ** 3  # both backed off once


# ---------------------------------------------------------------- train.py: crash, resume, eval-only


class _Crash(Exception):
    pass


def _train_args(data, out, *extra):
    return ["--root", str(data), "--trainer", "CoOp", "--seed", "1", "--output-dir", str(out),
            "--dataset-config-file", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "datasets",
                                                  "dtd.yaml"),
            *extra, "MODEL.BACKBONE.NAME", "tiny", "TRAINER.COOP.N_CTX", "2", "OPTIM.MAX_EPOCH", "4",
            "OPTIM.WARMUP_EPOCH", "0", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "2",
            "DATALOADER.TEST.BATCH_SIZE", "8", "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base",
            "INPUT.TRANSFORMS", "['normalize']", "USE_CUDA", "False"]


def _coop_parse(log):
    """CoOp's parse_test_res.py: only log.txt, only after 'Finish training', the last '* accuracy' wins."""
    import re

    found = None
    seen_end = False
    for line in log.splitlines():
        seen_end = seen_end or "Finish training" in line
        match = re.search(r"\* accuracy: ([\.\deE+-]+)%", line)
        if seen_end and match:
            found = float(match.group(1))
    return found


def test_crash_then_resume_keeps_log_and_only_the_final_checkpoint(tmp_path, monkeypatch):
    """A run killed after epoch 2 of 4 and resumed: its log.txt continues (CoOp's parser finds the
    result), and the crashed run's resume-only model.pth.tar-2 is gone once epoch 3 is saved."""
    import json

    from helpers import run_train_py

    from restore.datasets.synthetic import make_synthetic
    from restore.engine.trainer import SimpleTrainer

    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic("dtd", str(data), num_classes=4, images_per_class=4)
    original = SimpleTrainer.after_epoch

    def crash_after_epoch_2(self):
        original(self)
        if self.epoch + 1 == 2:
            raise _Crash

    monkeypatch.setattr(SimpleTrainer, "after_epoch", crash_after_epoch_2)
    with pytest.raises(_Crash):
        run_train_py(_train_args(data, out))
    monkeypatch.setattr(SimpleTrainer, "after_epoch", original)
    assert sorted(os.listdir(out / "prompt_learner")) == ["checkpoint", "model.pth.tar-2"]
    assert not (out / "results.json").exists()

    assert run_train_py(_train_args(data, out)) == 0
    assert sorted(os.listdir(out / "prompt_learner")) == ["checkpoint", "model.pth.tar-4"]
    assert sorted(f for f in os.listdir(out) if f.startswith("log.txt")) == ["log.txt"]
    log = (out / "log.txt").read_text()
    crashed, resumed = log.split("\n=== resumed ", 1)
    assert "epoch [2/4]" in crashed and "Finish training" not in crashed
    assert "Previous epoch: 2" in resumed and "epoch [3/4]" in resumed and "epoch [1/4]" not in resumed
    record = json.load(open(out / "results.json"))
    accuracy = record["accuracy"]
    assert _coop_parse(log) == round(accuracy, 1)
    # what the number was computed with: versions, precision, and the whole config (yacs-loadable)
    assert record["versions"]["torch"] == torch.__version__ and record["precision"] == "fp32"
    from restore.engine.config import get_cfg_default as fresh_cfg
    from restore.engine.config import extend_cfg as fresh_extend

    saved = fresh_cfg()
    fresh_extend(saved)
    saved.merge_from_file(str(out / "config.yaml"))
    assert (saved.TRAINER.NAME, saved.OPTIM.MAX_EPOCH, saved.OUTPUT_DIR) == ("CoOp", 4, str(out))

    # a finished run re-run with --overwrite starts a new log file, as Dassl does
    assert run_train_py(_train_args(data, out, "--overwrite", "OPTIM.MAX_EPOCH", "1")) == 0
    assert len([f for f in os.listdir(out) if f.startswith("log.txt-")]) == 1

    # --eval-only evaluates every time (as CoOp), even where results.json exists
    ev = tmp_path / "eval"
    for _ in range(2):
        assert run_train_py(_train_args(data, ev, "--eval-only", "--model-dir", str(out), "--load-epoch", "4")) == 0
        record = json.load(open(ev / "results.json"))
        assert record["accuracy"] == accuracy and record["epoch"] == 4
        (ev / "results.json").write_text("{}")
    assert len([f for f in os.listdir(ev) if f.startswith("log.txt")]) == 2  # eval-only: Dassl's new file


def test_resume_only_checkpoint_of_a_resumed_epoch(tmp_path):
    from restore.engine.trainer import TrainerBase, TrainerX

    def trainer(freq, start, directory):
        t = object.__new__(TrainerX)
        TrainerBase.__init__(t)  # the model registry only
        t.register_model("prompt_learner", torch.nn.Linear(1, 1))
        t.cfg = get_cfg_default()
        t.cfg.TRAIN.CHECKPOINT_FREQ = freq
        t.max_epoch, t.start_epoch, t.output_dir = 4, start, str(tmp_path)
        return t.resumed_resume_only_paths(directory)

    assert trainer(0, 2, str(tmp_path)) == [str(tmp_path / "prompt_learner" / "model.pth.tar-2")]
    assert trainer(2, 2, str(tmp_path)) == []  # a CHECKPOINT_FREQ epoch stays
    assert trainer(0, 4, str(tmp_path)) == [] and trainer(0, 0, str(tmp_path)) == []  # last epoch / fresh start
    assert trainer(0, 2, str(tmp_path / "elsewhere")) == []  # --resume from another run's folder: never delete there
