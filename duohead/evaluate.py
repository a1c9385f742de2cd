"""`duohead eval`: passkey and needle-in-a-haystack accuracy over a grid of context lengths x depths.

    duohead eval --pattern smollm2-135m-instruct --lengths 1024,2048,4096 --sparsities 0.5,0.75
    duohead eval --model ./tiny --methods full,streaming,random --limit 4 --out /tmp/eval

Methods: `full` (the unmodified model), `pattern` (the head pattern at each --sparsities value),
`streaming` (every KV head streams), `random` (seeded random gates at each --sparsities value: the
baseline a calibrated pattern must beat). Every method sees the same prompts (`duohead.prompts`, a haystack
unlike the calibration one); each prompt is prefilled once and decoded greedily for a few tokens; the score is
1 when the answer appears in the output, else 0. Writes `results.json` and one heat map per method to --out.

`results.json` is rewritten (atomically) after every prompt, so an interrupted grid keeps what it ran:
`duohead eval --out DIR --resume` continues it with the settings it records and runs only the prompts still
missing. A folder that holds results is never reused without `--resume` or `--force`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from duohead import prompts, ranks
from duohead.architecture import DEFAULT_SINK, DEFAULT_WINDOW
from duohead.cli_support import (
    DEFAULT_PATTERN,
    DTYPES,
    adopt_recorded,
    check_fraction,
    check_model_source,
    cpu_threads,
    given_options,
    load_model_for_cli,
    load_pattern_for_cli,
    recorded_value,
    resolve_device,
    run_cli,
    use_cpu_threads,
)
from duohead.files import atomic_write_text

if TYPE_CHECKING:  # torch and transformers load only once the arguments are checked (a bad one is answered at once)
    import torch
    from tqdm import tqdm

    from duohead.pattern import HeadPattern

METHOD_KINDS = ("full", "pattern", "streaming", "random")
RESULTS_FORMAT = "duohead-eval"
RESULTS_VERSION = 1
RESULTS = "results.json"
HEATMAPS = "heatmap_*.png"
# the options that decide a grid's results: recorded in results.json, taken from it by --resume
SETTINGS = ("model", "gguf_file", "pattern", "methods", "sparsities", "sink", "window", "tasks", "lengths", "depths",
            "samples", "limit", "seed", "max_new_tokens", "prefill_chunk", "dtype")  # fmt: skip
PATH_SETTINGS = ("model", "pattern")  # recorded as absolute paths where they are local files


@dataclass(frozen=True)
class Method:
    """One way of running the model: `pattern` None = full attention (the model unmodified)."""

    name: str
    kind: str
    sparsity: float
    pattern: HeadPattern | None


@dataclass(frozen=True)
class Prompt:
    """A tokenized sample, shared by all methods."""

    sample: prompts.Sample
    index: int  # which sample of its (task, length, depth) cell
    input_ids: torch.Tensor  # [1, T]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duohead eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model folder, .gguf file or Hugging Face id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model FOLDER")
    p.add_argument(
        "--pattern", help=f"pattern file, shipped name or auto (default model: {DEFAULT_PATTERN}); for method 'pattern'"
    )
    p.add_argument("--methods", type=_name_list, default=list(METHOD_KINDS), help=f"comma-separated: {','.join(METHOD_KINDS)}")
    p.add_argument("--sparsities", type=_float_list, default=[0.5, 0.75], help="for 'pattern' and 'random' (default 0.5,0.75)")
    p.add_argument("--sink", type=int, help=f"sink tokens per streaming head (default: the pattern's, else {DEFAULT_SINK})")
    p.add_argument("--window", type=int, help=f"recent tokens per streaming head (default: the pattern's, else {DEFAULT_WINDOW})")
    p.add_argument("--tasks", type=_name_list, default=list(prompts.SAMPLERS), help="passkey,needle (default both)")
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096], help="prompt tokens (default 1024,2048,4096)")
    p.add_argument("--depths", type=_float_list, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="fact depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="prompts per (task, length, depth) cell (default 1)")
    p.add_argument("--limit", type=int, help="run at most this many prompts per task, spread over the grid")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the random pattern (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per prompt (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prompt tokens per prefill forward; 0 = all at once")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs that other processes leave idle)",
    )
    p.add_argument(
        "--tp",
        action="store_true",
        help="tensor parallel over the processes of `torchrun --nproc-per-node N -m duohead eval --tp ...` (rank 0 reports)",
    )
    p.add_argument("--out", default="eval-results", help="folder for results.json and heat maps (default eval-results)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the grid in --out with the settings its results.json records, running only the missing prompts",
    )
    p.add_argument("--force", action="store_true", help="replace the results and heat maps already in --out")
    return p


def _check_out(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse a folder that holds results unless --resume or --force says what to do with them; --resume takes the
    recorded settings (an explicit option must agree with them)."""
    out = Path(args.out)
    if args.resume and args.force:
        raise ValueError("--resume and --force contradict each other; pass one")
    if args.resume:
        if not (out / RESULTS).is_file():
            raise FileNotFoundError(f"--resume: no {RESULTS} in {out}; start without --resume")
        try:
            settings = json.loads((out / RESULTS).read_text(encoding="utf-8"))["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{out / RESULTS} records no settings to resume from; start over with --force") from None
        adopt_recorded(args, given, settings, str(out), paths=PATH_SETTINGS)
    elif not args.force and ((out / RESULTS).exists() or any(out.glob(HEATMAPS))):
        raise FileExistsError(
            f"{out} holds the results of an earlier eval; pass --resume to continue it, --force to replace it, or another --out"
        )


