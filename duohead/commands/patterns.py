"""`duohead patterns [NAME]`: the shipped head patterns, or one of them in detail.

    duohead patterns                          one line per shipped pattern
    duohead patterns llama-3.1-8b-instruct    identity, provenance, gate histogram, ties at 50% / 75%, KV bytes

The detail view's KV bytes use the pattern's default cut and the byte formula of `DuoCache.memory()`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from duohead.commands.support import DTYPES, Parser, run_cli

if TYPE_CHECKING:  # torch loads only once the arguments are checked (a bad one is answered at once)
    from duohead.pattern import HeadPattern

TIE_CUTS = (0.5, 0.75)


def calibrated_by(pattern: HeadPattern) -> str:
    """A short account of what calibrated a pattern: method, steps and context range."""
    prov = pattern.provenance
    settings = prov.get("calibration", prov)
    steps = settings.get("num_steps", settings.get("steps"))
    low = settings.get("context_length_min", settings.get("ctx_min"))
    high = settings.get("context_length_max", settings.get("ctx_max"))
    method = "DuoAttention authors" if "DuoAttention" in str(prov.get("method")) else prov.get("method", "unknown")
    parts = [method] + ([f"{steps} steps"] if steps else []) + ([f"ctx {low}-{high}"] if low and high else [])
    return ", ".join(str(p) for p in parts)


def list_lines() -> list[str]:
    """One row per shipped pattern."""
    from duohead.catalogue import shipped_patterns

    header = ("name", "model", "layers x KV x dim", "sink/window", "cut", "calibrated by")
    rows = [header]
    for name, p in shipped_patterns().items():
        dim = p.model.get("head_dim", "?")
        cut = "-" if p.default_sparsity is None else f"{p.default_sparsity:g}"
        rows.append(
            (
                name,
                p.model.get("hf_id") or p.model.get("name", "?"),
                f"{p.num_layers} x {p.num_kv_heads} x {dim}",
                f"{p.sink}/{p.window}",
                cut,
                calibrated_by(p),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


def sparsity_lines(pattern: HeadPattern) -> list[str]:
    """For which sparsities the pattern holds: a ranking or graded gates serve any (nested layouts); 0/1 gates without
    a ranking only their calibrated cut. Then the sparsities its accuracy was measured at, where the file records them
    (provenance "measured": {sparsity: what was measured})."""
    cut = pattern.default_sparsity
    at = f"calibrated at {cut:g}" if cut is not None else "no calibrated cut recorded"
    if pattern.ranking is not None:
        line = f"sparsities: any (a ranking orders every head; the layouts are nested); {at}"
    elif bool(((pattern.gates > 0) & (pattern.gates < 1)).float().mean() >= 0.5):
        line = f"sparsities: any (graded gates order the heads); {at}"
    else:
        line = f"sparsities: {at} only (0/1 gates and no ranking: other cuts fall inside ties, decided by head order)"
    measured = pattern.provenance.get("measured")
    if not isinstance(measured, dict) or not measured:
        return [line]
    return [line, "measured: " + "; ".join(f"sparsity {key}: {value}" for key, value in measured.items())]


def tie_line(pattern: HeadPattern, sparsity: float) -> str:
    """How the cut at `sparsity` falls among equal scores of the pattern's order (ranking, else gates), in words."""
    from duohead.pattern import tie_structure

    t = tie_structure(pattern.order_scores, sparsity)
    head = f"cut at {sparsity:g}: {t['streaming']} of {pattern.gates.numel()} KV heads stream"
    score = "ranking score" if pattern.ranking is not None else "gate"
    if t["cut_gate"] is None:
        return head
    if not t["inside_tie"]:
        return f"{head}; no tie at the cut: all {t['tied']} head(s) at the highest streaming {score} {t['cut_gate']:.6g} stream"
    return (
        f"{head}; the cut falls inside a tie: {t['tied']} heads share {score} {t['cut_gate']:.6g} and {t['tied_streaming']} of "
        "them stream, picked by (layer, head) order (earlier layers first)"
    )


def detail_lines(name: str, pattern: HeadPattern, tokens: int, itemsize: int) -> list[str]:
    """What `duohead patterns NAME` prints."""
    from duohead.catalogue import describe, layout_kv_bytes
    from duohead.gate_summary import histogram_lines

    prov = pattern.provenance
    architecture = pattern.model.get("architecture", "?")
    lines = [describe(name, pattern), f"architecture: {architecture}; sink {pattern.sink}, window {pattern.window}"]
    lines.append(f"calibrated by: {calibrated_by(pattern)}")
    for key in ("source", "license"):
        if key in prov:
            lines.append(f"{key}: {prov[key]}")
    if "clipped" in prov:
        lines.append(f"clipped on import: {prov['clipped']['gates']} gates by at most {prov['clipped']['largest_distance']:.3g}")
    cut = pattern.default_sparsity
    lines.append(
        f"default cut: sparsity {cut:g} (used when enable() gets no sparsity/threshold)"
        if cut is not None
        else "default cut: none recorded (threshold 0.5)"
    )
    lines += sparsity_lines(pattern)
    lines += ["gate histogram:", *histogram_lines(pattern.gates)]
    lines += [tie_line(pattern, s) for s in TIE_CUTS]
    head_dim = pattern.model.get("head_dim")
    if head_dim and cut is not None:
        b = layout_kv_bytes(pattern.binarize(sparsity=cut), head_dim, pattern.sink, pattern.window, tokens, itemsize)
        lines.append(
            f"KV cache at {tokens:,} tokens, {itemsize} bytes per value, batch 1, cut {cut:g}: "
            f"{b['total_bytes'] / 2**30:.2f} GiB "
            f"(full attention {b['full_bytes'] / 2**30:.2f} GiB)"
        )
    hf_id = pattern.model.get("hf_id")
    if hf_id:
        lines.append(f"use: duohead generate --model {hf_id} --pattern {name}   (or --pattern auto)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="duohead patterns", description="List the shipped head patterns, or show one.")
    parser.add_argument("name", nargs="?", help="a shipped pattern to show in detail")
    parser.add_argument("--tokens", type=int, default=131072, help="context length for the KV bytes (default 131072)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="KV dtype for the bytes (default bfloat16)")
    args = parser.parse_args(argv)
    return run_cli("patterns", lambda: _patterns(args))


def _patterns(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1; got {args.tokens}")
    from duohead.catalogue import shipped_patterns

    patterns = shipped_patterns()
    if args.name is None:
        print("\n".join(list_lines()))
        return 0
    if args.name not in patterns:
        shipped = ", ".join(patterns)
        raise ValueError(f"no shipped pattern {args.name!r}; shipped: {shipped} (for a file, use `duohead inspect FILE`)")
    print("\n".join(detail_lines(args.name, patterns[args.name], args.tokens, DTYPES[args.dtype].itemsize)))
    return 0
