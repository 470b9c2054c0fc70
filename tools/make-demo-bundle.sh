#!/usr/bin/env bash
# Builds the phantom-trained demo bundle from scratch, one resumable step at a time:
#   1. a pretraining cohort of phantoms (48 subjects, 1 mm) and its slice index;
#   2. tiny DINO pretraining on one CPU (tiny-cpu config, 2 epochs of 600 steps; resumes after an interruption);
#   3. a separate labelled phantom cohort for the heads (80 subjects, 1 mm);
#   4. heads of every kind on the frozen encoder (sequence, tumour segmentation, diagnosis, marker, age, survival);
#   5. the bundle installed as the shipped default, with a held-out demo phantom (tools/install-demo-bundle.py);
#   6. MoCo v3 and MAE encoders with the same pretraining budget, for benchmarks/label_efficiency.py.
# Re-run it after an interruption: finished steps are skipped, pretraining continues from its checkpoint.
# Usage: bash tools/make-demo-bundle.sh [WORK_DIR]   (default: build/demo)
set -euo pipefail
work=${1:-build/demo}
mkdir -p "$work"
budget=(--config tiny-cpu --data "$work/pretrain-index" --set epochs=2 --set steps_per_epoch=600)

pretrain() {  # OBJECTIVE OUT_DIR
  local resume=()
  [ -f "$2/bundle/model.json" ] && return
  [ -f "$2/checkpoint.pt" ] && resume=(--resume)
  braindino pretrain "${budget[@]}" --objective "$1" -o "$2" "${resume[@]}"
}

if [ ! -f "$work/pretrain-cohort/manifest.csv" ]; then
  braindino cohort make 48 "$work/pretrain-cohort" --seed 100
fi
if [ ! -f "$work/pretrain-index/index.json" ]; then
  braindino index "$work/pretrain-cohort" -o "$work/pretrain-index"
fi
pretrain dino "$work/pretrain"

if [ ! -f "$work/heads-cohort/manifest.csv" ]; then
  braindino cohort make 80 "$work/heads-cohort" --seed 200
fi
bundle="$work/braindino-tiny-phantom"
fit() {  # NAME fit-head options...; the first call creates the bundle with its head
  local name=$1
  shift
  [ -f "$work/reports/$name/metrics.md" ] && return
  braindino fit-head --name "$name" --manifest "$work/heads-cohort" --cache "$work/cache" \
    --report "$work/reports/$name" --label-fraction 0.1 1 --seeds 0 1 2 "$@"
}
if [ -d "$bundle" ]; then
  fit sequence --task seq --bundle "$bundle"
else
  fit sequence --task seq --bundle "$work/pretrain/bundle" -o "$bundle"
fi
fit diagnosis --task cls --target diagnosis --modality t1 --bundle "$bundle"
fit marker --task cls --target marker --modality t1ce --bundle "$bundle"
fit age --task reg --target age --modality t1 --bundle "$bundle"
fit survival --task surv --modality t1ce --bundle "$bundle"
fit tumor --task seg --modality flair --steps 600 --label-fraction 1 --seeds 0 --bundle "$bundle"
installed=BrainDINO/BrainDINOLib/models/braindino-tiny-phantom
if [ ! -f "$installed/model.json" ] || [ "$bundle/model.json" -nt "$installed/model.json" ]; then
  python tools/install-demo-bundle.py "$bundle" --work "$work"
fi

pretrain moco "$work/pretrain-moco"
pretrain mae "$work/pretrain-mae"
