"""Merge the stages of run.sh (one `duohead eval` folder per length) into one report: the tables of
benchmarks/RESULTS.md ("RULER-style tasks") in table.txt and one method x family heat map per length.

    .venv/bin/python benchmarks/eval-ruler/combine.py
"""

from __future__ import annotations

import json
from pathlib import Path

from duohead.commands.eval_report import format_table, summarize, write_heatmaps
from duohead.plots import have_matplotlib

HERE = Path(__file__).parent
STAGES = ("1k", "2k", "4k")


def main() -> None:
    reports = [json.loads((HERE / s / "results.json").read_text()) for s in STAGES if (HERE / s / "results.json").exists()]
    lengths = [n for r in reports for n in r["lengths"]]
    tasks = list(dict.fromkeys(t for r in reports for t in r["tasks"]))
    methods = []
    for first in reports[0]["methods"]:  # a stage still running has only its first methods
        rows = [row for r in reports for m in r["methods"] if m["name"] == first["name"] for row in m["results"]]
        summary = summarize(rows, tasks, lengths, [])
        methods.append({"name": first["name"], "sparsity": first["sparsity"], "summary": summary})
    report = {"lengths": lengths, "tasks": tasks, "depths": [], "methods": methods}
    complete = ", ".join(f"{s}: {'complete' if r['complete'] else 'partial'}" for s, r in zip(STAGES, reports))
    (HERE / "table.txt").write_text(f"stages: {complete}\n\n{format_table(report)}\n")
    if have_matplotlib():
        write_heatmaps(report, HERE)
    print((HERE / "table.txt").read_text())


if __name__ == "__main__":
    main()