def _check_args(args: argparse.Namespace) -> None:
    if args.tp:
        ranks.world()  # refuses outside torchrun
        if args.device is not None:
            raise ValueError("--tp places each rank on its own device (torchrun's LOCAL_RANK); drop --device")
    for name in args.methods:
        if name not in METHOD_KINDS:
            raise ValueError(f"unknown method {name!r} in --methods; choose from {', '.join(METHOD_KINDS)}")
    for task in args.tasks:
        if task not in prompts.SAMPLERS:
            raise ValueError(f"unknown task {task!r} in --tasks; choose from {', '.join(prompts.SAMPLERS)}")
    for s in args.sparsities:
        check_fraction("--sparsities", s)
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths must lie in [0, 1]; got {d}")
    for name in ("samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.prefill_chunk < 0:
        raise ValueError("--prefill-chunk must be >= 0 (0 = all at once)")
    cpu_threads(args.threads)


def build_methods(args: argparse.Namespace, pattern: HeadPattern | None, config) -> list[Method]:
    """The methods asked for, in --methods order; random gates come from --seed."""
    import torch

    from duohead.architecture import num_kv_heads
    from duohead.pattern import HeadPattern

    layers = config.num_hidden_layers
    kv_heads = num_kv_heads(config)
    sink = args.sink if args.sink is not None else (pattern.sink if pattern else DEFAULT_SINK)
    window = args.window if args.window is not None else (pattern.window if pattern else DEFAULT_WINDOW)
    methods: list[Method] = []
    for kind in args.methods:
        if kind == "full":
            methods.append(Method("full", kind, 0.0, None))
        elif kind == "pattern":
            methods += [Method(f"pattern@{s:g}", kind, s, pattern) for s in args.sparsities]
        elif kind == "streaming":
            methods.append(Method("streaming", kind, 1.0, HeadPattern(torch.zeros(layers, kv_heads), sink=sink, window=window)))
        else:
            gates = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(args.seed))
            random_pattern = HeadPattern(gates, sink=sink, window=window, provenance={"method": "random", "seed": args.seed})
            methods += [Method(f"random@{s:g}", kind, s, random_pattern) for s in args.sparsities]
    return methods


