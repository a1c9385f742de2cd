"""One layer's streaming-head prefill on the CPU: the Λ rule's ways against a causal pass of the same heads.

    python benchmarks/bench_lambda_prefill.py                      # SmolLM2's shapes, 512 ... 2048 tokens
    python benchmarks/bench_lambda_prefill.py --band 64 --lengths 1024

Random q [1, 6, T, 64], k, v [1, 2, T, 64] (SmolLM2's two streaming KV heads of a layer with six query heads),
sink 64, window 256, fp32. Ways: causal (what stock transformers computes for these heads), one dense [Q, T] Λ mask
(`reference.dense_lambda_attention`) and bands (`reference.unpadded_lambda_attention`); the bands are checked against
the dense mask first. Prints the median milliseconds over interleaved calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from duohead.kernels import reference
from duohead.kernels.backends import REGISTRY

SINK, WINDOW, SCALE = 64, 256, 0.125


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,768,1024,1344,2048")
    p.add_argument("--band", type=int, default=REGISTRY["torch"].lambda_band, help="rows per band")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ways = {
        "causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True),
        "dense": lambda q, k, v: reference.dense_lambda_attention(q, k, v, None, SINK, WINDOW, SCALE),
        "bands": lambda q, k, v: reference.unpadded_lambda_attention(q, k, v, SINK, WINDOW, SCALE, band=args.band),
    }
    print(f"| tokens | {' | '.join(ways)} |")
    print("|---" * (len(ways) + 1) + "|")
    for tokens in (int(n) for n in args.lengths.split(",")):
        gen = torch.Generator().manual_seed(tokens)
        q, k, v = (torch.randn(1, heads, tokens, 64, generator=gen) for heads in (6, 2, 2))
        dense = ways["dense"](q, k, v)
        assert torch.allclose(ways["bands"](q, k, v), dense, atol=1e-5)
        times = {name: [] for name in ways}
        for _ in range(args.calls):
            for name, way in ways.items():
                start = time.perf_counter()
                way(q, k, v)
                times[name].append(time.perf_counter() - start)
        print(f"| {tokens} | " + " | ".join(f"{statistics.median(t) * 1e3:.2f}" for t in times.values()) + " |")


if __name__ == "__main__":
    main()
