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


def run_train_py(args: list[str]) -> int:
    """Run ``train.py``'s ``main`` in this process (a subprocess mostly spends its time importing torch)."""
    import train

    stdout = sys.stdout
    try:
        return train.main(train.build_parser().parse_args(args))
    finally:
        if sys.stdout is not stdout:  # train.py tees stdout into log.txt
            logger, sys.stdout = sys.stdout, stdout
            close = getattr(logger, "close", None)
            if close is not None:
                close()
