"""The protocol runner on submitit (restore.cluster): SLURM settings from YAML and flags, the sbatch file
checked against submitit's own SlurmExecutor, submission through a fake sbatch with the skip rules and
``status`` read back from the records and a fake sacct, torchrun for multi-GPU jobs, the install hint
without submitit, and one real job through submitit's LocalExecutor that is sent USR2 mid-training,
requeued, and finishes with the tensors and tables of an uninterrupted run.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import os.path as osp
import signal
import stat
import sys
import threading
import time

import pytest
import torch

from restore import cluster as C
from restore import protocols as P

submitit = pytest.importorskip("submitit", reason="submitit (pip install -e '.[cluster]') missing")
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.WARMUP_EPOCH", "0", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.TEST.BATCH_SIZE", "50"]


def _jobs(tmp_path, output: str = "out", trainers: str = "coop", seeds=(1,), datasets: str = "dtd",
          opts=()) -> tuple[P.Context, list[list[P.Step]]]:
    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / output), shots=2, opts=list(opts))
    return ctx, [job for t in trainers.split(",") for job in P.build_jobs(ctx, "base2new", t, list(seeds), datasets)]


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _finish(step: P.Step, accuracy: float = 50.0) -> None:
    """Make ``step`` look finished, as train.py leaves it (results.json, a checkpoint pointer)."""
    os.makedirs(osp.join(step.output_dir, "prompt_learner"), exist_ok=True)
    if not step.eval_only:
        open(osp.join(step.output_dir, "prompt_learner", "model.pth.tar-1"), "w").close()
        with open(osp.join(step.output_dir, "prompt_learner", "checkpoint"), "w") as f:
            f.write("model.pth.tar-1\n")
    with open(step.results_path(), "w") as f:
        json.dump({"accuracy": accuracy}, f)


# --------------------------------------------------------------------------- settings
def test_settings_from_yaml_then_flags_and_bad_values(tmp_path, capsys):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("partition: gpu\ngpus_per_job: 2\ncpus_per_task: 8\nmem_gb: 1.5\ntime: '1-02:30:00'\n"
                   "account: proj\nqos: low\narray_parallelism: 4\nsbatch: {constraint: a100}\n"
                   "setup: ['module load cuda']\n")
    parser = P.build_parser("run-all")
    args = parser.parse_intermixed_args(["base2new", "coop", "--cluster-config", str(cfg), "--qos", "high",
                                         "--sbatch", "exclude=node1", "--time", "90"])
    s = C.settings_from_args(args)
    assert (s.partition, s.gpus_per_job, s.cpus_per_task, s.mem_gb, s.account) == ("gpu", 2, 8, 1.5, "proj")
    assert s.qos == "high" and s.time == 90 and s.array_parallelism == 4  # flags win over the YAML
    assert s.sbatch == {"constraint": "a100", "exclude": "node1"} and s.setup == ["module load cuda"]
    assert C.load_settings(str(cfg)).time == 24 * 60 + 2 * 60 + 30
    assert [C.parse_time(t) for t in ("45", 45, "02:00", "0:10:30", "2-00:00")] == [45, 45, 120, 11, 2880]
    params = C.slurm_parameters(s)
    assert params["mem"] == "1536MB" and params["gpus_per_node"] == 2 and params["additional_parameters"] == {
        "constraint": "a100", "exclude": "node1"}
    # bad input: one sentence each, naming the key and the file or flag
    bad = tmp_path / "bad.yaml"
    for text, words in (("partiton: gpu\n", ["Unknown cluster setting 'partiton'", "partition"]),
                        ("time: soon\n", ["time 'soon' is not a time limit"]),
                        ("gpus_per_job: -1\n", ["gpus_per_job: -1 in", "integer >= 0"]),
                        ("mem_gb: lots\n", ["mem_gb: 'lots'", "number > 0"]),
                        ("- a\n- b\n", ["not a mapping"])):
        bad.write_text(text)
        with pytest.raises(P.ProtocolError) as err:
            C.load_settings(str(bad))
        assert all(w in str(err.value) for w in words) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(P.ProtocolError, match="--sbatch 'a100': give KEY=VALUE"):
        C.settings_from_args(parser.parse_intermixed_args(["base2new", "coop", "--sbatch", "a100"]))
    # through the CLI: one line, exit 2, nothing written
    rc = P.main(["run-all", "base2new", "coop", "--launcher", "slurm", "--data", str(tmp_path), "--output",
                 str(tmp_path / "o"), "--time", "later"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and "not a time limit" in err and not osp.exists(tmp_path / "o")
    rc = P.main(["run-all", "base2new", "coop", "--launcher", "slurm", "--gpus", "0,1", "--data", str(tmp_path),
                 "--output", str(tmp_path / "o")])
    assert rc == 2 and "drop --gpus (GPUs per job: --gpus-per-job)" in capsys.readouterr().err


def test_without_submitit_the_launcher_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    rc = P.main(["run-all", "base2new", "coop", "--launcher", "slurm", "--datasets", "dtd", "--seeds", "1",
                 "--data", str(tmp_path), "--output", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ('error: submitit is not installed: pip install -e ".[cluster]" (or pip install '
                               'submitit) to use --launcher slurm')


def test_slurm_launcher_off_a_cluster_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun / sbatch here
    rc = P.main(["run-all", "base2new", "coop", "--launcher", "slurm", "--datasets", "dtd", "--seeds", "1",
                 "--data", str(tmp_path), "--output", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "srun" in err and "use --dry-run to see the sbatch file" in err
    assert not osp.exists(tmp_path / "o" / "logs" / "submitit" / "base2new" / C.JOBS_FILE)


# --------------------------------------------------------------------------- sbatch (dry run)
def _fake_tools(tmp_path, monkeypatch) -> str:
    """``srun``, ``sbatch`` (prints a job id, keeps the script) and ``sacct`` (prints tmp/sacct.txt) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": f"#!/bin/sh\ncp \"$1\" {tmp_path}/sbatch_$(ls {tmp_path} | grep -c sbatch_).sh\n"
                  "echo 'Submitted batch job 4242'\n",
        "sacct": f"#!/bin/sh\ncat {tmp_path}/sacct.txt\n",
        "squeue": f"#!/bin/sh\ncat {tmp_path}/squeue.txt 2>/dev/null\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return str(bin_dir)


