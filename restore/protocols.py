"""The evaluation protocols as commands: what ``scripts/**/*.sh`` run (the logic lives here, testable).

Every step is one ``python train.py ...`` call of the CoOp family; this module only chooses its
arguments (trainer class, config file, per-dataset options, output folder, checkpoint to load)::

    python -m restore.protocols base2new-train  TRAINER DATASET SEED [opts...]
    python -m restore.protocols base2new-test   TRAINER DATASET SEED [opts...]   # --sub new (default) | base
    python -m restore.protocols xd-train        TRAINER SEED [opts...]           # ImageNet, all classes
    python -m restore.protocols xd-test         TRAINER DATASET|all SEED [opts...]
    python -m restore.protocols dg-test         TRAINER DATASET|all SEED [opts...]
    python -m restore.protocols fewshot-train   TRAINER DATASET SHOTS SEED [opts...]
    python -m restore.protocols run-all         PROTOCOL TRAINER[,TRAINER...] [--seeds 1,2,3] [--datasets ...] [--gpus 0,1] [opts...]
    python -m restore.protocols list            # trainers, their classes and config files

``TRAINER`` is a method's script name (``python -m restore.methods`` lists them). Environment variables (each also a flag):
``DATA`` (dataset root, required), ``CFG`` (config name in the trainer's config folder, or a path to a
YAML file), ``SHOTS`` (training shots, default 16), ``OUTPUT`` (output root, default ``output``; with a
backbone of random weights in the opts, e.g. ``MODEL.BACKBONE.NAME tiny``, ``output_random``), ``SUB``
(class split of ``base2new-test``). Output folders: see :mod:`restore.evaluation.results`.

Runs are idempotent: a step whose ``results.json`` exists is skipped, a crashed training resumes
from its last checkpoint (``train.py`` does that), and an evaluation whose model was retrained since
is redone. Evaluation steps load the last epoch written by the training run, read from its
``checkpoint`` file (no hard-coded ``--load-epoch``). A step whose folder another run is using (its
``run.lock``) fails with one line naming that process. SIGINT (Ctrl-C) or SIGTERM stops the running
``train.py`` processes too (each runs in its own process group, signalled and waited for), prints one
line and exits with 130 / 143; the same command then resumes where it stopped.

Each step records the user's trailing opts in ``<run folder>/protocol_opts.json`` when it runs; a
finished (or partly trained) step asked again with other opts is refused with one line that says
what differs, instead of being skipped as if it were the run asked for. ``--overwrite`` redoes a
step: a training step's old folder is first moved aside to ``<folder>.old-<YYYYmmdd-HHMMSS>`` (kept,
ignored by the tables) and the model is trained from scratch; its evaluations then see the new model.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from restore.datasets.catalog import resolve
from restore.evaluation.results import (
    DEFAULT_OUTPUT_ROOT,
    LOCK_FILE,
    OLD_RUN_SUFFIX,
    PROTOCOL_DIRS,
    RESULTS_FILE,
    run_dir,
)
from restore.methods import MethodSpec, config_path, dataset_config, get_method, list_methods, load_plugins

__all__ = [
    "Step", "ProtocolError", "BASE2NEW_DATASETS", "XD_TARGETS", "DG_TARGETS",
    "FEWSHOT_SHOTS", "OPTS_FILE", "get_spec", "resolve_config", "last_epoch",
    "base2new_train", "base2new_test", "xd_train", "xd_test", "dg_test", "fewshot_train", "build_jobs",
    "run_steps", "run_jobs", "move_aside", "check_steps", "Interrupted", "main",
]

BASE2NEW_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                     "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_SOURCE = "imagenet"
XD_TARGETS = [d for d in BASE2NEW_DATASETS if d != XD_SOURCE]
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
FEWSHOT_SHOTS = [1, 2, 4, 8, 16]
DEFAULT_SEEDS = [1, 2, 3]


class ProtocolError(RuntimeError):
    """A problem with the request (unknown trainer, missing config, untrained model) — one sentence."""


def get_spec(trainer: str) -> MethodSpec:
    """The registered method for a script name, alias, label or trainer class (plugins loaded first)."""
    load_plugins()
    try:
        return get_method(trainer)
    except KeyError:
        raise ProtocolError(f"Unknown trainer {trainer!r}; choose one of "
                            f"{', '.join(s.key for s in list_methods())}") from None


_PROTOCOL_FALLBACK = {"dg": "xd", "fewshot": "base2new", "xd": "base2new"}
_PROTOCOL_ALIASES = {"cross_dataset": "xd", "cross_datasets": "xd", "domain_generalization": "dg", "few_shot": "fewshot",
                     "b2n": "base2new", "base_to_novel": "base2new"}


def normalize_protocol(protocol: str) -> str:
    p = protocol.strip().lower()
    p = _PROTOCOL_ALIASES.get(p, p)
    if p not in PROTOCOL_DIRS:
        raise ProtocolError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOL_DIRS)}")
    return p


def dataset_key(name: str) -> str:
    try:
        return resolve(name)
    except ValueError as err:
        raise ProtocolError(str(err)) from None


def _config_candidates(spec: MethodSpec, protocol: str, dataset: str) -> list[str]:
    out: list[str] = []
    p: Optional[str] = protocol
    while p is not None:
        out += list(spec.configs.get(f"{p}:{dataset}", ())) + list(spec.configs.get(p, ()))
        p = _PROTOCOL_FALLBACK.get(p)
    return list(dict.fromkeys(out))


def resolve_config(spec: MethodSpec, protocol: str, dataset: str, cfg: str = "", root: str = "") -> tuple[str, str]:
    """``(config file, config name)`` for a trainer/protocol/dataset; ``cfg`` (``CFG=``) overrides.

    ``cfg`` is a path to a YAML file, or a name looked up in the folders of the trainer's defaults;
    a name with a ``<name>:<dataset>`` entry in the trainer's table uses that dataset's own file.
    The returned name (the run folder) is the grid's, not the dataset file's: ``cfg``, or the
    protocol's general config, so every dataset of a grid lands in one results table.
    """
    base = config_path(spec, "")
    candidates = _config_candidates(spec, protocol, dataset)
    if cfg:
        if cfg.endswith((".yaml", ".yml")) or os.sep in cfg:
            path = cfg if osp.isabs(cfg) or osp.isfile(cfg) or not root else osp.join(root, cfg)
            if not osp.isfile(path):
                raise ProtocolError(f"CFG={cfg!r}: no such config file")
            return osp.abspath(path), osp.splitext(osp.basename(path))[0]
        for cand in spec.configs.get(f"{cfg}:{dataset}", ()):
            path = osp.join(base, cand + ".yaml")
            if osp.isfile(path):
                return path, cfg
        folders = list(dict.fromkeys([c.split("/")[0] for c in candidates] + [spec.trainer]))
        for folder in folders:
            path = osp.join(base, folder, cfg + ".yaml")
            if osp.isfile(path):
                return path, cfg
        raise ProtocolError(f"CFG={cfg!r}: not found in configs/trainers/{{{','.join(folders)}}}/; "
                            f"available: {_available(base, folders)}")
    for cand in candidates:
        path = osp.join(base, cand + ".yaml")
        if osp.isfile(path):
            # a dataset's own file (MMRL's ImageNet schedule) runs under the protocol's config name, so
            # the results tables group every dataset of the grid together
            general = [c for c in _config_candidates(spec, protocol, "") if osp.isfile(osp.join(base, c + ".yaml"))]
            return path, osp.basename(general[0] if general else cand)
    folders = list(dict.fromkeys(c.split("/")[0] for c in candidates)) or [spec.trainer]
    raise ProtocolError(f"No config for {spec.key} ({protocol}, {dataset}): tried {candidates or 'none'}; "
                        f"available: {_available(base, folders)}. Pass CFG=<name or path>.")


def _available(base: str, folders: Sequence[str]) -> list[str]:
    found = []
    for folder in folders:
        d = osp.join(base, folder)
        if osp.isdir(d):
            found += [f"{folder}/{osp.splitext(f)[0]}" for f in sorted(os.listdir(d)) if f.endswith(".yaml")]
    return found


# --------------------------------------------------------------------------- steps
#: What a step was run with, written in its run folder when it starts: the user's trailing opts (not the
#: per-dataset ones the runner adds), an id of the run and, for an evaluation, the id of the model's run.
OPTS_FILE = "protocol_opts.json"
#: Opts that do not change what a run computes: a finished run asked again with other values of these
#: is still skipped.
NEUTRAL_OPTS = frozenset({"DATALOADER.NUM_WORKERS", "DATALOADER.TEST.BATCH_SIZE", "TRAIN.PRINT_FREQ"})


def _read_json(path: str) -> Optional[dict[str, Any]]:
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _opts_dict(opts: Sequence[str]) -> dict[str, str]:
    """``KEY VALUE ...`` as a dict (the last value of a key wins, as in yacs), neutral keys left out."""
    out: dict[str, str] = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        out[str(key)] = str(value)
    if len(opts) % 2:
        out[str(opts[-1])] = "<no value>"
    return {k: v for k, v in out.items() if k not in NEUTRAL_OPTS}


def _opts_text(opts: dict[str, str]) -> str:
    return " ".join(f"{k} {v}" for k, v in opts.items()) or "none"


@dataclass
class Step:
    """One ``train.py`` call; ``model_dir`` set = evaluation of that training run's last checkpoint.

    ``user_opts`` are the user's trailing config opts (recorded in :data:`OPTS_FILE`, compared before
    a finished step is skipped); ``None`` = not known (no record, no check).
    """

    name: str
    output_dir: str
    argv: list[str]
    model_dir: Optional[str] = None
    eval_only: bool = False
    user_opts: Optional[list[str]] = None

    def results_path(self) -> str:
        return osp.join(self.output_dir, RESULTS_FILE)

    def record_path(self) -> str:
        return osp.join(self.output_dir, OPTS_FILE)

    def is_stale(self) -> bool:
        """Finished, but its model was retrained afterwards (or is being retrained)."""
        if not (self.model_dir and osp.isfile(self.results_path())):
            return False
        evaluated = (_read_json(self.record_path()) or {}).get("model_run_id")
        current = (_read_json(osp.join(self.model_dir, OPTS_FILE)) or {}).get("run_id")
        if evaluated and current and evaluated != current:
            return True
        trained = osp.join(self.model_dir, RESULTS_FILE)
        return osp.isfile(trained) and osp.getmtime(trained) > osp.getmtime(self.results_path())

    def is_done(self) -> bool:
        return osp.isfile(self.results_path()) and not self.is_stale()

    def has_started_training(self) -> bool:
        """A training step with a checkpoint in its folder (``train.py`` would resume it)."""
        if self.eval_only or not osp.isdir(self.output_dir):
            return False
        return any(osp.isfile(osp.join(self.output_dir, d, "checkpoint")) for d in os.listdir(self.output_dir))

    def mismatch(self) -> Optional[str]:
        """One sentence if the finished (or resumable) run in ``output_dir`` was run with other opts."""
        # only a run that would be skipped (finished) or resumed (partly trained); a stale evaluation is redone
        finished = self.is_done()
        if self.user_opts is None or not (finished or self.has_started_training()):
            return None
        what = "finished" if finished else "partly trained"
        record = _read_json(self.record_path())
        kept = "" if self.eval_only else " (the old folder is kept as <folder>.old-<time>)"
        advice = f"pass --overwrite to redo it{kept}, or set OUTPUT=<another folder> for this one"
        if record is not None and isinstance(record.get("opts"), list):
            before, now = _opts_dict(record["opts"]), _opts_dict(self.user_opts)
            if before == now:
                return None
            diff = [f"{k} {before.get(k, '<not set>')} -> {now.get(k, '<not set>')}"
                    for k in list(before) + [k for k in now if k not in before] if before.get(k) != now.get(k)]
            return (f"{self.output_dir} holds a {what} run with other options ({'; '.join(diff)}; was: "
                    f"{_opts_text(before)}; now: {_opts_text(now)}): {advice}")
        # A run from before the record existed: compare the backbone its results.json names.
        results = _read_json(self.results_path()) or {}
        ran, asked = results.get("backbone"), self._asked_backbone()
        if ran and asked and str(ran) != asked:
            return (f"{self.output_dir} holds a {what} run with backbone {ran!r}, not the {asked!r} asked for: "
                    f"{advice}")
        return None

    def model_mismatch(self) -> Optional[str]:
        """For an evaluation: one sentence if the model was trained with other model-defining opts
        (backbone, TRAINER.*, DATASET.*; the schedule does not matter here) than the ones asked now."""
        if not self.model_dir or self.user_opts is None:
            return None
        record = _read_json(osp.join(self.model_dir, OPTS_FILE))
        if record is None or not isinstance(record.get("opts"), list):
            return None

        def defining(opts: Sequence[str]) -> dict[str, str]:
            return {k: v for k, v in _opts_dict(opts).items() if not k.startswith(("OPTIM.", "TRAIN."))}

        trained, now = defining(record["opts"]), defining(self.user_opts)
        if trained == now:
            return None
        return (f"the model in {self.model_dir} was trained with {_opts_text(trained)}, but this evaluation "
                f"asks for {_opts_text(now)}: pass the training step's trailing options to this step too")

    def conflict(self) -> Optional[str]:
        """:meth:`mismatch` or :meth:`model_mismatch`: why this step must not run (or be skipped) as asked."""
        return self.mismatch() or self.model_mismatch()

    def _asked_backbone(self) -> Optional[str]:
        asked = _opts_dict(self.user_opts or []).get("MODEL.BACKBONE.NAME")
        if asked is not None:
            return asked
        if "--config-file" not in self.argv:
            return None
        path = self.argv[self.argv.index("--config-file") + 1]
        try:
            import yaml

            with open(path) as f:
                name = ((yaml.safe_load(f) or {}).get("MODEL") or {}).get("BACKBONE", {}).get("NAME")
        except Exception:  # noqa: BLE001 - unreadable config: nothing to compare
            return None
        return str(name) if name else None

    def write_record(self) -> None:
        """Write :data:`OPTS_FILE` (called when the step starts; ``output_dir`` is created)."""
        import datetime
        import json

        os.makedirs(self.output_dir, exist_ok=True)
        record: dict[str, Any] = {
            "opts": list(self.user_opts or []),
            "run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "step": self.name,
        }
        if self.model_dir:
            record["model_dir"] = self.model_dir
            record["model_run_id"] = (_read_json(osp.join(self.model_dir, OPTS_FILE)) or {}).get("run_id")
        tmp = self.record_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, self.record_path())

    def train_argv(self, overwrite: bool = False, resolve_epoch: bool = True) -> list[str]:
        """The full argument list for ``train.py`` (resolves the checkpoint epoch now)."""
        extra: list[str] = []
        if self.eval_only:
            extra.append("--eval-only")
            if self.model_dir:
                extra += ["--model-dir", self.model_dir]
                epoch = last_epoch(self.model_dir) if resolve_epoch else "<last>"
                if epoch is not None:
                    extra += ["--load-epoch", str(epoch)]
        if overwrite or self.is_stale():
            extra.append("--overwrite")
        argv = list(self.argv)
        # options go before the trailing config opts
        cut = argv.index("--") if "--" in argv else len(argv)
        return argv[:cut] + extra + argv[cut + 1:]

    def command(self, overwrite: bool = False, resolve_epoch: bool = True) -> str:
        return shlex.join(["python", "train.py"] + self.train_argv(overwrite, resolve_epoch))


_CKPT_RE = re.compile(r"model\.pth\.tar-(\d+)$")


def last_epoch(model_dir: str) -> Optional[int]:
    """The epoch of the last checkpoint of a *finished* training folder (None: ``model-best``).

    Read from each model's ``checkpoint`` file, as Dassl writes it; all models must agree.
    """
    if not osp.isdir(model_dir):
        raise ProtocolError(f"{model_dir} does not exist: train the model first (see scripts/*/train.sh)")
    if not osp.isfile(osp.join(model_dir, RESULTS_FILE)):
        raise ProtocolError(f"Training in {model_dir} is not finished (no {RESULTS_FILE}); re-run its training "
                            "command to resume it from the last checkpoint")
    epochs = set()
    for name in sorted(os.listdir(model_dir)):
        pointer = osp.join(model_dir, name, "checkpoint")
        if not osp.isfile(pointer):
            continue
        with open(pointer) as f:
            fname = f.readline().strip()
        if not osp.isfile(osp.join(model_dir, name, fname)):
            raise ProtocolError(f"{pointer} names {fname}, which is missing")
        match = _CKPT_RE.match(fname)
        epochs.add(int(match.group(1)) if match else None)
    if not epochs:
        raise ProtocolError(f"No checkpoint in {model_dir} (no <model>/checkpoint file)")
    if len(epochs) > 1:
        raise ProtocolError(f"The models in {model_dir} point to different checkpoints: {sorted(map(str, epochs))}")
    return epochs.pop()


@dataclass
class Context:
    """What every step needs besides trainer/dataset/seed (env vars or flags)."""

    data: str = ""
    output: str = DEFAULT_OUTPUT_ROOT
    cfg: str = ""
    shots: int = 16
    opts: list[str] = field(default_factory=list)
    root: str = ""
    check_data: bool = True

    def __post_init__(self) -> None:
        self.root = self.root or os.getcwd()

    def data_root(self) -> str:
        if not self.data:
            raise ProtocolError("DATA is not set: export DATA=/path/to/datasets (the folder that holds dtd/, "
                                "eurosat/, imagenet/, ...; see DATASETS.md)")
        if self.check_data and not osp.isdir(self.data):
            raise ProtocolError(f"DATA={self.data!r} is not a folder")
        return self.data

    def rel(self, path: str) -> str:
        rel = osp.relpath(path, os.getcwd())
        return path if rel.startswith("..") else rel


def _argv(ctx: Context, spec: MethodSpec, dataset: str, seed: int, cfg_path: str, out_dir: str,
          protocol: str, opts: Sequence[str]) -> list[str]:
    dcfg = dataset_config(dataset, spec)
    if not dcfg:
        raise ProtocolError(f"No dataset config {dataset}.yaml in the configs/datasets folder of any plugin")
    argv = ["--root", ctx.data_root(), "--seed", str(seed), "--trainer", spec.trainer,
            "--dataset-config-file", ctx.rel(dcfg), "--config-file", ctx.rel(cfg_path), "--output-dir", out_dir, "--"]
    # the method's dataset overrides are applied by the launcher (from DATASET.NAME and PROTOCOL)
    return argv + ["PROTOCOL", PROTOCOL_DIRS[protocol], *opts, *spec.opts.get(protocol, ()), *ctx.opts]


def _train_cfg(ctx: Context, spec: MethodSpec, protocol: str, dataset: str) -> tuple[str, str]:
    return resolve_config(spec, protocol, dataset, ctx.cfg, ctx.root)


def base2new_train(ctx: Context, trainer: str, dataset: str, seed: int) -> Step:
    spec, dataset = get_spec(trainer), dataset_key(dataset)
    cfg_path, cfg = _train_cfg(ctx, spec, "base2new", dataset)
    out = run_dir(ctx.output, "base2new", "train_base", dataset, ctx.shots, spec.display, cfg, seed)
    opts = ["DATASET.NUM_SHOTS", str(ctx.shots), "DATASET.SUBSAMPLE_CLASSES", "base"]
    return Step(f"base2new train_base {spec.display} {dataset} seed{seed}", out,
                _argv(ctx, spec, dataset, seed, cfg_path, out, "base2new", opts), user_opts=list(ctx.opts))


def base2new_test(ctx: Context, trainer: str, dataset: str, seed: int, sub: str = "new") -> Step:
    if sub not in ("new", "base"):
        raise ProtocolError(f"SUB must be 'new' or 'base', got {sub!r}")
    spec, dataset = get_spec(trainer), dataset_key(dataset)
    cfg_path, cfg = _train_cfg(ctx, spec, "base2new", dataset)
    model_dir = run_dir(ctx.output, "base2new", "train_base", dataset, ctx.shots, spec.display, cfg, seed)
    out = run_dir(ctx.output, "base2new", f"test_{sub}", dataset, ctx.shots, spec.display, cfg, seed)
    opts = ["DATASET.NUM_SHOTS", str(ctx.shots), "DATASET.SUBSAMPLE_CLASSES", sub]
    return Step(f"base2new test_{sub} {spec.display} {dataset} seed{seed}", out,
                _argv(ctx, spec, dataset, seed, cfg_path, out, "base2new", opts),
                model_dir=model_dir if spec.trains else None, eval_only=True, user_opts=list(ctx.opts))


def xd_train(ctx: Context, trainer: str, seed: int) -> Step:
    spec = get_spec(trainer)
    cfg_path, cfg = _train_cfg(ctx, spec, "xd", XD_SOURCE)
    out = run_dir(ctx.output, "xd", "train", XD_SOURCE, ctx.shots, spec.display, cfg, seed)
    opts = ["DATASET.NUM_SHOTS", str(ctx.shots)]
    return Step(f"xd train {spec.display} {XD_SOURCE} seed{seed}", out,
                _argv(ctx, spec, XD_SOURCE, seed, cfg_path, out, "xd", opts), user_opts=list(ctx.opts))


def _transfer_test(ctx: Context, protocol: str, trainer: str, dataset: str, seed: int) -> Step:
    spec, dataset = get_spec(trainer), dataset_key(dataset)
    check_target(protocol, dataset)
    # Folders are named by the *training* config; the evaluation may use a protocol-specific file (MMRL's
    # domain_generalization yaml), else the training one.
    train_path, cfg = _train_cfg(ctx, spec, "xd", XD_SOURCE)
    cfg_path = train_path if ctx.cfg else _train_cfg(ctx, spec, protocol, XD_SOURCE)[0]
    model_dir = run_dir(ctx.output, "xd", "train", XD_SOURCE, ctx.shots, spec.display, cfg, seed)
    out = run_dir(ctx.output, protocol, "test", dataset, ctx.shots, spec.display, cfg, seed)
    return Step(f"{protocol} test {spec.display} {dataset} seed{seed}", out,
                _argv(ctx, spec, dataset, seed, cfg_path, out, protocol, []),
                model_dir=model_dir if spec.trains else None, eval_only=True, user_opts=list(ctx.opts))


def check_target(protocol: str, dataset: str) -> None:
    """Only the protocol's own targets: the 10 non-ImageNet datasets (xd), ImageNet's 4 variants (dg)."""
    targets, other, script = ((XD_TARGETS, DG_TARGETS, "scripts/xd/test_dg.sh (dg-test)") if protocol == "xd"
                              else (DG_TARGETS, XD_TARGETS, "scripts/xd/test_xd.sh (xd-test)"))
    if dataset in targets:
        return
    title = "cross-dataset" if protocol == "xd" else "domain-generalization"
    hint = f"; {dataset} is a {'domain-generalization' if protocol == 'xd' else 'cross-dataset'} target: use {script}" \
        if dataset in other else (f"; {dataset} is the training (source) dataset, evaluated by the training step itself"
                                  if dataset == XD_SOURCE else "")
    raise ProtocolError(f"{dataset} is not a {title} target; choose from {', '.join(targets)} (or all){hint}")


def xd_test(ctx: Context, trainer: str, dataset: str, seed: int) -> Step:
    return _transfer_test(ctx, "xd", trainer, dataset, seed)


def dg_test(ctx: Context, trainer: str, dataset: str, seed: int) -> Step:
    return _transfer_test(ctx, "dg", trainer, dataset, seed)


def fewshot_train(ctx: Context, trainer: str, dataset: str, shots: int, seed: int) -> Step:
    spec, dataset = get_spec(trainer), dataset_key(dataset)
    cfg_path, cfg = _train_cfg(ctx, spec, "fewshot", dataset)
    out = run_dir(ctx.output, "fewshot", "train", dataset, shots, spec.display, cfg, seed)
    opts = ["DATASET.NUM_SHOTS", str(shots)]
    return Step(f"fewshot train {spec.display} {dataset} {shots}-shot seed{seed}", out,
                _argv(ctx, spec, dataset, seed, cfg_path, out, "fewshot", opts), user_opts=list(ctx.opts))


def _dataset_list(value: str, default: Sequence[str]) -> list[str]:
    if value in ("", "all"):
        return list(default)
    return [dataset_key(d) for d in re.split(r"[,\s]+", value.strip()) if d]


def build_jobs(ctx: Context, protocol: str, trainer: str, seeds: Sequence[int], datasets: str = "",
               shots: Sequence[int] = (), test_base: bool = False) -> list[list[Step]]:
    """The protocol's grid as jobs; a job is a list of steps run in order (training first)."""
    protocol = normalize_protocol(protocol)
    jobs: list[list[Step]] = []
    if protocol == "base2new":
        for dataset in _dataset_list(datasets, BASE2NEW_DATASETS):
            for seed in seeds:
                job = [base2new_train(ctx, trainer, dataset, seed), base2new_test(ctx, trainer, dataset, seed, "new")]
                if test_base:
                    job.append(base2new_test(ctx, trainer, dataset, seed, "base"))
                jobs.append(job)
    elif protocol in ("xd", "dg"):
        for seed in seeds:
            job = [xd_train(ctx, trainer, seed)]
            if protocol == "xd":
                job += [xd_test(ctx, trainer, d, seed) for d in _dataset_list(datasets, XD_TARGETS)]
            job += [dg_test(ctx, trainer, d, seed) for d in (_dataset_list(datasets, DG_TARGETS) if protocol == "dg"
                                                             else DG_TARGETS)]
            jobs.append(job)
    else:
        for dataset in _dataset_list(datasets, BASE2NEW_DATASETS):
            for k in shots or FEWSHOT_SHOTS:
                for seed in seeds:
                    jobs.append([fewshot_train(ctx, trainer, dataset, k, seed)])
    return jobs


