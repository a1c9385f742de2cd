#!/usr/bin/env bash
# One-call GPU check of duohead's kernels: nvcc's version and one FlashInfer warm-up first (if FlashInfer fails,
# once, every later row runs without it), correctness of every GPU path against the torch reference, then
# timings on Llama-3-8B-shaped attention (32 q heads, 8 KV heads, head_dim 128, bf16) at 32K and 128K context,
# 0/50/75% streaming heads: (a) a decode step of all 32 layers' attention with the cache writes, eager and
# CUDA-graph replay, (b) one layer's prefill attention, duohead vs FlashInfer full attention, (c) a whole-model
# decode step at 128K (2 random layers of 8B shape; --model-layers N) vs stock transformers' StaticCache, eager
# and CUDA-graph replay. Prints a table last; full JSON in $OUT/gpu_check.json. It has not run on a GPU yet:
# give it the 540 s below and rerun with --contexts 32768 if it runs out.
#
# Once per checkout, on a machine with PyPI (the wheels travel with the tree; /.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
#     -d .whl flashinfer-python==0.6.13 apache-tvm-ffi==0.1.15.post2 \
#     nvidia-ml-py ninja requests urllib3 idna charset-normalizer certifi
# (`import flashinfer` needs pynvml and requests, its JIT the ninja binary; the GPU machine may lack them.)
# Then, from a session that has a device machine, one call of the `run` device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Without the device tool, on any CUDA machine: OUT=out bash benchmarks/gpu_check.sh
# CPU rehearsal of the same logic (tiny shapes, Triton interpreter, no FlashInfer):
#   python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
# Extra arguments go to gpu_check.py, e.g. --contexts 32768 or --prefill-backend auto (FA3: longer compile).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
if command -v nvcc > /dev/null; then  # FlashInfer's JIT needs it; gpu_check.py reports it again in its table
  echo "gpu_check: $(command -v nvcc): $(nvcc --version | grep -i release || echo '?')"
else
  echo "gpu_check: nvcc not found on PATH (FlashInfer can only use kernels it ships prebuilt)" >&2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$HOME/site" .whl/*.whl
  export PYTHONPATH="$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$HOME/site/bin:$PATH"  # ninja for FlashInfer's JIT
else
  echo "gpu_check: no wheels in .whl/; FlashInfer only if already installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
