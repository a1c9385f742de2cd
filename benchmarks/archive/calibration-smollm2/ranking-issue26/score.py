"""Scores of the issue-26 sparsity grid: per method, prompts answered (of 36) with a Wilson 95% interval and the
per-cell counts. Usage: python score.py eval-shipped eval-ranked eval-direct75 (folders holding results.json)."""

import json
import math
import sys


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


for folder in sys.argv[1:]:
    for method in json.load(open(f"{folder}/results.json"))["methods"]:
        rows = method["results"]
        score = sum(r["score"] for r in rows)
        cells: dict[str, list[float]] = {}
        for r in rows:
            cell = cells.setdefault(f"{r['task']}@{r['length']}", [0.0, 0])
            cell[0] += r["score"]
            cell[1] += 1
        low, high = wilson(score, len(rows))
        counts = "  ".join(f"{name}={hit:g}/{n}" for name, (hit, n) in sorted(cells.items()))
        print(f"{folder:14s} {method['name']:16s} {score:5.1f}/{len(rows)}  CI [{low:.2f}, {high:.2f}]  {counts}")