def select_cells(cells: list, limit: int | None) -> list:
    """At most `limit` cells, evenly spread over the list (all of them without a limit)."""
    if limit is None or limit >= len(cells):
        return cells
    if limit == 1:
        return [cells[len(cells) // 2]]
    return [cells[round(i * (len(cells) - 1) / (limit - 1))] for i in range(limit)]


def check_lengths(lengths: list[int], max_new_tokens: int, config) -> None:
    """Raise ValueError, with eval's fix (a smaller --lengths), if the longest prompt plus its new tokens would
    exceed the model's positions. A sample of length n has at most n tokens (`duohead.prompts`)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max(lengths) + max_new_tokens > limit:
        raise ValueError(
            f"--lengths {max(lengths)} plus --max-new-tokens {max_new_tokens} exceeds this model's {limit} positions; "
            f"pass --lengths of at most {limit - max_new_tokens}"
        )


def build_prompts(args: argparse.Namespace, tokenizer, config) -> list[Prompt]:
    """Every prompt of the run, tokenized once. Each sample's seed derives from --seed and its cell."""
    check_lengths(args.lengths, args.max_new_tokens, config)
    out: list[Prompt] = []
    for task in args.tasks:
        cells = [(n, d, k) for n in args.lengths for d in args.depths for k in range(args.samples)]
        for length, depth, k in select_cells(cells, args.limit):
            seed = random.Random(f"{args.seed}/{task}/{length}/{depth}/{k}").randrange(2**31)
            sample = prompts.SAMPLERS[task](tokenizer, length, depth, seed)
            ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
            out.append(Prompt(sample, k, ids))
    return out


def score(answer: str, output: str) -> float:
    """1.0 when the answer appears in the output (case-insensitive), else 0.0."""
    return float(answer.lower() in output.lower())


def evaluate_method(
    model,
    tokenizer,
    method: Method,
    items: list[Prompt],
    args: argparse.Namespace,
    bar: tqdm | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every prompt under one method; one result row per prompt, passed to `on_row` as soon as it is made.
    `bar` (tqdm) advances by one per prompt and prints each prompt's line above itself."""
    import duohead
    from duohead.runner import run_prompt

    if method.pattern is not None:
        duohead.enable(model, method.pattern, sparsity=method.sparsity, sink=args.sink, window=args.window)
    try:
        rows = []
        for item in items:
            result = run_prompt(model, item.input_ids, args.max_new_tokens, chunk=args.prefill_chunk)
            output = tokenizer.decode(result.tokens, skip_special_tokens=True)
            s = item.sample
            rows.append(
                {
                    "task": s.task,
                    "length": s.length,
                    "depth": s.depth,
                    "sample": item.index,
                    "prompt_tokens": result.prompt_tokens,
                    "answer": s.answer,
                    "output": output,
                    "score": score(s.answer, output),
                    "prefill_seconds": result.prefill_seconds,
                }
            )
            if on_row is not None:
                on_row(rows[-1])
            if bar is not None:
                bar.write(
                    f"  {method.name:<14} {s.task:<8} len {s.length:>6} depth {s.depth:.2f}  "
                    f"score {rows[-1]['score']:.0f}  answer {s.answer!r} output {output.strip()[:40]!r}",
                    file=sys.stderr,
                )
                bar.update(1)
        return rows
    finally:
        if method.pattern is not None:
            duohead.disable(model)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], tasks: list[str], lengths: list[int], depths: list[float]) -> dict:
    """Means per task, and per task the grid [depth][length] of mean scores (None where nothing ran)."""
    per_task = {}
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        grid = [[_mean([r["score"] for r in mine if r["length"] == n and r["depth"] == d]) for n in lengths] for d in depths]
        per_task[task] = {
            "mean": _mean([r["score"] for r in mine]),
            "by_length": {str(n): _mean([r["score"] for r in mine if r["length"] == n]) for n in lengths},
            "grid": grid,
        }
    return {"mean": _mean([r["score"] for r in rows]), "tasks": per_task}


def format_table(report: dict) -> str:
    """Methods as rows; per task the mean score at each length, then the overall mean."""
    cols = [(t, n) for t in report["tasks"] for n in report["lengths"]]
    head = f"{'method':<14} {'sparsity':>8} " + " ".join(f"{t[:7]}@{n}".rjust(13) for t, n in cols) + f" {'mean':>6}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for m in report["methods"]:
        cells = " ".join(fmt(m["summary"]["tasks"][t]["by_length"][str(n)]).rjust(13) for t, n in cols)
        lines.append(f"{m['name']:<14} {m['sparsity']:>8.2f} {cells} {fmt(m['summary']['mean']):>6}")
    return "\n".join(lines)


def row_key(row: dict) -> tuple:
    """What identifies a prompt of the grid in a result row."""
    return (row["task"], row["length"], row["depth"], row["sample"])


def prompt_key(item: Prompt) -> tuple:
    return (item.sample.task, item.sample.length, item.sample.depth, item.index)


def _keep(rows: list[dict], save: Callable[[], None], row: dict) -> None:
    """Add a finished prompt's row to its method's rows and write the results so far."""
    rows.append(row)
    save()


def _evaluate(args: argparse.Namespace, given: set[str]) -> int:
    _check_out(args, given)
    _check_args(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from duohead.plots import have_matplotlib, plot_needle_grid

    check_model_source(args.model, args.gguf_file)
    pattern = load_pattern_for_cli(args.pattern, args.model, args.gguf_file) if "pattern" in args.methods else None
    out = Path(args.out)
    device = resolve_device(args.device)
    threads = use_cpu_threads(args.threads)[1] if device.type == "cpu" else None  # said below, with the grid's size
    model, tokenizer = load_model_for_cli(args.model, args.gguf_file, args.dtype, device, pattern, tp=args.tp)
    methods = build_methods(args, pattern, model.config)
    items = build_prompts(args, tokenizer, model.config)
    if ranks.is_main():
        print(f"eval: {len(items)} prompts x {len(methods)} methods" + (f"; {threads}" if threads else ""), file=sys.stderr)

    previous = json.loads((out / RESULTS).read_text(encoding="utf-8")) if args.resume else None
    report = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "model": args.model or "SmolLM2-135M-Instruct",
        "pattern": pattern.source if pattern else None,
        "seed": args.seed,
        "tasks": args.tasks,
        "lengths": args.lengths,
        "depths": args.depths,
        "max_new_tokens": args.max_new_tokens,
        "settings": {dest: recorded_value(getattr(args, dest)) if dest in PATH_SETTINGS else getattr(args, dest)
                     for dest in SETTINGS},
        "complete": False,
        "methods": [],
    }  # fmt: skip
    earlier = {m["name"]: m["results"] for m in previous["methods"]} if previous else {}
    quiet = not ranks.is_main()  # under torchrun --tp, rank 0 alone shows progress and writes the results
    order = {prompt_key(item): i for i, item in enumerate(items)}
    if not quiet and not args.resume:
        for stale in out.glob(HEATMAPS):  # --force: the heat maps of the run being replaced
            stale.unlink()

    def save() -> None:
        if not quiet:
            atomic_write_text(out / RESULTS, json.dumps(report, indent=1) + "\n")

    total = len(items) * len(methods)
    with tqdm(total=total, desc="eval", unit="prompt", dynamic_ncols=True, disable=quiet) as bar:
        try:
            for method in methods:
                rows = [r for r in earlier.get(method.name, []) if row_key(r) in order]
                report["methods"].append({"name": method.name, "kind": method.kind, "sparsity": method.sparsity})
                report["methods"][-1]["results"] = rows
                done = {row_key(r) for r in rows}
                bar.update(len(done))
                todo = [item for item in items if prompt_key(item) not in done]
                evaluate_method(model, tokenizer, method, todo, args, None if quiet else bar, partial(_keep, rows, save))
                rows.sort(key=lambda r: order[row_key(r)])
                report["methods"][-1]["summary"] = summarize(rows, args.tasks, args.lengths, args.depths)
        except KeyboardInterrupt:
            ran = sum(len(m["results"]) for m in report["methods"])
            print(f"\ninterrupted: {ran} of {total} prompts are in {out / RESULTS}", file=sys.stderr)
            print(f"continue with: duohead eval --out {out} --resume", file=sys.stderr)
            raise
    report["complete"] = True
    save()
    if quiet:  # every rank ran every prompt (its slice of the heads); rank 0 writes the results
        return 0
    print(format_table(report))
    if have_matplotlib():
        for m in report["methods"]:
            grids = {t: m["summary"]["tasks"][t]["grid"] for t in args.tasks}
            title = f"{m['name']} (sparsity {m['sparsity']:.2f})"
            plot_needle_grid(out / f"heatmap_{m['name'].replace('@', '_')}.png", title, args.lengths, args.depths, grids)
        print(f"wrote {out / RESULTS} and one heat map per method", file=sys.stderr)
    else:
        print(f"wrote {out / RESULTS}; install matplotlib for the heat maps", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `duohead eval`; returns the exit code (2 for a user error, printed as one line)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    given = given_options(build_parser(), argv)
    if args.tp:
        with ranks.main_rank_speaks():
            return run_cli("eval", lambda: _evaluate(args, given))
    return run_cli("eval", lambda: _evaluate(args, given))
