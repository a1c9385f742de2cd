"""SmolLM2-135M-Instruct on CPU: KV bytes, peak memory, prefill time and decode step time vs context length,
for full attention (stock transformers: sdpa, DynamicCache) and duohead at 50% / 75% streaming KV heads.

    nice python benchmarks/bench_cpu.py                      # contexts 1024,2048,4096,8000
    python benchmarks/bench_cpu.py --contexts 1024 --decode-steps 4 --out /tmp/bench

Each (method, context) runs in a fresh subprocess so its peak RSS is its own. Per run: random prompt tokens
(seeded), one-shot prefill (logits of the last token only), then greedy decode steps; the reported step time is
the median. Ratios are against full attention measured in the same invocation, and the ideal KV ratio
1 / (r + (1 - r)(S + W) / T) (r = retrieval fraction, T = tokens held) is printed beside the measured one.
The largest context a KV budget allows is computed from the measured bytes per token.
Writes bench_cpu.json and bench_cpu.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

METHODS = {"full": None, "duohead@0.5": 0.5, "duohead@0.75": 0.75}
SHIPPED = "smollm2-135m-instruct"


def _pattern():
    """The shipped calibrated pattern (package data; no made-up fallback)."""
    import duohead

    return duohead.HeadPattern.load(SHIPPED), SHIPPED


def measure(method: str, context: int, decode_steps: int, seed: int) -> dict:
    """One run in this process: prefill `context` random tokens, then `decode_steps` greedy steps."""
    import duohead
    from duohead.loading import load_model
    from duohead.runner import current_rss_bytes, run_prompt

    torch.manual_seed(seed)
    model, _ = load_model()
    pattern_source = None
    if METHODS[method] is not None:
        pattern, pattern_source = _pattern()
        duohead.enable(model, pattern, sparsity=METHODS[method])
    ids = torch.randint(100, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    rss_before = current_rss_bytes()
    result = run_prompt(model, ids, decode_steps + 1)
    row = {
        "method": method,
        "context": context,
        "tokens_held": context + decode_steps,
        "pattern": pattern_source,
        "prefill_seconds": result.prefill_seconds,
        "decode_step_seconds": statistics.median(result.decode_step_seconds),
        "kv": result.memory,
        "peak_rss_bytes": result.peak_memory_bytes,
        "rss_before_bytes": rss_before,
    }
    if METHODS[method] is not None:
        layouts = duohead.architecture.layer_layouts(model)
        heads = sum(len(lay.kv_order) for lay in layouts)
        row.update(
            retrieval_fraction=sum(lay.num_retrieval_heads for lay in layouts) / heads,
            sink=layouts[0].sink,
            window=layouts[0].window,
        )
    return row


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ideal_ratio(r: float, sink: int, window: int, tokens: int) -> float:
    return 1.0 / (r + (1.0 - r) * (sink + window) / tokens)


def max_context(budget: int, per_token: float, constant: float) -> int:
    """Tokens whose KV fits in `budget` bytes at `per_token` bytes each plus `constant` bytes."""
    return max(0, int((budget - constant) // per_token))


def _run_child(method: str, context: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        str(context),
        "--decode-steps",
        str(args.decode_steps),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:  # glibc: serve blocks >= N bytes by mmap, returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} @ {context} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], budgets: list[float]) -> str:
    full = {r["context"]: r for r in rows if r["method"] == "full"}
    lines = [
        "| method | context | KV held (MB) | KV ratio measured | KV ratio ideal | KV reserved (MB) | peak RSS (MB) | "
        "prefill (s) | prefill ratio | decode step (ms) | decode speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = full[r["context"]]
        kv = r["kv"]["total_bytes"]
        ideal = (
            "1.00"
            if r["method"] == "full"
            else f"{ideal_ratio(r['retrieval_fraction'], r['sink'], r['window'], r['tokens_held']):.2f}"
        )
        lines.append(
            f"| {r['method']} | {r['context']} | {kv / 1e6:.1f} | {base['kv']['total_bytes'] / kv:.2f} | {ideal} | "
            f"{r['kv']['reserved_bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 1e6:.0f} | {r['prefill_seconds']:.2f} | "
            f"{base['prefill_seconds'] / r['prefill_seconds']:.2f} | {r['decode_step_seconds'] * 1e3:.1f} | "
            f"{base['decode_step_seconds'] / r['decode_step_seconds']:.2f} |"
        )
    largest = max(full)
    lines += [
        "",
        "| method | KV bytes per token | constant KV bytes | "
        + " | ".join(f"max context in {b:g} GiB KV" for b in budgets)
        + " |",
        "|---|---|---|" + "---|" * len(budgets),
    ]
    for method in METHODS:
        r = next(x for x in rows if x["method"] == method and x["context"] == largest)
        per_token = r["kv"]["retrieval_bytes"] / r["tokens_held"]
        constant = r["kv"]["streaming_bytes"]
        fits = " | ".join(f"{max_context(int(b * 2**30), per_token, constant):,}" for b in budgets)
        lines.append(f"| {method} | {per_token:,.0f} | {constant:,} | {fits} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("KV cache held (MB)", lambda r: r["kv"]["total_bytes"] / 1e6),
        ("peak RSS (MB)", lambda r: r["peak_rss_bytes"] / 1e6),
        ("prefill (s)", lambda r: r["prefill_seconds"]),
        ("decode step (ms)", lambda r: r["decode_step_seconds"] * 1e3),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), layout="constrained")
    for ax, (label, value) in zip(axes, panels):
        for k, method in enumerate(METHODS):
            mine = [r for r in rows if r["method"] == method]
            contexts = [r["context"] for r in mine]
            ax.plot(contexts, [value(r) for r in mine], marker="o", label=method, color=f"C{k}")
            if ax is axes[0] and method != "full":
                reserved = [r["kv"]["reserved_bytes"] / 1e6 for r in mine]
                ax.plot(contexts, reserved, linestyle="--", color=f"C{k}", label=f"{method} reserved")
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct, fp32, CPU: full attention vs duohead")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,2048,4096,8000")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--budgets-gib", default="1,8", help="KV-cache budgets for the largest-context table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the runs (peak RSS without allocator retention)",
    )
    p.add_argument("--child", nargs=2, metavar=("METHOD", "CONTEXT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.decode_steps, args.seed)))
        return

    load_before = os.getloadavg()
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for method in METHODS:
            rows.append(_run_child(method, context, args))
            r = rows[-1]
            print(
                f"{method:<13} {context:>6}: prefill {r['prefill_seconds']:.2f} s, step {r['decode_step_seconds'] * 1e3:.1f} ms, "
                f"KV {r['kv']['total_bytes'] / 1e6:.1f} MB, peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.json").write_text(
        json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n"
    )
    table = _table(rows, [float(b) for b in args.budgets_gib.split(",")])
    print(table)
    try:
        _plot(rows, out / "bench_cpu.png")
    except ImportError:
        print("matplotlib is not installed; no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
