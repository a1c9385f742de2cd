"""Peak memory (and time) of one calibration step vs context length, on a tiny random Llama on the CPU.

    nice python benchmarks/bench_calibration_memory.py                       # 2K / 4K / 8K / 16K tokens
    python benchmarks/bench_calibration_memory.py --lengths 2048 4096 --dense-up-to 4096 --checkpointing on

One step = teacher forward + gated student forward and backward (`GatedModel`), gates at 0.5, the last 64
tokens supervised, gradient checkpointing on (the CUDA default) and off (the CPU default). Each measurement
runs in a fresh process: peak RSS (`ru_maxrss`) minus the RSS just before the step, so the model and the
interpreter are not counted. `dense` is the previous streaming branch (one SDPA call with a [T, T] Λ mask),
rebuilt here as the baseline, for lengths up to --dense-up-to. Writes bench_calibration_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from duohead.calibrate import gates as gates_module
from duohead.calibrate.gates import GatedModel
from duohead.kernels.reference import lambda_visible
from duohead.runner import current_rss_bytes

SUPERVISED = 64


def dense_streaming_attention(q, k, v, sink, window, scaling):
    """The previous streaming branch: one SDPA call under a [T, T] Λ mask (the baseline)."""
    pos = torch.arange(q.shape[2], device=q.device)
    visible = lambda_visible(pos[:, None], pos[None, :], sink, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=q.shape[1] > k.shape[1])


def tiny_model(max_positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max_positions,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def child(length: int, path: str, checkpointing: bool) -> dict:
    if path == "dense":
        gates_module.streaming_attention = dense_streaming_attention
    model = tiny_model(length)
    gated = GatedModel(model, sink=64, window=256, gradient_checkpointing=checkpointing)
    with torch.no_grad():
        gated.gates.fill_(0.5)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    supervised = torch.zeros(length, dtype=torch.bool)
    supervised[-SUPERVISED:] = True
    before = current_rss_bytes()
    start = time.perf_counter()
    target = gated.teacher_states(ids, supervised)
    gated.distill_backward(ids, supervised, target)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "tokens": length,
        "path": path,
        "checkpointing": checkpointing,
        "step_mib": round((peak - before) / 2**20, 1),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--dense-up-to", type=int, default=8192, help="longest length for the [T, T] baseline")
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--out", default=str(Path(__file__).with_name("bench_calibration_memory.json")))
    parser.add_argument("--child", nargs=3, metavar=("TOKENS", "PATH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.child[2] == "1")))
        return
    rows = []
    for length in args.lengths:
        for path in ("blocked", "dense"):
            if path == "dense" and length > args.dense_up_to:
                continue
            for checkpointing in [c == "on" for c in args.checkpointing]:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(length), path, str(int(checkpointing))],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    summary = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print("| tokens | path | checkpointing | step peak MiB | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['path']} | {'on' if r['checkpointing'] else 'off'} | {r['step_mib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
