"""Parity tool: the official code of a method (a local checkout) and our trainer, same seed, same data.

    python -m restore.parity --write-clip parity_clip.pt               # the parity CLIP (restore.official)
    python -m restore.datasets.synthetic dtd --root DATA --classes 4 --images-per-class 12
    python -m restore.parity --official ../official/CoOp --trainer CoOp --root DATA --weights parity_clip.pt \\
        --output parity_out [--resume] [--best-val] [--noise-floor] [--fixture tests/data/parity/coop.json] \\
        [KEY VALUE ...]

Runs the official ``train.py`` on this engine (or on the real Dassl with ``--real-dassl DIR``) and
our ``train.py``, each in its own process, with the same seed, data, config values and weights
file, in fp32 on the CPU; prints per epoch both loss sequences and a per-tensor comparison of the
learned state after the last epoch. ``--resume`` kills our run after epoch 1 and resumes it;
``--best-val`` selects the model on the validation set (compares ``model-best.pth.tar``).
``--noise-floor`` runs the official code a second time with another number of CPU threads (the same
computation, summed in another order) and prints how far the official run is from itself: the
round-off floor of the comparison (under AdamW, isolated elements whose gradient is at round-off
level at a step move by up to ~lr, in the official run against itself as in ours against it).
``--fixture`` records the official run (per-batch losses, compact per-tensor summaries) as JSON
for the test suite. The method's settings come from the ``OFFICIAL`` :class:`~restore.official.OfficialRun`
declared beside its trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import math
import os
import os.path as osp
import shutil
import subprocess
import sys
from typing import Any, Iterator, Sequence

import torch

from restore.official import OfficialRun, official_root, record_logits, record_losses, run_official, write_parity_clip

__all__ = ["RunKilled", "common_opts", "compare_tensors", "find_official_run", "killed_after_epoch",
           "learned_state", "main", "our_argv", "summarise", "summary_matches"]

#: Relative tolerance of the per-tensor comparison (fp32 round-off of a reordered summation).
RTOL = 1e-5


def common_opts(seed: int, root: str, output: str, epochs: int, shots: int, batch: int, resolution: int,
                best_val: bool = False) -> list[str]:
    """The ``train.py`` flags and opts both sides get (CoOp's flags; yacs ``KEY VALUE`` opts)."""
    opts = ["--root", root, "--seed", str(seed), "--output-dir", output,
            "--dataset-config-file", "configs/datasets/dtd.yaml",
            "DATASET.NUM_SHOTS", str(shots), "OPTIM.MAX_EPOCH", str(epochs), "INPUT.SIZE", f"({resolution}, {resolution})",
            "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch), "DATALOADER.TEST.BATCH_SIZE", "100",
            "DATALOADER.NUM_WORKERS", "0", "TRAIN.PRINT_FREQ", "1"]
    if best_val:
        opts += ["TEST.FINAL_MODEL", "best_val"]
    return opts


def our_argv(run: OfficialRun, common: Sequence[str], weights: str, extra: Sequence[str] = ()) -> list[str]:
    """Our ``train.py`` arguments for ``run`` (config files are relative to our repository root)."""
    flags, opts = _split(common)
    return [*flags, "--trainer", run.ours, "--config-file", run.our_config,
            *opts, "MODEL.BACKBONE.NAME", weights, *run.opts, *run.our_opts, *extra]


def official_argv(run: OfficialRun, common: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The official ``train.py`` arguments (its download of ``ViT-B/32`` is shimmed to the weights file)."""
    flags, opts = _split(common)
    items, own_flags, own_opts = list(run.official_opts), [], []  # type: list[str], list[str], list[str]
    while items:  # the official train.py's own flags (e.g. RESTORE_'s --fs_loss_r) go before the opts
        pair, items = items[:2], items[2:]
        (own_flags if pair[0].startswith("--") else own_opts).extend(pair)
    return [*flags, *own_flags, "--trainer", run.trainer, "--config-file", run.config,
            *opts, "MODEL.BACKBONE.NAME", "ViT-B/32", *run.opts, *own_opts, *extra]


def _split(common: Sequence[str]) -> tuple[list[str], list[str]]:
    items = list(common)
    flags: list[str] = []
    while items and items[0].startswith("--"):
        flags += items[:2]
        items = items[2:]
    return flags, items


def find_official_run(trainer: str, plugins: Sequence[str] = ("trainers",), variant: str = "") -> OfficialRun:
    """The ``OFFICIAL`` declared in the module of the registered trainer ``trainer`` (``variant``: an
    entry of that module's ``OFFICIAL_VARIANTS``, e.g. IVLP's single-branch configs)."""
    from restore.engine.registry import TRAINER_REGISTRY

    for package in plugins:
        module = importlib.import_module(package)
        register_all = getattr(module, "register_all", None)
        if callable(register_all):  # a plugin package that registers its methods on request
            register_all()
    cls = TRAINER_REGISTRY.get(trainer)
    module = sys.modules[cls.__module__]
    run = getattr(module, "OFFICIAL_VARIANTS", {}).get(variant) if variant else getattr(module, "OFFICIAL", None)
    if not isinstance(run, OfficialRun) or run.ours != trainer:
        what = f"no official variant {variant!r}" if variant else "no OFFICIAL run"
        raise ValueError(f"trainer {trainer!r} declares {what} in its module {cls.__module__}: the parity tool "
                         f"compares only trainers whose module declares the official run they reproduce.")
    return run


# --------------------------------------------------------------------------- comparing


def _checkpoint(output: str, best: bool, epochs: int) -> str:
    name = "model-best.pth.tar" if best else f"model.pth.tar-{epochs}"
    found = sorted(glob.glob(osp.join(output, "*", name)))
    if not found:
        raise FileNotFoundError(f"no {name} under {output}: the run did not finish")
    return found[0]


def learned_state(output: str, run: OfficialRun, epochs: int, best: bool = False,
                  official: bool = False) -> dict[str, torch.Tensor]:
    """The learned tensors of a run's final (or best) checkpoint, under our names."""
    from restore.engine.utils import load_checkpoint
    from restore.prompting.official import rename_official_state

    checkpoint = load_checkpoint(_checkpoint(output, best, epochs))
    state = {k: v.float() for k, v in checkpoint["state_dict"].items()}
    return rename_official_state(state, run.keys) if official else state


def summarise(tensor: torch.Tensor, n: int = 8) -> dict[str, Any]:
    """Shape, sum, norm and the first / last ``n`` values: enough to tell a difference beyond round-off."""
    flat = tensor.detach().float().flatten()
    return {"shape": list(tensor.shape), "sum": float(flat.sum()), "norm": float(flat.norm()),
            "max_abs": float(flat.abs().max()) if flat.numel() else 0.0,
            "head": flat[:n].tolist(), "tail": flat[-n:].tolist()}


def summary_matches(ours: dict[str, Any], official: dict[str, Any], rtol: float = RTOL) -> float:
    """The largest difference of two summaries relative to the tensor's scale (inf: shapes differ)."""
    if ours["shape"] != official["shape"]:
        return math.inf
    scale = max(official["max_abs"], 1e-12)
    numel = max(1, math.prod(official["shape"]))
    diffs = [abs(ours["norm"] - official["norm"]) / max(official["norm"], 1e-12),
             abs(ours["sum"] - official["sum"]) / (scale * numel)]
    diffs += [abs(a - b) / scale for a, b in zip(ours["head"] + ours["tail"], official["head"] + official["tail"])]
    return max(diffs)


def compare_tensors(ours: dict[str, torch.Tensor],
                    official: dict[str, torch.Tensor]) -> list[tuple[str, float, float]]:
    """Per official tensor: (key, max |ours - official| / max |official|, ||ours - official|| / ||official||);
    inf where ours lacks it or has another shape. Our own bookkeeping buffers without an official
    counterpart (e.g. RESTORE's saved references) are not compared."""
    rows = []
    for key in sorted(official):
        a, b = ours.get(key), official[key]
        if a is None or a.shape != b.shape:
            rows.append((key, math.inf, math.inf))
            continue
        diff = (a - b).abs()
        rows.append((key, float(diff.max()) / max(float(b.abs().max()), 1e-12),
                     float(diff.norm()) / max(float(b.norm()), 1e-12)))
    return rows


# --------------------------------------------------------------------------- running


def _run_side(side: str, spec: dict[str, Any]) -> None:
    """One side in its own process (``python -m restore.parity --side ...``)."""
    cmd = [sys.executable, "-m", "restore.parity", "--side", side, "--spec", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [spec["repo"], os.environ.get("PYTHONPATH")])))
    with open(osp.join(spec["output"] + ".log"), "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=spec["repo"] if side != "official" else None)
    if done.returncode != 0 and not spec.get("may_stop"):
        raise SideFailed(f"the {side} run failed (exit {done.returncode}): {_last_line(spec['output'] + '.log')} "
                         f"(whole output: {spec['output']}.log)")


class SideFailed(RuntimeError):
    """One side's process exited with an error; the message names its last line and its log."""


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "no output"


class RunKilled(Exception):
    """Raised by :func:`killed_after_epoch`: the run stops as if killed."""


@contextlib.contextmanager
def killed_after_epoch(epoch: int) -> Iterator[None]:
    """Stop any run of this engine right after epoch ``epoch`` (1-based) is finished and checkpointed,
    as if the process had been killed there (to check that resuming gives the uninterrupted run)."""
    import restore.engine.trainer as engine

    original = engine.TrainerX.after_epoch

    def after_epoch(self: Any) -> None:
        original(self)
        if self.epoch + 1 == epoch:
            raise RunKilled(f"stopped after epoch {epoch}")

    engine.TrainerX.after_epoch = after_epoch  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine.TrainerX.after_epoch = original  # type: ignore[method-assign]


def _side_main(side: str, spec: dict[str, Any]) -> int:
    if spec.get("threads"):  # --noise-floor: the same computation with another summation order
        torch.set_num_threads(int(spec["threads"]))
    if side == "official":
        run_official(spec["checkout"], spec["argv"], spec["weights"], real_dassl=spec.get("real_dassl"),
                     losses=spec["losses"], logits=spec.get("logits"))
        return 0
    sys.path.insert(0, spec["repo"])
    os.chdir(spec["repo"])
    train = importlib.import_module("train")
    stop = spec.get("stop_after_epoch")
    try:
        with killed_after_epoch(stop or 0), record_losses(spec["losses"]), record_logits(spec.get("logits")):
            return int(train.main(train.build_parser().parse_args(spec["argv"])) or 0)
    except RunKilled:
        print(f"(parity: run stopped after epoch {stop}, as if killed)")
        return 3


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _last_epoch_mean(records: list[dict[str, Any]]) -> float:
    """Mean loss over the last epoch's batches (what Dassl's last log line shows as the running average)."""
    last = max(r["epoch"] for r in records)
    losses = [r["loss"] for r in records if r["epoch"] == last]
    return sum(losses) / len(losses)


def _format_losses(records: list[dict[str, Any]]) -> dict[int, list[float]]:
    per_epoch: dict[int, list[float]] = {}
    for r in records:
        per_epoch.setdefault(r["epoch"], []).append(r["loss"])
    return per_epoch


def parity(args: argparse.Namespace, run: OfficialRun) -> int:
    repo = osp.abspath(args.repo)
    output = osp.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    resolution = args.resolution
    if args.eval_only:
        return _parity_eval(args, run, repo, output)
    rows: list[tuple[Any, ...]] = []
    modes = [("plain", False, False)]
    if args.resume:
        modes.append(("resume", True, False))
    if args.best_val:
        modes.append(("best-val", False, True))
    fixture: dict[str, Any] = {}
    for mode, resume, best in modes:
        out_off, out_ours = osp.join(output, f"{mode}_official"), osp.join(output, f"{mode}_ours")
        spec = {"repo": repo, "weights": osp.abspath(args.weights), "real_dassl": args.real_dassl}
        common_off = common_opts(args.seed, osp.abspath(args.root), out_off, args.epochs, args.shots, args.batch,
                                 resolution, best)
        common_ours = common_opts(args.seed, osp.abspath(args.root), out_ours, args.epochs, args.shots, args.batch,
                                  resolution, best)
        for folder in (out_off, out_ours):  # this tool's own run folders: start afresh (no auto-resume)
            shutil.rmtree(folder, ignore_errors=True)
        if mode == "resume" and rows:  # the official run is the plain one
            out_off = osp.join(output, "plain_official")
        else:
            _run_side("official", {**spec, "checkout": osp.abspath(args.official), "output": out_off,
                                   "argv": official_argv(run, common_off, args.opts),
                                   "losses": out_off + ".losses.json"})
        argv = our_argv(run, common_ours, osp.abspath(args.weights), [*args.opts, *_ours_only(args)])
        if resume:
            _run_side("ours", {**spec, "output": out_ours, "argv": argv, "losses": out_ours + ".first.losses.json",
                               "stop_after_epoch": 1, "may_stop": True})
        _run_side("ours", {**spec, "output": out_ours, "argv": argv, "losses": out_ours + ".losses.json"})
        off_losses = _read_json(out_off + ".losses.json")
        our_losses = _read_json(out_ours + ".losses.json")
        if resume:
            our_losses = _read_json(out_ours + ".first.losses.json") + our_losses
        off_state = learned_state(out_off, run, args.epochs, best, official=True)
        our_state = learned_state(out_ours, run, args.epochs, best)
        label = f"{run.ours}{'/' + args.variant if args.variant else ''}"
        print(f"\n== {label} ({mode}) vs official {run.trainer} ({run.repo}: {run.config})")
        off_e, our_e = _format_losses(off_losses), _format_losses(our_losses)
        for epoch in sorted(set(off_e) | set(our_e)):
            print(f"epoch {epoch + 1} official: " + " ".join(f"{v:.6f}" for v in off_e.get(epoch, [])))
            print(f"epoch {epoch + 1} ours:     " + " ".join(f"{v:.6f}" for v in our_e.get(epoch, [])))
        table = compare_tensors(our_state, off_state)
        for key, rel, rel_l2 in table:
            print(f"  {key:60s} max rel diff {rel:.2e}   rel L2 diff {rel_l2:.2e}")
        extra = sorted(set(our_state) - set(off_state))
        if extra:
            print(f"  ours only (no official counterpart): {', '.join(extra)}")
        equal = sum(rel <= RTOL for _, rel, _ in table)
        loss_diff = max((abs(a["loss"] - b["loss"]) for a, b in zip(off_losses, our_losses)), default=math.inf)
        if len(off_losses) != len(our_losses):
            loss_diff = math.inf
        rows.append((mode, off_losses, our_losses, equal, len(table), max((r for _, r, _ in table), default=0.0),
                     max((r for _, _, r in table), default=0.0), loss_diff))
        if args.noise_floor and mode == "plain":
            rows.append(_noise_floor(args, run, spec, output, off_losses, off_state))
        fixture[mode] = {"losses": [[r["epoch"], r["batch"], r["loss"]] for r in off_losses],
                         "tensors": {k: summarise(v) for k, v in off_state.items()}}
    print(f"\n| method | run | first-batch loss ours / official | last-epoch loss ours / official | "
          f"tensors equal (max rel diff <= {RTOL:g}) | max rel diff | max rel L2 diff | max loss diff |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for mode, off, ours, equal, total, worst, worst_l2, loss_diff in rows:
        print(f"| {label} | {mode} | {ours[0]['loss']:.6f} / {off[0]['loss']:.6f} | {_last_epoch_mean(ours):.6f} / "
              f"{_last_epoch_mean(off):.6f} | {equal}/{total} | {worst:.1e} | {worst_l2:.1e} | {loss_diff:.1e} |")
        if not mode.startswith("official"):  # the noise-floor row is information, not a verdict
            ok = ok and equal == total and loss_diff <= 1e-4
    if args.fixture:
        commit = subprocess.run(["git", "-C", osp.abspath(args.official), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        record = {"trainer": run.ours, "variant": args.variant, "official": {"repo": run.repo, "trainer": run.trainer, "commit": commit},
                  "settings": {"seed": args.seed, "epochs": args.epochs, "shots": args.shots, "batch": args.batch,
                               "resolution": resolution, "opts": list(args.opts)},
                  "runs": fixture}
        os.makedirs(osp.dirname(osp.abspath(args.fixture)), exist_ok=True)
        with open(args.fixture, "w") as f:
            json.dump(record, f, indent=1)
        print(f"fixture written to {args.fixture}")
    return 0 if ok else 1


def _noise_floor(args: argparse.Namespace, run: OfficialRun, spec: dict[str, Any], output: str,
                 off_losses: list[dict[str, Any]], off_state: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    """The official run again with another number of CPU threads, compared with the first official run
    (a summary-table row whose "ours" column is this second official run)."""
    threads = 1 if torch.get_num_threads() > 1 else 2
    out = osp.join(output, "noise_official")
    shutil.rmtree(out, ignore_errors=True)
    common = common_opts(args.seed, osp.abspath(args.root), out, args.epochs, args.shots, args.batch, args.resolution)
    _run_side("official", {**spec, "checkout": osp.abspath(args.official), "output": out, "threads": threads,
                           "argv": official_argv(run, common, args.opts), "losses": out + ".losses.json"})
    losses = _read_json(out + ".losses.json")
    table = compare_tensors(learned_state(out, run, args.epochs, official=True), off_state)
    print(f"\n== official {run.trainer} vs itself (CPU threads {threads} vs {torch.get_num_threads()}): "
          f"the comparison's round-off floor")
    for key, rel, rel_l2 in table:
        print(f"  {key:60s} max rel diff {rel:.2e}   rel L2 diff {rel_l2:.2e}")
    loss_diff = max((abs(a["loss"] - b["loss"]) for a, b in zip(off_losses, losses)), default=math.inf)
    if len(off_losses) != len(losses):
        loss_diff = math.inf
    return (f"official vs itself (threads {threads} vs {torch.get_num_threads()})", off_losses, losses,
            sum(rel <= RTOL for _, rel, _ in table), len(table), max((r for _, r, _ in table), default=0.0),
            max((r for _, _, r in table), default=0.0), loss_diff)


def logits_difference(ours: Sequence[Sequence[float]], official: Sequence[Sequence[float]]) -> float:
    """Max |ours - official| over all evaluated outputs, relative to the largest official |value|."""
    a, b = torch.tensor(ours), torch.tensor(official)
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def _parity_eval(args: argparse.Namespace, run: OfficialRun, repo: str, output: str) -> int:
    """Evaluation-only parity (zero-shot CLIP): the test set's outputs of both sides."""
    out_off, out_ours = osp.join(output, "eval_official"), osp.join(output, "eval_ours")
    for folder in (out_off, out_ours):
        shutil.rmtree(folder, ignore_errors=True)
    spec = {"repo": repo, "weights": osp.abspath(args.weights), "real_dassl": args.real_dassl}
    common = [osp.abspath(args.root), args.epochs, args.shots, args.batch, args.resolution]
    off_argv = official_argv(run, common_opts(args.seed, common[0], out_off, *common[1:]), args.opts)
    our = our_argv(run, common_opts(args.seed, common[0], out_ours, *common[1:]), osp.abspath(args.weights),
                   [*args.opts, *_ours_only(args)])
    _run_side("official", {**spec, "checkout": osp.abspath(args.official), "output": out_off,
                           "argv": ["--eval-only", *off_argv], "losses": None, "logits": out_off + ".logits.json"})
    _run_side("ours", {**spec, "output": out_ours, "argv": ["--eval-only", *our], "losses": None,
                       "logits": out_ours + ".logits.json"})
    with open(out_off + ".logits.json") as f:
        official = json.load(f)
    with open(out_ours + ".logits.json") as f:
        ours = json.load(f)
    rel = logits_difference(ours, official)
    acc = [100.0 * float((torch.tensor(x).argmax(-1) == torch.tensor(official).argmax(-1)).float().mean())
           for x in (ours, official)]
    print(f"\n== {run.ours} (eval) vs official {run.trainer} ({run.repo})")
    print(f"{len(official)} test outputs; max rel diff of the outputs {rel:.1e}; "
          f"predictions agreeing with the official ones: {acc[0]:.1f}%")
    print("| method | run | outputs equal | max rel diff |")
    print("|---|---|---|---|")
    print(f"| {run.ours} | eval | {len(ours) if rel <= RTOL else 0}/{len(official)} rows | {rel:.1e} |")
    if args.fixture:
        record = {"trainer": run.ours, "variant": args.variant,
                  "official": {"repo": run.repo, "trainer": run.trainer},
                  "settings": {"seed": args.seed, "epochs": args.epochs, "shots": args.shots, "batch": args.batch,
                               "resolution": args.resolution, "opts": list(args.opts)},
                  "runs": {"eval": {"logits": official}}}
        with open(args.fixture, "w") as f:
            json.dump(record, f, indent=1)
        print(f"fixture written to {args.fixture}")
    return 0 if rel <= RTOL else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m restore.parity", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-clip", metavar="FILE", help="write the parity CLIP's weights to FILE and exit")
    parser.add_argument("--official", help="root of a local checkout of the official repository")
    parser.add_argument("--trainer", help="our trainer name (its module declares OFFICIAL)")
    parser.add_argument("--root", help="dataset root holding dtd/ (python -m restore.datasets.synthetic dtd ...)")
    parser.add_argument("--weights", help="CLIP weights file both sides load (--write-clip)")
    parser.add_argument("--output", default="parity_out", help="folder for both runs (default: parity_out)")
    parser.add_argument("--repo", default=".", help="our repository root, holding train.py (default: .)")
    parser.add_argument("--variant", default="", help="a named variant of the trainer's official run "
                        "(its module's OFFICIAL_VARIANTS)")
    parser.add_argument("--plugins", default="trainers", help="packages registering our trainers (default: trainers)")
    parser.add_argument("--real-dassl", help="run the official code on a Dassl.pytorch checkout instead of our engine")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32, help="INPUT.SIZE; the weights' input resolution")
    parser.add_argument("--resume", action="store_true", help="also: our run killed after epoch 1, then resumed")
    parser.add_argument("--best-val", action="store_true", help="also: best-val model selection")
    parser.add_argument("--noise-floor", action="store_true", help="also: the official run again with another "
                        "number of CPU threads, compared with itself (the comparison's round-off floor)")
    parser.add_argument("--eval-only", action="store_true", help="compare evaluation outputs only (zero-shot CLIP)")
    parser.add_argument("--fixture", help="write the official runs' losses and tensor summaries (JSON) here")
    parser.add_argument("--ours-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a yacs opt for our run only (a switch reproducing an official quirk); repeatable")
    parser.add_argument("--side", choices=("official", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE opts for both sides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.side:
        return _side_main(args.side, json.loads(args.spec))
    if args.write_clip:
        print(f"wrote {write_parity_clip(args.write_clip)}")
        return 0
    missing = [flag for flag in ("official", "trainer", "root", "weights") if not getattr(args, flag)]
    if missing:
        build_parser().error("missing " + ", ".join(f"--{m}" for m in missing))
    try:
        run = _checked_run(args)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return parity(args, run)
    except SideFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


class BadInput(ValueError):
    """A command line the tool cannot run, as one sentence saying what to do."""


def _ours_only(args: argparse.Namespace) -> list[str]:
    return [item for pair in args.ours_opt for item in pair]


def _checked_run(args: argparse.Namespace) -> OfficialRun:
    """The official run ``args.trainer`` reproduces, once the command line's folders and files are
    checked; ``args.official`` becomes the folder holding the official code (a repository keeping it
    one level down works too). What is wrong raises :class:`BadInput`."""
    try:
        args.official = official_root(args.official)
    except FileNotFoundError as err:
        raise BadInput(f"--official {err}") from None
    if not osp.isfile(args.weights):
        raise BadInput(f"--weights {args.weights} does not exist: write the parity CLIP with "
                       f"`python -m restore.parity --write-clip {args.weights}`.")
    if not osp.isdir(osp.join(args.root, "dtd", "images")):
        raise BadInput(f"--root {args.root} holds no dtd/images: make the synthetic DTD both sides train on with "
                       f"`python -m restore.datasets.synthetic dtd --root {args.root} --classes 4 "
                       "--images-per-class 12`.")
    repo = osp.abspath(args.repo)
    if not osp.isfile(osp.join(repo, "train.py")):
        raise BadInput(f"--repo {args.repo} holds no train.py: run from the repository root or pass --repo.")
    if repo not in sys.path:  # the plugin packages (trainers/) live in our repository
        sys.path.insert(0, repo)
    try:
        return find_official_run(args.trainer, args.plugins.split(","), args.variant)
    except KeyError:
        from restore.engine.registry import TRAINER_REGISTRY

        raise BadInput(f"--trainer {args.trainer} is not a registered trainer; registered: "
                       f"{', '.join(sorted(TRAINER_REGISTRY.registered_names()))}.") from None
    except (ValueError, ImportError) as err:
        raise BadInput(str(err)) from None


if __name__ == "__main__":
    sys.exit(main())
