#!/usr/bin/env bash
# Issue 29's publish runs on a 2-core CPU, from a clean clone (after `make install`): is transfer worth it, and with
# how many cases? The tables and figures of docs/comparison.md ("Is transfer worth it") come from these folders.
#   bash scripts/publish_shots.sh              # ~2 h on 2 cores; rerun to continue (finished runs are kept)
#   SEEDS="0 1 2" bash scripts/publish_shots.sh # the seeds the issue asks for (~3 x the shots sweep's time)
# The grid is cut to fit (docs/comparison.md says how): k = 1 5 20, seed 0, scratch / full / decoder-only /
# tCURLoRA; full and tCURLoRA at the adapter lrs the tuned publish runs chose on validation at k = 5 (docs/
# demo_necrosis_publish.csv, docs/demo_flair_publish.csv), scratch at its own, tuned here the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0}
declare -A TCURLORA=([demo]=1e-2 [demo_flair]=1e-1)
for e in demo demo_flair; do
  # 1. scratch's lr on validation at k = 5, seed 0 (never test)
  $PY scripts/compare.py --experiment $e --methods scratch --shots 5 --adapter-lrs 3e-4 1e-3 3e-3 --seeds 0 \
    --tune-seeds 0 --jobs 2 --out outputs/shots/${e}_scratch_lr
  scratch=$($PY -c "import csv, sys; print(next(r['adapter_lr'] for r in csv.DictReader(open(sys.argv[1]))
    if r['method'] == 'scratch' and r['selected'] == 'True'))" outputs/shots/${e}_scratch_lr/comparison.csv)
  # 2. the shots sweep: every method on the first k of one fixed training list, the same val / test cases
  $PY scripts/compare.py --experiment $e --methods scratch full decoder_only tcurlora --seeds $SEEDS --shots 1 5 20 \
    --method-lrs scratch=$scratch full=1e-3 tcurlora=${TCURLORA[$e]} --jobs 2 --out outputs/shots/$e
  # 3. short of data or of steps? 4x the steps (96 epochs x 8 = 768): scratch at every k, full at k = 20, seed 0
  $PY scripts/compare.py --experiment $e --methods scratch --seeds 0 --shots 1 5 20 --method-lrs scratch=$scratch \
    --jobs 2 --out outputs/shots/${e}_768 -- trainer.max_epochs=96
  $PY scripts/compare.py --experiment $e --methods full --seeds 0 --shots 20 --method-lrs full=1e-3 \
    --jobs 2 --out outputs/shots/${e}_768 -- trainer.max_epochs=96
done
