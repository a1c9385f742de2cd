#!/bin/sh
# The RULER-style grid of benchmarks/RESULTS.md (section "RULER-style tasks"): SmolLM2-135M-Instruct on a 2-core CPU,
# one thread. Each stage is its own run folder; rerunning this script continues an interrupted stage (--resume).
# Sized to about an hour on a shared 2-core CPU: 3 samples per task at 1K, 1 at 2K, 3 tasks at 4K; 8K left out.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
stage() {  # stage DIR ARGS...: start the grid, or continue it when DIR already holds results
    dir=benchmarks/eval-ruler/$1; shift
    if [ -f "$dir/results.json" ]; then .venv/bin/duohead eval --out "$dir" --resume
    else .venv/bin/duohead eval --pattern smollm2-135m-instruct --methods full,pattern,streaming,random \
        --sparsities 0.5,0.75 --seed 0 --out "$dir" "$@"; fi
}
stage 1k --suite ruler --lengths 1024 --samples 3
stage 2k --suite ruler --lengths 2048 --samples 1
stage 4k --tasks niah_single_2,niah_multikey_1,vt --lengths 4096 --samples 1