def test_dry_run_prints_the_sbatch_file_submitit_writes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    rc = P.main(["run-all", "base2new", "coop,zsclip", "--datasets", "dtd", "--seeds", "1,2", "--launcher", "slurm",
                 "--dry-run", "--data", str(tmp_path), "--output", str(out), "--partition", "gpu",
                 "--gpus-per-job", "2", "--cpus-per-task", "8", "--mem-gb", "32", "--time", "4:00:00", "--account",
                 "proj", "--qos", "high", "--array-parallelism", "3", "--sbatch", "constraint=a100", "--setup",
                 "module load cuda", *TINY])
    text = capsys.readouterr().out
    assert rc == 0 and not out.exists(), "a dry run writes nothing"
    lines = set(text.splitlines())
    expected = {"#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=8",
                "#SBATCH --mem=32GB", "#SBATCH --time=240", "#SBATCH --account=proj", "#SBATCH --qos=high",
                "#SBATCH --array=0-3%3", "#SBATCH --constraint=a100", "#SBATCH --signal=USR2@120",
                "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=restore", "module load cuda"}
    assert expected <= lines, expected - lines
    assert sum(line.startswith("# job ") for line in lines) == 8  # 4 jobs x (train, test), listed
    # every parameter is one of submitit's documented SlurmExecutor options (its sbatch writer's arguments),
    # and submitit's own executor (a fake srun on PATH) writes the same file for one job
    from submitit.slurm.slurm import _get_default_parameters

    settings = C.settings_from_args(P.build_parser("run-all").parse_intermixed_args(
        ["base2new", "coop", "--partition", "gpu", "--gpus-per-job", "2", "--mem-gb", "32", "--qos", "high"]))
    params = C.slurm_parameters(settings)
    assert set(params) <= set(_get_default_parameters())
    _fake_tools(tmp_path, monkeypatch)
    real = submitit.SlurmExecutor(folder=str(tmp_path / "f"))
    real.update_parameters(**params)
    assert C.sbatch_script(settings, str(tmp_path / "f")) == real._make_submission_file_text(
        real._submitit_command_str, "x")


