"""DDP (torchrun-style, Gloo on CPU): 2 processes give the single-process loss curve, weights and results.

Four jobs run in the same processes (one spawn, one import): plain CoOp; CoOp with the Craft
regularizer's batch-level terms (stochastic contrastive alignment and the MMD against a sharded
unlabelled target loader), which are only equal to one process when computed on the global batch;
CoOp with Craft's static anchors computed inside training (rank 0 alone, over every image); and
RESTORE with the feature-defined shift (a batch statistic inside a nonlinear loss).
"""

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
NUM_CLASSES = 4
TARGET_SHOTS, TARGET_BATCH = 2, 4  # Craft: 8 target images, 2 global target batches: the loader restarts in training
JOBS: dict[str, list[str]] = {  # job name -> extra opts; every job runs in the same processes
    "coop": [],
    "craft": ["TRAINER.CRAFT.ENABLED", "True", "TRAINER.CRAFT.WEIGHT_STATIC", "0.0",
              "TRAINER.CRAFT.WEIGHT_STOCHASTIC", "1.0", "TRAINER.CRAFT.MMD_WEIGHT", "1.0",
              "TRAINER.CRAFT.TARGET_DATASET", "ImageNetSketch", "TRAINER.CRAFT.TARGET_NUM_SHOTS", str(TARGET_SHOTS),
              "TRAINER.CRAFT.TARGET_BATCH_SIZE", str(TARGET_BATCH)],
    # static term with anchors computed inside training: rank 0 alone, over all anchor images
    "craft_static": ["TRAINER.CRAFT.ENABLED", "True", "TRAINER.CRAFT.WEIGHT_STATIC", "1.0",
                     "TRAINER.CRAFT.WEIGHT_STOCHASTIC", "0.0", "TRAINER.CRAFT.MMD_WEIGHT", "0.0",
                     "TRAINER.CRAFT.ANCHOR_NUM_SHOTS", "3", "TRAINER.CRAFT.ANCHOR_BATCH_SIZE", "4"],
    # RESTORE with the paper's feature-defined shift: batch statistics, references and the guided update
    "restore_feature": ["TRAINER.NAME", "RESTORE", "TRAINER.RESTORE.PREC", "fp32", "TRAINER.RESTORE.SHIFT", "feature",
                        "TRAINER.RESTORE.FEATURE_NORM", "first_step", "TRAINER.RESTORE.PROMPT_DEPTH", "3",
                        "TRAINER.RESTORE.RATIO_UPDATE_EPOCH", "0"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, data_root: str, out_base: str, result_base: str) -> None:
    """One training process: the real engine (train.py's setup), synthetic DTD, tiny CLIP; every job in turn."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datasets  # noqa: F401
    import trainers

    trainers.register_all()
    from restore.engine import distributed as dist_mod
    from restore.engine.config import extend_cfg, get_cfg_default, merge_opts
    from restore.engine.trainer import build_trainer
    from restore.engine.utils import set_random_seed

    for job, opts in JOBS.items():
        cfg = get_cfg_default()
        extend_cfg(cfg)
        merge_opts(cfg, [
            "DATASET.NAME", "DescribableTextures", "DATASET.ROOT", data_root, "OUTPUT_DIR", os.path.join(out_base, job),
            "TRAINER.NAME", "CoOp", "TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.PREC", "fp32",
            "MODEL.BACKBONE.NAME", "tiny", "USE_CUDA", "False", "SEED", "1",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", str(GLOBAL_BATCH),
            "DATALOADER.TEST.BATCH_SIZE", "3", "INPUT.TRANSFORMS", "['normalize']",
            "OPTIM.MAX_EPOCH", str(EPOCHS), "OPTIM.LR", "0.02", "OPTIM.WARMUP_EPOCH", "0", "TRAIN.PRINT_FREQ", "1",
            *opts,
        ])
        cfg.freeze()
        set_random_seed(cfg.SEED)
        steps: list[dict[str, float]] = []
        grads: list[torch.Tensor] = []
        original = dist_mod.average_summary

        def recording(summary, original=original, steps=steps, grads=grads):
            """The (rank-averaged) summary logged per step, and the (rank-averaged) gradient it stepped with."""
            summary = original(summary)
            steps.append(dict(summary))
            grads.append(trainer.model.prompt_learner.ctx.grad.detach().clone())
            return summary

        dist_mod.average_summary = recording
        try:
            trainer = build_trainer(cfg)
            trainer.train()
        finally:
            dist_mod.average_summary = original
        if dist_mod.is_main_process():
            regs = getattr(trainer, "regularizers", [])
            target = regs[0]._target_loader if regs else None
            torch.save({"losses": [s["loss"] for s in steps], "steps": steps, "grads": grads,
                        "ctx": trainer.model.prompt_learner.ctx.detach().clone(),
                        "ratios": [float(getattr(getattr(trainer.model, "restore", None), k, float("nan")))
                                   for k in ("text_ratio", "vision_ratio")],
                        "local_batches": len(trainer.train_loader_x),
                        "local_batch_size": trainer.train_loader_x.batch_size,
                        "target_batch_size": target.batch_size if target is not None else None,
                        "num_train": len(trainer.dm.dataset.train_x),
                        "train_images": trainer.train_images, "train_seconds": trainer.train_seconds,
                        "world": dist_mod.get_world_size()}, f"{result_base}.{job}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{job: (single-process result, 2-process result, single OUTPUT_DIR, 2-process OUTPUT_DIR)}."""
    from restore.datasets.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("ddp")
    data_root = str(base / "data")
    make_synthetic("dtd", data_root, num_classes=NUM_CLASSES, images_per_class=6, seed=0)
    make_synthetic("imagenet_sketch", data_root, num_classes=NUM_CLASSES, images_per_class=3, seed=0)  # Craft's target
    single_out, ddp_out = str(base / "single"), str(base / "ddp")
    _run(0, 1, 0, data_root, single_out, str(base / "single"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, 2, port, data_root, ddp_out, str(base / "ddp"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {job: (torch.load(base / f"single.{job}.pt"), torch.load(base / f"ddp.{job}.pt"),
                  os.path.join(single_out, job), os.path.join(ddp_out, job)) for job in JOBS}


def test_ddp_loss_curve_and_weights_match_single_process(runs):
    single, ddp, _, _ = runs["coop"]
    assert ddp["world"] == 2 and single["world"] == 1
    # BATCH_SIZE is global: each of the 2 ranks loads half of every global batch, same number of steps
    assert ddp["local_batch_size"] == GLOBAL_BATCH // 2 and single["local_batch_size"] == GLOBAL_BATCH
    assert ddp["local_batches"] == single["local_batches"] and len(single["losses"]) == EPOCHS * single["local_batches"]
    assert len(set(round(x, 6) for x in single["losses"])) > 1  # it trains
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-6, rel=1e-5)  # fp32 round-off: rank sums in another order
    assert torch.allclose(ddp["grads"][0], single["grads"][0], rtol=0, atol=1e-5)  # same weights, same gradient
    # final weights: equal up to fp32 round-off (grads summed in a different order) carried through 6 steps
    assert torch.allclose(ddp["ctx"], single["ctx"], rtol=1e-4, atol=1e-5)


def test_ddp_results_equal_and_only_rank0_writes(runs):
    _, _, single_out, ddp_out = runs["coop"]
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


@pytest.mark.parametrize("job", list(JOBS))
def test_ddp_train_images_count_the_global_batch(runs, job):
    """train_images (behind results.json's train_images_per_s) counts every rank's images, as one process would."""
    for result, out in zip(runs[job][:2], runs[job][2:]):
        expected = result["num_train"] // GLOBAL_BATCH * GLOBAL_BATCH * EPOCHS  # Dassl drops the last partial batch
        assert result["train_images"] == expected, (result["world"], result["train_images"], expected)
        with open(os.path.join(out, "results.json")) as f:
            rate = json.load(f)["train_images_per_s"]
        assert rate == pytest.approx(round(expected / result["train_seconds"], 2), abs=0.011)


def test_ddp_craft_batch_terms_match_single_process(runs):
    """Craft's contrastive term and MMD (target batch sharded like the training batch) equal one process.

    Both are computed on the all-gathered global batch. The min-max-scaled MMD of this tiny run is
    ill-conditioned (a 1e-7 relative change of the weights or images moves its gradient by ~5e-4 in
    ONE process), so fp32 round-off shows at that scale in the gradient and ~1e-5 in later losses;
    per-rank terms (the bug) are off by ~1 in the gradient and ~0.5 in the loss.
    """
    single, ddp, _, _ = runs["craft"]
    assert ddp["world"] == 2 and single["world"] == 1
    assert single["target_batch_size"] == TARGET_BATCH and ddp["target_batch_size"] == TARGET_BATCH // 2
    assert len(single["losses"]) == EPOCHS * single["local_batches"] > TARGET_SHOTS * NUM_CLASSES // TARGET_BATCH
    for key in ("loss", "craft_mmd", "craft_stoch"):
        curve, ddp_curve = [s[key] for s in single["steps"]], [s[key] for s in ddp["steps"]]
        assert len(set(round(x, 6) for x in curve)) > 1 and min(curve) > 0, key
        assert ddp_curve[0] == pytest.approx(curve[0], abs=1e-6, rel=1e-6), key  # same weights
        assert ddp_curve == pytest.approx(curve, abs=3e-5, rel=1e-4), key
    # the rank-averaged gradient at the same weights is the single-process gradient
    assert torch.allclose(ddp["grads"][0], single["grads"][0], rtol=0, atol=2e-3)
    assert torch.allclose(ddp["ctx"], single["ctx"], rtol=1e-3, atol=1e-4)


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
    rows = torch.ones(3, 2, requires_grad=True)
    assert distributed.all_gather_rows(rows) is rows


def test_ddp_craft_anchors_computed_in_training_equal_single_process(runs):
    from trainers.craft.anchors import ANCHOR_FILE, load_anchors

    single, ddp, single_out, ddp_out = runs["craft_static"]
    a, b = load_anchors(os.path.join(single_out, ANCHOR_FILE)), load_anchors(os.path.join(ddp_out, ANCHOR_FILE))
    assert b["counts"].tolist() == a["counts"].tolist() == [3] * NUM_CLASSES  # every anchor image, not a shard
    assert torch.allclose(a["anchors"], b["anchors"], atol=1e-6)
    assert ddp["losses"][0] == pytest.approx(single["losses"][0], abs=1e-6)
    # later steps: fp32 round-off of the rank-summed gradients, carried through the steps
    assert ddp["losses"] == pytest.approx(single["losses"], abs=3e-5, rel=1e-4)


def test_ddp_restore_feature_shift_matches_single_process(runs):
    """SHIFT feature: L_fs, its first-step references and the guided ratio update use the global batch."""
    single, ddp, _, _ = runs["restore_feature"]
    fs = [step["loss_fs"] for step in single["steps"]]
    assert fs[0] == pytest.approx(0.0, abs=1e-9) and max(fs) > 1e-6  # normalised by the first step, then moves
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5, rel=1e-5)
    assert [s["loss_fs"] for s in ddp["steps"]] == pytest.approx(fs, abs=1e-6, rel=1e-4)
    scale = float(single["grads"][1].abs().max())  # fp32 round-off of the global-batch reductions scales with it
    assert torch.allclose(ddp["grads"][1], single["grads"][1], rtol=1e-4, atol=1e-5 * scale)
    assert single["ratios"][0] > 0.1 and single["ratios"][1] > 0.1  # updated after epoch 1
    assert ddp["ratios"] == pytest.approx(single["ratios"], rel=1e-5)
