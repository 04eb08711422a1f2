#!/usr/bin/env bash
# The zero-shot table of results/zeroshot/ (SmolLM2-135M-Instruct, CPU), one run per configuration and
# task set; each run adds its tasks to its row of zeroshot.md / zeroshot.json. Quantized rows are made
# in-process with the accuracy table's configurations (--row; calibration as `flexq accuracy`: 8 x 512
# tokens of the Wikipedia excerpt, seed 0) and run on the 'dequant' backend (the numerics contract in
# one fp32 dot per layer, as the perplexity table). Logs in results/zeroshot/raw/.
# The committed table was made with results/zeroshot/run_gpu.sh instead (log-likelihoods on a GPU machine,
# lm-eval here; results/zeroshot/README.md). This script is the all-CPU way: FULL=1 runs every task of every
# row on the whole validation/test sets (about 1 hour per row on 2 cores); without FULL, the first examples.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_DATASETS_OFFLINE=1
FLEXQ="nice -n 10 .venv/bin/flexq zeroshot --out results/zeroshot --backend dequant"
DEFAULT="W6A6 + sensitivity-chosen A8 (Hadamard rotation + GPTQ) = flexq-jax default"
OTHERS=("W6A6 + down_proj A8, paper rule (Hadamard rotation + GPTQ)" "W6A6 everywhere (Hadamard rotation + GPTQ)"
        "W6A16 (Hadamard rotation + GPTQ)" "W8A8 SmoothQuant (per-channel W, per-token A, alpha 0.5)")
log() { echo "results/zeroshot/raw/$1.log"; }
if [[ "${FULL:-0}" == 1 ]]; then
  $FLEXQ > "$(log fp32-full)" 2>&1
  for row in "$DEFAULT" "${OTHERS[@]}"; do $FLEXQ --row "$row" > "$(log "$(echo "$row" | tr -c 'A-Za-z0-9' _ | cut -c1-40)-full")" 2>&1; done
  exit 0
fi
# FP32 and the default FlexQ model: the first MAIN_LIMIT examples of every task; the other
# configurations: the first OTHERS_LIMIT.
if [[ -z "${SKIP_FP32:-}" ]]; then $FLEXQ --limit "${MAIN_LIMIT:-300}" > "$(log fp32)" 2>&1; fi
$FLEXQ --row "$DEFAULT" --limit "${MAIN_LIMIT:-300}" > "$(log flexq-default)" 2>&1
i=0
for row in "${OTHERS[@]}"; do
  i=$((i + 1))
  $FLEXQ --row "$row" --limit "${OTHERS_LIMIT:-100}" > "$(log "other-$i")" 2>&1
done