# --------------------------------------------------------------------------- execution
def _run_in_process(argv: list[str], root: str) -> int:
    """Run the launcher (:func:`restore.launch.cli`) in this interpreter (one import of torch for many steps)."""
    from restore import launch

    with _CHILDREN.lock:
        _CHILDREN.in_process += 1  # from now on a signal raises Interrupted here
    started = False
    try:
        _CHILDREN.check()
        started = True
        rc = launch.cli(argv)
    except Interrupted:
        _CHILDREN.stopped += started
        raise
    except SystemExit as err:  # argparse errors
        rc = err.code if isinstance(err.code, int) else 1
    except Exception as err:  # noqa: BLE001 - one failed step must not end the grid
        import traceback

        traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        rc = 1
    finally:
        with _CHILDREN.lock:
            _CHILDREN.in_process -= 1
        _free_memory()
    return int(rc or 0)


def _free_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- interruption
class Interrupted(BaseException):
    """SIGINT / SIGTERM reached the runner; its ``train.py`` children have been stopped and waited for.

    A ``BaseException`` (as ``KeyboardInterrupt``), so that no per-step ``except Exception`` takes it for
    a failed step."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Children:
    """What the runner is running, so that a signal stops all of it (every ``train.py`` in its own
    process group, which the runner signals: a child never outlives the sweep)."""

    KILL_AFTER_S = 15.0  # a child still alive this long after SIGTERM gets SIGKILL

    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entrant: the handler may run while the main thread holds it
        self.procs: set[subprocess.Popen] = set()
        self.in_process = 0  # steps running in this interpreter (stopped by raising Interrupted)
        self.signum = 0  # the signal that stops the sweep; 0 while running
        self.stopped = 0  # steps that the signal cut short
        self.timer: Optional[threading.Timer] = None

    def reset(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.procs.clear()
            self.in_process = self.signum = self.stopped = 0
            self.timer = None

    def check(self) -> None:
        """Raise :class:`Interrupted` once a signal came: nothing new starts after it."""
        if self.signum:
            raise Interrupted(self.signum)

    def signal_all(self, sig: int) -> None:
        with self.lock:
            for proc in list(self.procs):
                _signal_group(proc, sig)

    def on_signal(self, signum: int, frame: Any) -> None:
        with self.lock:
            first = not self.signum
            self.signum = self.signum or signum
            self.signal_all(signal.SIGTERM if first else signal.SIGKILL)  # twice: no more waiting
            if first and self.procs:
                self.timer = threading.Timer(self.KILL_AFTER_S, self.signal_all, args=(signal.SIGKILL,))
                self.timer.daemon = True
                self.timer.start()
            if self.in_process:  # a step in this interpreter: stop it where it is
                raise Interrupted(self.signum)


_CHILDREN = _Children()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # the child's own group: train.py and its data-loader workers
    except (ProcessLookupError, PermissionError):
        pass


def _interruptible(run: Callable[[], int]) -> int:
    """``run()`` with SIGINT / SIGTERM stopping every step it started (children too); then one line and
    exit status 128 + signal (130 for Ctrl-C, 143 for SIGTERM) instead of tracebacks."""
    if threading.current_thread() is not threading.main_thread():
        return run()
    _CHILDREN.reset()
    previous = {sig: signal.signal(sig, _CHILDREN.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run()
    except Interrupted as stop:  # (a second signal while this prints finds nothing left to stop)
        n = _CHILDREN.stopped
        print(f"Interrupted ({signal.Signals(stop.signum).name}): stopped {n} running step{'' if n == 1 else 's'}; "
              "run the same command again to resume", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _CHILDREN.reset()


def _run_subprocess(argv: list[str], root: str, env: Optional[dict[str, str]] = None, log: Optional[str] = None) -> int:
    """``python train.py argv`` in its own process group; a signal to the runner stops it (then
    :class:`Interrupted` is raised here, once it has exited)."""
    cmd = [sys.executable, "-m", "restore.launch"] + argv
    full_env = {**os.environ, **(env or {})}
    out = None
    if log:
        os.makedirs(osp.dirname(log), exist_ok=True)
        out = open(log, "w")  # noqa: SIM115 - closed below
    try:
        with _CHILDREN.lock:
            _CHILDREN.check()
            proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True)
            _CHILDREN.procs.add(proc)
            if _CHILDREN.signum:  # the signal came while it was being started
                _signal_group(proc, signal.SIGTERM)
        try:
            rc = proc.wait()
        finally:
            with _CHILDREN.lock:
                _CHILDREN.procs.discard(proc)
    finally:
        if out is not None:
            out.close()
    if _CHILDREN.signum:
        with _CHILDREN.lock:
            _CHILDREN.stopped += 1
        raise Interrupted(_CHILDREN.signum)
    return rc


@dataclass
class Outcome:
    step: Step
    status: str  # done, skipped, failed, not-run
    rc: int = 0
    seconds: float = 0.0
    message: str = ""


def move_aside(folder: str, suffix: str = OLD_RUN_SUFFIX) -> str:
    """Rename ``folder`` (or a file) to ``<folder><suffix><YYYYmmdd-HHMMSS>`` (``-2``, ... if taken); the new path.

    With the default suffix the name matches :data:`restore.evaluation.results.OLD_RUN_RE`, so the tables
    skip it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{folder}{suffix}{stamp}", 1
    while osp.exists(target):
        n += 1
        target = f"{folder}{suffix}{stamp}-{n}"
    os.rename(folder, target)
    return target


