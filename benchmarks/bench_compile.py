"""Decode tokens/s, eager vs compiled, full attention vs duohead, in one process (SmolLM2-135M-Instruct, CPU).

    python benchmarks/bench_compile.py --threads 1                      # contexts 2048,4096,8192
    python benchmarks/bench_compile.py --contexts 1024 --decode-steps 8 --out /tmp/compile.json

Four ways to decode the same random prompt at each context, through `duohead.runner.run_prompt` (what
`duohead generate [--compile]` runs): full attention eager (stock transformers, DynamicCache), full attention
compiled (transformers' StaticCache, `torch.compile(model.forward, fullgraph=True)`), duohead eager (dynamic
DuoCache) and duohead compiled (static DuoCache, same compile). duohead uses the shipped SmolLM2 pattern at 50%
streaming KV heads. The prefill is eager everywhere; the first compiled step (the compilation) is reported apart
and left out of tokens/s. Each context runs the four ways back to back in the order above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

SPARSITY = 0.5
WAYS = (("full", False), ("full", True), ("duohead", False), ("duohead", True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "bench_compile.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import duohead
    from duohead.files import atomic_write_text
    from duohead.loading import load_model
    from duohead.pattern import find_pattern
    from duohead.runner import run_prompt

    full, _ = load_model()
    duo, _ = load_model()
    duohead.enable(duo, duohead.HeadPattern.load(find_pattern("smollm2-135m-instruct")), sparsity=SPARSITY)
    models = {"full": full, "duohead": duo}
    load_before = os.getloadavg()
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(
            100, full.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(args.seed + context)
        )
        tokens = {}
        for method, compiled in WAYS:
            torch._dynamo.reset()
            result = run_prompt(models[method], ids, args.decode_steps + 2, compile=compiled)
            steps = result.decode_step_seconds[1:] if compiled else result.decode_step_seconds
            tokens[method, compiled] = result.tokens
            rows.append(
                {
                    "context": context,
                    "method": method,
                    "compiled": compiled,
                    "prefill_seconds": result.prefill_seconds,
                    "first_step_seconds": result.decode_step_seconds[0],
                    "median_step_seconds": statistics.median(steps),
                    "decode_tokens_per_second": result.decode_tokens_per_second,
                    "step_seconds": result.decode_step_seconds,
                }
            )
            r = rows[-1]
            print(
                f"{context:>5} {method:<8} {'compiled' if compiled else 'eager':<8} first step {r['first_step_seconds']:.2f} s, "
                f"median step {r['median_step_seconds'] * 1e3:.1f} ms, {r['decode_tokens_per_second']:.2f} tok/s",
                file=sys.stderr,
                flush=True,
            )
        for method in models:
            same = tokens[method, True] == tokens[method, False]
            for r in rows[-4:]:
                if r["method"] == method:
                    r["compiled_tokens_equal_eager"] = same

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
    }
    atomic_write_text(
        args.out,
        json.dumps({"machine": machine, "command": " ".join(sys.argv), "sparsity": SPARSITY, "rows": rows}, indent=1) + "\n",
    )
    by = {(r["context"], r["method"], r["compiled"]): r for r in rows}
    print(
        "| context | full eager tok/s | full compiled tok/s | duohead eager tok/s | duohead compiled tok/s | "
        "compiled / eager (full, duohead) | duohead / full (eager, compiled) | compiled tokens = eager |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for context in sorted({r["context"] for r in rows}):
        t = {(m, c): by[context, m, c]["decode_tokens_per_second"] for m, c in WAYS}
        same = all(by[context, m, True]["compiled_tokens_equal_eager"] for m in models)
        print(
            f"| {context} | {t['full', False]:.2f} | {t['full', True]:.2f} "
            f"| {t['duohead', False]:.2f} | {t['duohead', True]:.2f} | "
            f"{t['full', True] / t['full', False]:.2f}, {t['duohead', True] / t['duohead', False]:.2f} | "
            f"{t['duohead', False] / t['full', False]:.2f}, {t['duohead', True] / t['full', True]:.2f} "
            f"| {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
