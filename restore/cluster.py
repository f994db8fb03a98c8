"""Cluster execution of the protocol runner through ``submitit`` (SLURM, or its local executor).

``python -m restore.protocols run-all ... --launcher slurm`` submits one SLURM job per job of the grid
(a training step and the evaluations of its model, run in order inside the job, so an evaluation starts
only once its model exists); ``--launcher submitit-local`` runs the same jobs as local processes through
submitit's ``LocalExecutor`` (a cluster setup tried on one machine; the command waits for them). The
SLURM settings come from a YAML file (``--cluster-config``) and/or flags, flags winning::

    partition: gpu          # --partition
    gpus_per_job: 1         # --gpus-per-job (more than 1: the steps run under torchrun, DDP)
    cpus_per_task: 8        # --cpus-per-task
    mem_gb: 32              # --mem-gb
    time: "04:00:00"        # --time (minutes, or [D-]HH:MM[:SS])
    account: myproject      # --account
    qos: normal             # --qos
    array_parallelism: 16   # --array-parallelism (jobs of the array running at once)
    sbatch: {constraint: a100}          # --sbatch constraint=a100 (any other sbatch flag)
    setup: ["module load cuda"]         # --setup (shell lines before the job starts)

The rules are those of the local runner: a finished step is never resubmitted (a job whose steps are
all finished is not submitted), nor is a job whose submission is still queued or running. A job that
SLURM preempts or that reaches its time limit gets ``USR2`` (``signal_delay_s`` before the end); the
running ``train.py`` is stopped and the job requeued (submitit's checkpointing hook), and the
requeued job resumes the training from its last checkpoint (``train.py`` does that). ``--overwrite``
moves the jobs' existing run folders aside (``<folder>.old-<time>``) when they are submitted, so that
every start of a job, the first as a requeued one (USR2 or SLURM's own requeue), only resumes.

Every submission is recorded in ``<folder>/jobs.jsonl`` (default folder
``<output>/logs/submitit/<protocol>``, also holding submitit's files and each job's log
``<job id>_0_log.out``). ``python -m restore.protocols status`` with the arguments of ``run-all`` reads
these records, the output folders and SLURM (``sacct`` and ``squeue``) and lists every
step as finished / running / queued / failed / not submitted with its SLURM job id and log: a sweep is
watched and resumed after the submitting shell is gone (run the same ``run-all`` again).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import os.path as osp
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from restore.protocols import (
    _CHILDREN,
    Context,
    Interrupted,
    ProtocolError,
    Step,
    _in_use,
    move_aside,
    run_steps,
)

__all__ = [
    "JOBS_FILE",
    "LAUNCHERS",
    "ChainJob",
    "ClusterSettings",
    "add_arguments",
    "job_states",
    "jobs_folder",
    "load_settings",
    "parse_time",
    "print_status",
    "read_records",
    "sbatch_script",
    "settings_from_args",
    "slurm_parameters",
    "step_states",
    "submit",
]

LAUNCHERS = ("local", "slurm", "submitit-local")
#: One JSON line per submitted job: its id, launcher, host, submission time and steps (name, output folder).
JOBS_FILE = "jobs.jsonl"
_INSTALL = ('submitit is not installed: pip install -e ".[cluster]" (or pip install submitit) to use '
            "--launcher {launcher}")
STATES = ("finished", "running", "queued", "failed", "not submitted")


def _submitit(launcher: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise ProtocolError(_INSTALL.format(launcher=launcher)) from None
    return submitit


# --------------------------------------------------------------------------- settings
@dataclass
class ClusterSettings:
    """What every job of a sweep asks the scheduler for (``None`` / empty: the scheduler's default)."""

    partition: str = ""
    gpus_per_job: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time: int = 240  # minutes
    account: str = ""
    qos: str = ""
    array_parallelism: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int = 120
    max_requeues: int = 3  # submitit's max_num_timeout: time-outs (preemptions requeue without limit)
    job_name: str = "restore"
    folder: str = ""


_INT_FIELDS = {"gpus_per_job", "cpus_per_task", "array_parallelism", "signal_delay_s", "max_requeues"}


def parse_time(value: Any) -> int:
    """A time limit in minutes from ``90``, ``"90"``, ``"HH:MM"``, ``"HH:MM:SS"`` or ``"D-HH:MM:SS"``."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?", text)
    if match:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    elif re.fullmatch(r"\d+", text):
        total = int(text)
    else:
        raise ProtocolError(f"time {value!r} is not a time limit: give minutes (240) or [D-]HH:MM[:SS] (04:00:00)")
    if total < 1:
        raise ProtocolError(f"time {value!r} is under a minute: give a time limit of at least 1 minute")
    return total


def _coerce(key: str, value: Any, source: str) -> Any:
    """``value`` as the type of setting ``key``; :class:`ProtocolError` naming ``source`` otherwise."""
    try:
        if key == "time":
            return parse_time(value)
        if key in _INT_FIELDS:
            number = int(str(value).strip())
            if number < (1 if key in ("cpus_per_task", "array_parallelism") else 0):
                raise ValueError
            return number
        if key == "mem_gb":
            gb = float(str(value).strip().upper().removesuffix("G").removesuffix("GB"))
            if gb <= 0:
                raise ValueError
            return gb
        if key == "sbatch":
            if isinstance(value, dict):
                return {str(k).lstrip("-"): str(v) for k, v in value.items()}
            items = [value] if isinstance(value, str) else list(value)
            return dict(_sbatch_flag(str(item)) for item in items)
        if key == "setup":
            if isinstance(value, str):
                return [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)
    except (ValueError, TypeError):
        raise ProtocolError(f"{key}: {value!r} in {source} is not valid; {_HELP[key]}") from None


def _sbatch_flag(text: str) -> tuple[str, str]:
    key, sep, value = text.lstrip("-").partition("=")
    if not key or not sep:
        raise ProtocolError(f"--sbatch {text!r}: give KEY=VALUE (e.g. --sbatch constraint=a100)")
    return key.strip(), value.strip()


_HELP = {
    "partition": "the SLURM partition",
    "gpus_per_job": "GPUs per job, an integer >= 0 (more than 1: the steps run under torchrun)",
    "cpus_per_task": "CPUs per job, an integer >= 1",
    "mem_gb": "memory per job in GB, a number > 0",
    "time": "time limit per job: minutes (240) or [D-]HH:MM[:SS]",
    "account": "SLURM account (sbatch --account)",
    "qos": "SLURM quality of service (sbatch --qos)",
    "array_parallelism": "jobs of the array running at once, an integer >= 1 (submitit-local: default 1)",
    "sbatch": "other sbatch flags as KEY=VALUE (YAML: a mapping)",
    "setup": "shell lines run before the job (YAML: a list)",
    "signal_delay_s": "seconds before the time limit at which USR2 asks the job to requeue, an integer >= 0",
    "max_requeues": "how often a job that hits its time limit is requeued, an integer >= 0",
    "job_name": "the SLURM job name",
    "folder": "where submitit's files, the job logs and jobs.jsonl go",
}


def load_settings(path: str, settings: ClusterSettings | None = None) -> ClusterSettings:
    """``settings`` (default: the defaults) updated from a YAML file; one sentence for a bad file or key."""
    from restore.engine.config import ConfigError, load_yaml

    try:
        data = load_yaml(path)
    except ConfigError as err:
        raise ProtocolError(str(err)) from None
    settings = settings or ClusterSettings()
    known = {f.name for f in fields(ClusterSettings)}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ProtocolError(f"Unknown cluster setting {key!r} in {path}; known: {', '.join(sorted(known))}")
        setattr(settings, name, _coerce(name, value, path))
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher flags of ``run-all`` and ``status`` (every setting defaults to the YAML's, then the built-in)."""
    group = parser.add_argument_group("cluster (submitit)")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local (default): this machine; slurm: one SLURM job per train->test chain; "
                            "submitit-local: the same jobs as local processes through submitit (waits)")
    group.add_argument("--cluster-config", default="", help="YAML file of cluster settings (flags override it)")
    for name, kind in (("partition", str), ("gpus-per-job", str), ("cpus-per-task", str), ("mem-gb", str),
                       ("time", str), ("account", str), ("qos", str), ("array-parallelism", str),
                       ("signal-delay-s", str), ("max-requeues", str), ("job-name", str)):
        group.add_argument(f"--{name}", type=kind, default=None, help=_HELP[name.replace("-", "_")])
    group.add_argument("--jobs-folder", default=None, help=_HELP["folder"] + " (default <output>/logs/submitit/"
                       "<protocol>)")
    group.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE", help=_HELP["sbatch"])
    group.add_argument("--setup", action="append", default=None, metavar="CMD", help=_HELP["setup"])
    group.add_argument("--wait", action="store_true", help="slurm: wait until the submitted jobs end, then "
                       "print their status")


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    """Defaults, then ``--cluster-config``, then the flags given."""
    settings = load_settings(args.cluster_config) if getattr(args, "cluster_config", "") else ClusterSettings()
    flags = {"partition": "partition", "gpus_per_job": "gpus_per_job", "cpus_per_task": "cpus_per_task",
             "mem_gb": "mem_gb", "time": "time", "account": "account", "qos": "qos",
             "array_parallelism": "array_parallelism", "signal_delay_s": "signal_delay_s",
             "max_requeues": "max_requeues", "job_name": "job_name", "folder": "jobs_folder", "setup": "setup"}
    for name, attr in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            setattr(settings, name, _coerce(name, value, f"--{attr.replace('_', '-')}"))
    if getattr(args, "sbatch", None):
        settings.sbatch = {**settings.sbatch, **_coerce("sbatch", args.sbatch, "--sbatch")}
    return settings


