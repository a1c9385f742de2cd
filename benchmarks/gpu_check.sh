#!/usr/bin/env bash
# One-call GPU check of duohead's kernels: a preflight table first (benchmarks/gpu_preflight.py: Python, pip,
# compilers, Python.h, nvcc, ninja, FlashInfer and its prebuilt modules, $HOME, GPU memory, driver; a missing
# prerequisite turns off the rows that need it, with the reason), then one FlashInfer warm-up in a subprocess (a
# crash there turns FlashInfer off, and every later row runs without it), correctness of every GPU path against
# the torch reference, then timings on Llama-3-8B-shaped attention (32 q heads, 8 KV heads, head_dim 128, bf16)
# at 32K and 128K context, 0/50/75% streaming heads: (a) a decode step of all 32 layers' attention with the cache
# writes, eager and CUDA-graph replay, (b) one layer's prefill attention, duohead vs FlashInfer full attention,
# (c) a whole-model decode step at 128K (2 random layers of 8B shape; --model-layers N) vs stock transformers'
# StaticCache, eager and CUDA-graph replay, (d) a decode step of all 32 layers' attention at 1M tokens, 50%
# streaming, when `duohead plan` says the card holds its KV (full attention at 1M needs 128 GiB of KV: not run).
# Prints a table last; full JSON in $OUT/gpu_check.json. It has not run on a GPU yet: give it the 540 s below
# and rerun with --contexts 32768 if it runs out.
#
# Once per checkout, on a machine with PyPI (the wheels travel with the tree; /.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
#     -d .whl flashinfer-python==0.6.13 apache-tvm-ffi==0.1.15.post2 \
#     nvidia-ml-py ninja requests urllib3 idna charset-normalizer certifi
# (`import flashinfer` needs pynvml and requests, its JIT the ninja binary; the GPU machine may lack them.)
# Then the FlashInfer module gpu_check runs, prebuilt so the GPU machine needs no compiler (~5 min on 2 busy cores,
# 2 MiB; a venv with flashinfer-python==0.6.13, apache-tvm-ffi==0.1.15.post2 and torch, nvcc 13.0 from pip):
#   FLASHINFER_CUDA_ARCH_LIST=9.0a CUDA_HOME=/usr/local/cuda-13.0 MAX_JOBS=2 python benchmarks/flashinfer_aot.py
# Then, from a session that has a device machine, one call of the `run` device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Without the device tool, on any CUDA machine: OUT=out bash benchmarks/gpu_check.sh
# CPU rehearsal of the same logic (tiny shapes, Triton interpreter, no FlashInfer; the warm-up subprocess crashes
# on purpose, to show the other rows survive it):
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh --dry-run
# Nothing here stops the script: a failed step is printed, recorded in the preflight table, and the rows that
# need it are reported as off. Every row is in $OUT/gpu_check.json as soon as it is measured.
# Extra arguments go to gpu_check.py, e.g. --contexts 32768 or --prefill-backend auto (FA3: longer compile).
set -uo pipefail  # no -e: a failed step turns rows off (preflight), it does not end the one run
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SITE=$HOME/site PIP_EXTRA=""
case " $* " in  # the rehearsal installs the GPU machine's cp312 wheels beside its results, not in $HOME
  *" --dry-run "*) SITE=$OUT/site PIP_EXTRA="--python-version 3.12 --only-binary=:all:" ;;
esac
if compgen -G ".whl/*.whl" > /dev/null; then
  # shellcheck disable=SC2086
  if log=$("$PYTHON" -m pip install -q --no-index --no-deps $PIP_EXTRA --target "$SITE" .whl/*.whl 2>&1); then
    GPU_CHECK_WHEELS="installed $(ls .whl/*.whl | wc -l) from .whl/ into $SITE"
  else
    GPU_CHECK_WHEELS="failed: $(echo "$log" | tail -n 1)"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH" PATH="$SITE/bin:$PATH"  # ninja for FlashInfer's JIT
else
  GPU_CHECK_WHEELS="none in .whl/ (FlashInfer only if already installed)"
fi
if [ -d .whl/aot ]; then  # prebuilt FlashInfer modules (benchmarks/flashinfer_aot.py) where FlashInfer looks first
  find='import importlib.util as u; s = u.find_spec("flashinfer"); print(s.submodule_search_locations[0] if s else "")'
  package=$("$PYTHON" -c "$find" 2> /dev/null)
  if [ -n "$package" ] && mkdir -p "$package/data/aot" && cp -r .whl/aot/. "$package/data/aot/"; then
    GPU_CHECK_WHEELS="$GPU_CHECK_WHEELS; prebuilt modules copied to $package/data/aot"
  else
    GPU_CHECK_WHEELS="$GPU_CHECK_WHEELS; prebuilt modules in .whl/aot not copied (failed: no flashinfer package?)"
  fi
fi
export GPU_CHECK_WHEELS FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
"$PYTHON" benchmarks/gpu_preflight.py --out "$OUT" "$@" ||
  echo "gpu_check: the preflight failed (exit $?); gpu_check.py collects it again" >&2
"$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
status=$?
[ "$status" -eq 0 ] ||
  echo "gpu_check: gpu_check.py exited $status; the rows measured so far are in $OUT/gpu_check.json" >&2
exit "$status"
