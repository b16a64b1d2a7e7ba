#!/bin/bash
# The transfer ablation (docs/results.md 8.1), one job at a time, in the background:
#   nohup bench/ablation_queue.sh a1 a5 a2 a3 a4 a6 a7 a8 >> logs/ablation.log 2>&1 &
# Each run trains on isic-kaggle + ham10000 (lesion-safe), then is scored on the external sets (reported, never
# tuned on); `python bench/ablation.py runs/r8-*` prints the table. Resumable, across sessions too: a finished run
# is skipped (in runs/, or its small files kept in bench/results/runs/, which later sessions pair against), an
# unfinished one resumes from its last epoch. The code is a fixed commit (a git worktree at $SNAPSHOT
# of $ABLATION_COMMIT, made when missing), so that edits in the working tree cannot break a queued run and every
# fine-tuned row is trained by the same code: c0216d8, the first whose runs resume on a fresh copy of the data
# (every session here gets newly written files, and older code identified a run's data by their mtimes).
# External sets are scored by EVAL_COMMIT (a58b924), the first that writes each image's score
# (external_predictions.csv, for the paired table: bench/ablation.py --against); its external metrics are the
# pinned commit's, bit for bit (the frozen rows, scored again by it, came out identical).
cd "$(dirname "$0")/.."
ABLATION_COMMIT=${ABLATION_COMMIT:-c0216d8}
EVAL_COMMIT=${EVAL_COMMIT:-a58b924}
snapshot() {  # commit -> a worktree of it under /tmp, made when missing
  local dir=/tmp/lesionlab-ablation-$1
  [ -d "$dir" ] || { git worktree prune; git worktree add --detach "$dir" "$1" -q; }
  [ "$(git -C "$dir" rev-parse --short=7 HEAD)" = "${1:0:7}" ] || { echo "$dir is not $1" >&2; exit 2; }
  echo "$dir"
}
SNAPSHOT=$(snapshot "$ABLATION_COMMIT") || exit 2
EVAL_SNAPSHOT=$(snapshot "$EVAL_COMMIT") || exit 2
D="--data ../shared/data/isic-kaggle --data ../shared/data/ham10000"
EXT="--only-external --external isic2018=../shared/data/isic2018-task3-test --external ph2=../shared/data/ph2"
L=.venv/bin/lesionlab
FT="--mode finetune --lr 3e-4 --epochs 8 --optimizer adamw --weight-decay 1e-4 --schedule cosine --warmup-epochs 1 --label-smoothing 0.05"
KEPT=bench/results/runs
keep() {  # a finished run's small files, to commit: runs/ does not outlive a session; bench/ablation.py reads them
  mkdir -p "$KEPT/$1"
  for f in config.json metrics.json history.csv predictions.csv external_predictions.csv; do
    [ -f "runs/$1/$f" ] && cp "runs/$1/$f" "$KEPT/$1/"
  done
}
run() {  # name, train options...
  local name=$1; shift
  echo "=== $(date +%T) $name: $*"
  for done in runs/$name $KEPT/$name; do
    if [ -f $done/metrics.json ] && grep -q '"external"' $done/metrics.json; then echo "done earlier: $done"; return; fi
  done
  local rc=0  # the status of train, or of evaluate when train succeeded (not the echo's)
  PYTHONPATH=$SNAPSHOT/src $L train $D "$@" --out runs/$name --quiet &&
    PYTHONPATH=$EVAL_SNAPSHOT/src $L evaluate runs/$name $EXT --quiet || rc=$?
  [ $rc = 0 ] && keep "$name"
  echo "=== $(date +%T) $name finished rc=$rc"
}
for job in "$@"; do
  case $job in
    f-sq) run r8-f-squash --resize squash ;;  # frozen lite0 (the study's head), one lever each
    f-cc) run r8-f-cc --color-constancy shades-of-gray ;;
    f-dx) run r8-f-dx --target diagnosis ;;
    a1) run r8-a1-ft-union $FT ;;  # fine-tuned: the bundled model's recipe on the union, then one lever each
    a2) run r8-a2-ft-shortcuts $FT --augment dermoscopy+shortcuts ;;
    a3) run r8-a3-ft-color $FT --augment dermoscopy+color ;;
    a4) run r8-a4-ft-aspect $FT --augment dermoscopy+aspect ;;
    a5) run r8-a5-ft-dx $FT --target diagnosis ;;
    a5s1) run r8-a5-ft-dx-s1 $FT --target diagnosis --seed 1 ;;  # the validation choice, two more seeds (issue 14)
    a5s2) run r8-a5-ft-dx-s2 $FT --target diagnosis --seed 2 ;;
    a6) run r8-a6-ft-cc $FT --color-constancy shades-of-gray ;;
    a7) run r8-a7-ft-all $FT --target diagnosis --augment dermoscopy+shortcuts+color+aspect --color-constancy shades-of-gray ;;  # together
    a8) run r8-a8-ft-320 $FT --input-size 320 ;;  # input size: twice the pixels, about twice the time
    *) echo "unknown job $job (f-sq f-cc f-dx a1..a8 a5s1 a5s2)"; exit 2 ;;
  esac
done
echo "QUEUE DONE $(date +%T)"
