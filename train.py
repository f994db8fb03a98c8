"""CoOp-compatible entry point: ``python train.py --root DATA --trainer RESTORE ... [opts]``.

The launcher is the library's :mod:`restore.launch`; this checkout's methods and datasets are imported here.
"""

import sys

import datasets  # noqa: F401  registers the benchmark loaders
import trainers
from restore.launch import build_parser, cli, main, setup_cfg  # noqa: F401  (train.build_parser, ... as before)

trainers.register_all()

if __name__ == "__main__":
    sys.exit(cli())
