#!/usr/bin/env bash
# Builds the phantom-trained demo bundle from scratch, one resumable step at a time:
#   1. a pretraining cohort of phantoms (1 mm) and its slice index;
#   2. tiny DINO pretraining on one CPU (tiny-cpu config, 4 epochs; resumes after an interruption);
# Re-run it after an interruption: finished steps are skipped, pretraining continues from its checkpoint.
# Usage: bash tools/make-demo-bundle.sh [WORK_DIR]   (default: build/demo)
set -euo pipefail
work=${1:-build/demo}
mkdir -p "$work"

if [ ! -f "$work/pretrain-cohort/manifest.csv" ]; then
  braindino cohort make 48 "$work/pretrain-cohort" --seed 100
fi
if [ ! -f "$work/pretrain-index/index.json" ]; then
  braindino index "$work/pretrain-cohort" -o "$work/pretrain-index"
fi
resume=()
[ -f "$work/pretrain/checkpoint.pt" ] && resume=(--resume)
braindino pretrain --config tiny-cpu --data "$work/pretrain-index" -o "$work/pretrain" --set epochs=4 "${resume[@]}"
