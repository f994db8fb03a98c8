"""The launcher as a library: CoOp's ``train.py`` flags, config assembly and the run.

    python -m restore.launch --root DATA --trainer RESTORE --dataset-config-file ... [opts]

``train.py`` in a checkout is a thin entry point over :func:`cli`. Methods come from the plugins
(:func:`restore.methods.load_plugins`). Config precedence: defaults < dataset YAML < method dataset
overrides < keys the method YAML pins (``DATASET_OVERRIDES.PIN``) < command line.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
from typing import Any, Optional, Sequence

import torch

from restore.engine.config import (
    ConfigError,
    check_settings,
    extend_cfg,
    get_cfg_default,
    merge_file,
    merge_opts,
)
from restore.engine.output_dir import (
    OutputDirError,
    default_output_root,
    lock_output_dir,
)
from restore.engine.registry import (
    DATASET_REGISTRY,
    TRAINER_REGISTRY,
    check_availability,
    lookup_case_insensitive,
)
from restore.engine.trainer import RESULTS_FILE, build_trainer
from restore.engine.utils import (
    Logger,
    collect_env_info,
    error_message,
    set_random_seed,
    setup_logger,
    trusted_checkpoints,
)
from restore.methods import apply_dataset_overrides, load_plugins

__all__ = ["build_parser", "reset_cfg", "setup_cfg", "main", "run", "cli"]

def build_parser() -> argparse.ArgumentParser:
    """CoOp's ``train.py`` arguments."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train or evaluate a prompt-learning method on CLIP.")
    parser.add_argument("--root", type=str, default="", help="path to dataset")
    parser.add_argument("--output-dir", type=str, default="",
                        help="output directory (a folder, used by one run at a time; default output, or output_random "
                             "for a backbone with random weights)")
    parser.add_argument("--resume", type=str, default="", help="checkpoint directory (from which the training resumes)")
    parser.add_argument("--seed", type=int, default=-1,
                        help="random seed (0 or more); -1 (the default) keeps the config's SEED, itself -1 "
                             "(an unseeded run) unless a YAML or SEED in the opts sets it")
    parser.add_argument("--source-domains", type=str, nargs="+", help="source domains for DA/DG")
    parser.add_argument("--target-domains", type=str, nargs="+", help="target domains for DA/DG")
    parser.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    parser.add_argument("--config-file", type=str, default="", help="path to config file")
    parser.add_argument("--dataset-config-file", type=str, default="", help="path to config file for dataset setup")
    parser.add_argument("--trainer", type=str, default="", help="name of trainer")
    parser.add_argument("--backbone", type=str, default="", help="name of CNN backbone")
    parser.add_argument("--head", type=str, default="", help="name of head")
    parser.add_argument("--eval-only", action="store_true", help="evaluation only")
    parser.add_argument("--model-dir", type=str, default="", help="load model from this directory for eval-only mode")
    parser.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    parser.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    parser.add_argument("--overwrite", action="store_true", help="redo a run whose results.json already exists")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle checkpoints that a safe load refuses (runs any code inside them); "
                             "only for files from a source you trust")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options using the command-line")
    return parser


def reset_cfg(cfg: Any, args: argparse.Namespace) -> None:
    """Copy truthy CLI arguments into cfg, as CoOp does; ``--seed 0`` is honoured here."""
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed is not None and args.seed < -1:
        raise ConfigError(f"--seed {args.seed} is negative: give a seed of 0 or more, or leave it at -1 to keep "
                          f"the config's SEED (-1 = an unseeded run).")
    if args.seed is not None and args.seed != -1:
        cfg.SEED = args.seed
    if args.source_domains:
        cfg.DATASET.SOURCE_DOMAINS = args.source_domains
    if args.target_domains:
        cfg.DATASET.TARGET_DOMAINS = args.target_domains
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    if args.trainer:
        cfg.TRAINER.NAME = lookup_case_insensitive(TRAINER_REGISTRY, args.trainer)
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.head:
        cfg.MODEL.HEAD.NAME = args.head


