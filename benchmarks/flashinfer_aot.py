"""Build the FlashInfer modules gpu_check needs ahead of time, on a machine without a GPU, so the GPU machine loads
them instead of compiling (JIT stays the fallback for anything else).

gpu_check runs FlashInfer on Llama-3-8B shapes in bf16 (head dim 128, 4 query heads per KV head): its prefill
wrapper (backend fa2) and its tensor-core decode wrapper share one module, the fa2 batch-prefill module for
bf16 / head dim 128. `--dtypes` and `--head-dims` add others (each ~200 CPU-seconds, ~2 MB). Needs flashinfer
(the version the GPU machine installs), apache-tvm-ffi, torch (CPU is enough), nvcc (pip's nvidia-cuda-nvcc 13.0
and the CUDA runtime headers; $CUDA_HOME), gcc and ninja. FlashInfer links with -lcuda, and pip's CUDA has no
libcuda stub: the module calls no driver-API function, so an empty libcuda.so (soname libcuda.so.1, the driver's)
is put on LIBRARY_PATH for the link when $CUDA_HOME/lib64/stubs has none. FlashInfer looks for a prebuilt module
at flashinfer/data/aot/<name>/<name>.so; gpu_check.sh copies OUT/<name>/ there after installing the wheel.

    FLASHINFER_CUDA_ARCH_LIST=9.0a CUDA_HOME=/usr/local/cuda-13.0 MAX_JOBS=2 \\
        python benchmarks/flashinfer_aot.py --out .whl/aot
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def libcuda_stub() -> None:
    """An empty libcuda.so on LIBRARY_PATH when the CUDA install has no stub (FlashInfer's link asks for -lcuda)."""
    stubs = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "lib64" / "stubs"
    if (stubs / "libcuda.so").exists():
        return
    folder = Path(tempfile.mkdtemp(prefix="libcuda-stub-"))
    subprocess.run(
        ["gcc", "-shared", "-x", "c", "/dev/null", "-o", str(folder / "libcuda.so"), "-Wl,-soname,libcuda.so.1"], check=True
    )
    os.environ["LIBRARY_PATH"] = (
        f"{folder}{os.pathsep}{os.environ['LIBRARY_PATH']}" if "LIBRARY_PATH" in os.environ else str(folder)
    )


def build(out: Path, dtypes: list[str], head_dims: list[int]) -> list[str]:
    """Build each (dtype, head dim) fa2 batch-prefill module and copy it to out/<name>/<name>.so; the names."""
    import flashinfer
    from flashinfer.jit.attention.modules import gen_batch_prefill_module

    names = []
    for dtype in dtypes:
        for head_dim in head_dims:
            dt = DTYPES[dtype]
            spec = gen_batch_prefill_module("fa2", dt, dt, dt, torch.int32, head_dim, head_dim, 0, False, False, False)
            t0 = time.perf_counter()
            spec.build(verbose=False)
            target = out / spec.name / f"{spec.name}.so"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(spec.jit_library_path, target)
            size = target.stat().st_size / 2**20
            print(f"{spec.name}: {time.perf_counter() - t0:.0f} s, {size:.1f} MiB (flashinfer {flashinfer.__version__})")
            names.append(spec.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".whl/aot"), help="folder of <name>/<name>.so")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[128])
    args = parser.parse_args()
    if "FLASHINFER_CUDA_ARCH_LIST" not in os.environ:
        raise SystemExit("flashinfer_aot: set FLASHINFER_CUDA_ARCH_LIST (9.0a for H100/H200)")
    libcuda_stub()
    build(args.out, args.dtypes, args.head_dims)


if __name__ == "__main__":
    main()
