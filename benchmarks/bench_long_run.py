"""Long-run stability: stream >= 100K tokens through a tiny random Llama with duohead on CPU.

    nice python benchmarks/bench_long_run.py                 # 102,400 tokens, two layouts, a few minutes
    python benchmarks/bench_long_run.py --tokens 20480 --checkpoint 4096

Tokens go in as chunks (--chunk per forward) into one `DuoCache`; every --checkpoint tokens the run records
the cache's bytes (`DuoCache.memory()` and the bytes actually allocated by the streaming tensors), the RSS,
and the fastest (and median) of --probe-steps single-token decode steps: on a shared CPU the minimum is the
estimate least disturbed by other processes. Two layouts: `mixed` (one retrieval, one
streaming KV head per layer) and `streaming` (all KV heads streaming). Expected: streaming bytes flat,
retrieval bytes linear in T; decode step time flat for `streaming` and growing linearly for `mixed`, its slope
being the cost of reading the retrieval KV. The fit (least squares) is printed. Writes bench_long_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import duohead
from duohead.cache import cache_argument
from duohead.runner import current_rss_bytes

LAYOUTS = {"mixed": [[1.0, 0.0], [0.0, 1.0]], "streaming": [[0.0, 0.0], [0.0, 0.0]]}


def tiny_model(max_positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def streaming_allocated_bytes(cache: duohead.DuoCache) -> int:
    """Bytes of every tensor the streaming heads' caches hold (keys, values, positions), summed over layers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.streaming for t in layer.streaming.tensors())


@torch.no_grad()
def run(layout: str, args: argparse.Namespace) -> list[dict]:
    model = tiny_model(args.tokens + args.probe_steps * (args.tokens // args.checkpoint + 1) + 16)
    duohead.enable(model, duohead.HeadPattern(torch.tensor(LAYOUTS[layout]), sink=args.sink, window=args.window))
    cache = duohead.DuoCache.from_model(model)
    gen = torch.Generator().manual_seed(0)
    points, fed, start = [], 0, time.perf_counter()
    while fed < args.tokens:
        ids = torch.randint(0, 256, (1, args.chunk), generator=gen)
        model(input_ids=ids, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
        fed += args.chunk
        if fed % args.checkpoint == 0:
            steps = []
            for _ in range(args.probe_steps):
                t0 = time.perf_counter()
                model(input_ids=torch.randint(0, 256, (1, 1), generator=gen), **{cache_argument(model): cache}, use_cache=True)
                steps.append(time.perf_counter() - t0)
            memory = cache.memory()
            points.append(
                {
                    "tokens_held": cache.get_seq_length(),
                    "retrieval_bytes": memory["retrieval_bytes"],
                    "streaming_bytes": memory["streaming_bytes"],
                    "streaming_allocated_bytes": streaming_allocated_bytes(cache),
                    "reserved_bytes": memory["reserved_bytes"],
                    "rss_bytes": current_rss_bytes(),
                    "decode_step_seconds": min(steps),
                    "decode_step_median_seconds": statistics.median(steps),
                    "elapsed_seconds": time.perf_counter() - start,
                }
            )
            p = points[-1]
            print(
                f"{layout:<9} T={p['tokens_held']:>7}: retrieval {p['retrieval_bytes'] / 1e6:7.2f} MB, streaming "
                f"{p['streaming_bytes'] / 1e3:6.1f} KB, step min {p['decode_step_seconds'] * 1e3:6.2f} ms, "
                f"median {p['decode_step_median_seconds'] * 1e3:6.2f} ms",
                file=sys.stderr,
                flush=True,
            )
    return points


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, r_squared)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def summary(layout: str, points: list[dict]) -> str:
    first, last = points[0], points[-1]
    xs = [p["retrieval_bytes"] / 1e6 for p in points]
    ys = [p["decode_step_seconds"] * 1e3 for p in points]
    lines = [
        f"{layout}: {last['tokens_held']:,} tokens in {last['elapsed_seconds']:.0f} s",
        f"  streaming bytes: {first['streaming_bytes']:,} at T={first['tokens_held']:,}, {last['streaming_bytes']:,} at "
        f"T={last['tokens_held']:,} (allocated {first['streaming_allocated_bytes']:,} -> {last['streaming_allocated_bytes']:,})",
        "  retrieval bytes per token held: " + ", ".join(f"{p['retrieval_bytes'] / p['tokens_held']:.1f}" for p in (first, last)),
        f"  fastest decode step: {ys[0]:.2f} ms at T={first['tokens_held']:,}, {ys[-1]:.2f} ms at T={last['tokens_held']:,}",
    ]
    if max(xs) > 0:
        a, b, r2 = fit_line(xs, ys)
        lines.append(f"  fit: step_ms = {a:.3f} + {b:.4f} * retrieval_MB (R^2 {r2:.3f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=102_400)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--checkpoint", type=int, default=10_240)
    p.add_argument("--probe-steps", type=int, default=25)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steady timings on a shared CPU)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint % args.chunk or args.tokens % args.checkpoint:
        p.error("--checkpoint must be a multiple of --chunk, and --tokens a multiple of --checkpoint")
    load_before = os.getloadavg()
    results = {layout: run(layout, args) for layout in LAYOUTS}
    load = {"before": load_before, "after": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_long_run.json").write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "args": vars(args), "load_average_1_5_15_min": load, "layouts": results}, indent=1
        )
        + "\n"
    )
    print(f"load average (1/5/15 min) before {load['before']}, after {load['after']}")
    for layout, points in results.items():
        print(summary(layout, points))


if __name__ == "__main__":
    main()
