#!/usr/bin/env bash
# The whole GPU benchmark of issue 19 in one command, sized for a lent GPU machine (under 8 minutes on an H200):
# the paper's setting (ViT-B UNETR, 128³ crop, batch 4), bf16 autocast then fp32, every method of the registry plus
# the floor and tCURLoRA's fused / factored paths, methods alternating over up to 4 rounds, then a profile of one
# step of floor / LoRA / tCURLoRA. Every JSON is rewritten after each method, so a cut-off run keeps what it measured.
#
#   OUT=results scripts/bench_gpu.sh                         # on the GPU machine (PYTHON=... for another interpreter)
#   DEVICE=cpu CROP=32 BATCH=1 STEPS=1 WARMUP=0 ROUNDS=1 PRECISIONS=fp32 METHODS="floor tcurlora-auto" scripts/bench_gpu.sh
#                                                            # the same script, tiny, on a CPU (tests/test_bench.py, -m slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
CROP=${CROP:-128}
BATCH=${BATCH:-4}
OUT=${OUT:-bench_results}
BUDGET_S=${BUDGET_S:-200}   # per precision: no round starts that would end after it (bench_adapters.py --budget-s)
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-4}
PRECISIONS=${PRECISIONS:-"bf16 fp32"}   # the profile runs at the first
METHODS=${METHODS:-"decoder_only floor lora dora pissa loha lokr curlora lora_pt tcurlora-auto tcurlora-fused tcurlora-factored full"}
PROFILE_METHODS=${PROFILE_METHODS:-"floor lora tcurlora-auto"}
mkdir -p "$OUT"
for precision in $PRECISIONS; do
    $PYTHON scripts/bench_adapters.py --device "$DEVICE" --crop "$CROP" --batch "$BATCH" --precision "$precision" \
        --steps "$STEPS" --warmup "$WARMUP" --rounds "$ROUNDS" --budget-s "$BUDGET_S" --methods $METHODS \
        --out "$OUT/bench_${DEVICE}_${CROP}_b${BATCH}_${precision}.json"
done
$PYTHON scripts/profile_tcurlora.py --device "$DEVICE" --crop "$CROP" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" \
    --precision "${PRECISIONS%% *}" --methods $PROFILE_METHODS --out "$OUT/profile_${DEVICE}_${CROP}_b${BATCH}.json"