def check_steps(steps: Sequence[Step], overwrite: bool = False) -> None:
    """Raise :class:`ProtocolError` (one sentence) for the first step whose existing run has other opts."""
    if overwrite:
        return
    for step in steps:
        problem = step.conflict()
        if problem:
            raise ProtocolError(problem)


def _failure_hint(step: Step, log: Optional[str]) -> str:
    """Where to read why a step failed: its log.txt if train.py got that far, else its console output."""
    places = [p for p in (log, osp.join(step.output_dir, "log.txt")) if p and osp.isfile(p)]
    if places:
        return "see " + " and ".join(places)
    return "see the error printed above" if not log else "train.py wrote no log"


def _in_use(folder: str) -> Optional[str]:
    """Why ``folder`` cannot be written now (a live run holds its lock), or None."""
    if not osp.exists(osp.join(folder, LOCK_FILE)):  # the usual case, without importing the engine (torch)
        return None
    from restore.engine.output_dir import output_dir_holder

    return output_dir_holder(folder)


def run_steps(steps: Sequence[Step], root: str, overwrite: bool = False, in_process: bool = True,
              env: Optional[dict[str, str]] = None, log_dir: Optional[str] = None,
              report: Callable[[str], None] = print) -> list[Outcome]:
    """Run steps in order; after a failed step the later steps of the list are not run.

    A finished step is skipped, unless it was run with other opts (then it fails with one sentence).
    ``overwrite``: every step is redone; a training step's existing folder is moved aside first, so
    that ``train.py`` trains from scratch instead of resuming from the final checkpoint. An
    evaluation that runs again (overwrite, retrained model, failed before) also moves its old folder
    aside, so that its ``log.txt`` holds the new result.
    """
    outcomes: list[Outcome] = []
    failed = False
    for step in steps:
        _CHILDREN.check()
        if failed:
            outcomes.append(Outcome(step, "not-run", message="an earlier step of this job failed"))
            continue
        busy = _in_use(step.output_dir)
        if busy:  # another train.py (another sweep, a hand-started run) is writing there right now
            report(f"FAILED {step.name}: {busy}")
            outcomes.append(Outcome(step, "failed", 2, message=busy))
            failed = True
            continue
        problem = None if overwrite else step.conflict()
        if problem:
            report(f"FAILED {step.name}: {problem}")
            outcomes.append(Outcome(step, "failed", 2, message=problem))
            failed = True
            continue
        if step.is_done() and not overwrite:
            report(f"skip (finished: {step.results_path()}) {step.name}")
            outcomes.append(Outcome(step, "skipped"))
            continue
        try:
            argv = step.train_argv(overwrite)
        except ProtocolError as err:
            report(f"FAILED {step.name}: {err}")
            outcomes.append(Outcome(step, "failed", 1, message=str(err)))
            failed = True
            continue
        if osp.isdir(step.output_dir) and (overwrite or step.eval_only):
            # training: from scratch, not resumed from the final checkpoint; evaluation: a fresh
            # log.txt, which CoOp's parse_test_res.py (and --test-log) read, not a log.txt-<time>
            old = move_aside(step.output_dir)
            what = "training from scratch" if not step.eval_only else "evaluating again"
            report(f"moved the previous run {step.output_dir} aside to {old}; {what}")
        if step.user_opts is not None:
            step.write_record()
        report(f"run {step.name}\n  {shlex.join(['python', 'train.py'] + argv)}")
        start = time.time()
        log = None
        if in_process:
            rc = _run_in_process(argv, root)
        else:
            log = osp.join(log_dir, re.sub(r"[^A-Za-z0-9_.+-]+", "_", step.name) + ".out") if log_dir else None
            rc = _run_subprocess(argv, root, env, log)
        seconds = time.time() - start
        ok = rc == 0 and osp.isfile(step.results_path())
        message = ""
        if not ok:
            failed = True
            message = f"exit {rc}, {seconds:.1f} s; {_failure_hint(step, log)}"
            report(f"FAILED {step.name} ({message})")
        outcomes.append(Outcome(step, "done" if ok else "failed", rc, seconds, message))
    return outcomes