def jobs_folder(settings: ClusterSettings, output: str, protocol: str) -> str:
    """Where submitit's files, the job logs and :data:`JOBS_FILE` of a sweep go."""
    return osp.abspath(settings.folder or osp.join(output, "logs", "submitit", protocol))


def slurm_parameters(settings: ClusterSettings) -> dict[str, Any]:
    """The settings as ``submitit.SlurmExecutor.update_parameters`` keywords (names of its sbatch writer)."""
    params: dict[str, Any] = {"job_name": settings.job_name, "time": settings.time, "nodes": 1,
                              "ntasks_per_node": 1, "signal_delay_s": settings.signal_delay_s,
                              "stderr_to_stdout": True}  # one log per job: <job id>_0_log.out
    if settings.gpus_per_job:
        params["gpus_per_node"] = settings.gpus_per_job
    optional = {"partition": settings.partition, "cpus_per_task": settings.cpus_per_task,
                "mem": _mem(settings.mem_gb), "account": settings.account, "qos": settings.qos,
                "array_parallelism": settings.array_parallelism}
    params.update({k: v for k, v in optional.items() if v not in (None, "")})
    if settings.sbatch:
        params["additional_parameters"] = dict(settings.sbatch)
    if settings.setup:
        params["setup"] = list(settings.setup)
    return params


