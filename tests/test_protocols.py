"""Protocol scripts end to end on synthetic data with the tiny random CLIP (CPU).

Covers: trainer/config mapping and per-dataset opts, the bash scripts (base2new, xd, dg) through
subprocess with DATA set, run-all over trainers x datasets x seeds, skip of finished runs, resume of a
killed run, the aggregate tables (HM, std, published column, cost columns) and the CoOp log parser.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import os.path as osp
import signal
import subprocess
import time

import pytest

from restore.evaluation.metrics import harmonic_mean, mean_std

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
synthetic = pytest.importorskip("restore.data.synthetic", reason="restore.data.synthetic (synthetic datasets) missing")

OPTS = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0", "DATALOADER.NUM_WORKERS",
        "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATALOADER.TEST.BATCH_SIZE", "50"]


def _env(data: str, output: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CFG", "SUB", "SHOTS", "OUTPUT", "DATA")}
    env.update({"DATA": data, "OUTPUT": output, "SHOTS": "2", "PYTHONPATH": ROOT,
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # the tiny model: threads only contend
    env.update(extra)
    return env


def _bash(script: str, args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", osp.join(ROOT, "scripts", script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data"))
    for name in ("dtd", "eurosat", "imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        synthetic.make_synthetic(name, root, num_classes=4, images_per_class=6)
    return root


def _results(path: str) -> dict:
    with open(osp.join(path, "results.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- mapping (no training)
def test_trainer_mapping_and_config_resolution(tmp_path):
    from restore import protocols as P

    assert set(P.TRAINERS) >= {"restore", "mmrl", "craft", "coop", "cocoop", "ivlp", "vpt", "maple", "promptsrc",
                               "kgcoop", "zsclip"}
    assert P.get_spec("CoOp").trainer == "CoOp" and P.get_spec("clip").trainer == "ZeroshotCLIP"
    assert P.get_spec("craft").trainer == "MaPLe" and P.get_spec("craft").label == "MaPLe+Craft"
    with pytest.raises(P.ProtocolError, match="Unknown trainer"):
        P.get_spec("nope")
    # every default config file exists (other helpers write them; this keeps the mapping honest)
    for key, spec in P.TRAINERS.items():
        for protocol in ("base2new", "xd", "fewshot"):
            path, name = P.resolve_config(spec, protocol, "dtd")
            assert osp.isfile(path) and path.endswith(name + ".yaml"), (key, protocol)
    # ImageNet's own schedule, under the grid's run-folder name (one results table for all datasets)
    path, name = P.resolve_config(P.get_spec("mmrl"), "base2new", "imagenet")
    assert osp.basename(path) == "vit_b16_base2new_imagenet.yaml" and name == "vit_b16_base2new"
    assert P.resolve_config(P.get_spec("mmrl"), "base2new", "dtd")[1] == name
    assert P.resolve_config(P.get_spec("mmrl"), "dg", "imagenet")[1] == "vit_b16_domain_generalization"
    # CFG override: a name in the trainer's folder, or a path
    assert P.resolve_config(P.get_spec("coop"), "base2new", "dtd", cfg="vit_b16")[1] == "vit_b16"
    own = tmp_path / "mine.yaml"
    own.write_text("OPTIM:\n  LR: 0.1\n")
    assert P.resolve_config(P.get_spec("coop"), "base2new", "dtd", cfg=str(own)) == (str(own), "mine")
    with pytest.raises(P.ProtocolError, match="not found"):
        P.resolve_config(P.get_spec("coop"), "base2new", "dtd", cfg="does_not_exist")


def test_dry_run_commands_and_dataset_opts_hook(capsys, tmp_path):
    from restore import protocols as P

    rc = P.main(["run-all", "base2new", "coop", "--datasets", "dtd", "--seeds", "1", "--dry-run",
                 "--data", str(tmp_path), "--output", "out", "OPTIM.MAX_EPOCH", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    train, test = lines
    assert "--trainer CoOp" in train and "configs/trainers/CoOp/" in train
    assert "out/base2new/train_base/dtd/shots_16/CoOp/" in train and train.endswith("OPTIM.MAX_EPOCH 1")
    assert "DATASET.SUBSAMPLE_CLASSES base" in train and "PROTOCOL base2new" in train
    assert "--eval-only --model-dir out/base2new/train_base/dtd/shots_16/CoOp/" in test
    assert "DATASET.SUBSAMPLE_CLASSES new" in test and "out/base2new/test_new/dtd/" in test
    # a method's per-dataset hook (RESTORE: restore_dataset_opts) lands before the user's opts
    from restore.engine.registry import TRAINER_REGISTRY

    P.trainer_class(P.get_spec("coop"))  # imports trainers/
    if "RESTORE" in TRAINER_REGISTRY.registered_names():
        opts = P.dataset_opts(P.get_spec("restore"), "dtd", "base2new")
        assert opts, "RESTORE provides per-dataset options for DTD"
        step = P.base2new_train(P.Context(data=str(tmp_path), output="out", opts=["X", "1"]), "restore", "dtd", 1)
        argv = step.train_argv(resolve_epoch=False)
        assert argv[-2:] == ["X", "1"] and " ".join(opts) in " ".join(argv)
    # few-shot and dg folders
    ctx = P.Context(data=str(tmp_path), output="out")
    assert "out/fewshot/train/eurosat/shots_4/CoOp/" in P.fewshot_train(ctx, "coop", "eurosat", 4, 2).output_dir
    dg = P.dg_test(ctx, "coop", "imagenet_a", 1)
    assert "out/dg/test/imagenet_a/shots_16/CoOp/" in dg.output_dir and "PROTOCOL" in dg.argv
    assert dg.model_dir.startswith("out/xd/train/imagenet/shots_16/CoOp/")
    assert dg.argv[dg.argv.index("PROTOCOL") + 1] == "domain_generalization"


def test_clear_errors_without_data_or_training(tmp_path):
    env = _env("", str(tmp_path / "out"))
    env.pop("DATA")
    proc = _bash("base2new/train.sh", ["coop", "dtd", "1"], env, check=False)
    assert proc.returncode == 2 and "DATA is not set" in proc.stderr
    proc = _bash("base2new/test.sh", ["coop", "dtd", "1"], _env(str(tmp_path), str(tmp_path / "out")), check=False)
    assert proc.returncode != 0 and "train the model first" in proc.stdout


# --------------------------------------------------------------------------- log parser
DASSL_LOG = """\
***************
** Arguments **
***************
Loading trainer: CoOp
epoch [1/2] batch [1/1] time 0.532 (0.532) data 0.139 (0.139) loss 0.7215 (0.7215) acc 50.0000 (50.0000) lr 2.0000e-04 eta 0:00:00
Evaluate on the *val* set
=> result
* total: 4
* correct: 1
* accuracy: 25.0%
* error: 75.0%
Checkpoint saved to output/x/prompt_learner/model.pth.tar-2
Finish training
Deploy the last-epoch model
Evaluate on the *test* set
=> result
* total: 9
* correct: 6
* accuracy: {acc}%
* error: 33.3%
* macro_f1: 60.1%
Elapsed: 0:00:01
"""


def test_coop_log_parser(tmp_path, capsys):
    from restore.evaluation import results as R

    for seed, acc in ((1, "66.7"), (2, "70.1")):
        d = tmp_path / "exp" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "log.txt").write_text(DASSL_LOG.format(acc=acc))
        (d / "log.txt-2024-01-01-00-00-00").write_text(DASSL_LOG.format(acc="1.0"))  # never read
    log = str(tmp_path / "exp" / "seed1" / "log.txt")
    assert R.parse_log(log) == 66.7  # after "Finish training", the last "* accuracy"; the val 25.0 is ignored
    assert R.parse_log(log, "Finished training") is None  # MaPLe's signal never appears in current logs
    assert R.parse_log(log, "=> result") == 66.7  # --test-log
    assert R.read_log_accuracy(str(tmp_path / "exp" / "seed2")) == 70.1
    eval_only = tmp_path / "eval.txt"
    eval_only.write_text("Loading weights\n=> result\n* total: 3\n* accuracy: 33.3%\n")
    assert R.parse_log(str(eval_only)) is None and R.parse_log(str(eval_only), "=> result") == 33.3
    assert R.main([str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    mean, std = mean_std([66.7, 70.1])
    assert f"* accuracy: {mean:.2f}% +- {std:.2f}%" in out and "accuracy: 66.70%" in out
    assert std == pytest.approx(1.7)  # population std, as parse_test_res.py


def test_aggregate_reads_coop_style_logs(tmp_path):
    from restore.evaluation.aggregate import aggregate

    for phase, acc in (("train_base", "80.0"), ("test_new", "60.0")):
        d = tmp_path / "output" / "base2new" / phase / "dtd" / "shots_16" / "MaPLe" / "cfg" / "seed1"
        d.mkdir(parents=True)
        (d / "log.txt").write_text(DASSL_LOG.format(acc=acc))
    markdown, files = aggregate(str(tmp_path / "output"), plot=False)
    row = next(r for r in csv.DictReader(open(files["base2new.csv"])) if r["dataset"] == "dtd")
    assert float(row["hm"]) == pytest.approx(harmonic_mean(80.0, 60.0), abs=1e-3)
    assert float(row["paper_hm"]) == 68.40  # MaPLe DTD in the RESTORE paper's Table 1
    assert "| DTD | 1 | 80.00 ± 0.00 | 60.00 ± 0.00 | 68.57 | 81.36 / 59.02 / 68.40 | 0.17 |" in markdown


# --------------------------------------------------------------------------- end to end
def test_base2new_grid_two_trainers_aggregate_and_skip(data_root, tmp_path, capsys):
    out = str(tmp_path / "output")
    env = _env(data_root, out)
    proc = _bash("run_all.sh", ["base2new", "coop,zsclip", "--datasets", "dtd,eurosat", "--seeds", "1,2",
                                "--in-process", *OPTS], env)
    assert "8 jobs" in proc.stdout and "16 done" in proc.stdout and "0 failed" in proc.stdout, proc.stdout[-2000:]
    runs = sorted(glob.glob(osp.join(out, "base2new", "*", "*", "shots_2", "*", "*", "seed*", "results.json")))
    assert len(runs) == 16
    # a finished grid is skipped without running anything
    before = {p: os.path.getmtime(p) for p in runs}
    proc = _bash("run_all.sh", ["base2new", "coop", "--datasets", "dtd,eurosat", "--seeds", "1,2", *OPTS], env)
    assert proc.stdout.count("skip (finished") == 8 and "8 skipped" in proc.stdout
    assert before == {p: os.path.getmtime(p) for p in runs}

    from restore.evaluation import aggregate as A

    assert A.main([out, "--out", str(tmp_path / "agg")]) == 0
    md = capsys.readouterr().out
    assert "Base-to-novel: CoOp" in md and "Base-to-novel: ZeroshotCLIP" in md and "RANDOM weights" in md
    rows = list(csv.DictReader(open(tmp_path / "agg" / "base2new.csv")))
    # check one row by hand from the results.json files
    cfg_dir = osp.dirname(glob.glob(osp.join(out, "base2new", "train_base", "eurosat", "shots_2", "CoOp", "*",
                                              "seed1"))[0])
    cfg = osp.basename(cfg_dir)
    base = [_results(osp.join(out, "base2new", "train_base", "eurosat", "shots_2", "CoOp", cfg, f"seed{s}"))["accuracy"]
            for s in (1, 2)]
    new = [_results(osp.join(out, "base2new", "test_new", "eurosat", "shots_2", "CoOp", cfg, f"seed{s}"))["accuracy"]
           for s in (1, 2)]
    bm, bs = sum(base) / 2, abs(base[0] - base[1]) / 2  # population std of two values
    nm, ns = sum(new) / 2, abs(new[0] - new[1]) / 2
    row = next(r for r in rows if r["method"] == "CoOp" and r["dataset"] == "eurosat")
    assert row["n_seeds_base"] == "2" and row["n_seeds_new"] == "2"
    assert float(row["base_mean"]) == pytest.approx(bm, abs=1e-3) and float(row["base_std"]) == pytest.approx(bs, abs=1e-3)
    assert float(row["new_mean"]) == pytest.approx(nm, abs=1e-3) and float(row["new_std"]) == pytest.approx(ns, abs=1e-3)
    assert float(row["hm"]) == pytest.approx(2 * bm * nm / (bm + nm), abs=1e-3)
    assert f"| EuroSAT | 2 | {bm:.2f} ± {bs:.2f} | {nm:.2f} ± {ns:.2f} | {2 * bm * nm / (bm + nm):.2f} |" in md
    # cost figures surface in the CSV
    assert float(row["train_wall_time_s"]) > 0 and float(row["peak_memory_mb"]) > 0
    assert row["train_images_per_s"] and row["eval_images_per_s"]
    avg = next(r for r in rows if r["method"] == "CoOp" and r["dataset"] == "average")
    dtd = next(r for r in rows if r["method"] == "CoOp" and r["dataset"] == "dtd")
    avg_b = (float(dtd["base_mean"]) + bm) / 2
    avg_n = (float(dtd["new_mean"]) + nm) / 2
    assert float(avg["hm"]) == pytest.approx(harmonic_mean(avg_b, avg_n), abs=1e-3) and avg["n_datasets"] == "2"
    zs = next(r for r in rows if r["method"] == "ZeroshotCLIP" and r["dataset"] == "dtd")
    assert zs["n_seeds_new"] == "2"
    assert (tmp_path / "agg" / "runs.csv").exists() and glob.glob(str(tmp_path / "agg" / "base2new_*.png"))
    runs_rows = list(csv.DictReader(open(tmp_path / "agg" / "runs.csv")))
    assert len(runs_rows) == 16 and all(r["wall_time_s"] for r in runs_rows)


def test_killed_run_resumes_and_finished_run_is_skipped(tmp_path):
    data = str(tmp_path / "data")
    synthetic.make_synthetic("dtd", data, num_classes=4, images_per_class=12)
    out = str(tmp_path / "output")
    env = _env(data, out, SHOTS="4")  # 2 base classes x 4 shots, batch 1: 8 steps per epoch
    opts = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "2", "OPTIM.WARMUP_EPOCH", "0",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "1", "DATALOADER.TEST.BATCH_SIZE", "50"]
    proc = subprocess.Popen(["bash", osp.join(ROOT, "scripts", "base2new", "train.sh"), "coop", "dtd", "1", *opts],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pointer = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            found = glob.glob(osp.join(out, "base2new", "train_base", "dtd", "shots_4", "CoOp", "*", "seed1",
                                       "prompt_learner", "checkpoint"))
            if found and open(found[0]).read().strip() == "model.pth.tar-1":
                pointer = found[0]
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash right after epoch 1's checkpoint
        proc.wait()
    assert pointer is not None, "the first epoch's checkpoint never appeared"
    run = osp.dirname(osp.dirname(pointer))
    assert not osp.exists(osp.join(run, "results.json")), "training finished before it could be killed"

    proc = _bash("base2new/train.sh", ["coop", "dtd", "1", *opts], env)
    logs = sorted(glob.glob(osp.join(run, "log.txt*")))
    assert len(logs) == 2  # Dassl keeps the first log and writes log.txt-<timestamp>
    resumed = open(max(logs, key=os.path.getmtime)).read()
    assert "Found checkpoint" in resumed and "Previous epoch: 1" in resumed
    assert "epoch [2/2]" in resumed and "epoch [1/2]" not in resumed
    assert _results(run)["epoch"] == 2 and osp.isfile(osp.join(run, "prompt_learner", "model.pth.tar-2"))

    proc = _bash("base2new/train.sh", ["coop", "dtd", "1", *opts], env)
    assert "skip (finished" in proc.stdout and len(glob.glob(osp.join(run, "log.txt*"))) == 2
    # the test step finds epoch 2 by itself; SUB=base re-tests the model on the base classes
    proc = _bash("base2new/test.sh", ["coop", "dtd", "1", *opts], {**env, "SUB": "base"})
    assert "--load-epoch 2" in proc.stdout
    test_base = run.replace("train_base", "test_base")
    assert _results(test_base)["accuracy"] == _results(run)["accuracy"]


def test_xd_and_dg_scripts(data_root, tmp_path):
    out = str(tmp_path / "output")
    env = _env(data_root, out)
    _bash("xd/train.sh", ["coop", "1", *OPTS], env)
    proc = _bash("xd/test_xd.sh", ["coop", "dtd,eurosat", "1", *OPTS], env)
    assert proc.stdout.count("--load-epoch 1") == 2
    _bash("xd/test_dg.sh", ["coop", "all", "1", *OPTS], env)
    src = glob.glob(osp.join(out, "xd", "train", "imagenet", "shots_2", "CoOp", "*", "seed1"))[0]
    cfg = osp.basename(osp.dirname(src))
    r = _results(src)
    assert r["protocol"] == "cross_dataset" and r["split"] == "all" and r["dataset"] == "ImageNet"
    for ds in ("dtd", "eurosat"):
        r = _results(osp.join(out, "xd", "test", ds, "shots_2", "CoOp", cfg, "seed1"))
        assert r["protocol"] == "cross_dataset" and r["epoch"] == 1 and r["num_classes"] == 4
    for ds in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        r = _results(osp.join(out, "dg", "test", ds, "shots_2", "CoOp", cfg, "seed1"))
        assert r["protocol"] == "domain_generalization" and r["num_classes"] == 4 and r["epoch"] == 1

    from restore.evaluation.aggregate import aggregate

    md, files = aggregate(out, plot=False)
    xd = list(csv.DictReader(open(files["cross_dataset.csv"])))
    assert [r["dataset"] for r in xd] == ["imagenet", "dtd", "eurosat", "average"]
    assert xd[0]["role"] == "source" and xd[-1]["n_datasets"] == "2"
    mean_targets = (float(xd[1]["mean"]) + float(xd[2]["mean"])) / 2
    assert float(xd[-1]["mean"]) == pytest.approx(mean_targets, abs=1e-3)
    dg = list(csv.DictReader(open(files["domain_generalization.csv"])))
    assert [r["dataset"] for r in dg] == ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
                                          "average"]
    assert "Cross-dataset transfer: CoOp" in md and "Domain generalization: CoOp" in md and "4/4 datasets" in md


def test_run_all_one_job_per_gpu(tmp_path, monkeypatch):
    """--gpus: one worker per id, each job's steps on one GPU (CUDA_VISIBLE_DEVICES), every step a subprocess."""
    import threading

    from restore import protocols as P

    calls, lock = [], threading.Lock()

    def fake_subprocess(argv, root, env=None, log=None):  # stands in for `python train.py ...`
        out = argv[argv.index("--output-dir") + 1]
        os.makedirs(osp.join(out, "prompt_learner"), exist_ok=True)
        open(osp.join(out, "prompt_learner", "model.pth.tar-1"), "w").close()
        with open(osp.join(out, "prompt_learner", "checkpoint"), "w") as f:
            f.write("model.pth.tar-1\n")
        time.sleep(0.05)
        with open(osp.join(out, "results.json"), "w") as f:
            json.dump({"accuracy": 50.0}, f)
        with lock:
            calls.append((out, env["CUDA_VISIBLE_DEVICES"], log, argv))
        return 0

    monkeypatch.setattr(P, "_run_subprocess", fake_subprocess)
    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=2)
    jobs = P.build_jobs(ctx, "base2new", "coop", [1, 2], "dtd,eurosat")
    outcomes = P.run_jobs(jobs, ctx.root, gpus=["0", "1"], log_dir=str(tmp_path / "logs"))
    assert [o.status for o in outcomes].count("done") == 8 and len(calls) == 8
    gpu_of = {c[0]: c[1] for c in calls}
    assert set(gpu_of.values()) == {"0", "1"}
    for job in jobs:  # training and its evaluation ran on the same GPU, evaluation with the trained epoch
        assert gpu_of[job[0].output_dir] == gpu_of[job[1].output_dir]
        test_argv = next(c[3] for c in calls if c[0] == job[1].output_dir)
        assert test_argv[test_argv.index("--load-epoch") + 1] == "1"
    assert all(c[2].startswith(str(tmp_path / "logs")) for c in calls)
    # a second pass skips everything without starting a process
    calls.clear()
    assert {o.status for o in P.run_jobs(jobs, ctx.root, gpus=["0", "1"])} == {"skipped"} and not calls


def test_fewshot_step_in_process_and_table(data_root, tmp_path, capsys):
    from restore import protocols as P
    from restore.evaluation.aggregate import aggregate

    out = str(tmp_path / "output")
    for seed in ("1", "2"):
        assert P.main(["fewshot-train", "zsclip", "dtd", "1", seed, "--data", data_root, "--output", out, *OPTS]) == 0
    runs = glob.glob(osp.join(out, "fewshot", "train", "dtd", "shots_1", "ZeroshotCLIP", "*", "seed*", "results.json"))
    assert len(runs) == 2 and all(_results(osp.dirname(r))["protocol"] == "few_shot" for r in runs)
    md, files = aggregate(out, plot=False)
    rows = list(csv.DictReader(open(files["few_shot.csv"])))
    assert len(rows) == 1 and rows[0]["n_seeds"] == "2" and rows[0]["shots"] == "1"
    assert "Few-shot: ZeroshotCLIP" in md and "| DTD |" in md
