"""`duohead generate`: long-context generation with a head pattern, and a closing report of what it cost.

    duohead generate --pattern smollm2-135m-instruct --prompt-file doc.txt --chat --compare-full
    cat doc.txt | duohead generate --model ./my-llama --pattern my-llama.json --sparsity 0.5
    duohead generate --demo

The prompt is prefilled chunk by chunk into a `DuoCache` (a progress bar on stderr), then decoded greedily
with the new text streamed to stdout (`--prompt-lookup N`: speculative decoding with drafts copied from the
prompt, same tokens, fewer forwards; `--compile`: the decode step compiled with torch.compile on a static
cache, same tokens). The report gives prompt tokens, prefill time, decode tokens/s, KV
bytes (duohead's and what full attention would hold, from `DuoCache.memory()`) and peak memory (RSS on
CPU, max allocated on CUDA). `--compare-full` reruns the prompt with full attention (the unmodified model,
via `duohead.disable`) and prints both side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from duohead import prompts
from duohead.commands import ranks
from duohead.commands.support import (
    DEFAULT_PATTERN,
    DTYPES,
    Parser,
    check_fraction,
    check_model_source,
    check_prompt_fits,
    cpu_threads,
    load_model_for_cli,
    load_pattern_for_cli,
    resolve_device,
    run_cli,
    use_cpu_threads,
)
from duohead.files import MiB, atomic_write_text, check_output_file, check_regular_file, read_regular_text

if TYPE_CHECKING:  # torch and transformers load only once the arguments are checked (a bad one is answered at once)
    import torch

    from duohead.pattern import HeadPattern
    from duohead.runner import RunResult

DEMO_SPARSITY = 0.5  # --demo without --sparsity/--threshold streams half of the KV heads
PROMPT_LIMIT = 256 * MiB  # bytes read at most from --prompt-file or stdin (a 1M-token prompt is ~4 MB of text)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duohead generate", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model and pattern")
    src.add_argument("--model", help="local model folder, .gguf file or Hugging Face id (default: SmolLM2-135M-Instruct)")
    src.add_argument("--gguf-file", help="GGUF file name inside --model FOLDER")
    src.add_argument("--pattern", help=f"pattern file or folder, shipped name, or auto (default model: {DEFAULT_PATTERN})")
    src.add_argument("--sparsity", type=float, help="fraction of KV heads that stream, in [0, 1]")
    src.add_argument(
        "--threshold", type=float, help="a KV head streams iff its gate < threshold (default: pattern's cut, else 0.5)"
    )
    src.add_argument("--sink", type=int, help="sink tokens per streaming head (default: the pattern's)")
    src.add_argument("--window", type=int, help="recent tokens per streaming head (default: the pattern's)")
    src.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    src.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    src.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs that other processes leave idle)",
    )
    src.add_argument(
        "--tp",
        action="store_true",
        help="tensor parallel over the processes of `torchrun --nproc-per-node N -m duohead generate --tp ...` "
        "(transformers' tp_plan='auto'; rank 0 prints; the report gives each rank's KV bytes)",
    )
    run = p.add_argument_group("prompt and generation")
    run.add_argument("--prompt-file", help="read the prompt from this file (default: stdin)")
    run.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    run.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens to generate (default 128)")
    run.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward; 0 = all at once")
    run.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding: each step also checks up to N draft tokens copied from the prompt; "
        "same output as plain greedy, fewer forwards when the answer quotes the prompt (default 0: off)",
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step (torch.compile, static cache; full attention uses transformers' StaticCache); "
        "the first step includes the compilation and is left out of decode tok/s",
    )
    run.add_argument("--compare-full", action="store_true", help="also run with full attention and compare")
    run.add_argument("--report-json", help="also write the report as JSON to this file (an existing one needs --force)")
    run.add_argument("--force", action="store_true", help="replace an existing --report-json file")
    run.add_argument(
        "--demo",
        action="store_true",
        help=f"built-in ~{prompts.DEMO_TOKENS}-token document with a buried fact, default model and pattern, "
        f"chat template, sparsity {DEMO_SPARSITY} unless given",
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad numbers before anything slow happens."""
    check_fraction("--sparsity", args.sparsity)
    if args.sparsity is not None and args.threshold is not None:
        raise ValueError("pass either --sparsity or --threshold, not both")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ValueError(f"--threshold must be a finite number (a head streams iff its gate < threshold); got {args.threshold}")
    if args.sink is not None and args.sink < 0:
        raise ValueError(f"--sink must be >= 0 (tokens); got {args.sink}")
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window must be >= 1 (tokens); got {args.window}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.prompt_lookup < 0:
        raise ValueError(f"--prompt-lookup must be >= 0 (0 = off); got {args.prompt_lookup}")
    if args.compile and args.prompt_lookup:
        raise ValueError("--compile decodes one token per step; drop --prompt-lookup or --compile")
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0 (0 = all at once); got {args.prefill_chunk}")
    cpu_threads(args.threads)
    if args.demo and (args.model or args.gguf_file or args.prompt_file):
        raise ValueError("--demo uses the default model and its built-in prompt; drop --model/--gguf-file/--prompt-file")
    if args.tp:
        ranks.world()  # refuses outside torchrun
        if args.device is not None:
            raise ValueError("--tp places each rank on its own device (torchrun's LOCAL_RANK); drop --device")
    if args.prompt_file is not None:
        check_regular_file(args.prompt_file, "prompt file", PROMPT_LIMIT)
    if args.report_json is not None:
        check_output_file(args.report_json, "--report-json", args.force)
    elif args.force:
        raise ValueError("--force replaces an existing --report-json file; pass --report-json FILE or drop --force")


