#!/usr/bin/env bash
# The full grid of a protocol for one trainer: datasets x seeds (x shots), training then evaluation.
#
#   DATA=/path/to/datasets bash scripts/run_all.sh PROTOCOL TRAINER [--seeds 1,2,3] [--datasets dtd,eurosat]
#                                                  [--gpus 0,1] [--test-base] [--dry-run] [opts...]
#
# PROTOCOL: base2new (train base, test new), xd (train ImageNet, test the 10 other datasets and the 4
# ImageNet variants), dg (train ImageNet, test the 4 variants), fewshot (--shot-list 1,2,4,8,16).
# One job at a time by default; --gpus 0,1 runs one job per GPU (CUDA_VISIBLE_DEVICES round-robin,
# each job's output in $OUTPUT/logs/PROTOCOL/). Finished runs are skipped, crashed ones resume, so
# re-running this command after an interruption completes the grid. Ctrl-C or SIGTERM also stops the
# running train.py processes, prints one line and exits with 130 / 143. OUTPUT defaults to output
# (output_random for a backbone with random weights such as MODEL.BACKBONE.NAME tiny). Then:
#   python -m restore.evaluation.aggregate output/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RESTORE_PLUGINS="${RESTORE_PLUGINS:-trainers:register_all,datasets}"  # this checkout's methods and datasets
exec "${PYTHON:-python}" -m restore.protocols run-all "$@"
