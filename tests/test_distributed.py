"""DDP (torchrun-style, Gloo on CPU): 2 processes give the single-process loss curve, weights and results."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from restore.engine import distributed
from restore.engine.distributed import ShardedSampler, _merge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 4
EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, data_root: str, out_dir: str, result_file: str) -> None:
    """One training process: the real engine (train.py's setup) on a synthetic DTD with the tiny CLIP."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datasets  # noqa: F401
    import trainers  # noqa: F401
    from restore.engine import distributed as dist_mod
    from restore.engine.config import extend_cfg, get_cfg_default, merge_opts
    from restore.engine.trainer import build_trainer
    from restore.engine.utils import set_random_seed

    cfg = get_cfg_default()
    extend_cfg(cfg)
    merge_opts(cfg, [
        "DATASET.NAME", "DescribableTextures", "DATASET.ROOT", data_root, "OUTPUT_DIR", out_dir,
        "TRAINER.NAME", "CoOp", "TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.PREC", "fp32",
        "MODEL.BACKBONE.NAME", "tiny", "USE_CUDA", "False", "SEED", "1",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", str(GLOBAL_BATCH),
        "DATALOADER.TEST.BATCH_SIZE", "3", "INPUT.TRANSFORMS", "['normalize']",
        "OPTIM.MAX_EPOCH", str(EPOCHS), "OPTIM.LR", "0.02", "OPTIM.WARMUP_EPOCH", "0", "TRAIN.PRINT_FREQ", "1",
    ])
    cfg.freeze()
    set_random_seed(cfg.SEED)
    losses: list[float] = []
    original = dist_mod.average_summary

    def recording(summary):  # the (rank-averaged) summary the engine logs for each step
        summary = original(summary)
        losses.append(summary["loss"])
        return summary

    dist_mod.average_summary = recording
    trainer = build_trainer(cfg)
    trainer.train()
    if dist_mod.is_main_process():
        torch.save({"losses": losses, "ctx": trainer.model.prompt_learner.ctx.detach().clone(),
                    "local_batches": len(trainer.train_loader_x),
                    "local_batch_size": trainer.train_loader_x.batch_size,
                    "world": dist_mod.get_world_size()}, result_file)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from restore.data.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("ddp")
    data_root = str(base / "data")
    make_synthetic("dtd", data_root, num_classes=4, images_per_class=6, seed=0)
    single_out, ddp_out = str(base / "single"), str(base / "ddp")
    _run(0, 1, 0, data_root, single_out, str(base / "single.pt"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, 2, port, data_root, ddp_out, str(base / "ddp.pt"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return (torch.load(base / "single.pt"), torch.load(base / "ddp.pt"), single_out, ddp_out)


def test_ddp_loss_curve_and_weights_match_single_process(runs):
    single, ddp, _, _ = runs
    assert ddp["world"] == 2 and single["world"] == 1
    # BATCH_SIZE is global: each of the 2 ranks loads half of every global batch, same number of steps
    assert ddp["local_batch_size"] == GLOBAL_BATCH // 2 and single["local_batch_size"] == GLOBAL_BATCH
    assert ddp["local_batches"] == single["local_batches"] and len(single["losses"]) == EPOCHS * single["local_batches"]
    assert len(set(round(x, 6) for x in single["losses"])) > 1  # it trains
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-6, rel=1e-6)
    # final weights: equal up to fp32 round-off (grads summed in a different order) carried through 6 steps
    assert torch.allclose(ddp["ctx"], single["ctx"], rtol=1e-4, atol=1e-5)


def test_ddp_results_equal_and_only_rank0_writes(runs):
    _, _, single_out, ddp_out = runs
    with open(os.path.join(single_out, "results.json")) as f:
        single = json.load(f)
    with open(os.path.join(ddp_out, "results.json")) as f:
        ddp = json.load(f)
    for key in ("accuracy", "macro_f1", "num_test_images"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-9), key
    logs = sorted(f for f in os.listdir(ddp_out) if f.startswith("log.txt"))
    assert logs == ["log.txt"] or logs == []  # no second log file written by rank 1
    ckpts = sorted(os.listdir(os.path.join(ddp_out, "prompt_learner")))
    assert ckpts == sorted(os.listdir(os.path.join(single_out, "prompt_learner")))


def test_sharded_sampler_partitions_global_batches_without_a_group():
    order = list(range(11))
    shards = [list(ShardedSampler(order, 4, True, r, 2)) for r in range(2)]
    assert shards == [[0, 1, 4, 5], [2, 3, 6, 7]]  # last incomplete global batch dropped, as in training
    assert [len(ShardedSampler(order, 4, True, r, 2)) for r in range(2)] == [4, 4]
    evals = [list(ShardedSampler(order, 4, False, r, 3)) for r in range(3)]
    assert evals == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]] and sum(evals, []) == order
    assert [len(ShardedSampler(order, 4, False, r, 3)) for r in range(3)] == [4, 4, 3]


def test_evaluator_state_merge_and_single_process_noops():
    from collections import defaultdict

    a = {"_correct": 2, "_total": 3, "_y_true": [0, 1, 1], "_per_class_res": defaultdict(list, {0: [True]})}
    b = {"_correct": 1, "_total": 2, "_y_true": [2, 0], "_per_class_res": defaultdict(list, {0: [False], 2: [True]})}
    merged = _merge([a, b])
    assert merged["_correct"] == 3 and merged["_total"] == 5 and merged["_y_true"] == [0, 1, 1, 2, 0]
    assert dict(merged["_per_class_res"]) == {0: [True, False], 2: [True]}
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.all_reduce_sum(7) == 7 and distributed.average_summary({"loss": 1.0}) == {"loss": 1.0}
    assert distributed.shard_sampler("s", 8, True, 100) == ("s", 8)