# --------------------------------------------------------------------------- submission, skip rules, status
def test_slurm_submission_records_skips_and_status(tmp_path, capsys, monkeypatch):
    _fake_tools(tmp_path, monkeypatch)
    ctx, jobs = _jobs(tmp_path, seeds=(1, 2, 3))
    settings = C.ClusterSettings(partition="gpu")
    folder = C.jobs_folder(settings, ctx.output, "base2new")
    _finish(jobs[2][0])
    _finish(jobs[2][1])  # seed 3 finished: never submitted
    assert C.submit(jobs, ctx, "base2new", settings, "slurm") == 0
    out = capsys.readouterr().out
    assert "skip (finished:" in out and "Submitted 2 SLURM jobs (4242_0 ... 4242_1)" in out
    script = _read(tmp_path / "sbatch_0.sh")
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=gpu" in script
    records = [json.loads(line) for line in _read(osp.join(folder, C.JOBS_FILE)).splitlines()]
    assert [r["job_id"] for r in records] == ["4242_0", "4242_1"]
    assert [s["output_dir"] for s in records[0]["steps"]] == [osp.abspath(s.output_dir) for s in jobs[0]]

    # the queue as sacct reports it: a pending array collapsed into one line
    (tmp_path / "sacct.txt").write_text("4242_[0-1%2]|PENDING\n")
    assert C.submit(jobs, ctx, "base2new", settings, "slurm") == 0  # queued jobs are not submitted again
    assert capsys.readouterr().out.count("is pending)") == 2 and not osp.exists(tmp_path / "sbatch_1.sh")

    def states() -> list[tuple[str, str]]:
        return [(r.state, r.job_id) for r in C.step_states(jobs, folder)]

    assert states() == [("queued", "4242_0")] * 2 + [("queued", "4242_1")] * 2 + [("finished", "")] * 2
    (tmp_path / "sacct.txt").write_text("4242_0|RUNNING\n4242_1|CANCELLED by 1000\n")
    assert [s for s, _ in states()] == ["running", "queued", "failed", "failed", "finished", "finished"]
    _finish(jobs[0][0])
    (tmp_path / "sacct.txt").write_text("4242_0|TIMEOUT\n4242_1|FAILED\n")
    rows = C.step_states(jobs, folder)
    assert [r.state for r in rows] == ["finished", "failed", "failed", "failed", "finished", "finished"]
    assert rows[1].note == "job timeout" and rows[1].log == osp.join(folder, "4242_0_0_log.out")
    # squeue (live jobs) wins over sacct; a job that neither lists has ended
    (tmp_path / "squeue.txt").write_text("4242_0|RUNNING\n")
    (tmp_path / "sacct.txt").write_text("4242_0|PENDING\n")
    assert C.job_states([{"job_id": "4242_0", "launcher": "slurm"}, {"job_id": "4242_1", "launcher": "slurm"}]) == {
        "4242_0": "RUNNING", "4242_1": "ENDED"}
    (tmp_path / "squeue.txt").unlink()
    (tmp_path / "sacct.txt").write_text("4242_0|TIMEOUT\n4242_1|FAILED\n")
    # the printed table, read back: a header, one line per step, the counts
    C.print_status(jobs, folder)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["STATE", "JOB", "STEP", "LOG"] and len(printed) == 8
    assert printed[1].split()[:2] == ["finished", "4242_0"] and printed[3].split()[:2] == ["failed", "4242_1"]
    assert printed[-1].startswith("6 steps: 3 finished, 0 running, 0 queued, 3 failed, 0 not submitted")
    # the failed jobs are submitted again (the training that finished inside job 0 is skipped by the job)
    assert C.submit(jobs, ctx, "base2new", settings, "slurm") == 0
    assert "Submitted 2 SLURM jobs" in capsys.readouterr().out
    # seed 3 asked with other opts is refused with one line, not skipped; --overwrite submits it again
    jobs[2][0].write_record()  # what train.py's run recorded: no trailing opts
    _, other = _jobs(tmp_path, seeds=(3,), opts=["OPTIM.MAX_EPOCH", "5"])
    assert C.submit(other, ctx, "base2new", settings, "slurm") == 1
    refused = capsys.readouterr().out
    assert "FAILED base2new train_base CoOp dtd seed3:" in refused and "OPTIM.MAX_EPOCH <not set> -> 5" in refused
    # (the old folders are moved aside at submission, so every start of the job, requeued too, only resumes)
    assert C.submit(other, ctx, "base2new", settings, "slurm", overwrite=True) == 0
    submitted = capsys.readouterr().out
    assert "Submitted 1 SLURM job (4242)" in submitted and submitted.count("moved the previous run") == 2
    assert not osp.exists(other[0][0].output_dir) and len(glob.glob(other[0][0].output_dir + ".old-*")) == 1
    # --wait: looks at the queue until no job of the submission is queued or running, then prints the status
    monkeypatch.setattr(C, "WAIT_POLL_S", 0.05)
    (tmp_path / "squeue.txt").write_text("4242_0|PENDING\n4242_1|RUNNING\n")
    waiter = threading.Thread(target=C._wait, args=([{"job_id": j, "launcher": "slurm"} for j in ("4242_0", "4242_1")],))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()
    (tmp_path / "squeue.txt").write_text("4242_1|COMPLETING\n")
    time.sleep(0.5)
    assert waiter.is_alive()
    (tmp_path / "squeue.txt").write_text("")  # both left the queue
    waiter.join(5)
    assert not waiter.is_alive()
    _, fresh = _jobs(tmp_path, output="out2")
    assert C.submit(fresh, ctx, "base2new", settings, "slurm", wait=True) == 1  # ended without results
    assert "2 steps: 0 finished, 0 running, 0 queued, 2 failed" in capsys.readouterr().out
    # status from the CLI, as after the submitting shell is gone (a new process reads the records)
    (tmp_path / "sacct.txt").write_text("4242_0|RUNNING\n4242_1|PENDING\n")
    rc = P.main(["status", "base2new", "coop", "--datasets", "dtd", "--seeds", "1,2,3", "--output", ctx.output,
                 "--shots", "2"])
    assert rc == 0 and capsys.readouterr().out.splitlines()[-1].startswith(
        "6 steps: 1 finished, 1 running, 2 queued, 2 failed, 0 not submitted")  # seed 3: job 4242 ended