def run_jobs(jobs: Sequence[Sequence[Step]], root: str, gpus: Sequence[str] = (), overwrite: bool = False,
             in_process: bool = False, log_dir: Optional[str] = None) -> list[Outcome]:
    """Run jobs one at a time, or one per GPU (``CUDA_VISIBLE_DEVICES`` round-robin, subprocesses)."""
    total = len(jobs)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    state = {"finished": 0, "busy_seconds": 0.0}
    start = time.time()

    def report_job(index: int, job_outcomes: list[Outcome], gpu: str) -> None:
        with lock:
            outcomes.extend(job_outcomes)
            state["finished"] += 1
            spent = sum(o.seconds for o in job_outcomes)
            ran = [o for o in job_outcomes if o.status in ("done", "failed")]
            status = "FAILED" if any(o.status == "failed" for o in job_outcomes) else (
                "done" if ran else "skipped")
            elapsed = time.time() - start
            left = total - state["finished"]
            eta = elapsed / state["finished"] * left if state["finished"] else 0
            where = f" gpu {gpu}" if gpu else ""
            print(f"[{state['finished']}/{total}] {status}{where}: {job_outcomes[0].step.name} ({spent:.1f} s); "
                  f"elapsed {elapsed:.0f} s, eta {eta:.0f} s", flush=True)

    if not gpus:
        for i, job in enumerate(jobs):
            report_job(i, run_steps(job, root, overwrite, in_process=in_process), "")
    else:
        pending: "queue.Queue[tuple[int, Sequence[Step]]]" = queue.Queue()
        for item in enumerate(jobs):
            pending.put(item)

        def worker(gpu: str) -> None:
            while True:
                try:
                    i, job = pending.get_nowait()
                except queue.Empty:
                    return
                quiet: list[str] = []
                try:
                    res = run_steps(job, root, overwrite, in_process=False, env={"CUDA_VISIBLE_DEVICES": gpu},
                                    log_dir=log_dir, report=quiet.append)
                except Interrupted:  # the main thread reports it, once every worker has stopped
                    return
                moved = [line for line in quiet if line.startswith("--overwrite:")]
                if moved:
                    with lock:
                        print("\n".join(moved), flush=True)
                report_job(i, res, gpu)

        threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _CHILDREN.check()
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "not-run")}
    print(f"Finished {total} job{'' if total == 1 else 's'} ({len(outcomes)} step{'' if len(outcomes) == 1 else 's'})"
          f" in {time.time() - start:.0f} s: " + ", ".join(f"{v} {k.replace('-', ' ')}" for k, v in counts.items()))
    for o in failed:
        print(f"  FAILED {o.step.name}: {o.message or f'exit {o.rc}; ' + _failure_hint(o.step, None)}")
    return outcomes


