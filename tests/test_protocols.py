"""Protocol scripts end to end on synthetic data with the tiny random CLIP (CPU).

Covers: trainer/config mapping and per-dataset opts, the bash scripts (base2new, xd, dg) through
subprocess with DATA set, run-all over trainers x datasets x seeds, skip of finished runs, resume of a
killed run, the aggregate tables (HM, std, published column, cost columns) and the CoOp log parser.
Also: --overwrite retrains from scratch (old folder moved aside), a finished run with other opts is
refused, xd / dg targets only, averages over the protocol's own targets (partial k/N), the published
row chosen by config (MMRL*, RESTORE-on-IVLP, MaPLe 5 / 10 epochs), the paper HM recomputed from base
and new, SHOTS validation, and failure messages that point to a log only if it exists. Also: SIGTERM /
Ctrl-C to run_all.sh stop its train.py children (also with --gpus) with one line and exit 143 / 130, and
the same command resumes; a step whose folder another run holds fails before writing; the help text
and the summary line. Scripts whose behaviour is not process-level run as bash runs them with their Python
step in this process (``_script_here``): one import of torch for the module, not one per command.
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
synthetic = pytest.importorskip("restore.datasets.synthetic", reason="restore.datasets.synthetic (synthetic datasets) missing")

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


_SCRIPT_ENV = ("DATA", "OUTPUT", "SHOTS", "CFG", "SUB")


def _script_here(script: str, args: list[str], env: dict[str, str], monkeypatch, capsys,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``bash scripts/SCRIPT args`` with its Python step in this process.

    bash runs the script with ``PYTHON=echo``: after its own checks and exports it prints the command it
    would ``exec``; that ``-m restore.protocols ...`` command then runs here through ``protocols.main``
    with the script's environment (DATA, OUTPUT, SHOTS, CFG, SUB). Output and status as from the script.
    """
    from restore import protocols as P

    echoed = _bash(script, args, {**env, "PYTHON": "echo"}).stdout.split()
    assert echoed[:2] == ["-m", "restore.protocols"] and len(echoed) == len(args) + 3, echoed  # no spaces in args
    for key in _SCRIPT_ENV:
        if key in env:
            monkeypatch.setenv(key, env[key])
        else:
            monkeypatch.delenv(key, raising=False)
    capsys.readouterr()
    rc = P.main(echoed[2:])
    captured = capsys.readouterr()
    proc = subprocess.CompletedProcess(["bash", script, *args], rc, captured.out, captured.err)
    if check and rc != 0:
        raise AssertionError(f"{script} {args} failed ({rc}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
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
    from restore.methods import list_methods

    P.get_spec("coop")  # loads the plugins
    methods = {s.key: s for s in list_methods()}
    assert set(methods) >= {"restore", "mmrl", "craft", "coop", "cocoop", "ivlp", "vpt", "maple", "promptsrc",
                               "kgcoop", "zsclip"}
    assert P.get_spec("CoOp").trainer == "CoOp" and P.get_spec("clip").trainer == "ZeroshotCLIP"
    assert P.get_spec("craft").trainer == "MaPLe" and P.get_spec("craft").display == "MaPLe+Craft"
    with pytest.raises(P.ProtocolError, match="Unknown trainer"):
        P.get_spec("nope")
    # every default config file exists (other helpers write them; this keeps the mapping honest)
    for key, spec in methods.items():
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


def test_dry_run_commands(capsys, tmp_path):
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
    # a method's dataset overrides are not in the command (the launcher applies them, once, as values)
    step = P.base2new_train(P.Context(data=str(tmp_path), output="out", opts=["X", "1"]), "restore", "dtd", 1)
    argv = step.train_argv(resolve_epoch=False)
    assert argv[-2:] == ["X", "1"] and "TRAINER.RESTORE.VISION_RATIO" not in argv
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
    moved = tmp_path / "exp" / "seed1.old-20260101-000000"  # what --overwrite moved aside: never a seed
    moved.mkdir()
    (moved / "log.txt").write_text(DASSL_LOG.format(acc="5.0"))
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
    # MaPLe DTD in the RESTORE paper's Table 1: 81.36 / 59.02, printed HM 68.40; compared: HM(81.36, 59.02)
    assert float(row["paper_hm"]) == pytest.approx(harmonic_mean(81.36, 59.02), abs=1e-3)
    assert float(row["paper_hm_printed"]) == 68.40
    assert "| DTD | 1 | 80.00 ± 0.00 | 60.00 ± 0.00 | 68.57 | 81.36 / 59.02 / 68.41 | -1.36 | 0.98 | 0.16 |" in markdown


# --------------------------------------------------------------------------- end to end
def test_base2new_grid_two_trainers_aggregate_and_skip(data_root, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "output")
    env = _env(data_root, out)
    proc = _script_here("run_all.sh", ["base2new", "coop,zsclip", "--datasets", "dtd,eurosat", "--seeds", "1,2",
                                       "--in-process", *OPTS], env, monkeypatch, capsys)
    assert "8 jobs" in proc.stdout and "16 done" in proc.stdout and "0 failed" in proc.stdout, proc.stdout[-2000:]
    runs = sorted(glob.glob(osp.join(out, "base2new", "*", "*", "shots_2", "*", "*", "seed*", "results.json")))
    assert len(runs) == 16
    # a finished grid is skipped without running anything
    before = {p: os.path.getmtime(p) for p in runs}
    proc = _script_here("run_all.sh", ["base2new", "coop", "--datasets", "dtd,eurosat", "--seeds", "1,2", *OPTS], env,
                        monkeypatch, capsys)
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


def test_killed_run_resumes_and_finished_run_is_skipped(tmp_path, monkeypatch, capsys):
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

    proc = _script_here("base2new/train.sh", ["coop", "dtd", "1", *opts], env, monkeypatch, capsys)
    logs = sorted(glob.glob(osp.join(run, "log.txt*")))
    # the resumed run continues log.txt after a "=== resumed" line (CoOp's parser reads only log.txt)
    assert [osp.basename(p) for p in logs] == ["log.txt"]
    resumed = open(logs[0]).read().split("=== resumed ", 1)[1]
    assert "Found checkpoint" in resumed and "Previous epoch: 1" in resumed
    assert "epoch [2/2]" in resumed and "epoch [1/2]" not in resumed
    assert _results(run)["epoch"] == 2 and osp.isfile(osp.join(run, "prompt_learner", "model.pth.tar-2"))

    proc = _script_here("base2new/train.sh", ["coop", "dtd", "1", *opts], env, monkeypatch, capsys)
    assert "skip (finished" in proc.stdout and len(glob.glob(osp.join(run, "log.txt*"))) == len(logs)
    # the test step finds epoch 2 by itself; SUB=base re-tests the model on the base classes
    proc = _script_here("base2new/test.sh", ["coop", "dtd", "1", *opts], {**env, "SUB": "base"}, monkeypatch, capsys)
    assert "--load-epoch 2" in proc.stdout
    test_base = run.replace("train_base", "test_base")
    assert _results(test_base)["accuracy"] == _results(run)["accuracy"]


def test_xd_and_dg_scripts(data_root, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "output")
    env = _env(data_root, out)
    _script_here("xd/train.sh", ["coop", "1", *OPTS], env, monkeypatch, capsys)
    proc = _script_here("xd/test_xd.sh", ["coop", "dtd,eurosat", "1", *OPTS], env, monkeypatch, capsys)
    assert proc.stdout.count("--load-epoch 1") == 2
    _script_here("xd/test_dg.sh", ["coop", "all", "1", *OPTS], env, monkeypatch, capsys)
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


# --------------------------------------------------------------------------- audit fixes
def _fake_run(root, protocol_dir, phase, dataset, method, cfg, seed, accuracy, shots=16, **info) -> str:
    """A finished run in the output layout (results.json only), as the tables read it."""
    from restore.evaluation.results import run_dir

    folder = run_dir(root, protocol_dir, phase, dataset, shots, method, cfg, seed)
    os.makedirs(folder, exist_ok=True)
    with open(osp.join(folder, "results.json"), "w") as f:
        json.dump({"accuracy": accuracy, "backbone": "ViT-B/16", **info}, f)
    return folder


def _main(*argv: str) -> int:
    from restore import protocols as P

    return P.main(list(argv))


def test_overwrite_retrains_from_scratch_keeps_old_run_and_retests(data_root, tmp_path, capsys):
    """--overwrite of a training step: old folder moved aside, a real training (not a re-test of the final
    checkpoint), the evaluation then sees the new model, and the tables ignore the moved-aside run."""
    from restore.evaluation.results import collect_runs

    out = str(tmp_path / "output")
    common = ["--data", data_root, "--output", out, "--shots", "2", *OPTS]
    assert _main("base2new-train", "coop", "dtd", "1", *common) == 0
    assert _main("base2new-test", "coop", "dtd", "1", *common) == 0
    train = glob.glob(osp.join(out, "base2new", "train_base", "dtd", "shots_2", "CoOp", "*", "seed1"))[0]
    test = train.replace("train_base", "test_new")
    first = _results(train)
    assert first["epoch"] == 1 and first["train_images_per_s"]
    capsys.readouterr()

    assert _main("base2new-train", "coop", "dtd", "1", "--overwrite", *common) == 0
    printed = capsys.readouterr().out
    again = _results(train)
    assert again["epoch"] == 1 and again["train_images_per_s"], again  # trained, not a re-test (epoch 0, null)
    old = glob.glob(train + ".old-*")
    assert len(old) == 1 and f"moved the previous run {train} aside to {old[0]}" in printed
    assert _results(old[0]) == first and osp.isfile(osp.join(old[0], "log.txt"))  # kept as it was
    assert "Found checkpoint" not in open(osp.join(train, "log.txt")).read()
    assert again["wall_time_s"] > 0 and sorted(glob.glob(osp.join(train, "log.txt*"))) == [osp.join(train, "log.txt")]

    # the evaluation is redone on the new model (not skipped as finished)
    assert _main("base2new-test", "coop", "dtd", "1", *common) == 0
    printed = capsys.readouterr().out
    assert "skip (finished" not in printed and "run base2new test_new" in printed
    record = json.load(open(osp.join(test, "protocol_opts.json")))
    assert record["model_run_id"] == json.load(open(osp.join(train, "protocol_opts.json")))["run_id"]
    # the old evaluation was moved aside: log.txt (what CoOp's parse_test_res.py reads) holds the new result
    assert f"moved the previous run {test} aside" in printed and len(glob.glob(test + ".old-*")) == 1
    assert sorted(glob.glob(osp.join(test, "log.txt*"))) == [osp.join(test, "log.txt")]
    from restore.evaluation.results import parse_log
    assert parse_log(osp.join(test, "log.txt"), "=> result") == round(_results(test)["accuracy"], 1)
    # moved-aside folders are not runs of the tables
    assert sorted(r.path for r in collect_runs(out)) == sorted([test, train])


def test_evaluation_of_a_retraining_model_is_not_skipped(tmp_path):
    """A training redone (new run id) makes its finished evaluations stale even before it finishes."""
    from restore import protocols as P

    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=2, check_data=False)
    train, test = P.base2new_train(ctx, "coop", "dtd", 1), P.base2new_test(ctx, "coop", "dtd", 1)
    train.write_record()
    test.write_record()
    os.makedirs(test.output_dir, exist_ok=True)
    with open(test.results_path(), "w") as f:
        json.dump({"accuracy": 1.0}, f)
    assert test.is_done()
    assert P.move_aside(train.output_dir).startswith(train.output_dir + ".old-")  # what --overwrite does first
    train.write_record()  # the new training has started (new run id), it has no results yet
    assert not test.is_done()


