"""Has a calibration converged? Measures read off the gates G [L, Hkv] and the per-step layouts in the log.

A run counts as converged when, at its cut (the target sparsity, or 0.5 without one):
- the gates below 0.5 are exactly the heads that stream at the cut (the target is reached by the gates
  themselves, not only by the quantile);
- the cut margin (lowest retrieval gate - highest streaming gate) is at least `MIN_MARGIN`;
- at least `MIN_DECIDED` of the gates are within `DECIDED` of 0 or 1;
- no head changed side during the last `LATE` of the steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from duohead.gate_summary import gate_report

DECIDED = 0.05
MIN_DECIDED = 0.8
MIN_MARGIN = 0.1
LATE = 0.2


def decided_fraction(gates: torch.Tensor) -> float:
    """Fraction of gates within `DECIDED` of 0 or 1."""
    flat = gates.detach().flatten().float()
    return ((flat <= DECIDED) | (flat >= 1 - DECIDED)).float().mean().item()


def late_side_changes(layouts: list[list[int]], num_heads: int) -> int:
    """How many heads changed side during the last `LATE` of the steps.

    layouts: per step (in order), the flat indices of the heads that stream after that step. The window is the
    last ceil(LATE * steps) steps plus the layout just before it, so a change on its first step counts.
    """
    if len(layouts) < 2:
        return 0
    span = math.ceil(LATE * len(layouts))
    sides = torch.zeros(span + 1, num_heads, dtype=torch.bool)
    for row, streaming in enumerate(layouts[-span - 1 :]):
        sides[row, streaming] = True
    return int((sides != sides[-1]).any(dim=0).sum())


def convergence_report(gates: torch.Tensor, sparsity: float, layouts: list[list[int]]) -> dict[str, Any]:
    """`gate_report` at the cut plus the convergence measures; `converged` with `reasons` when it is not."""
    report = gate_report(gates, sparsity)
    flat = gates.detach().flatten().float().cpu()
    below_half = int((flat < 0.5).sum())
    report.update(
        below_half=below_half,
        decided=round(decided_fraction(flat), 4),
        late_side_changes=late_side_changes(layouts, flat.numel()),
        late_steps=math.ceil(LATE * len(layouts)),
    )
    reasons = []
    if below_half != report["streaming_heads"]:
        reasons.append(f"{below_half} gates below 0.5, target {report['streaming_heads']}")
    if report.get("margin", 1.0) < MIN_MARGIN:
        reasons.append(f"cut margin {report['margin']} < {MIN_MARGIN}")
    if report["decided"] < MIN_DECIDED:
        reasons.append(f"{report['decided']:.0%} of gates within {DECIDED} of 0/1 (< {MIN_DECIDED:.0%})")
    if report["late_side_changes"]:
        reasons.append(f"{report['late_side_changes']} heads changed side in the last {report['late_steps']} steps")
    report["converged"] = not reasons
    if reasons:
        report["reasons"] = reasons
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """A `convergence_report` as lines a person reads (the JSON stays in the pattern's provenance)."""
    lines = [
        f"cut at sparsity {report['sparsity']:g}: {report['streaming_heads']} of {report['heads']} KV heads stream; "
        f"{report['below_half']} gates are below 0.5"
    ]
    if "margin" in report:
        tie = f", {report['ties_at_cut']} gates tied at the cut" if report["ties_at_cut"] > 1 else ""
        lines.append(
            f"cut margin {report['margin']:g} (highest streaming gate {report['highest_streaming_gate']:g}, "
            f"lowest retrieval gate {report['lowest_retrieval_gate']:g}{tie})"
        )
    lines += [
        f"decided: {report['decided']:.0%} of gates within {DECIDED} of 0 or 1 (saturated: {report['saturated_at_0']} at 0, "
        f"{report['saturated_at_1']} at 1); mean gate {report['mean']:g}",
        f"heads that changed side in the last {report['late_steps']} steps: {report['late_side_changes']}",
        "converged: yes" if report["converged"] else f"converged: no ({'; '.join(report['reasons'])})",
    ]
    return lines