def _mem(gb: float | None) -> str | None:
    """sbatch's ``--mem`` value: whole GB as ``32GB``, else MB (``1536MB``)."""
    if gb is None:
        return None
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def _slurm_executor(folder: str, settings: ClusterSettings, dry_run: bool = False) -> Any:
    submitit = _submitit("slurm")
    cls = submitit.SlurmExecutor
    if dry_run:
        class DryRunSlurmExecutor(cls):  # type: ignore[misc,valid-type]
            """submitit's SLURM executor on a machine without ``srun``: used only to write the sbatch file."""

            @classmethod
            def affinity(cls) -> int:
                return 1

        cls = DryRunSlurmExecutor
    try:
        executor = cls(folder=folder, max_num_timeout=settings.max_requeues)
    except RuntimeError as err:
        raise ProtocolError(f"{err} --launcher slurm submits from a SLURM login node; here use --dry-run to see "
                            "the sbatch file, or --launcher submitit-local") from None
    try:
        executor.update_parameters(**slurm_parameters(settings))
    except ValueError as err:
        raise ProtocolError(f"A cluster setting is refused by submitit: {str(err).splitlines()[0]}") from None
    return executor


def sbatch_script(settings: ClusterSettings, folder: str, num_jobs: int = 1) -> str:
    """The sbatch file submitit writes for these settings (an array of ``num_jobs`` jobs if more than 1)."""
    executor = _slurm_executor(folder, settings, dry_run=True)
    params = dict(executor.parameters)
    if num_jobs > 1:
        params["map_count"] = num_jobs  # as submitit does for an array
    executor.parameters = params
    return str(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))