def test_finished_run_with_other_opts_is_refused(data_root, tmp_path, capsys):
    """A quick try (tiny backbone, 1 epoch) is not skipped as 'finished' for a command with other opts."""
    from restore import protocols as P

    out = str(tmp_path / "output")
    common = ["--data", data_root, "--output", out, "--shots", "2"]
    assert _main("base2new-train", "coop", "dtd", "1", *common, *OPTS) == 0
    run = glob.glob(osp.join(out, "base2new", "train_base", "dtd", "shots_2", "CoOp", "*", "seed1"))[0]
    record = json.load(open(osp.join(run, "protocol_opts.json")))
    assert record["opts"] == OPTS
    capsys.readouterr()
    # the same opts (also with another worker count): skipped
    same = [*OPTS[:-6], "DATALOADER.NUM_WORKERS", "2", *OPTS[-4:]]
    assert _main("base2new-train", "coop", "dtd", "1", *common, *same) == 0
    assert "skip (finished" in capsys.readouterr().out
    # the real command (no opts: the config's ViT-B/16, full schedule): one line, what differs, what to do
    assert _main("base2new-train", "coop", "dtd", "1", *common) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "skip (finished" not in captured.out and len(err.splitlines()) == 1, captured
    assert err.startswith(f"error: {run} holds a finished run with other options")
    assert "MODEL.BACKBONE.NAME tiny -> <not set>" in err and "OPTIM.MAX_EPOCH 1 -> <not set>" in err
    assert "--overwrite" in err and "OUTPUT=" in err
    # another value: named as such; the evaluation step checks its own record the same way
    changed = [*OPTS[:3], "2", *OPTS[4:]]
    assert _main("base2new-train", "coop", "dtd", "1", *common, *changed) == 2
    assert "OPTIM.MAX_EPOCH 1 -> 2" in capsys.readouterr().err
    assert _main("base2new-test", "coop", "dtd", "1", *common, *OPTS) == 0
    assert _main("base2new-test", "coop", "dtd", "1", *common, *changed) == 2
    assert "test_new" in capsys.readouterr().err
    # run-all: the job fails with the sentence, nothing is run
    ctx = P.Context(data=data_root, output=out, shots=2, opts=changed)
    outcomes = P.run_jobs(P.build_jobs(ctx, "base2new", "coop", [1], "dtd"), ctx.root)
    assert [o.status for o in outcomes] == ["failed", "not-run"] and "OPTIM.MAX_EPOCH 1 -> 2" in outcomes[0].message
    # a run from before the record existed: its results.json's backbone is compared with the config's
    os.remove(osp.join(run, "protocol_opts.json"))
    assert _main("base2new-train", "coop", "dtd", "1", *common) == 2
    assert "backbone 'tiny', not the 'ViT-B/16' asked for" in capsys.readouterr().err
    # --overwrite redoes it (the opts of the new run are recorded)
    assert _main("base2new-train", "coop", "dtd", "1", *common, "--overwrite", *changed) == 0
    assert json.load(open(osp.join(run, "protocol_opts.json")))["opts"] == changed and _results(run)["epoch"] == 2


