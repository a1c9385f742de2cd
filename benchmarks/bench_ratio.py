"""duohead vs full attention at every prompt length, interleaved in one process: prefill and decode time ratios.

    python benchmarks/bench_ratio.py --threads 1                         # 256 ... 8192 tokens, 3 rounds
    python benchmarks/bench_ratio.py --lengths 256,1024 --rounds 2 --out /tmp/ratio.json
    python benchmarks/bench_ratio.py --family gemma2 --lengths 512,2048 --out /tmp/gemma2.json

SmolLM2-135M-Instruct (fp32, CPU) loaded twice: stock transformers (sdpa, DynamicCache) and duohead with the
shipped pattern at 50% streaming KV heads. `--family F` instead builds a random model of family F (gemma2,
gemma3_text, gpt_oss) at SmolLM2's size (30 layers alternating local windows of `--local-window` tokens and global
ones, 9 query / 3 KV heads of 64, hidden 576), with transformers' default attention for it (eager for Gemma 2 and
GPT-OSS, whose SDPA path has no soft cap / sinks), and a 50% layout spread over its global layers.

Every round visits every length; at each length both models run back to back (the order alternates by round):
one-shot prefill of the same random prompt (logits of the last token only), then greedy decode steps. Reported per
length: the median over rounds of the prefill time and of the median decode step, and their ratio full / duohead
(> 1: duohead is faster). Running both sides in one process, interleaved, keeps machine load from favouring either.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SPARSITY = 0.5


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _models(family: str | None, local_window: int):
    """(full attention model, duohead model at SPARSITY), and the pattern's name."""
    import duohead
    from duohead.loading import load_model
    from duohead.pattern import find_pattern

    if family is not None:
        return (*_random_models(family, local_window), f"a 50% layout spread over the global layers ({family})")
    full, _ = load_model()
    duo, _ = load_model()
    name = "smollm2-135m-instruct"
    duohead.enable(duo, duohead.HeadPattern.load(find_pattern(name)), sparsity=SPARSITY)
    return full, duo, name


FAMILY_CONFIGS = {  # transformers config class, and the fields beyond SmolLM2's shape (the families' own defaults)
    "gemma2": ("Gemma2Config", {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 64}),
    "gemma3_text": ("Gemma3TextConfig", {"query_pre_attn_scalar": 64}),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def _random_models(family: str, local_window: int):
    """Two copies of one seeded random model of `family` at SmolLM2's size; the second enabled at SPARSITY."""
    import copy

    import transformers
    from transformers import AutoModelForCausalLM

    import duohead
    from duohead.architecture import num_kv_heads, pattern_layers
    from duohead.planner import spread_layout

    class_name, fields = FAMILY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=16384, sliding_window=local_window,
        layer_types=["sliding_attention", "full_attention"] * 15, **fields,
    )  # fmt: skip
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    duo = copy.deepcopy(full)
    layout = spread_layout(len(pattern_layers(config)), num_kv_heads(config), 1, SPARSITY)
    duohead.enable(duo, duohead.HeadPattern(layout.float(), sink=64, window=256))
    return full, duo


@torch.no_grad()
def measure(model, ids: torch.Tensor, decode_steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode-step seconds) of one prompt ids [1, T] on a fresh cache sized for it."""
    from duohead.runner import _forward, new_cache

    cache = new_cache(model, ids.shape[1] + decode_steps)
    start = time.perf_counter()
    logits = _forward(model, ids, cache, logits_to_keep=1).logits[:, -1]
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(decode_steps):
        token = logits.argmax(dim=-1, keepdim=True)
        start = time.perf_counter()
        logits = _forward(model, token, cache).logits[:, -1]
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "bench_ratio.json"))
    p.add_argument("--family", choices=sorted(FAMILY_CONFIGS), help="a random model of this family instead of SmolLM2")
    p.add_argument("--local-window", type=int, default=1024, help="--family: the local layers' sliding window (tokens)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    full, duo, pattern = _models(args.family, args.local_window)
    vocab = full.config.vocab_size
    prompts = {n: torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(args.seed + n)) for n in lengths}
    measure(full, prompts[lengths[0]], 2), measure(duo, prompts[lengths[0]], 2)  # warm-up: first calls allocate

    load_before = os.getloadavg()
    samples = {(m, n): [] for m in ("full", "duohead") for n in lengths}
    for r in range(args.rounds):
        for n in lengths:
            order = [("full", full), ("duohead", duo)] if r % 2 == 0 else [("duohead", duo), ("full", full)]
            for method, model in order:
                samples[method, n].append(measure(model, prompts[n], args.decode_steps))
            print(
                f"round {r + 1} {n:>5}: "
                + ", ".join(
                    f"{m} prefill {samples[m, n][-1][0]:.3f} s step {samples[m, n][-1][1] * 1e3:.1f} ms"
                    for m in ("full", "duohead")
                ),
                file=sys.stderr,
                flush=True,
            )

    rows = []
    for n in lengths:
        med = {m: [statistics.median(s[i] for s in samples[m, n]) for i in (0, 1)] for m in ("full", "duohead")}
        rows.append(
            {
                "tokens": n,
                "full_prefill_s": med["full"][0],
                "duohead_prefill_s": med["duohead"][0],
                "prefill_ratio": med["full"][0] / med["duohead"][0],
                "full_decode_step_s": med["full"][1],
                "duohead_decode_step_s": med["duohead"][1],
                "decode_ratio": med["full"][1] / med["duohead"][1],
                "samples": {m: samples[m, n] for m in ("full", "duohead")},
            }
        )
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
    }
    report = {
        "machine": machine,
        "command": " ".join(sys.argv),
        "pattern": pattern,
        "sparsity": SPARSITY,
        "rounds": args.rounds,
        "decode_steps": args.decode_steps,
        "rows": rows,
    }
    from duohead.files import atomic_write_text

    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(
        "| tokens | full prefill (s) | duohead prefill (s) | prefill ratio | full step (ms) | duohead step (ms) | decode ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['full_prefill_s']:.3f} | {r['duohead_prefill_s']:.3f} | {r['prefill_ratio']:.2f} | "
            f"{r['full_decode_step_s'] * 1e3:.1f} | {r['duohead_decode_step_s'] * 1e3:.1f} | {r['decode_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
