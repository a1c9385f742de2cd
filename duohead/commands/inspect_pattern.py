"""`duohead inspect PATTERN [--sparsity X] [--png FILE]`: summarise a head pattern.

Prints the shape, sink/window, model and provenance, a text histogram of the gates, how many gates are
saturated, and the margin at the cut for a sparsity; optionally draws the gate heat map (layers x KV heads).
The gate report and histogram come from `duohead.gate_summary` (also used by `duohead calibrate` and `duohead patterns`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from duohead.commands.support import Parser, check_fraction, run_cli
from duohead.files import check_output_file
from duohead.gate_summary import SATURATION, gate_report, histogram_lines

if TYPE_CHECKING:  # torch loads only once the arguments are checked (a bad one is answered at once)
    from duohead.pattern import HeadPattern


def _field_lines(title: str, fields: dict) -> list[str]:
    """A pattern's free-form dict as lines a person reads: `title:` then one `  key: value` line per field (nested
    values stay compact JSON on their line)."""
    if not fields:
        return [f"{title}: (none recorded)"]
    plain = lambda v: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return [f"{title}:", *(f"  {key}: {plain(value)}" for key, value in sorted(fields.items()))]


def summary_lines(pattern: HeadPattern, sparsity: float) -> list[str]:
    """What `duohead inspect` prints for a pattern."""
    report = gate_report(pattern.gates, sparsity)
    layout = pattern.binarize(sparsity=sparsity)
    lines = [
        f"pattern: {pattern.source or '(in memory)'}",
        *_field_lines("model", pattern.model),
        f"shape: {pattern.num_layers} layers x {pattern.num_kv_heads} KV heads = {report['heads']} gates",
        f"sink {pattern.sink}, window {pattern.window}",
        *_field_lines("provenance", pattern.provenance),
        "gate histogram:",
        *histogram_lines(pattern.gates),
        f"saturated: {report['saturated_at_1']} at 1, {report['saturated_at_0']} at 0 (within {SATURATION}); "
        f"mean gate {report['mean']}",
    ]
    if "margin" in report:
        tie = f", {report['ties_at_cut']} gates tied at the cut (order by layer, head)" if report["ties_at_cut"] > 1 else ""
        lines.append(
            f"cut at sparsity {sparsity}: {report['streaming_heads']} streaming; highest streaming gate "
            f"{report['highest_streaming_gate']}, lowest retrieval gate {report['lowest_retrieval_gate']}, "
            f"margin {report['margin']}{tie}"
        )
    per_layer = " ".join(str(int(n)) for n in layout.sum(dim=1).tolist())
    lines.append(f"retrieval heads per layer at sparsity {sparsity}: {per_layer}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="duohead inspect", description="Summarise a duohead head pattern.")
    parser.add_argument("pattern", help="pattern .json file, reference folder, or shipped pattern name")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of KV heads that stream at the cut (default 0.5)")
    parser.add_argument("--png", help="also write the gate heat map to this PNG file (needs matplotlib; to replace one: --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --png file")
    args = parser.parse_args(argv)
    return run_cli("inspect", lambda: _inspect(args))


def _inspect(args: argparse.Namespace) -> int:
    check_fraction("--sparsity", args.sparsity)
    if args.png is not None:
        check_output_file(args.png, "--png", args.force)
    from duohead.pattern import HeadPattern
    from duohead.plots import plot_gates

    pattern = HeadPattern.load(args.pattern)
    print("\n".join(summary_lines(pattern, args.sparsity)))
    if args.png:
        print(f"heat map: {plot_gates(pattern.gates, args.png, title=pattern.model.get('name') or Path(args.pattern).stem)}")
    return 0