def test_evaluation_without_the_training_opts_is_refused(data_root, tmp_path, capsys):
    """README's quick try: train.sh with the tiny options, then test.sh without them -> one sentence, not a
    ViT-B/16 load error; the schedule (OPTIM.*) may differ, the backbone may not."""
    out = str(tmp_path / "output")
    common = ["--data", data_root, "--output", out, "--shots", "2"]
    assert _main("base2new-train", "coop", "dtd", "1", *common, *OPTS) == 0
    capsys.readouterr()
    assert _main("base2new-test", "coop", "dtd", "1", *common) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained with" in err and "MODEL.BACKBONE.NAME tiny" in err
    assert "pass the training step's trailing options" in err
    schedule_only = [o for k, v in zip(OPTS[0::2], OPTS[1::2]) if not k.startswith("OPTIM.") for o in (k, v)]
    assert _main("base2new-test", "coop", "dtd", "1", *common, *schedule_only) == 0


def test_partly_trained_run_with_other_opts_is_not_resumed(tmp_path):
    from restore import protocols as P

    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=2, opts=["OPTIM.MAX_EPOCH", "1"])
    step = P.base2new_train(ctx, "coop", "dtd", 1)
    step.write_record()
    assert step.mismatch() is None  # nothing trained yet (e.g. train.py failed on a config error): no check
    os.makedirs(osp.join(step.output_dir, "prompt_learner"))
    open(osp.join(step.output_dir, "prompt_learner", "checkpoint"), "w").write("model.pth.tar-1\n")
    other = P.base2new_train(P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=2), "coop", "dtd", 1)
    assert "partly trained run" in other.mismatch() and step.mismatch() is None


