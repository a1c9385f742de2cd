"""Registers, stack and spills of duohead's Triton kernels for sm_90a, without a GPU.

Compiles each kernel with Triton's real compiler (not the interpreter) to PTX, then runs the ptxas that ships with
Triton (`ptxas-blackwell`, the one that reads Triton 3.9's PTX 9.x) with -v. Shapes: Llama-3-8B heads (G = 4, D = 128).
    python benchmarks/kernel_registers.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from duohead.kernels import triton_decode as td  # noqa: E402
from duohead.kernels import triton_streaming as ts  # noqa: E402
from duohead.kernels.triton_common import compile_for_sm90  # noqa: E402


def ptxas_info(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """'R registers, S B stack, P B spill stores' of one kernel built for sm_90a."""
    compiled = compile_for_sm90(kernel, dtype, constexprs, num_warps, num_stages)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
        ).stderr
    numbers = [
        re.search(pattern, log) for pattern in (r"Used (\d+) registers", r"(\d+) bytes stack frame", r"(\d+) bytes spill stores")
    ]
    registers, stack, spills = (m.group(1) if m else "?" for m in numbers)
    return f"{registers} registers, {stack} B stack, {spills} B spill stores"


def main() -> None:
    group, head_dim = 4, 128
    for dtype in ("bf16", "fp32"):
        stages = 1 if dtype == "fp32" else 2
        for q_len in (1, 512):
            cfg = ts.launch_config(group, q_len, head_dim)
            constexprs = dict(
                GROUP=group,
                GROUP_PAD=cfg["GROUP_PAD"],
                BLOCK_Q=cfg["BLOCK_Q"],
                BLOCK_N=cfg["BLOCK_N"],
                HEAD_DIM=head_dim,
                BLOCK_D=cfg["BLOCK_D"],
                IEEE_DOT=dtype == "fp32",
            )
            info = ptxas_info(ts._streaming_attention_kernel, dtype, constexprs, cfg["num_warps"], stages)
            print(f"{dtype} attention kernel, Q = {q_len}: {info}")
        for splits in (1, 4):
            constexprs = dict(
                GROUP=group, ROWS=16, BLOCK_N=64, HEAD_DIM=head_dim, BLOCK_D=128, SPLITS=splits, IEEE_DOT=dtype == "fp32"
            )
            info = ptxas_info(td._streaming_decode_kernel, dtype, constexprs, 4, stages)
            print(f"{dtype} fused decode kernel, SPLITS = {splits}: {info}")
        constexprs = dict(GROUP=group, ROWS=16, HEAD_DIM=head_dim, BLOCK_D=128, SPLITS=4)
        print(f"{dtype} combine kernel: {ptxas_info(td._combine_splits_kernel, dtype, constexprs, 4, 2)}")


if __name__ == "__main__":
    main()