def _pattern(args: argparse.Namespace) -> HeadPattern:
    return load_pattern_for_cli(args.pattern, args.model, args.gguf_file)


def _read_prompt_text(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        return read_regular_text(args.prompt_file, "prompt file", PROMPT_LIMIT)
    if sys.stdin.isatty():
        raise ValueError("no prompt: pass --prompt-file FILE, pipe text on stdin, or use --demo")
    try:
        text = sys.stdin.read(PROMPT_LIMIT + 1)
    except UnicodeDecodeError:
        raise ValueError("the prompt on stdin is not UTF-8 text") from None
    if len(text) > PROMPT_LIMIT:
        raise ValueError(f"the prompt on stdin is longer than {PROMPT_LIMIT:,} characters, the most duohead reads")
    return text


def encode_prompt(tokenizer, text: str, chat: bool) -> torch.Tensor:
    """Token ids [1, T] of the prompt, wrapped as a chat user message when `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; drop --chat and pass plain text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(text, return_tensors="pt").input_ids


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TokenPrinter:
    """Streams decoded text to stdout as tokens arrive (decodes the whole suffix, so multi-token characters print whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed) :])
            sys.stdout.flush()
            self.printed = text


def _generate_one(name: str, label: str, model, tokenizer, input_ids: torch.Tensor, args: argparse.Namespace) -> RunResult:
    """One run (`name`: duohead or full attention), headed by `label`; its prefill bar is named after it."""
    from duohead.runner import run_prompt

    print(f"--- {label} ---", flush=True)
    result = run_prompt(
        model,
        input_ids,
        args.max_new_tokens,
        chunk=args.prefill_chunk,
        progress=ranks.is_main(),
        label=f"prefill, {name}",
        stop_ids=stop_token_ids(model, tokenizer),
        on_token=TokenPrinter(tokenizer),
        lookup=args.prompt_lookup,
        compile=args.compile,
    )
    print(flush=True)
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_report(runs: dict[str, RunResult], per_rank: dict[str, list[dict[str, int]]] | None = None) -> str:
    """The closing report: one column per run (duohead, and full attention with --compare-full). `per_rank`
    (tensor parallel): each run's `memory()` on every rank, in rank order, shown as one more row."""
    cols = list(runs)
    rows: list[tuple[str, list[str]]] = [
        ("prompt tokens", [str(r.prompt_tokens) for r in runs.values()]),
        ("new tokens", [str(len(r.tokens)) for r in runs.values()]),
        ("prefill", [f"{r.prefill_seconds:.2f} s" for r in runs.values()]),
        (
            "decode",
            ["-" if r.decode_tokens_per_second is None else f"{r.decode_tokens_per_second:.2f} tok/s" for r in runs.values()],
        ),
        ("decode forwards", [f"{len(r.decode_step_seconds)} ({r.accepted_draft_tokens} drafted)" for r in runs.values()]),
        ("KV cache held", [_mb(r.memory["total_bytes"]) for r in runs.values()]),
        ("  retrieval heads", [_mb(r.memory["retrieval_bytes"]) for r in runs.values()]),
        ("  streaming heads", [_mb(r.memory["streaming_bytes"]) for r in runs.values()]),
        ("KV with full attention", [_mb(r.memory["full_bytes"]) for r in runs.values()]),
        ("peak memory (" + next(iter(runs.values())).peak_memory_kind + ")", [_mb(r.peak_memory_bytes) for r in runs.values()]),
    ]
    if per_rank:
        held = [" / ".join(f"{m['total_bytes'] / 1e6:,.1f}" for m in per_rank[name]) + " MB" for name in runs]
        rows.insert(6, (f"  on each of {len(per_rank['duohead'])} ranks", held))
    width = max(len(name) for name, _ in rows) + 2
    lines = ["".ljust(width) + "".join(c.ljust(18) for c in cols)]
    lines += [name.ljust(width) + "".join(v.ljust(18) for v in values) for name, values in rows]
    lines.append(kv_comparison(runs["duohead"].memory))
    return "\n".join(lines)


