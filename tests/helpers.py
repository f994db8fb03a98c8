"""Helpers shared by several test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import sys

import torch


def token_ids(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Random tokenised prompts (N, 77): SOT, ``length - 1`` random tokens, EOT at index ``length``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), 77, dtype=torch.long)
    ids[:, 0] = 49406
    for i, n in enumerate(lengths):
        ids[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        ids[i, n] = 49407
    return ids


def tiny_run_config(lr: float = 0.01, max_epoch: int = 1, schedule: bool = True, extra: str = "") -> str:
    """A trainer YAML for the tiny random CLIP: batch 2 (test 8), no loader workers, SGD at ``lr`` for
    ``max_epoch`` epochs (cosine after one constant warm-up epoch when ``schedule``), plus ``extra`` sections."""
    warmup = ('  LR_SCHEDULER: "cosine"\n  WARMUP_EPOCH: 1\n  WARMUP_TYPE: "constant"\n  WARMUP_CONS_LR: 1e-5\n'
              if schedule else "")
    return ("DATALOADER:\n  TRAIN_X:\n    BATCH_SIZE: 2\n  TEST:\n    BATCH_SIZE: 8\n  NUM_WORKERS: 0\n"
            f'OPTIM:\n  NAME: "sgd"\n  LR: {lr}\n  MAX_EPOCH: {max_epoch}\n{warmup}'
            'MODEL:\n  BACKBONE:\n    NAME: "tiny"\n' + extra.lstrip("\n"))


def run_train_py(args: list[str], as_cli: bool = False) -> int:
    """Run ``train.py``'s ``main`` in this process (a subprocess mostly spends its time importing torch).

    ``as_cli``: through ``train.cli`` as ``python train.py`` does, so errors become its one-line message and
    exit status instead of exceptions.
    """
    import train

    stdout = sys.stdout
    try:
        if as_cli:
            return train.cli(args)
        return train.main(train.build_parser().parse_args(args))
    finally:
        if sys.stdout is not stdout:  # train.py tees stdout into log.txt
            logger, sys.stdout = sys.stdout, stdout
            close = getattr(logger, "close", None)
            if close is not None:
                close()


def dassl_checkpoint(state_dict: dict[str, torch.Tensor], epoch: int) -> dict:
    """What the original Dassl's ``save_model`` writes for a trainer with SGD, cosine LR and constant
    warmup (CoOp's and MaPLe's configs): its scheduler state is the warmup scheduler's ``__dict__``
    minus the optimizer, so it holds the successor CosineAnnealingLR *object* and, through it, the
    SGD object (a pickled class instance each, with a ``collections.defaultdict`` state)."""
    from restore.engine.optim import ConstantWarmupScheduler

    params = [torch.nn.Parameter(v.detach().clone().float()) for v in state_dict.values()]
    optim = torch.optim.SGD(params, lr=0.002, momentum=0.9)
    sched = ConstantWarmupScheduler(optim, torch.optim.lr_scheduler.CosineAnnealingLR(optim, float(epoch)), 1, 1e-5)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(epoch):
        optim.step()
        sched.step()
    return {"state_dict": state_dict, "epoch": epoch, "optimizer": optim.state_dict(),
            "scheduler": {k: v for k, v in vars(sched).items() if k != "optimizer"}, "val_result": None}
