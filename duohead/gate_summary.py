"""What a table of gates [L, Hkv] looks like at a cut: saturation, the margin and ties at the cut, a text histogram.
Used by calibration's convergence report and by the `duohead inspect`, `calibrate` and `patterns` commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SATURATION = 0.01  # a gate within this of 0 or 1 counts as saturated


def gate_report(gates: torch.Tensor, sparsity: float) -> dict[str, Any]:
    """Gate distribution of gates [L, Hkv] and the cut at `sparsity` (fraction of KV heads that stream).

    margin = (lowest retrieval gate) - (highest streaming gate) at that cut; ties = how many gates share the
    value on either side of the cut (> 1 means the cut falls inside a tie, decided by (layer, head) order).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1] (fraction of KV heads that stream); got {sparsity}")
    from duohead.pattern import stream_order, streaming_count

    flat = gates.detach().flatten().float().cpu()
    ordered = flat[stream_order(flat)]
    n = flat.numel()
    k = streaming_count(sparsity, n)
    report: dict[str, Any] = {
        "heads": n,
        "saturated_at_1": int((flat >= 1 - SATURATION).sum()),
        "saturated_at_0": int((flat <= SATURATION).sum()),
        "mean": round(flat.mean().item(), 4),
        "sparsity": sparsity,
        "streaming_heads": k,
    }
    if 0 < k < n:
        low, high = ordered[k - 1].item(), ordered[k].item()
        report.update(
            highest_streaming_gate=round(low, 4),
            lowest_retrieval_gate=round(high, 4),
            margin=round(high - low, 4),
            ties_at_cut=int((flat == low).sum()) if low == high else 1,
        )
    return report


def histogram_lines(gates: torch.Tensor, bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram of gates [L, Hkv] over [0, 1]."""
    import torch

    flat = gates.detach().flatten().float().cpu()
    counts = torch.histc(flat, bins=bins, min=0.0, max=1.0).long().tolist()
    top = max(counts) or 1
    return [
        f"  [{i / bins:.1f}, {(i + 1) / bins:.1f}{']' if i == bins - 1 else ')'} {c:5d} {'#' * round(width * c / top)}"
        for i, c in enumerate(counts)
    ]
