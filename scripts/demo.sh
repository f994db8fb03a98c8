#!/usr/bin/env bash
# End-to-end demo of the base-to-novel protocol on synthetic data with the tiny random CLIP (CPU, seconds):
# writes synthetic DTD and EuroSAT, trains TRAINER (default restore) on their base classes for 2 seeds,
# evaluates on the new classes, and prints the aggregate table.
#
#   bash scripts/demo.sh [TRAINER]          # e.g. bash scripts/demo.sh coop
#
# DEMO_DIR (default demo_output, outside output/ so that `aggregate output/` never mixes the demo into
# real tables) receives data/, output/ and output/aggregate/. Re-running skips
# finished runs. The backbone has RANDOM weights: the numbers are meaningless, only the machinery
# (scripts, checkpoints, resume, aggregation) is real.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RESTORE_PLUGINS="${RESTORE_PLUGINS:-trainers:register_all,datasets}"  # this checkout's methods and datasets
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the tiny model gains nothing from threads
TRAINER="${1:-restore}"
DEMO_DIR="${DEMO_DIR:-demo_output}"
export DATA="$DEMO_DIR/data" OUTPUT="$DEMO_DIR/output" SHOTS="${SHOTS:-16}"
unset CFG SUB

for ds in dtd eurosat; do
  [ -d "$DATA/$ds" ] || "$PY" -m restore.datasets.synthetic "$ds" --root "$DATA" --classes 4 --images-per-class 12
done

"$PY" -m restore.protocols run-all base2new "$TRAINER" --datasets dtd,eurosat --seeds 1,2 --in-process \
  MODEL.BACKBONE.NAME tiny OPTIM.MAX_EPOCH 2 OPTIM.WARMUP_EPOCH 0 DATALOADER.NUM_WORKERS 0 \
  DATALOADER.TRAIN_X.BATCH_SIZE 4 DATALOADER.TEST.BATCH_SIZE 32 TRAIN.PRINT_FREQ 5 > "$DEMO_DIR/run_all.log" 2>&1 \
  || { echo "run-all failed; last lines of $DEMO_DIR/run_all.log:"; tail -n 30 "$DEMO_DIR/run_all.log"; exit 1; }
grep -E '^\[[0-9]+/[0-9]+\]|^Finished' "$DEMO_DIR/run_all.log" || true

"$PY" -m restore.evaluation.aggregate "$OUTPUT"
cat <<'NOTE'

NOTE: this demo uses the tiny CLIP with RANDOM weights on synthetic images, 2 epochs and 2 seeds.
The accuracies above are meaningless (the "Paper" column is the published ViT-B/16 result, for layout
only); the demo only shows that training, resume/skip, base->new evaluation and aggregation work.
For real numbers: DATA=/path/to/datasets bash scripts/run_all.sh base2new restore
NOTE
