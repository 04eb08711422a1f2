#!/usr/bin/env bash
# The zero-shot table's log-likelihoods on a GPU machine (no lm-eval, no task data, no network
# needed there). Three steps, of which only the middle one runs on the GPU:
#   1. here:  flexq zeroshot --export-requests .zs/requests-full.npz      (every request of the four
#             tasks, full sets, as token ids; with the calibration batch and 8 x 2048 evaluation tokens)
#   2. there: ROWS="FP32|<accuracy-table row label>|..." bash results/zeroshot/run_gpu.sh \
#                 .zs/requests-full.npz MODEL.gguf OUTDIR
#             each row: `flexq score-requests` (quantized there from the file's calibration batch,
#             rotated first where the row says so, on the dequant backend, fp32 at "highest" matmul
#             precision), one scores file per row in OUTDIR and the log in OUTDIR/log
#   3. here:  for each scores file S: flexq zeroshot --scores-from S --out results/zeroshot
#             (lm-eval's own scoring of the replayed log-likelihoods)
# PARALLEL=1 runs the rows of step 2 at once, one process each (XLA_PYTHON_CLIENT_PREALLOCATE=false).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
req=$1 model=$2 out=$3
mkdir -p "$out"
IFS='|' read -ra rows <<< "${ROWS:-FP32}"
run_row() {  # one row: its scores file and its log
  local row=$1 slug args=()
  slug=$(echo "$row" | tr -c 'A-Za-z0-9' _ | cut -c1-48)
  if [ "$row" != FP32 ]; then args=(--row "$row" --backend dequant); fi
  echo "== $row -> $out/$slug.npz ($(date -u +%H:%M:%S))"
  timeout "${ROW_TIMEOUT:-300}" python3 -m evaluation.cli score-requests "$req" --model "$model" "${args[@]}" \
      --batch-tokens "${BATCH_TOKENS:-32768}" --fixed-rows --out "$out/$slug.npz" 2>&1 \
      | tr '\r' '\n' | grep -v 'it/s\]$\|tok/s\]$'
  echo "== $row: rc=${PIPESTATUS[0]} ($(date -u +%H:%M:%S))"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  # PARALLEL=1: every row in its own process at once. A row's time is mostly quantization on the
  # host (one core each); the model is small, so the rows share the GPU without waiting long.
  for i in "${!rows[@]}"; do run_row "${rows[$i]}" > "$out/row-$i.log" & done
  wait
  cat "$out"/row-*.log | tee -a "$out/log"
else
  for row in "${rows[@]}"; do run_row "$row" | tee -a "$out/log"; done
fi