# --------------------------------------------------------------------------- CLI
def _context(args: argparse.Namespace, opts: Sequence[str], check_data: bool = True) -> Context:
    return Context(data=args.data, output=args.output or _default_output(opts), cfg=args.cfg, shots=args.shots,
                   opts=list(opts), check_data=check_data)


def _default_output(opts: Sequence[str]) -> str:
    """``output``, or ``output_random`` when the opts name a backbone with random weights (``tiny``...),
    so that such runs never sit among real results."""
    backbone = _opts_dict(opts).get("MODEL.BACKBONE.NAME")
    if backbone is None:
        return DEFAULT_OUTPUT_ROOT
    from restore.engine.output_dir import (
        default_output_root,  # imports torch: only when a backbone is named
    )

    output = default_output_root(backbone)
    if output != DEFAULT_OUTPUT_ROOT:
        print(f"Backbone {backbone} has random weights: output root {output}/, not {DEFAULT_OUTPUT_ROOT}/ (set "
              "OUTPUT to choose another)", file=sys.stderr)
    return output


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=os.environ.get("DATA", ""), help="dataset root (env DATA)")
    parser.add_argument("--output", default=os.environ.get("OUTPUT", ""),
                        help="output root (env OUTPUT; default output, or output_random for a backbone with random "
                             "weights such as tiny)")
    parser.add_argument("--cfg", default=os.environ.get("CFG", ""), help="config name or YAML path (env CFG)")
    parser.add_argument("--shots", type=_shots, default=_env_shots(), help="training shots (env SHOTS, default 16)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo finished steps; a training step is retrained from scratch, its old folder kept as "
                             "<folder>.old-<YYYYmmdd-HHMMSS>")
    parser.add_argument("--dry-run", action="store_true", help="print the train.py commands only")