def setup_cfg(args: argparse.Namespace) -> Any:
    """defaults -> trainers' nodes -> dataset YAML -> method YAML -> CLI flags -> the method's dataset overrides
    (MMRL's published lambda / d_r, RESTORE's ratios; not the keys the method YAML pins) -> opts (they win)."""
    load_plugins()
    cfg = get_cfg_default()
    extend_cfg(cfg)
    if args.dataset_config_file:
        merge_file(cfg, args.dataset_config_file)
    if args.config_file:
        merge_file(cfg, args.config_file)
    reset_cfg(cfg, args)
    cfg.TRAINER.NAME = lookup_case_insensitive(TRAINER_REGISTRY, cfg.TRAINER.NAME)
    apply_dataset_overrides(cfg, args.opts or [])  # logs the values it applies, one line
    merge_opts(cfg, args.opts or [])
    if not args.output_dir and "OUTPUT_DIR" not in (args.opts or [])[0::2]:  # random weights: not among real runs
        output = default_output_root(cfg.MODEL.BACKBONE.NAME, cfg.OUTPUT_DIR)
        if output != cfg.OUTPUT_DIR:
            print(f"Backbone {cfg.MODEL.BACKBONE.NAME} has random weights: output goes to {output}/, not "
                  f"{cfg.OUTPUT_DIR}/ (--output-dir chooses another folder)")
            cfg.OUTPUT_DIR = output
    cfg.TRAINER.NAME = lookup_case_insensitive(TRAINER_REGISTRY, cfg.TRAINER.NAME)
    check_availability(cfg.TRAINER.NAME, TRAINER_REGISTRY.registered_names(), "trainer")
    check_availability(cfg.DATASET.NAME, DATASET_REGISTRY.registered_names(), "dataset")
    cfg.freeze()
    return cfg


def print_args(args: argparse.Namespace, cfg: Any) -> None:
    print("***************")
    print("** Arguments **")
    print("***************")
    for key in sorted(args.__dict__):
        print(f"{key}: {args.__dict__[key]}")
    print("************")
    print("** Config **")
    print("************")
    print(cfg)


def main(argv: Optional[Sequence[str] | argparse.Namespace] = None) -> int:
    """Parse ``argv`` (default: the process's arguments; or parsed arguments) and run; the exit status.

    A bad config or output folder is one sentence on stderr (exit 2); other errors propagate, as from
    CoOp's ``train.py`` (:func:`cli` turns them into one sentence).
    """
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    return start(args)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``train.py`` / ``python -m restore.launch``: :func:`main`, errors as one sentence on stderr (the
    traceback goes to the run's log.txt); the log tee it opened is closed when the run ends."""
    console = sys.stdout
    try:
        return main(argv)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as err:
        import traceback

        tee = sys.stdout if isinstance(sys.stdout, Logger) else None
        if tee is not None:
            try:
                traceback.print_exc(file=tee.file)
            except OSError:  # the log itself cannot be written (disk full): the sentence below says so
                pass
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 1
    finally:
        log = sys.stdout
        if log is not console and isinstance(log, Logger):  # the run's log.txt ends with the run
            log.close()
            sys.stdout = console


def start(args: argparse.Namespace) -> int:
    """Set up the config, hold the output folder and :func:`run`."""
    training = not args.eval_only and not args.no_train
    try:
        cfg = setup_cfg(args)
        check_settings(cfg, training=training)
    except (ConfigError, ValueError, KeyError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2
    try:  # one run per folder, taken before anything is written into it; released when the run ends
        lock = lock_output_dir(cfg.OUTPUT_DIR)
    except OutputDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with lock:
        if lock.takeover_note():
            print(lock.takeover_note())
        return run(args, cfg)


def run(args: argparse.Namespace, cfg: Any) -> int:
    """The run itself, in an output folder this process holds."""
    training = not args.eval_only and not args.no_train
    results = osp.join(cfg.OUTPUT_DIR, RESULTS_FILE)
    if osp.exists(results) and not args.overwrite and training:  # --eval-only always evaluates, as CoOp
        print(f"{results} exists: this run is finished, skipping it (pass --overwrite to redo it).")
        return 0
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED, deterministic=cfg.DETERMINISTIC)
    elif cfg.DETERMINISTIC:  # a deterministic run needs a seed: the global RNG drives batches and initial values
        print("DETERMINISTIC without a seed: setting fixed seed 0")
        set_random_seed(0, deterministic=True)
    # an unfinished run (killed, then resumed) continues its log.txt, where CoOp's parse_test_res.py looks
    setup_logger(cfg.OUTPUT_DIR, append=training and not osp.exists(results))
    if torch.cuda.is_available() and cfg.USE_CUDA and not cfg.DETERMINISTIC:
        torch.backends.cudnn.benchmark = True
    if cfg.SEED < 0 and not cfg.DETERMINISTIC:
        print("Unseeded run (SEED -1): few-shot images, initialisation and batch order differ from run to run; "
              "results.json records seed \"unseeded\".")
    print_args(args, cfg)
    print("Collecting env info ...")
    print("** System info **\n" + collect_env_info() + "\n")
    with trusted_checkpoints(args.trust_checkpoint):
        trainer = build_trainer(cfg)
        if args.eval_only:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
            trainer.test()
            return 0
        if not args.no_train:
            trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
