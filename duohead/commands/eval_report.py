"""What `duohead eval` reports: per-method summaries with 95% intervals, the tables a person reads, the heat maps.

Works on the rows of `results.json` (one per prompt: task, length, depth, score, kv_bytes, ...); imports neither
torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path

from duohead import prompts, ruler


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def wilson(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a mean score over n prompts, as (low, high). Scores with partial
    credit (RULER's fraction of answers found) are treated as n trials at rate `mean`, an approximation."""
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((mean * (1 - mean) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _stats(scores: list[float]) -> dict:
    """Mean, count and 95% Wilson interval of scores (mean None when there are none)."""
    mean = _mean(scores)
    return {"mean": mean, "n": len(scores), "ci95": list(wilson(mean, len(scores))) if scores else None}


def summarize(rows: list[dict], tasks: list[str], lengths: list[int], depths: list[float]) -> dict:
    """Per task and per family (`ruler.family`): mean, count and 95% interval overall and at each length; per
    passkey/needle task the grid [depth][length] of mean scores (None where nothing ran); `kv_bytes`: the most KV
    bytes a prompt of the longest length that ran held (None before any ran)."""
    per_task = {}
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        per_task[task] = _stats([r["score"] for r in mine])
        per_task[task]["by_length"] = {str(n): _mean([r["score"] for r in mine if r["length"] == n]) for n in lengths}
        if task in prompts.SAMPLERS:
            per_task[task]["grid"] = [
                [_mean([r["score"] for r in mine if r["length"] == n and r["depth"] == d]) for n in lengths] for d in depths
            ]
    families = {}
    for name in dict.fromkeys(ruler.family(t) for t in tasks):
        mine = [r for r in rows if ruler.family(r["task"]) == name]
        families[name] = _stats([r["score"] for r in mine])
        families[name]["by_length"] = {str(n): _stats([r["score"] for r in mine if r["length"] == n]) for n in lengths}
    longest = max((r["length"] for r in rows), default=None)
    return {
        **_stats([r["score"] for r in rows]),
        "by_length": {str(n): _stats([r["score"] for r in rows if r["length"] == n]) for n in lengths},
        "kv_bytes": max((r.get("kv_bytes", 0) for r in rows if r["length"] == longest), default=None),
        "kv_bytes_length": longest,
        "tasks": per_task,
        "families": families,
    }


def _score(stats: dict) -> str:
    return "-" if stats["mean"] is None else f"{stats['mean']:.2f}"


def _interval(stats: dict) -> str:
    return "" if stats["ci95"] is None else f"[{stats['ci95'][0]:.2f}, {stats['ci95'][1]:.2f}]"


def format_table(report: dict) -> str:
    """One block per task family (methods down, lengths across, then the family's mean and 95% interval), then the
    overall block: mean per length, mean with its interval and the KV bytes held at the longest length."""
    lengths = report["lengths"]
    methods = report["methods"]
    width = max(14, *(len(m["name"]) for m in methods))
    lines = []
    for family in methods[0]["summary"]["families"] if methods else []:
        head = f"{family:<{width}} " + " ".join(f"{n:>7}" for n in lengths) + f" {'mean':>6} {'95% CI':>13}"
        lines += [head, "-" * len(head)]
        for m in methods:
            stats = m["summary"]["families"][family]
            cells = " ".join(f"{_score(stats['by_length'][str(n)]):>7}" for n in lengths)
            lines.append(f"{m['name']:<{width}} {cells} {_score(stats):>6} {_interval(stats):>13}")
        lines.append("")
    head = (f"{'overall':<{width}} {'sparsity':>8} " + " ".join(f"{n:>7}" for n in lengths)
            + f" {'mean':>6} {'95% CI':>13} {'KV MB':>8}")  # fmt: skip
    lines += [head, "-" * len(head)]
    for m in methods:
        summary = m["summary"]
        cells = " ".join(f"{_score(summary['by_length'][str(n)]):>7}" for n in lengths)
        kv = "-" if summary["kv_bytes"] is None else f"{summary['kv_bytes'] / 2**20:.2f}"
        lines.append(f"{m['name']:<{width}} {m['sparsity']:>8.2f} {cells} {_score(summary):>6} {_interval(summary):>13} {kv:>8}")
    longest = max((m["summary"]["kv_bytes_length"] or 0 for m in methods), default=0)
    lines.append(f"(KV MB: the KV cache held after a {longest}-token prompt and its answer; 95% CI: Wilson, per prompt)")
    return "\n".join(lines)


def write_heatmaps(report: dict, out: Path) -> None:
    """One depth x length heat map per method for the passkey/needle tasks, and one method x family heat map per
    length (`heatmap_families.png`) when the run has other (RULER) tasks."""
    from duohead.plots import plot_needle_grid, plot_score_grids

    needles = [t for t in report["tasks"] if t in prompts.SAMPLERS]
    for m in report["methods"] if needles else []:
        grids = {t: m["summary"]["tasks"][t]["grid"] for t in needles}
        title = f"{m['name']} (sparsity {m['sparsity']:.2f})"
        plot_needle_grid(out / f"heatmap_{m['name'].replace('@', '_')}.png", title, report["lengths"], report["depths"], grids)
    if len(needles) < len(report["tasks"]):
        families = list(report["methods"][0]["summary"]["families"])
        grids = {
            f"{n} tokens": [
                [m["summary"]["families"][f]["by_length"][str(n)]["mean"] for f in families] for m in report["methods"]
            ]
            for n in report["lengths"]
        }
        names = [m["name"] for m in report["methods"]]
        plot_score_grids(out / "heatmap_families.png", "score by task family", families, names, grids)
