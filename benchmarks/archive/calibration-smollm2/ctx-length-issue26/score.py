"""Scores of the issue-26 calibration-length grid: per method, prompts answered with a Wilson 95% interval and the
per-cell counts (task @ length). Usage: python score.py eval-shipped eval-c2k ... (folders holding results.json);
--sample K keeps only sample index K (to compare with older grids of more samples)."""

import json
import math
import sys


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


args = sys.argv[1:]
sample = None
if "--sample" in args:
    i = args.index("--sample")
    sample = int(args[i + 1])
    del args[i : i + 2]
for folder in args:
    for method in json.load(open(f"{folder}/results.json"))["methods"]:
        rows = [r for r in method["results"] if r["length"] >= 4096 and (sample is None or r["sample"] == sample)]
        score = sum(r["score"] for r in rows)
        cells: dict[str, list[float]] = {}
        for r in rows:
            cell = cells.setdefault(f"{r['task']}@{r['length']}", [0.0, 0])
            cell[0] += r["score"]
            cell[1] += 1
        low, high = wilson(score, len(rows))
        counts = "  ".join(f"{name}={hit:g}/{n}" for name, (hit, n) in sorted(cells.items()))
        print(
            f"{folder.rstrip('/').split('/')[-1]:22s} {method['name']:14s} {score:4.1f}/{len(rows)}  "
            f"[{low:.2f}, {high:.2f}]  {counts}"
        )
