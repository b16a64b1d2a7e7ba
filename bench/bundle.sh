#!/bin/bash
# Make a trained run the bundled default model, measuring what its model card reports:
#   bench/bundle.sh runs/NAME            (from the repository root; about 5 minutes on 2 quiet cores)
# 1. evaluation by this code (operating point, diagnosis decision and detector fitted on validation: a run
#    evaluated by older code, such as the ablation queue's pinned commits, gets the current rules), 2. the lesion
#    detector learns to refuse clinical photos (half of ../shared/data/clinical-sd198, split by folder; measured on
#    the other half), 3. the external sets are scored again with that detector (their refusal counts), 4. ONNX
#    export, 5. single-image latency (bench/serve.py, model and end to end), 6. site calibration on
#    isic2018-task3-test (100/200/400 images, ten draws each, scored on the images not drawn), 7. the bundle and its
#    MODEL_CARD.md (tools/make_default_model.py), whose "How it was made" lists these steps as they ran.
# Measurements go to bench/results/bundle-NAME-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bench/bundle.sh RUN_DIR}
NAME=$(basename "$RUN")
L=.venv/bin/lesionlab
PY=.venv/bin/python
OUT=${BUNDLE_RESULTS:-bench/results/bundle-$NAME}   # measurements, and where the bundle goes (a dry run: both elsewhere)
DEST=${BUNDLE_OUT:-src/lesionlab/default_model}
EXT="--only-external --external isic2018=../shared/data/isic2018-task3-test --external ph2=../shared/data/ph2"
MADE=()  # each step's command as it ran (the model card's "How it was made")
step() {  # title, command...
  echo "=== $(date +%T) $1"; shift
  MADE+=("$(echo "$@" | sed 's|\.venv/bin/python |python |; s|\.venv/bin/||')")
  "$@"
}
TRAIN=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['command'])" "$RUN/config.json")
MADE+=("$TRAIN")
step evaluate $L evaluate "$RUN" --quiet
step refusal $L refusal "$RUN" --non-lesion ../shared/data/clinical-sd198/images --quiet
step external $L evaluate "$RUN" $EXT --quiet
step export $L export "$RUN"
echo "=== $(date +%T) latency (measured, not part of the model)"
$PY bench/serve.py --model "$RUN" --part runtimes --out "$OUT-serve.json"
step "site calibration" $PY bench/site_calibration.py "$RUN" --sizes 100 200 400 --draws 10 \
  --policy sensitivity:0.90 --policy sensitivity:0.95 --json "$OUT-site.json"
BUNDLE=(tools/make_default_model.py "$RUN" --out "$DEST" --site-calibration "$OUT-site.json")
MADE+=("python ${BUNDLE[*]}")
COMMANDS=()
for c in "${MADE[@]}"; do COMMANDS+=(--command "$c"); done
echo "=== $(date +%T) bundle"
$PY "${BUNDLE[@]}" "${COMMANDS[@]}"
echo "=== $(date +%T) done"
