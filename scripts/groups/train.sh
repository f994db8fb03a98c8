#!/usr/bin/env bash
# Group robustness: train on DATASET's train split, pick the model on val (worst-group accuracy by default),
# test with per-group accuracy. Output: $OUTPUT/groups/train/DATASET/shots_SHOTS/<METHOD>/<cfg>/seedSEED
#
#   DATA=/path/to/datasets bash scripts/groups/train.sh TRAINER waterbirds|celeba SEED [opts...]
#
# TRAINER: restore, mmrl, craft, coop, cocoop, ivlp, vpt, maple, promptsrc, kgcoop, zsclip.
# Environment: DATA (required), CFG (config name or .yaml path; default: the trainer's few-shot config),
# SHOTS (training images per class, default 16; -1 = the whole train split), OUTPUT (output root, default
# output; output_random for a backbone with random weights such as MODEL.BACKBONE.NAME tiny), PYTHON.
# Trailing opts (KEY VALUE ...) go to train.py after everything else, e.g. TEST.SELECTION_METRIC accuracy
# (select on average val accuracy), DATASET.GROUPS.SHOTS_PER_GROUP True (SHOTS per group), DATASET.TEMPLATE.
# Tables: python -m restore.evaluation.group_tables $OUTPUT. Logic: restore/protocols.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RESTORE_PLUGINS="${RESTORE_PLUGINS:-trainers:register_all,datasets}"  # this checkout's methods and datasets
exec "${PYTHON:-python}" -m restore.protocols groups-train "$@"