def test_torchrun_for_multi_gpu_jobs_and_requeue(tmp_path, monkeypatch):
    argv = ["--root", "d", "--output-dir", "o"]
    assert P.train_command(argv) == [sys.executable, "-m", "restore.launch", *argv]
    assert P.train_command(argv, nproc=4) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node=4", "-m", "restore.launch", *argv]
    calls = []

    def fake_subprocess(argv, root, env=None, log=None, nproc=1):
        calls.append(nproc)
        out = argv[argv.index("--output-dir") + 1]
        _finish(P.Step("x", out, [], eval_only="--eval-only" in argv))
        return 0

    monkeypatch.setattr(P, "_run_subprocess", fake_subprocess)
    ctx, jobs = _jobs(tmp_path)
    summary = C.ChainJob(jobs[0], ctx.root, nproc=2)()
    assert calls == [2, 2] and [s["status"] for s in summary] == ["done", "done"]
    # a preempted job is requeued as the same chain
    try:
        requeued = C.ChainJob(jobs[0], ctx.root, nproc=2).checkpoint()
    finally:
        P._CHILDREN.reset()  # checkpoint() marks this process as stopping (a real job exits next)
    assert isinstance(requeued.function, C.ChainJob) and requeued.function.nproc == 2
    assert [s.output_dir for s in requeued.function.steps] == [s.output_dir for s in jobs[0]]


def test_a_cancelled_job_leaves_no_train_py_behind(tmp_path, monkeypatch):
    """submitit-local cancels a job (Ctrl-C of the sweep) with SIGINT: the job stops its train.py first."""
    marker = tmp_path / "child.pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    monkeypatch.setattr(P, "train_command", lambda argv, nproc=1: [sys.executable, "-c", code])
    ctx, jobs = _jobs(tmp_path)

    def interrupt() -> None:
        while not marker.exists() or not marker.read_text():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # as submitit's controller does to cancel the job

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            C.ChainJob(jobs[0], ctx.root)()
        pid = int(marker.read_text())
        deadline = time.time() + 10
        while osp.exists(f"/proc/{pid}") and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not P._CHILDREN.procs and not osp.isfile(jobs[0][0].results_path())
    finally:
        P._CHILDREN.reset()