def kv_comparison(memory: dict[str, int]) -> str:
    """One line: how many times less (or more) KV duohead holds than full attention would, from `DuoCache.memory()`."""
    held, full = memory["total_bytes"], memory["full_bytes"]
    if held < full:
        return f"duohead holds {full / held:.2f}x less KV than full attention would"
    if held > full:
        return (
            f"duohead holds {held / full:.2f}x more KV than full attention would: each streaming head's sink + window "
            "buffer is allocated whole, and this prompt does not fill it"
        )
    return "duohead holds as much KV as full attention would"


def _generate(args: argparse.Namespace) -> int:
    _check_args(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import duohead
    from duohead.architecture import layer_layouts
    from duohead.loading import DEFAULT_MODEL

    if args.demo:
        args.chat = True
        if args.sparsity is None and args.threshold is None:
            args.sparsity = DEMO_SPARSITY
    check_model_source(args.model, args.gguf_file)
    device = resolve_device(args.device)
    pattern = _pattern(args)
    text = None if args.demo else _read_prompt_text(args)
    if text is not None and not text.strip():
        raise ValueError("the prompt is empty; pass text with --prompt-file FILE or on stdin")
    threads = use_cpu_threads(args.threads) if device.type == "cpu" else None  # (threads, the line saying why)
    model, tokenizer = load_model_for_cli(
        args.model, args.gguf_file, args.dtype, device, pattern, tp=args.tp, sink=args.sink, window=args.window
    )
    if args.demo:
        text, expected = prompts.demo_document(tokenizer)
        print(
            f"demo: a {prompts.DEMO_TOKENS}-token document hides the code {expected}; the model is asked for it", file=sys.stderr
        )
    input_ids = encode_prompt(tokenizer, text, args.chat)
    check_prompt_fits(input_ids.shape[1], args.max_new_tokens, model.config)

    duohead.enable(model, pattern, sparsity=args.sparsity, threshold=args.threshold, sink=args.sink, window=args.window)
    layouts = layer_layouts(model)
    heads = sum(len(lay.kv_order) for lay in layouts)
    streaming = heads - sum(lay.num_retrieval_heads for lay in layouts)
    if args.tp:  # each rank holds a slice of the heads: count them all
        streaming, heads = map(sum, zip(*ranks.gather((streaming, heads)), strict=True))
    label = f"duohead ({streaming}/{heads} KV heads streaming, sink {layouts[0].sink}, window {layouts[0].window})"
    runs = {"duohead": _generate_one("duohead", label, model, tokenizer, input_ids, args)}
    if args.compare_full:
        duohead.disable(model)
        runs["full attention"] = _generate_one("full attention", "full attention", model, tokenizer, input_ids, args)
    per_rank = None
    if args.tp:  # the report's KV rows are all ranks together, plus one row per rank
        per_rank = {name: ranks.gather(r.memory) for name, r in runs.items()}
        for name, r in runs.items():
            r.memory = {key: sum(m[key] for m in per_rank[name]) for key in r.memory}
    print(format_report(runs, per_rank))
    if threads is not None:
        print(threads[1])
    if args.demo:
        for name, r in runs.items():
            found = expected in tokenizer.decode(r.tokens, skip_special_tokens=True)
            print(f"demo: {name} {'found' if found else 'did not find'} the code {expected}")
    if args.report_json and ranks.is_main():
        report = {
            "model": args.model or DEFAULT_MODEL,
            "pattern": pattern.source,
            "cpu_threads": threads[0] if threads else None,
            "sparsity": streaming / heads,
            "sink": layouts[0].sink,
            "window": layouts[0].window,
            "runs": {
                name: {**r.report(), "tokens": r.tokens, "text": tokenizer.decode(r.tokens, skip_special_tokens=True)}
                for name, r in runs.items()
            },
            **({"kv_per_rank": per_rank} if per_rank else {}),
        }
        check_output_file(args.report_json, "--report-json", args.force)  # nothing appeared there meanwhile
        try:
            atomic_write_text(args.report_json, json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise OSError(f"--report-json {args.report_json}: not written ({e.strerror or e}); the report is above") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `duohead generate`; returns the exit code (2 for a user error, printed as one line)."""
    args = build_parser().parse_args(argv)
    if args.tp:
        with ranks.main_rank_speaks():
            return run_cli("generate", lambda: _generate(args))
    return run_cli("generate", lambda: _generate(args))
