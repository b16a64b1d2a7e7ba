#!/usr/bin/env bash
# Fine-tuning throughput on one CUDA GPU, with the data pipeline included.
#
# What it measures: `lesionlab train --mode finetune --backbone efficientnet_lite0 --device cuda` for 2 epochs,
# batch 128, 8 data-loader workers, at 224 px and at 384 px input, on a generated set of 384 px JPEGs
# (bench/make_images.py: N = 4096 images, 90% train; the run trains on 80% of those, the rest validates). Per size
# it reports, from the run's config.json compute block:
#   - images_per_second       training steps (decode/augment wait, transfer, forward, backward, optimizer)
#   - max_memory_allocated_gb peak memory PyTorch allocated on the GPU (GiB; CUDA runs only)
#   - data_wait_fraction      share of the training time spent waiting for the data loader
# and, beside them, the peak of `nvidia-smi --query-gpu=memory.used` polled every second (the whole GPU: CUDA
# context and cached blocks included, so above max_memory_allocated) and the wall time of the run.
# Random weights (--allow-random-init: no ImageNet weights on the GPU machine): fine for timing. --no-eval: the
# figures come from training alone.
#
# The bar: >= 2000 images/s for efficientnet_lite0 at 224 px, data pipeline included.
#
# Run from the repository root (no install needed; it sets PYTHONPATH=src itself):
#     bash bench/gpu.sh
#     N=1024 bash bench/gpu.sh                     # fewer images
# If OUT is set, the summary (text and JSON), both config.json files and the logs are copied there.
# Overrides for a smoke test elsewhere: PYTHON (python), DEVICE (cuda), SIZES ("224 384"), EPOCHS (2),
# BATCH (128), WORKERS (8), DATA (/tmp/gpu-bench), GEN_WORKERS (the cores).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

PYTHON=${PYTHON:-python}
N=${N:-4096}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-"224 384"}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-8}
DATA=${DATA:-/tmp/gpu-bench}
GEN_WORKERS=${GEN_WORKERS:-$(nproc)}
BAR=2000

echo "== machine"
"$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF
HAVE_SMI=0
if command -v nvidia-smi >/dev/null 2>&1; then
  HAVE_SMI=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
echo "cores: $(nproc)"

echo "== images"
"$PYTHON" bench/make_images.py "$DATA" --n "$N" --size 384 --workers "$GEN_WORKERS" --quiet

# poll_smi FILE: append the GPU's memory.used (MiB, the highest GPU) to FILE every second until killed
poll_smi() {
  while :; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | sort -n | tail -1 >>"$1" || true
    sleep 1
  done
}

FAILED=0
RESULTS=()
for SIZE in $SIZES; do
  RUN=/tmp/gpu-run-$SIZE
  LOG=/tmp/gpu-run-$SIZE.log
  SMI=/tmp/gpu-run-$SIZE.smi
  export LESIONLAB_CACHE_DIR=/tmp/gpu-cache-$SIZE
  rm -rf "$RUN" "$LESIONLAB_CACHE_DIR" "$SMI"  # a fresh run (an existing one would resume) and a cold cache
  : >"$SMI"
  CMD=("$PYTHON" -m lesionlab train --data "$DATA" --mode finetune --backbone efficientnet_lite0
    --device "$DEVICE" --epochs "$EPOCHS" --batch-size "$BATCH" --data-workers "$WORKERS" --input-size "$SIZE"
    --allow-random-init --no-eval --out "$RUN" --quiet)
  echo "== $SIZE px: ${CMD[*]}"
  POLLER=""
  if [ "$HAVE_SMI" = 1 ]; then
    poll_smi "$SMI" &
    POLLER=$!
  fi
  START=$(date +%s.%N)
  RC=0
  "${CMD[@]}" >"$LOG" 2>&1 || RC=$?
  WALL=$(awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ -n "$POLLER" ]; then
    kill "$POLLER" 2>/dev/null || true
    wait "$POLLER" 2>/dev/null || true
  fi
  if [ "$RC" != 0 ]; then
    FAILED=1
    echo "FAILED (exit $RC); the log's tail:"
    tail -n 40 "$LOG"
  fi
  RESULTS+=("$SIZE $RC $WALL")
done

echo "== summary"
SUMMARY=/tmp/gpu-summary.txt
SUMMARY_JSON=/tmp/gpu-summary.json
"$PYTHON" - "$BAR" "$SUMMARY_JSON" "${RESULTS[@]}" <<'EOF' | tee "$SUMMARY"
import json
import sys
from pathlib import Path

bar, out_json, rows = float(sys.argv[1]), sys.argv[2], [r.split() for r in sys.argv[3:]]
results = []
for size, rc, wall in rows:
    config = {}
    try:
        config = json.loads(Path(f"/tmp/gpu-run-{size}/config.json").read_text())
    except (OSError, ValueError):
        pass
    compute = config.get("compute") or {}
    smi = [int(x) for x in Path(f"/tmp/gpu-run-{size}.smi").read_text().split() if x.isdigit()]
    results.append({
        "input_size": int(size),
        "exit_code": int(rc),
        "wall_seconds": float(wall),
        "images_per_second": compute.get("images_per_second"),
        "images_trained": compute.get("images_trained"),
        "max_memory_allocated_gb": compute.get("max_memory_allocated_gb"),
        "data_wait_fraction": compute.get("data_wait_fraction"),
        "nvidia_smi_peak_mib": max(smi) if smi else None,
        "device_name": compute.get("device_name"),
        "precision": compute.get("precision"),
        "compute": compute,
        "command": config.get("command"),
    })

def show(x, unit=""):
    return "absent" if x is None else f"{x}{unit}"

device = next((r["compute"].get("device") for r in results if r["compute"]), "?")
print(f"efficientnet_lite0 finetune on {device}, data pipeline included")
for r in results:
    print(
        f"{r['input_size']:>4} px: {show(r['images_per_second'])} images/s | max_memory_allocated "
        f"{show(r['max_memory_allocated_gb'], ' GB')} | nvidia-smi peak {show(r['nvidia_smi_peak_mib'], ' MiB')} | "
        f"data wait {show(r['data_wait_fraction'])} | wall {r['wall_seconds']} s | {show(r['precision'])} on "
        f"{show(r['device_name'])} | {r['images_trained']} images trained | exit {r['exit_code']}"
    )
at224 = next((r["images_per_second"] for r in results if r["input_size"] == 224), None)
if at224 is not None:
    verdict = "MET" if at224 >= bar else "NOT MET"
    print(f"bar: >= {bar:g} images/s at 224 px: {verdict} ({at224})")
Path(out_json).write_text(json.dumps({"bar_images_per_second": bar, "runs": results}, indent=2) + "\n")
EOF

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$SUMMARY" "$SUMMARY_JSON" "$OUT"/
  for SIZE in $SIZES; do
    if [ -f "/tmp/gpu-run-$SIZE/config.json" ]; then cp "/tmp/gpu-run-$SIZE/config.json" "$OUT/config-$SIZE.json"; fi
    if [ -f "/tmp/gpu-run-$SIZE.log" ]; then cp "/tmp/gpu-run-$SIZE.log" "$OUT/train-$SIZE.log"; fi
  done
  echo "copied to $OUT"
fi
exit "$FAILED"
