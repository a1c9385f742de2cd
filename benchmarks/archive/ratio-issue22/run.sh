#!/bin/bash
# before (0cb2d52, start of session) and after (this session's restructuring) alternately; each run interleaves
# full attention and duohead itself and reports their ratio, so machine load cancels within a run.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
for i in 1 2; do
  for side in before after; do
    (cd /tmp/$side && PYTHONPATH=/tmp/$side $PY benchmarks/bench_ratio.py --lengths 512,2048,8192 --rounds 2 --threads 1 --out /tmp/lead/ratio/$side-$i.json > /tmp/lead/ratio/$side-$i.log 2>&1)
  done
done
echo done > /tmp/lead/ratio/DONE
