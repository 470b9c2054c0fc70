#!/usr/bin/env bash
# Builds the phantom-trained demo bundle from scratch, one resumable step at a time:
#   1. a pretraining cohort of whole-head phantoms (48 subjects, 1 mm; four sequences and two randomised
#      contrasts each, a quarter of them skull-stripped) and its slice index;
#   2. tiny DINO pretraining (tiny-cpu config, 2 epochs of 156 steps of 256 slices: about 2.5 minutes on one H100
#      GPU, several hours on a CPU; resumes after an interruption);
#   3. a separate labelled cohort for the heads (80 subjects, 1 mm, one randomised contrast each, a quarter
#      skull-stripped);
#   4. heads on the frozen encoder, on all 80 subjects: the brain mask first (every later head is fitted on scans
#      prepared through it, as infer prepares them), then tumour segmentation on any contrast and on T1, T1ce and
#      T2 alone, sequence, diagnosis, marker, age, survival, and the out-of-distribution reference (braindino
#      calibrate). Encoding the 400 scans twice, as infer does, takes about 3-12 s a scan on 2 CPU cores; the
#      brain decoder's 3,000 steps about 0.5 s each there and the tumour decoders' 2,000 and 1,000 (they read
#      the pixels too) 1.5-2 s, 10-30 ms on a GPU (--device follows fit-head's default: a GPU when there is one);
#   5. the bundle installed as the shipped default, with a held-out demo phantom (tools/install-demo-bundle.py);
#   6. MoCo v3 and MAE encoders with the same pretraining budget, for benchmarks/label_efficiency.py.
# Re-run it after an interruption: finished steps are skipped, pretraining continues from its checkpoint.
# Usage: bash tools/make-demo-bundle.sh [WORK_DIR]   (default: build/demo)
set -euo pipefail
work=${1:-build/demo}
mkdir -p "$work"
budget=(--config tiny-cpu --data "$work/pretrain-index" --set epochs=2 --set steps_per_epoch=156 --set batch_size=256
  --set workers=12 --set checkpoint_every=250)

pretrain() {  # OBJECTIVE OUT_DIR
  local resume=()
  [ -f "$2/bundle/model.json" ] && return
  [ -f "$2/checkpoint.pt" ] && resume=(--resume)
  braindino pretrain "${budget[@]}" --objective "$1" -o "$2" "${resume[@]}"
}
cohort() {  # N FOLDER SEED options...; an interrupted cohort resumes where it stopped
  [ -f "$2/manifest.csv" ] && return
  braindino cohort make "$1" "$2" --seed "$3" --skull-stripped 0.25 --workers "$(nproc)" "${@:4}"
}

pretrained() {  # every encoder exported (then the pretraining cohort is not needed)
  for run in pretrain pretrain-moco pretrain-mae; do [ -f "$work/$run/bundle/model.json" ] || return 1; done
}
if ! pretrained; then
  cohort 48 "$work/pretrain-cohort" 100 --random-contrasts 2
  [ -f "$work/pretrain-index/index.json" ] || braindino index "$work/pretrain-cohort" -o "$work/pretrain-index"
fi
pretrain dino "$work/pretrain"

cohort 80 "$work/heads-cohort" 200 --random-contrasts 1
bundle="$work/braindino-tiny-phantom"
fit() {  # NAME fit-head options...; on the heads cohort; the first call creates the bundle with its head
  local name=$1
  shift
  [ -f "$work/reports/$name/metrics.md" ] && return
  braindino fit-head --name "$name" --manifest "$heads" --cache "$work/cache" \
    --report "$work/reports/$name" --label-fraction 0.1 1 --seeds 0 1 2 "$@"
}
heads="$work/heads-cohort"
if [ -d "$bundle" ]; then
  fit brain --task brain --steps 3000 --label-fraction 1 --seeds 0 --bundle "$bundle"
else
  fit brain --task brain --steps 3000 --label-fraction 1 --seeds 0 --bundle "$work/pretrain/bundle" -o "$bundle"
fi
# The tumour head first: its feature files (with patch tokens) then serve every volume head.
# It also reads the pixels (--image-channels): on T1ce the tokens alone find next to nothing.
fit tumor --task seg --modality any --steps 2000 --image-channels 16 --lesion-share 0.5 --label-fraction 1 --seeds 0 --bundle "$bundle"
# A head fitted on one sequence finds that sequence's lesion far better (T1ce: the enhancing ring); infer lets it
# segment scans of its sequence instead of the any-contrast head.
for sequence in t1 t1ce t2; do
  fit "tumor_$sequence" --task seg --modality "$sequence" --steps 1000 --image-channels 16 --lesion-share 0.5 \
    --label-fraction 1 --seeds 0 --bundle "$bundle"
done
fit sequence --task seq --thumbnails --bundle "$bundle"
fit diagnosis --task cls --target diagnosis --modality t1 --bundle "$bundle"
fit marker --task cls --target marker --modality t1ce --bundle "$bundle"
fit age --task reg --target age --modality t1 --bundle "$bundle"
fit survival --task surv --modality t1ce --bundle "$bundle"
if [ ! -f "$work/reports/calibrated" ]; then
  braindino calibrate --manifest "$heads" --bundle "$bundle" --cache "$work/cache"
  touch "$work/reports/calibrated"
fi
installed=BrainDINO/BrainDINOLib/models/braindino-tiny-phantom
if [ ! -f "$installed/model.json" ] || [ "$bundle/model.json" -nt "$installed/model.json" ]; then
  python tools/install-demo-bundle.py "$bundle" --work "$work"
fi

pretrain moco "$work/pretrain-moco"
pretrain mae "$work/pretrain-mae"
