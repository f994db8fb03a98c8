#!/usr/bin/env bash
# Cross-dataset / domain generalization, step 1: train on ImageNet, all classes, 16 shots.
# Output: $OUTPUT/xd/train/imagenet/shots_16/<METHOD>/<cfg>/seedSEED
#
#   DATA=/path/to/datasets bash scripts/xd/train.sh TRAINER SEED [opts...]
#
# TRAINER: restore, mmrl, craft, coop, cocoop, ivlp, vpt, maple, promptsrc, kgcoop, zsclip.
# Environment: DATA (required), CFG (config name or .yaml path; default per trainer and protocol),
# SHOTS (training shots, default 16), OUTPUT (output root, default output; output_random for a backbone
# with random weights such as MODEL.BACKBONE.NAME tiny), PYTHON (default python).
# Trailing opts (KEY VALUE ...) go to train.py after everything else. A finished run (results.json)
# is skipped (refused, with what differs, if it ran with other opts); a crashed one resumes from its
# last checkpoint; --overwrite redoes it (a training's old folder is kept as <folder>.old-<time>).
# Logic: restore/protocols.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RESTORE_PLUGINS="${RESTORE_PLUGINS:-trainers:register_all,datasets}"  # this checkout's methods and datasets
exec "${PYTHON:-python}" -m restore.protocols xd-train "$@"