def _shots(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"SHOTS must be an integer (training shots per class, e.g. 16), "
                                         f"got {text!r}") from None


def _env_shots() -> int:
    """``SHOTS`` from the environment (default 16); :class:`ProtocolError` if it is not an integer."""
    text = os.environ.get("SHOTS", "").strip() or "16"
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"SHOTS must be an integer (training shots per class, e.g. SHOTS=16), "
                            f"got SHOTS={os.environ['SHOTS']!r}") from None


def _int_list(text: str) -> list[int]:
    return [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]


_COMMANDS = {
    "base2new-train": "train on the base classes (its own test = base accuracy)",
    "base2new-test": "evaluate the base-trained model on new (or, with --sub base, base) classes",
    "xd-train": "train on ImageNet (all classes) for cross-dataset transfer / domain generalization",
    "xd-test": "evaluate the ImageNet model on the 10 other datasets",
    "dg-test": "evaluate the ImageNet model on ImageNetV2, -Sketch, -A and -R",
    "fewshot-train": "train and test on all classes with NUM_SHOTS shots",
    "run-all": "the full grid of datasets x seeds (x shots) of a protocol",
    "list": "trainers, their classes and the config files they resolve to",
}


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one sub-command (flags may come anywhere; opts are the trailing words)."""
    if command not in _COMMANDS:
        raise ProtocolError(f"Unknown command {command!r}; choose one of {', '.join(_COMMANDS)}")
    p = argparse.ArgumentParser(prog=f"python -m restore.protocols {command}", description=_COMMANDS[command])
    if command == "list":
        return p
    _common(p)
    opts_help = "config options KEY VALUE ... passed to every step (after all others, so they win)"
    if command == "run-all":
        p.add_argument("protocol", help="base2new | xd | dg | fewshot")
        p.add_argument("trainer", help="one or a comma list of method names (python -m restore.methods lists them)")
        p.add_argument("--seeds", type=_int_list, default=DEFAULT_SEEDS, help="default 1,2,3")
        p.add_argument("--datasets", default="", help="comma list (default: all of the protocol)")
        p.add_argument("--shot-list", type=_int_list, default=FEWSHOT_SHOTS, help="few-shot: default 1,2,4,8,16")
        p.add_argument("--gpus", default="", help="e.g. 0,1: one job per GPU at a time (subprocesses)")
        p.add_argument("--in-process", action="store_true", help="run every step in this interpreter (no --gpus)")
        p.add_argument("--test-base", action="store_true", help="base2new: also evaluate on base classes (test_base)")
    else:
        p.add_argument("trainer", help="a method name (python -m restore.methods lists them)")
        if command == "base2new-test":
            p.add_argument("--sub", default=os.environ.get("SUB", "new"), choices=["new", "base"], help="env SUB")
        if command in ("xd-test", "dg-test"):
            p.add_argument("dataset", help="a dataset, a comma list, or 'all'")
        elif command != "xd-train":
            p.add_argument("dataset")
        if command == "fewshot-train":
            p.add_argument("num_shots", type=int)
        p.add_argument("seed", type=int)
    p.add_argument("opts", nargs="*", help=opts_help)
    return p


def _usage() -> str:
    about = __doc__.split("\n\n")[1].replace("``", "").rstrip(":")  # the reST "::" introduces a listing
    return ("usage: python -m restore.protocols COMMAND ...\n\n" + "\n".join(
        f"  {name:15s} {text}" for name, text in _COMMANDS.items()) + "\n\n" + about + ".\n\n"
        "Run python -m restore.protocols COMMAND --help for a command's arguments. Environment: DATA\n"
        "(dataset root, required), CFG, SHOTS, SUB, OUTPUT (output root: output, or output_random for a\n"
        "backbone with random weights such as tiny).")


def _print_list() -> int:
    root = os.getcwd()
    load_plugins()
    for spec in list_methods():
        print(f"{spec.key:10s} -> {spec.trainer} (output label {spec.display})")
        for protocol in ("base2new", "xd", "fewshot"):
            try:
                path, _ = resolve_config(spec, protocol, "dtd", root=root)
                shown = osp.relpath(path, root)
            except ProtocolError:
                shown = "MISSING (tried " + ", ".join(_config_candidates(spec, protocol, "dtd")) + ")"
            print(f"    {protocol:9s} {shown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command = argv[0]
    try:
        parser = build_parser(command)
    except ProtocolError as err:
        usage = "" if command in _COMMANDS else f"\n\n{_usage()}"
        print(f"error: {err}{usage}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv[1:])
    args.command = command
    if command == "list":
        return _print_list()
    return _interruptible(lambda: _run_command(args))


def _run_command(args: argparse.Namespace) -> int:
    """Build the steps of a parsed command and run them (or print them with ``--dry-run``)."""
    try:
        ctx = _context(args, args.opts, check_data=not args.dry_run)
        if args.dry_run and not ctx.data:
            ctx.data = "$DATA"
        if args.command == "run-all":
            jobs = [job for trainer in re.split(r"[,\s]+", args.trainer.strip()) if trainer
                    for job in build_jobs(ctx, args.protocol, trainer, args.seeds, args.datasets, args.shot_list,
                                          args.test_base)]
            if args.dry_run:
                for job in jobs:
                    for step in job:
                        print(step.command(args.overwrite, resolve_epoch=False))
                return 0
            gpus = [g for g in re.split(r"[,\s]+", args.gpus) if g]
            if gpus and args.in_process:
                raise ProtocolError("--in-process and --gpus exclude each other")
            log_dir = osp.join(ctx.output, "logs", normalize_protocol(args.protocol)) if gpus else None
            outcomes = run_jobs(jobs, ctx.root, gpus, args.overwrite, args.in_process, log_dir)
            return 1 if any(o.status == "failed" for o in outcomes) else 0
        if args.command == "base2new-train":
            steps = [base2new_train(ctx, args.trainer, args.dataset, args.seed)]
        elif args.command == "base2new-test":
            steps = [base2new_test(ctx, args.trainer, args.dataset, args.seed, args.sub)]
        elif args.command == "xd-train":
            steps = [xd_train(ctx, args.trainer, args.seed)]
        elif args.command in ("xd-test", "dg-test"):
            fn, default = (xd_test, XD_TARGETS) if args.command == "xd-test" else (dg_test, DG_TARGETS)
            steps = [fn(ctx, args.trainer, d, args.seed) for d in _dataset_list(args.dataset, default)]
        else:
            steps = [fewshot_train(ctx, args.trainer, args.dataset, args.num_shots, args.seed)]
        if args.dry_run:
            for step in steps:
                print(step.command(args.overwrite, resolve_epoch=False))
            return 0
        check_steps(steps, args.overwrite)
        outcomes = run_steps(steps, ctx.root, args.overwrite, in_process=True)
    except ProtocolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
