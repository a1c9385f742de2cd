"""`duohead plan`: what a deployment needs per GPU, from the model's config alone (no weights are read); the
planning itself is `duohead.planner.plan_deployment`.

    duohead plan --pattern llama-3.1-8b-instruct --context 128K --gpu-memory 80GiB
    duohead plan --model ./Llama-3.1-70B --pattern my-70b.json --sparsity 0.5 --context 128K --tp 8
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from duohead.architecture import DEFAULT_SINK, DEFAULT_WINDOW
from duohead.commands.support import DTYPES, Parser, check_fraction, run_cli
from duohead.planner import (
    Plan,
    check_config_sizes,
    format_tokens,
    load_config,
    parse_bytes,
    parse_tokens,
    plan_deployment,
    shipped_model_config,
    spread_layout,
)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _tokens(n: int | None) -> str:
    return "no limit from KV" if n is None else f"{format_tokens(n)} tokens"


def format_plan(plan: Plan) -> str:
    """The plan as a short table: per GPU (the fullest rank when they differ), full attention beside duohead."""
    r = plan.fullest()
    heads = (plan.layers - plan.local_layers) * plan.kv_heads
    lines = [
        f"model: {plan.model_type}, {plan.layers} layers x {plan.kv_heads} KV heads ({plan.query_heads} query heads), "
        f"head dim {plan.head_dim}, {plan.dtype}",
        *[f"{plan.local_layers} local sliding-window layers keep their own window (of {plan.local_window} tokens) in both"]
        * (plan.local_layers > 0),
        f"duohead: {plan.streaming_heads} of {heads} KV heads stream (sparsity {plan.streaming_heads / heads:.2f}), "
        f"sink {plan.sink}, window {plan.window}",
        f"context {format_tokens(plan.context)} tokens x batch {plan.batch}, tensor parallel over {plan.tp} GPU(s)",
        "",
        (f"per GPU (fullest rank: {r.rank})" if plan.tp > 1 else "per GPU").ljust(30) + "full attention".ljust(20) + "duohead",
        "weights".ljust(30) + _gib(r.weight_bytes).ljust(20) + _gib(r.weight_bytes),
        "KV cache".ljust(30) + _gib(r.full_kv_bytes).ljust(20) + _gib(r.duohead_kv_bytes),
        "total".ljust(30) + _gib(r.weight_bytes + r.full_kv_bytes).ljust(20) + _gib(r.weight_bytes + r.duohead_kv_bytes),
    ]
    if r.duohead_kv_bytes:
        lines.append(f"duohead holds {r.full_kv_bytes / r.duohead_kv_bytes:.2f}x less KV than full attention")
    if plan.gpu_memory is not None:
        fit_full = min(p.max_context_full for p in plan.ranks)
        duo = [p.max_context_duohead for p in plan.ranks if p.max_context_duohead is not None]
        fit_duo = min(duo) if duo else None
        lines.append(f"longest context in {_gib(plan.gpu_memory)}".ljust(30) + _tokens(fit_full).ljust(28) + _tokens(fit_duo))
    if plan.tp > 1 and len({(p.duohead_kv_bytes, p.weight_bytes) for p in plan.ranks}) > 1:
        lines += ["", "per rank: " + ", ".join(f"{p.rank}: {_gib(p.weight_bytes + p.duohead_kv_bytes)}" for p in plan.ranks)]
    if plan.max_position_embeddings is not None and plan.context > plan.max_position_embeddings:
        lines.append(
            f"note: the model has {format_tokens(plan.max_position_embeddings)} positions; "
            f"{format_tokens(plan.context)} tokens exceed them"
        )
    lines.append("(K = 1,024 tokens, M = 1,024K; not counted: activations, CUDA context, allocator slack)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duohead plan", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="config.json, model folder or Hugging Face id (default: the model config a shipped --pattern ships, "
        "e.g. llama-3.1-8b-instruct)",
    )
    p.add_argument("--pattern", help="pattern file, reference folder or shipped name (default: streaming heads spread evenly)")
    p.add_argument("--sparsity", type=float, help="fraction of KV heads that stream, in [0, 1]")
    p.add_argument("--threshold", type=float, help="with --pattern: a KV head streams iff its gate < threshold")
    p.add_argument("--sink", type=int, help=f"sink tokens per streaming head (default: the pattern's, else {DEFAULT_SINK})")
    p.add_argument("--window", type=int, help=f"recent tokens per streaming head (default: the pattern's, else {DEFAULT_WINDOW})")
    p.add_argument("--context", required=True, help="tokens per sequence (prompt + generated): 131072, 128K or 1M (K = 1,024)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights and KV dtype (default bfloat16)")
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB or 141GB: adds the longest context that fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of the table")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad values before torch loads; turns --context and --gpu-memory into numbers."""
    check_fraction("--sparsity", args.sparsity)
    args.context = parse_tokens(args.context)
    args.gpu_memory = None if args.gpu_memory is None else parse_bytes(args.gpu_memory)
    if args.pattern is None and (args.sparsity is None or args.threshold is not None):
        raise ValueError("without --pattern pass --sparsity S (a threshold needs a pattern's gates)")
    if args.model is None and args.pattern is None:
        raise ValueError("pass --model (config.json, model folder or Hugging Face id) or a shipped --pattern NAME")


def _config(args: argparse.Namespace) -> Any:
    """The model config to plan: --model, else the config the shipped --pattern ships."""
    if args.model is not None:
        return load_config(args.model)
    config = shipped_model_config(args.pattern)
    if config is None:
        from duohead.pattern import HeadPattern

        hf_id = HeadPattern.load(args.pattern).model.get("hf_id")
        example = f" (e.g. --model {hf_id})" if hf_id else ""
        raise ValueError(
            f"pattern {args.pattern} ships no model config: pass --model with the model's config.json, folder or "
            f"Hugging Face id{example}"
        )
    return config


def _plan(args: argparse.Namespace) -> int:
    _check_args(args)
    from duohead.architecture import num_kv_heads, pattern_layers, text_config

    gpu_memory = args.gpu_memory
    config = _config(args)
    check_config_sizes(text_config(config))
    if args.pattern is not None:
        from duohead.pattern import HeadPattern

        pattern = HeadPattern.load(args.pattern)
        pattern.validate(config)
        default = args.sparsity is None and args.threshold is None  # the pattern's calibrated cut, as enable() applies it
        layout = pattern.binarize(sparsity=pattern.default_sparsity if default else args.sparsity, threshold=args.threshold)
        sink = pattern.sink if args.sink is None else args.sink
        window = pattern.window if args.window is None else args.window
    else:
        tc = text_config(config)
        layout = spread_layout(len(pattern_layers(tc)), num_kv_heads(tc), args.tp, args.sparsity)
        sink = DEFAULT_SINK if args.sink is None else args.sink
        window = DEFAULT_WINDOW if args.window is None else args.window
    plan = plan_deployment(
        config, layout, sink=sink, window=window, context=args.context, tp=args.tp, dtype=args.dtype,
        batch=args.batch, gpu_memory=gpu_memory,
    )  # fmt: skip
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `duohead plan`; returns the exit code (2 for a user error, printed as one line)."""
    args = build_parser().parse_args(argv)
    return run_cli("plan", lambda: _plan(args))