# --------------------------------------------------------------------------- the job
class ChainJob:
    """One job of the grid run inside a submitit job: its steps in order (``train.py`` subprocesses,
    under ``torchrun`` with ``nproc`` > 1). Checkpointable: on USR2 (preemption, time limit) the
    running step is stopped and the job requeued; every start resumes (``--overwrite`` acts at submission)."""

    def __init__(self, steps: Sequence[Step], root: str, nproc: int = 1) -> None:
        self.steps = list(steps)
        self.root = root
        self.nproc = nproc

    def __call__(self) -> list[dict[str, Any]]:
        outcomes: list[Any] = []
        errors: list[BaseException] = []

        def work() -> None:
            # SLURM may signal every process of the job: USR2 is for submitit's handler (main thread)
            # only, so this thread and the train.py processes it starts (which inherit the mask) block it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
            try:
                outcomes.extend(run_steps(self.steps, self.root, False, in_process=False,
                                          nproc=self.nproc, report=lambda line: print(line, flush=True)))
            except Interrupted:  # stopped for a requeue (checkpoint below)
                pass
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)

        # the steps run in a thread, so that submitit's USR2 handler (main thread) can stop them
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt:  # the job is cancelled (submitit-local's cancel is a SIGINT): no orphan
            self._stop_steps(signal.SIGINT, wait_s=1.0)
            raise
        if errors:
            raise errors[0]
        summary = [{"step": o.step.name, "status": o.status, "rc": o.rc, "seconds": round(o.seconds, 1),
                    "message": o.message} for o in outcomes]
        failed = [o for o in outcomes if o.status in ("failed", "not-run")]
        if failed:
            raise RuntimeError("; ".join(f"{o.step.name}: {o.status} ({o.message})" for o in failed))
        return summary

    @staticmethod
    def _stop_steps(signum: int, wait_s: float) -> None:
        """Start no further step; SIGTERM the running ``train.py`` (its process group), SIGKILL after ``wait_s``."""
        _CHILDREN.signum = _CHILDREN.signum or signum
        _CHILDREN.signal_all(signal.SIGTERM)
        deadline = time.time() + wait_s
        while _CHILDREN.procs and time.time() < deadline:
            time.sleep(0.05)
        if _CHILDREN.procs:
            _CHILDREN.signal_all(signal.SIGKILL)
            time.sleep(0.2)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop the running ``train.py`` (its last checkpoint stays) and requeue this job to resume."""
        import submitit

        print("Preempted or out of time: stopping the running step; the requeued job resumes it", flush=True)
        self._stop_steps(signal.SIGUSR2, wait_s=_CHILDREN.KILL_AFTER_S)
        return submitit.helpers.DelayedSubmission(ChainJob(self.steps, self.root, self.nproc))


# --------------------------------------------------------------------------- records and states
def _append_record(folder: str, record: dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(osp.join(folder, JOBS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(folder: str) -> dict[str, dict[str, Any]]:
    """The latest submission record of every step output folder in ``folder``'s :data:`JOBS_FILE`."""
    latest: dict[str, dict[str, Any]] = {}
    path = osp.join(folder, JOBS_FILE)
    if not osp.isfile(path):
        return latest
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a crash: the others still count
                continue
            if isinstance(record, dict) and isinstance(record.get("steps"), list):
                for step in record["steps"]:
                    if isinstance(step, dict) and step.get("output_dir"):
                        latest[osp.abspath(str(step["output_dir"]))] = record
    return latest


