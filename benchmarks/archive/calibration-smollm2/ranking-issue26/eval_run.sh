#!/bin/bash
# issue 26: the sparsity grid on SmolLM2 (passkey + needle, 1K and 2K, depths 0.1/0.5/0.9, 3 samples per cell, seed 0:
# 36 prompts per method, the same prompts for every method)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D=/work/main/.venv/bin/duohead
GRID="--lengths 1024,2048 --depths 0.1,0.5,0.9 --samples 3 --seed 0 --threads 1"
# the ranking pattern (relaxed, seed 1, 80 steps at 50%, ranking recorded) at 25% and 75%, with full, random, StreamingLLM
$D eval --methods full,pattern,random,streaming --pattern /tmp/lead/cal/r50/pattern.json --sparsities 0.25,0.75 $GRID --out /tmp/lead/ev/ranked > /tmp/lead/ev/ranked.log 2>&1 &
# today's shipped pattern (50% only, no ranking; its 50% layout is the ranking pattern's) at 25/50/75%, and the
# direct 75% calibration (relaxed, seed 1, 80 steps at 75%) at 75%
( $D eval --methods pattern --pattern smollm2-135m-instruct --sparsities 0.25,0.5,0.75 $GRID --out /tmp/lead/ev/shipped > /tmp/lead/ev/shipped.log 2>&1
  $D eval --methods pattern --pattern /tmp/lead/cal/r75/pattern.json --sparsities 0.75 $GRID --out /tmp/lead/ev/direct75 > /tmp/lead/ev/direct75.log 2>&1 ) &
wait
echo done > /tmp/lead/ev/DONE