# --------------------------------------------------------------------------- a real job, preempted
def _children(pid) -> list[int]:
    """The child processes of ``pid`` (started by any of its threads)."""
    out = []
    for children in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(children) as f:
            out += [int(x) for x in f.read().split()]
    return out


@pytest.mark.skipif(not osp.isdir("/proc/self/task"), reason="finds the job's process through /proc")
def test_local_executor_job_preempted_requeues_and_equals_an_uninterrupted_run(tmp_path, capsys):
    from restore.datasets import synthetic
    from restore.engine.utils import load_checkpoint
    from restore.evaluation.aggregate import aggregate

    data = str(tmp_path / "data")
    synthetic.make_synthetic("dtd", data, num_classes=4, images_per_class=12)
    opts = [*TINY, "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "1"]  # 8 steps per epoch

    def grid(name: str) -> tuple[P.Context, list[list[P.Step]]]:
        """The base2new job of CoOp on DTD, seed 1: its training step (the evaluation adds nothing here,
        and each step is a train.py start, seconds on a loaded CI machine)."""
        ctx = P.Context(data=data, output=str(tmp_path / name), shots=4, opts=opts)
        return ctx, [job[:1] for job in P.build_jobs(ctx, "base2new", "coop", [1], "dtd")]

    ctx, jobs = grid("cluster")
    settings = C.ClusterSettings(time=30)
    folder = C.jobs_folder(settings, ctx.output, "base2new")
    assert [r.state for r in C.step_states(jobs, folder)] == ["not submitted"]
    result: dict[str, int] = {}
    submitter = threading.Thread(target=lambda: result.setdefault(
        "rc", C.submit(jobs, ctx, "base2new", settings, "submitit-local")))
    submitter.start()
    pointer = osp.join(jobs[0][0].output_dir, "prompt_learner", "checkpoint")
    deadline = time.time() + 120
    while not (osp.isfile(pointer) and _read(pointer).strip() == "model.pth.tar-1"):
        assert time.time() < deadline and submitter.is_alive(), "epoch 1's checkpoint never appeared"
        time.sleep(0.01)
    job_id = json.loads(_read(osp.join(folder, C.JOBS_FILE)).splitlines()[0])["job_id"]
    mid = C.step_states(jobs, folder)
    assert [(r.state, r.job_id) for r in mid] == [("running", job_id)] and "PID" in mid[0].note
    worker = _children(job_id)  # submitit's controller (the job id) runs the job as its child
    assert len(worker) == 1
    train = _children(worker[0])  # the train.py process the job started
    assert len(train) == 1
    # what SLURM sends before a time limit (to every process of the job); the train.py blocks it
    for pid in (train[0], worker[0]):
        os.kill(pid, signal.SIGUSR2)
    submitter.join(240)
    assert result.get("rc") == 0
    assert [r.state for r in C.step_states(jobs, folder)] == ["finished"]
    job_log = _read(osp.join(folder, f"{job_id}_0_log.out"))
    assert "Preempted or out of time" in job_log and f"Requeued job {job_id}" in job_log
    train_log = _read(osp.join(jobs[0][0].output_dir, "log.txt"))
    resumed = train_log.split("=== resumed ", 1)[1]
    assert "Previous epoch: 1" in resumed and "epoch [2/2]" in resumed and "epoch [1/2]" not in resumed

    ref_ctx, ref_jobs = grid("plain")  # the same job, uninterrupted, in this process
    assert [o.status for o in P.run_steps(ref_jobs[0], ref_ctx.root, in_process=True)] == ["done"]
    capsys.readouterr()
    ours = load_checkpoint(osp.join(jobs[0][0].output_dir, "prompt_learner", "model.pth.tar-2"))
    ref = load_checkpoint(osp.join(ref_jobs[0][0].output_dir, "prompt_learner", "model.pth.tar-2"))
    assert ours["state_dict"].keys() == ref["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    tables = []
    for root in (ctx.output, ref_ctx.output):
        _, files = aggregate(root, out=root + "_tables", plot=False)
        rows = list(csv.DictReader(_read(files["base2new.csv"]).splitlines()))
        tables.append([{k: r[k] for k in ("method", "dataset", "n_seeds_base", "base_mean")} for r in rows])
    assert tables[0] == tables[1] and tables[0][0]["dataset"] == "dtd" and tables[0][0]["n_seeds_base"] == "1"