_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED",
           "PREEMPTED"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _expand_array(job_id: str) -> list[str]:
    """``123_[0-3,7%2]`` (a pending array in sacct / squeue) -> ``123_0 ... 123_3, 123_7``."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    out = []
    for part in match.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{match.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _slurm_states(job_ids: Sequence[str], run: Callable[[list[str]], str]) -> dict[str, str]:
    """SLURM's state of each job id: ``sacct`` (accounting, also ended jobs), then ``squeue`` (this user's
    live jobs, which win); a job neither lists while one of them answered has ENDED, UNKNOWN if none did."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    answered = False
    for cmd in (["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ids],
                ["squeue", "-h", "-o", "%i|%T", "-u", getpass.getuser()]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            text = run(cmd)
        except (OSError, subprocess.SubprocessError):
            continue
        answered = True
        for line in text.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[0] and parts[1].strip():
                for jid in _expand_array(parts[0]):
                    states[jid] = parts[1].split()[0].upper()
    return {jid: states.get(jid, "ENDED" if answered else "UNKNOWN") for jid in job_ids}


def _run_quiet(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _local_state(record: dict[str, Any]) -> str:
    """A submitit-local job: RUNNING while its controller process lives, else ENDED (UNKNOWN elsewhere)."""
    if record.get("host") != socket.gethostname():
        return "UNKNOWN"
    try:
        pid = int(str(record["job_id"]))
        os.kill(pid, 0)
    except (ValueError, KeyError, ProcessLookupError):
        return "ENDED"
    except PermissionError:
        return "RUNNING"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"submitit" not in f.read():
                return "ENDED"  # the id was reused by an unrelated process
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return "ENDED"
    except OSError:
        pass
    return "RUNNING"


def job_states(records: Sequence[dict[str, Any]], run: Callable[[list[str]], str] = _run_quiet) -> dict[str, str]:
    """The scheduler state of each recorded job id (SLURM's names; submitit-local: RUNNING / ENDED)."""
    states: dict[str, str] = {}
    slurm = [str(r["job_id"]) for r in records if r.get("launcher") == "slurm"]
    states.update(_slurm_states(slurm, run))
    for r in records:
        if r.get("launcher") != "slurm":
            states[str(r["job_id"])] = _local_state(r)
    return states


@dataclass
class StepState:
    """Where one step of a submitted sweep stands."""

    step: Step
    state: str  # one of STATES
    job_id: str = ""
    log: str = ""
    note: str = ""


def _job_log(record: dict[str, Any]) -> str:
    return osp.join(str(record.get("folder", "")), f"{record['job_id']}_0_log.out")


def step_states(jobs: Sequence[Sequence[Step]], folder: str,
                states: dict[str, str] | None = None) -> list[StepState]:
    """Each step's state from its output folder, the latest submission record and the job's state."""
    records = read_records(folder)
    if states is None:
        states = job_states(list({id(r): r for r in records.values()}.values()))
    out: list[StepState] = []
    for job in jobs:
        first_open = True
        for step in job:
            rec = records.get(osp.abspath(step.output_dir))  # the step's latest submission
            sid = str(rec["job_id"]) if rec else ""
            job_state = states.get(sid, "UNKNOWN") if rec else ""
            step_log = osp.join(step.output_dir, "log.txt")
            log = step_log if osp.isfile(step_log) else (_job_log(rec) if rec else "")
            if step.is_done():
                out.append(StepState(step, "finished", sid, log))
                continue
            busy = _in_use(step.output_dir)
            if busy:  # a live train.py holds the folder's run.lock
                holder = re.search(r"\(PID [^)]*\)", busy)
                out.append(StepState(step, "running", sid, log, holder.group(0)[1:-1] if holder else ""))
            elif not rec:
                note = "partly trained" if step.has_started_training() else ""
                out.append(StepState(step, "not submitted", "", log, note))
            elif job_state in _QUEUED:
                out.append(StepState(step, "queued", sid, log, job_state.lower()))
            elif job_state in _RUNNING:
                what = "running" if first_open else "queued"
                out.append(StepState(step, what, sid, log, "" if first_open else "after the steps before it"))
            elif job_state == "UNKNOWN":
                out.append(StepState(step, "queued", sid, log, "state unknown (no sacct/squeue answer)"))
            else:
                out.append(StepState(step, "failed", sid, log, f"job {job_state.lower()}"))
            first_open = False
    return out


def print_status(jobs: Sequence[Sequence[Step]], folder: str, states: dict[str, str] | None = None) -> int:
    """Print one line per step (state, job id, step, log) and a count per state."""
    rows = step_states(jobs, folder, states)
    width = max([len(r.step.name) for r in rows] + [4])
    print(f"{'STATE':14s}{'JOB':12s}{'STEP':{width}s}  LOG")
    for r in rows:
        note = f"  ({r.note})" if r.note else ""
        print(f"{r.state:14s}{r.job_id or '-':12s}{r.step.name:{width}s}  {r.log or '-'}{note}")
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    print(f"{len(rows)} step{'' if len(rows) == 1 else 's'}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f" (submissions: {osp.join(folder, JOBS_FILE)})")
    return 0


# --------------------------------------------------------------------------- submission
def _selectable(jobs: Sequence[Sequence[Step]], folder: str, overwrite: bool) -> tuple[list[list[Step]], int]:
    """The jobs to submit (reporting the others) and the number refused with a conflict."""
    records = read_records(folder)
    live = job_states(list({id(r): r for r in records.values()}.values())) if records else {}
    chosen, refused = [], 0
    for job in jobs:
        head = job[0]
        record = records.get(osp.abspath(head.output_dir))
        state = live.get(str(record["job_id"]), "") if record else ""
        if record and (state in _QUEUED or state in _RUNNING):
            print(f"skip (job {record['job_id']} is {state.lower()}) {head.name}")
            continue
        busy = next((b for b in (_in_use(s.output_dir) for s in job) if b), None)
        if busy:
            print(f"FAILED {head.name}: {busy}")
            refused += 1
            continue
        if not overwrite:
            problem = next((p for p in (s.conflict() for s in job) if p), None)
            if problem:
                print(f"FAILED {head.name}: {problem}")
                refused += 1
                continue
            if all(s.is_done() for s in job):
                print(f"skip (finished: {head.results_path()}) {head.name}")
                continue
        chosen.append(list(job))
    return chosen, refused


def submit(jobs: Sequence[Sequence[Step]], ctx: Context, protocol: str, settings: ClusterSettings, launcher: str,
           overwrite: bool = False, dry_run: bool = False, wait: bool = False) -> int:
    """Submit the unfinished jobs (one submitit job each); 0 if all were submitted (and, waiting, finished)."""
    if launcher not in LAUNCHERS[1:]:
        raise ProtocolError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    folder = jobs_folder(settings, ctx.output, protocol)
    if dry_run:
        _submitit(launcher)
        print(f"# {len(jobs)} job{'' if len(jobs) == 1 else 's'}, one {launcher} job each (steps in order); "
              f"submitit folder {folder}")
        for i, job in enumerate(jobs):
            for step in job:
                print(f"# job {i}: {step.command(overwrite, resolve_epoch=False)}")
        if launcher == "slurm":
            print(sbatch_script(settings, folder, len(jobs)))
        return 0
    chosen, refused = _selectable(jobs, folder, overwrite)
    if not chosen:
        print(f"Nothing to submit ({len(jobs) - refused} of {len(jobs)} jobs finished or in the queue"
              f"{f', {refused} refused' if refused else ''}).")
        return 1 if refused else 0
    nproc = max(1, settings.gpus_per_job)
    if overwrite:  # here, not in the job: a requeued job (or SLURM's own requeue) must only resume
        for job in chosen:
            for step in job:
                if osp.isdir(step.output_dir):
                    print(f"moved the previous run {step.output_dir} aside to {move_aside(step.output_dir)}")
    calls = [ChainJob(job, ctx.root, nproc) for job in chosen]
    if launcher == "slurm":
        executor = _slurm_executor(folder, settings)
        with executor.batch():
            futures = [executor.submit(call) for call in calls]
        handles = list(zip(chosen, futures))
        for job, future in handles:
            _record(folder, launcher, str(future.job_id), job)
        ids = [str(f.job_id) for f in futures]
        print(f"Submitted {len(ids)} SLURM job{'' if len(ids) == 1 else 's'} ({ids[0]}"
              f"{f' ... {ids[-1]}' if len(ids) > 1 else ''}); logs and records in {folder}")
        print("Watch with: python -m restore.protocols status <the same arguments as run-all>")
        if not wait:
            return 1 if refused else 0
        _wait([{"job_id": i, "launcher": "slurm"} for i in ids])
    else:
        failed = _run_local(calls, chosen, folder, settings)
        refused += failed
    print_status(chosen, folder)
    states = step_states(chosen, folder)
    return 1 if refused or any(s.state != "finished" for s in states) else 0


def _record(folder: str, launcher: str, job_id: str, job: Sequence[Step]) -> None:
    _append_record(folder, {
        "job_id": job_id, "launcher": launcher, "host": socket.gethostname(), "folder": folder,
        "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "steps": [{"name": s.name, "output_dir": osp.abspath(s.output_dir)} for s in job],
    })


#: Seconds between two looks at the queue while ``--wait`` waits.
WAIT_POLL_S = 30.0


def _wait(records: Sequence[dict[str, Any]]) -> None:
    """Until none of these jobs is queued or running (by :func:`job_states`; UNKNOWN counts as ended)."""
    while any(state in _QUEUED or state in _RUNNING for state in job_states(records).values()):
        time.sleep(WAIT_POLL_S)


def _submit_quietly(executor: Any, call: ChainJob, log: str) -> Any:
    """``executor.submit(call)`` with the stderr of submitit's local controller process going to ``log``
    (on Ctrl-C it would print a KeyboardInterrupt traceback on the terminal; the job has its own log)."""
    os.makedirs(osp.dirname(log), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "a") as f:
            os.dup2(f.fileno(), 2)
        return executor.submit(call)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _run_local(calls: Sequence[ChainJob], chosen: Sequence[Sequence[Step]], folder: str,
               settings: ClusterSettings) -> int:
    """submitit's LocalExecutor, at most ``array_parallelism`` jobs at once (default 1); failed jobs."""
    submitit = _submitit("submitit-local")
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    executor.update_parameters(timeout_min=settings.time, gpus_per_node=settings.gpus_per_job,
                               signal_delay_s=settings.signal_delay_s, stderr_to_stdout=True)
    if settings.setup:
        executor.update_parameters(setup=list(settings.setup))
    limit = settings.array_parallelism or 1
    pending = list(zip(calls, chosen))
    running: list[tuple[Any, Sequence[Step]]] = []
    failed = 0
    total, finished = len(pending), 0
    while pending or running:
        while pending and len(running) < limit:
            call, job = pending.pop(0)
            future = _submit_quietly(executor, call, osp.join(folder, "controllers.err"))
            _record(folder, "submitit-local", str(future.job_id), job)
            running.append((future, job))
        time.sleep(0.2)
        if _CHILDREN.signum:  # Ctrl-C / SIGTERM to this command: cancel the running jobs, then stop
            for future, _ in running:
                future.cancel()  # SIGINT to submitit's controller, which stops the job (and its train.py)
            deadline = time.time() + _CHILDREN.KILL_AFTER_S
            while any(not f.done() for f, _ in running) and time.time() < deadline:
                time.sleep(0.1)
            with _CHILDREN.lock:
                _CHILDREN.stopped += len(running)
            raise Interrupted(_CHILDREN.signum)
        for item in [r for r in running if r[0].done()]:
            running.remove(item)
            future, job = item
            finished += 1
            ok = all(step.is_done() for step in job)  # from the output folders (no result pickle is read)
            failed += not ok
            log = _job_log({"job_id": future.job_id, "folder": folder})
            print(f"[{finished}/{total}] {'done' if ok else 'FAILED'}: job {future.job_id} {job[0].name}"
                  f"{'' if ok else f' (see {log})'}", flush=True)
    return failed
