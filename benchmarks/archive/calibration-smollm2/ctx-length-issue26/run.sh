#!/bin/bash
# issue 26, item 4 (and item 3's 4K-8K rows at 25/75%): calibration length vs deployment length on SmolLM2.
# Run one line at a time, in this order (2-core CPU shared with another job; one thread per process); 2026-12-03.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D="nice -n 5 duohead"
CAL="--lr 0.1 --target-sparsity 0.5 --sink 64 --window 256 --num-passkeys 4 --passkey-words 16 --seed 1 --checkpoint-every 5 --threads 1"
# calibrations: the shipped recipe (relaxed rule, ranking recorded, seed 1) at longer samples
$D calibrate --out cal/c2k --steps 40 --ctx-min 1536 --ctx-max 2048 $CAL    # not converged; pattern kept as c2k-40steps/
$D calibrate --out cal/c4k --steps 40 --ctx-min 3072 --ctx-max 4096 $CAL    # not converged; not continued (time)
$D calibrate --out cal/c2k --resume --steps 60 --threads 1                  # still not converged: c2k-60steps/
# the grid: passkey and needle at 4,096 and 8,184 tokens (8,184 + 8 new tokens = SmolLM2's 8,192 positions),
# depths 0.1/0.5/0.9, one sample per cell, seed 0: the same 12 prompts for every method (each prompt's seed derives
# from --seed and its cell, so these are sample 0 of the older 3-sample grids' 4K/8K cells)
G="--lengths 4096,8184 --depths 0.1,0.5,0.9 --samples 1 --seed 0 --threads 1"
$D eval --methods full,pattern --pattern smollm2-135m-instruct --sparsities 0.5,0.75 $G --out eval-shipped
$D eval --methods pattern --pattern cal/c2k/pattern.json --sparsities 0.5,0.75 $G --out eval-c2k
$D eval --methods pattern --pattern cal/c4k/pattern.json --sparsities 0.5,0.75 $G --out eval-c4k
$D eval --methods random --sparsities 0.5,0.75 $G --out eval-random
$D eval --methods pattern,random --pattern smollm2-135m-instruct --sparsities 0.25 $G --out eval-s25
$D eval --methods streaming $G --out eval-streaming
# layouts and scores
python overlap.py shipped=smollm2-135m-instruct c2k60=c2k-60steps/pattern.json c2k40=c2k-40steps/pattern.json \
    c4k40=c4k-40steps/pattern.json direct75=../ranking-issue26/direct75-80steps/pattern.json > overlap.txt
python score.py eval-shipped eval-c2k eval-c4k eval-random eval-s25 eval-streaming > scores.txt
# afterwards, the one prompt that separated the lengths at 50% (passkey, 8,184 tokens, depth 0.9), samples 0-2:
$D eval --methods pattern --pattern cal/c4k/pattern.json --sparsities 0.5 --tasks passkey --lengths 8184 --depths 0.9 --samples 3 --seed 0 --threads 1 --out eval-pk8k-c4k
$D eval --methods pattern --pattern cal/c2k/pattern.json --sparsities 0.5 --tasks passkey --lengths 8184 --depths 0.9 --samples 3 --seed 0 --threads 1 --out eval-pk8k-c2k
$D eval --methods full,pattern --pattern smollm2-135m-instruct --sparsities 0.5 --tasks passkey --lengths 8184 --depths 0.9 --samples 3 --seed 0 --threads 1 --out eval-pk8k-shipped
python prompts.py eval-pk8k-shipped eval-pk8k-c2k eval-pk8k-c4k > prompts-pk8k.txt