def test_transfer_targets_are_restricted(tmp_path, capsys):
    from restore import protocols as P

    ctx = P.Context(data=str(tmp_path), output="out")
    with pytest.raises(P.ProtocolError, match="imagenet_a is not a cross-dataset target.*use scripts/xd/test_dg.sh"):
        P.xd_test(ctx, "coop", "imagenet_a", 1)
    with pytest.raises(P.ProtocolError, match="dtd is not a domain-generalization target.*imagenetv2"):
        P.dg_test(ctx, "coop", "dtd", 1)
    with pytest.raises(P.ProtocolError, match="imagenet is not a cross-dataset target"):
        P.xd_test(ctx, "coop", "imagenet", 1)
    with pytest.raises(P.ProtocolError, match="not a domain-generalization target"):
        P.build_jobs(ctx, "dg", "coop", [1], "imagenet_a,eurosat")
    assert len(P.build_jobs(ctx, "xd", "coop", [1])[0]) == 1 + 10 + 4
    assert _main("xd-test", "coop", "imagenet_r,dtd", "1", "--data", str(tmp_path), "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "imagenet_r is not a cross-dataset target" in err


def test_transfer_and_base2new_averages_over_own_targets_only(tmp_path):
    from restore.evaluation.aggregate import aggregate

    out = str(tmp_path / "output")
    cfg = "vit_b16_c2_ep5_batch4_2ctx_cross_datasets"
    _fake_run(out, "xd", "train", "imagenet", "MaPLe", cfg, 1, 70.0)
    for ds, acc in (("imagenetv2", 60.0), ("imagenet_a", 50.0), ("dtd", 10.0), ("eurosat", 20.0)):
        _fake_run(out, "dg", "test", ds, "MaPLe", cfg, 1, acc)  # dtd, eurosat: written by an old runner
    for ds, acc in (("dtd", 40.0), ("imagenet_sketch", 99.0)):
        _fake_run(out, "xd", "test", ds, "MaPLe", cfg, 1, acc)
    md, files = aggregate(out, plot=False)
    dg = {r["dataset"]: r for r in csv.DictReader(open(files["domain_generalization.csv"]))}
    assert dg["dtd"]["role"] == "other" and dg["eurosat"]["role"] == "other" and dg["imagenetv2"]["role"] == "target"
    assert float(dg["average"]["mean"]) == pytest.approx(55.0)  # imagenetv2 and imagenet_a only
    avg = dg["average"]
    assert avg["n_datasets"] == "2" and avg["n_targets"] == "4" and avg["partial"] == "True"
    assert dg["average"]["paper"] == "" and dg["dtd"]["paper"] == ""
    xd = {r["dataset"]: r for r in csv.DictReader(open(files["cross_dataset.csv"]))}
    assert float(xd["average"]["mean"]) == pytest.approx(40.0) and xd["imagenet_sketch"]["role"] == "other"
    assert "| **Average (targets)** | partial 2/4 datasets | 55.00 | – | – |" in md
    assert "| **Average (targets)** | partial 1/10 datasets | 40.00 | – | – |" in md
    assert "4/4 datasets" not in md and "| DTD (not a target, not averaged) |" in md
    # all four targets: complete, compared with the paper's average
    for ds, acc in (("imagenet_sketch", 40.0), ("imagenet_r", 70.0)):
        _fake_run(out, "dg", "test", ds, "MaPLe", cfg, 1, acc)
    md, files = aggregate(out, plot=False)
    dg = {r["dataset"]: r for r in csv.DictReader(open(files["domain_generalization.csv"]))}
    assert float(dg["average"]["mean"]) == pytest.approx(55.0) and dg["average"]["partial"] == "False"
    assert float(dg["average"]["paper"]) == 59.97  # MaPLe in the RESTORE paper's Table 3
    assert "| **Average (targets)** | 4/4 datasets | 55.00 | 59.97 | -4.97 |" in md
    # base-to-novel: a dataset outside the 11 is listed but not averaged; 2 of 11 is partial
    for ds, (b, n) in (("dtd", (80.0, 60.0)), ("eurosat", (90.0, 70.0)), ("imagenet_a", (10.0, 10.0))):
        _fake_run(out, "base2new", "train_base", ds, "CoOp", "c", 1, b)
        _fake_run(out, "base2new", "test_new", ds, "CoOp", "c", 1, n)
    md, files = aggregate(out, plot=False)
    b2n = {r["dataset"]: r for r in csv.DictReader(open(files["base2new.csv"]))}
    assert float(b2n["average"]["base_mean"]) == pytest.approx(85.0) and b2n["average"]["partial"] == "True"
    assert b2n["imagenet_a"]["role"] == "other" and "partial 2/11 datasets" in md


def test_published_row_follows_the_config(tmp_path):
    from restore.evaluation import aggregate as A

    assert A.published_method("MMRL", "vit_b16_base2new_light") == "MMRL*"
    assert A.published_method("MMRL", "vit_b16_base2new") == "MMRL"
    assert A.published_method("RESTORE", "vit_b16_c2_ep10_batch4_2+2ctx_ivlp") is None
    assert A.published_method("RESTORE", "vit_b16_c2_ep10_batch4_2ctx") == "MaPLe+RESTORE"
    assert A.published_method("RESTORE", "vit_b16_c2_ep10_batch4_4+4ctx_promptsrc") == "PromptSRC+RESTORE"
    assert A.published_method("MaPLe", "vit_b16_c2_ep10_batch4_2ctx") == "MaPLe"  # RESTORE's 10-epoch re-run
    assert A.published_method("MaPLe", "vit_b16_c2_ep5_batch4_2ctx") == "MaPLe (MaPLe paper)"
    published = A.load_published()["base2new"]
    assert {k: published[("MMRL*", "average")][k] for k in ("base", "new", "hm")} == \
        {"base": 85.27, "new": 76.85, "hm": 80.84}
    assert ("MMRL*", "eurosat") not in published  # only the average is published
    assert published[("MaPLe (MaPLe paper)", "average")]["hm"] == 78.55

    out = str(tmp_path / "output")
    for ds in A.BASE2NEW_DATASETS:
        _fake_run(out, "base2new", "train_base", ds, "MMRL", "vit_b16_base2new_light", 1, 85.0)
        _fake_run(out, "base2new", "test_new", ds, "MMRL", "vit_b16_base2new_light", 1, 77.0)
    for cfg in ("vit_b16_c2_ep10_batch4_2ctx", "vit_b16_c2_ep5_batch4_2ctx"):
        _fake_run(out, "base2new", "train_base", "dtd", "MaPLe", cfg, 1, 80.0)
        _fake_run(out, "base2new", "test_new", "dtd", "MaPLe", cfg, 1, 60.0)
    _fake_run(out, "base2new", "train_base", "dtd", "RESTORE", "vit_b16_c2_ep10_batch4_2+2ctx_ivlp", 1, 80.0)
    _fake_run(out, "base2new", "test_new", "dtd", "RESTORE", "vit_b16_c2_ep10_batch4_2+2ctx_ivlp", 1, 60.0)
    md, files = A.aggregate(out, plot=False)
    rows = {(r["method"], r["cfg"], r["dataset"]): r for r in csv.DictReader(open(files["base2new.csv"]))}
    light = rows[("MMRL", "vit_b16_base2new_light", "average")]
    paper = tuple(float(light[k]) for k in ("paper_base", "paper_new", "paper_hm_printed"))
    assert paper == (85.27, 76.85, 80.84)
    assert rows[("MMRL", "vit_b16_base2new_light", "eurosat")]["paper_hm"] == ""  # not full MMRL's 87.21
    assert "Paper: `MMRL*`." in md
    ivlp = rows[("RESTORE", "vit_b16_c2_ep10_batch4_2+2ctx_ivlp", "dtd")]
    assert ivlp["paper_base"] == "" and ivlp["paper_hm"] == ""  # not MaPLe+RESTORE's 82.79 / 61.83
    assert "Paper: none (no published row for config `vit_b16_c2_ep10_batch4_2+2ctx_ivlp`)." in md
    assert float(rows[("MaPLe", "vit_b16_c2_ep10_batch4_2ctx", "dtd")]["paper_base"]) == 81.36  # RESTORE Table 1
    assert float(rows[("MaPLe", "vit_b16_c2_ep5_batch4_2ctx", "dtd")]["paper_base"]) == 80.36  # MaPLe's own


def test_paper_hm_is_recomputed_from_base_and_new(tmp_path):
    """PromptSRC FGVCAircraft: printed HM 31.27, but HM(37.66, 28.27) = 32.30 (restore.md §2.8)."""
    from restore.evaluation import aggregate as A

    out = str(tmp_path / "output")
    _fake_run(out, "base2new", "train_base", "fgvc_aircraft", "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", 1, 40.0)
    _fake_run(out, "base2new", "test_new", "fgvc_aircraft", "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", 1, 30.0)
    md, files = A.aggregate(out, plot=False)
    row = next(r for r in csv.DictReader(open(files["base2new.csv"])) if r["dataset"] == "fgvc_aircraft")
    paper_hm = harmonic_mean(37.66, 28.27)
    assert float(row["paper_hm"]) == pytest.approx(paper_hm, abs=1e-3) and round(paper_hm, 2) == 32.30
    assert float(row["paper_hm_printed"]) == 31.27
    assert float(row["delta_hm"]) == pytest.approx(harmonic_mean(40.0, 30.0) - paper_hm, abs=1e-3)  # 1.99, not 3.02
    assert float(row["delta_base"]) == pytest.approx(2.34) and float(row["delta_new"]) == pytest.approx(1.73)
    assert ("| FGVCAircraft | 1 | 40.00 ± 0.00 | 30.00 ± 0.00 | 34.29 | 37.66 / 28.27 / 32.30 | 2.34 | 1.73 | 1.99 |"
            in md)
    # the printed HM stays only where base / new are not published
    assert A.paper_numbers({"hm": 81.2})["hm"] == 81.2


def test_shots_must_be_an_integer(tmp_path):
    proc = _bash("base2new/train.sh", ["coop", "dtd", "1"], _env(str(tmp_path), str(tmp_path / "out"), SHOTS="abc"),
                 check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: SHOTS must be an integer (training shots per class, "
                                                "e.g. SHOTS=16), got SHOTS='abc'"]


def test_failure_message_points_to_a_log_that_exists(data_root, tmp_path, capsys, monkeypatch):
    from restore import protocols as P

    out = str(tmp_path / "output")
    # train.py stops on the config before it creates log.txt: no pointer to a missing file
    assert _main("base2new-train", "coop", "dtd", "1", "--data", data_root, "--output", out, "OPTIM.LRR", "0.1") == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "log.txt" not in failed[0] and "see the error printed above" in failed[0], failed
    assert "Unknown config key 'OPTIM.LRR'" in captured.err
    # a failure after train.py started its log: the message names it
    ctx = P.Context(data=data_root, output=out, shots=2)
    step = P.base2new_train(ctx, "coop", "eurosat", 1)

    def fails_after_logging(argv, root):
        os.makedirs(step.output_dir, exist_ok=True)
        open(osp.join(step.output_dir, "log.txt"), "w").write("boom\n")
        return 1

    monkeypatch.setattr(P, "_run_in_process", fails_after_logging)
    [outcome] = P.run_steps([step], ctx.root)
    assert outcome.status == "failed" and outcome.message.endswith(f"see {osp.join(step.output_dir, 'log.txt')}")


# --------------------------------------------------------------------------- signals, locks, wording
def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{what} never happened (runner exit {proc.poll()})")


def _train_children(pid: int) -> list[int]:
    """The launcher processes (``python -m restore.launch``) whose parent is ``pid`` (read from /proc, no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and (b"train.py" in cmdline or b"restore.launch" in cmdline):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _interrupt(proc: subprocess.Popen, ready, sig: int) -> tuple[str, str, list[int], list[int]]:
    """Once ``ready()`` returns the runner's train.py children, send ``sig`` to the runner and collect its
    output: (stdout, stderr, children, those still alive afterwards, which are then killed)."""
    children: list[int] = []
    try:
        children = ready()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    alive = [pid for pid in children if _alive(pid)]
    _stop(alive)
    return stdout, stderr, children, alive


def _stop(pids: list[int]) -> None:
    for pid in pids:  # only if the runner left them running (the bug these tests guard against)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not osp.isdir("/proc"), reason="finds the runner's children in /proc")
def test_sigterm_stops_the_sweep_and_its_child_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "data")
    synthetic.make_synthetic("dtd", data, num_classes=4, images_per_class=12)
    out = str(tmp_path / "output")
    env = _env(data, out, SHOTS="4")  # 2 base classes x 4 shots, batch 1: 8 steps per epoch
    opts = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "4", "OPTIM.WARMUP_EPOCH", "0",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "1", "DATALOADER.TEST.BATCH_SIZE", "50"]
    args = ["base2new", "coop", "--datasets", "dtd", "--seeds", "1", *opts]
    cmd = ["bash", osp.join(ROOT, "scripts", "run_all.sh"), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run_glob = osp.join(out, "base2new", "train_base", "dtd", "shots_4", "CoOp", "*", "seed1")

    def ready() -> list[int]:
        _wait_for(lambda: glob.glob(osp.join(run_glob, "prompt_learner", "checkpoint")), "epoch 1's checkpoint", proc)
        return _wait_for(lambda: _train_children(proc.pid), "the train.py child", proc)

    stdout, stderr, children, alive = _interrupt(proc, ready, signal.SIGTERM)
    assert proc.returncode == 143, stderr[-3000:]
    assert not alive, "train.py kept running after the sweep was stopped"
    assert stderr.strip().splitlines()[-1] == ("Interrupted (SIGTERM): stopped 1 running step; run the same command "
                                               "again to resume")
    assert stderr.count("Interrupted") == 1 and "Traceback" not in stderr + stdout
    assert "Finished" not in stdout and "FAILED" not in stdout
    run = glob.glob(run_glob)[0]
    assert not osp.exists(osp.join(run, "results.json")), "training finished before it could be stopped"

    again = _script_here("run_all.sh", [*args, "--in-process"], env, monkeypatch, capsys)
    resumed = open(osp.join(run, "log.txt")).read().split("=== resumed ", 1)[1]
    assert "Found checkpoint" in resumed and "Previous epoch: " in resumed and "epoch [1/4]" not in resumed
    assert _results(run)["epoch"] == 4 and osp.isfile(run.replace("train_base", "test_new") + "/results.json")
    assert "Finished 1 job (2 steps) in " in again.stdout and ": 2 done, 0 skipped, 0 failed, 0 not run" in again.stdout


@pytest.mark.skipif(not osp.isdir("/proc"), reason="finds the runner's children in /proc")
def test_ctrl_c_stops_parallel_jobs_with_one_line_and_no_traceback(tmp_path):
    data = str(tmp_path / "data")
    for name in ("dtd", "eurosat"):
        synthetic.make_synthetic(name, data, num_classes=4, images_per_class=12)
    out = str(tmp_path / "output")
    opts = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "50", "OPTIM.WARMUP_EPOCH", "0",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "1"]
    proc = subprocess.Popen(["bash", osp.join(ROOT, "scripts", "run_all.sh"), "base2new", "coop", "--datasets",
                             "dtd,eurosat", "--seeds", "1", "--gpus", "0,1", *opts], env=_env(data, out, SHOTS="4"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def ready() -> list[int]:
        logs = osp.join(out, "base2new", "train_base", "*", "shots_4", "CoOp", "*", "seed1", "log.txt")
        _wait_for(lambda: len(glob.glob(logs)) == 2, "both jobs' training", proc)
        return _train_children(proc.pid)

    stdout, stderr, children, alive = _interrupt(proc, ready, signal.SIGINT)  # SIGINT: what Ctrl-C sends
    assert len(children) == 2
    assert proc.returncode == 130, stderr[-3000:]
    assert not alive, "a train.py kept running after Ctrl-C"
    assert stderr.strip().splitlines() == ["Interrupted (SIGINT): stopped 2 running steps; run the same command "
                                           "again to resume"]
    logs = "".join(open(p).read() for p in glob.glob(osp.join(out, "logs", "base2new", "*.out")))
    assert "Traceback" not in stdout + logs and "Finished" not in stdout


def test_a_step_whose_folder_is_in_use_fails_with_one_line(tmp_path, capsys):
    import socket

    from restore import protocols as P
    from restore.engine.output_dir import lock_output_dir

    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=2, check_data=False)
    job = [P.base2new_train(ctx, "coop", "dtd", 1), P.base2new_test(ctx, "coop", "dtd", 1)]
    with lock_output_dir(job[0].output_dir):  # another sweep's train.py is writing there
        outcomes = P.run_steps(job, ctx.root)
        assert os.listdir(job[0].output_dir) == ["run.lock"]  # no protocol_opts.json, nothing moved aside
    assert [o.status for o in outcomes] == ["failed", "not-run"]
    expected = (f"{job[0].output_dir} is in use by another run (PID {os.getpid()} on host {socket.gethostname()}, "
                "started ")
    assert outcomes[0].message.startswith(expected)
    printed = capsys.readouterr().out
    assert printed.startswith(f"FAILED {job[0].name}: {expected}") and len(printed.strip().splitlines()) == 1


def test_help_and_summary_say_what_they_mean(capsys, tmp_path, monkeypatch):
    from restore import protocols as P

    assert P.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "::" not in text and "COMMAND --help" in text and "output_random" in text

    def finished(argv, root, env=None, log=None):
        out = argv[argv.index("--output-dir") + 1]
        os.makedirs(out, exist_ok=True)
        with open(osp.join(out, "results.json"), "w") as f:
            json.dump({"accuracy": 50.0}, f)
        return 0

    monkeypatch.setattr(P, "_run_subprocess", finished)
    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), shots=2, check_data=False)
    jobs = [[P.base2new_train(ctx, "zsclip", d, 1), P.base2new_test(ctx, "zsclip", d, 1)] for d in ("dtd", "eurosat")]
    P.run_jobs(jobs, ctx.root)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Finished 2 jobs (4 steps) in ")
    assert last.endswith(": 4 done, 0 skipped, 0 failed, 0 not run")
