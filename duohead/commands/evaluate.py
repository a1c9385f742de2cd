"""`duohead eval`: accuracy of full attention, head patterns and baselines on passkeys, needles and RULER's tasks.

    duohead eval --pattern smollm2-135m-instruct --lengths 1024,2048,4096 --sparsities 0.5,0.75
    duohead eval --model ./tiny --methods full,streaming,random --limit 4 --out /tmp/eval

    duohead eval --pattern smollm2-135m-instruct --suite ruler --lengths 1024,2048 --samples 3

Methods: `full` (the unmodified model), `pattern` (the head pattern at each --sparsities value),
`streaming` (every KV head streams), `random` (seeded random gates at each --sparsities value: the
baseline a calibrated pattern must beat). Every method sees the same prompts (`duohead.prompts`, a haystack
unlike the calibration one, or RULER's task families from `duohead.ruler`); each prompt is prefilled once and
decoded greedily; the score is the fraction of the answers found in the output. Writes `results.json` and heat
maps to --out; the tables and summaries are `duohead.commands.eval_report`'s. docs/evaluation.md has the details.

`results.json` is rewritten (atomically) after every prompt, so an interrupted grid keeps what it ran:
`duohead eval --out DIR --resume` continues it with the settings it records and runs only the prompts still
missing. A folder that holds results is never reused without `--resume` or `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from duohead import prompts, ruler
from duohead.architecture import DEFAULT_SINK, DEFAULT_WINDOW
from duohead.commands import ranks
from duohead.commands.eval_report import format_table, summarize, write_heatmaps
from duohead.commands.support import (
    DEFAULT_PATTERN,
    DTYPES,
    Parser,
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
from duohead.files import atomic_write_text, check_output_folder, check_regular_file, read_regular_text

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
SETTINGS = ("model", "gguf_file", "pattern", "methods", "sparsities", "sink", "window", "suite", "tasks", "haystack",
            "lengths", "depths", "samples", "limit", "seed", "max_new_tokens", "prefill_chunk", "dtype")  # fmt: skip
PATH_SETTINGS = ("model", "pattern", "haystack")  # recorded as absolute paths where they are local files


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
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


TASKS = {**prompts.SAMPLERS, **ruler.TASKS}
SUITES = {"needle": tuple(prompts.SAMPLERS), "ruler": ruler.SUITE}
MIN_LENGTH = {"passkey": 96, "needle": 96} | ruler.MIN_LENGTH  # checked before the model loads
NEW_TOKENS = {"passkey": 8, "needle": 8} | ruler.NEW_TOKENS  # greedy tokens per prompt without --max-new-tokens
HAYSTACK_LIMIT = 64 << 20  # bytes read at most from --haystack (an 8K-token haystack needs ~40 KB)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duohead eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model folder, .gguf file or Hugging Face id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model FOLDER")
    p.add_argument(
        "--pattern", help=f"pattern file, shipped name or auto (default model: {DEFAULT_PATTERN}); for method 'pattern'"
    )
    p.add_argument("--methods", type=_name_list, default=list(METHOD_KINDS), help=f"comma-separated: {','.join(METHOD_KINDS)}")
    p.add_argument("--sparsities", type=_float_list, default=[0.5, 0.75], help="for 'pattern' and 'random' (default 0.5,0.75)")
    p.add_argument("--sink", type=int, help=f"sink tokens per streaming head (default: the pattern's, else {DEFAULT_SINK})")
    p.add_argument("--window", type=int, help=f"recent tokens per streaming head (default: the pattern's, else {DEFAULT_WINDOW})")
    p.add_argument("--suite", choices=sorted(SUITES), help="needle: passkey,needle (the default); ruler: RULER's tasks")
    p.add_argument("--tasks", type=_name_list, help=f"comma-separated, from: {','.join(TASKS)} (default: the suite's)")
    p.add_argument(
        "--haystack",
        metavar="FILE",
        help=f"UTF-8 text for the essay haystack of {', '.join(ruler.ESSAY_TASKS)} (default: built-in essays)",
    )
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096], help="prompt tokens (default 1024,2048,4096)")
    p.add_argument("--depths", type=_float_list, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="fact depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="prompts per (task, length, depth) cell (default 1)")
    p.add_argument("--limit", type=int, help="run at most this many prompts per task, spread over the grid")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the random pattern (default 0)")
    p.add_argument("--max-new-tokens", type=int, help="greedy tokens per prompt (default: 8, more for RULER tasks)")
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
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in --tasks; choose from {', '.join(TASKS)}")
    if args.haystack is not None:
        if not set(args.tasks) & set(ruler.ESSAY_TASKS):
            raise ValueError(f"--haystack feeds the essay haystack of {', '.join(ruler.ESSAY_TASKS)}; --tasks has none of them")
        check_regular_file(args.haystack, "--haystack file", HAYSTACK_LIMIT)
    for task in args.tasks:
        if min(args.lengths) < MIN_LENGTH[task]:
            raise ValueError(
                f"--lengths {min(args.lengths)} is too short for a {task} prompt: it needs at least {MIN_LENGTH[task]} tokens"
            )
    for s in args.sparsities:
        check_fraction("--sparsities", s)
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths must lie in [0, 1]; got {d}")
    for name in ("samples", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
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


def new_tokens(args: argparse.Namespace, task: str) -> int:
    """Greedy tokens for a prompt of `task`: --max-new-tokens, else the task's own budget."""
    return args.max_new_tokens if args.max_new_tokens is not None else NEW_TOKENS[task]


def check_lengths(lengths: list[int], max_new_tokens: int, config) -> None:
    """Raise ValueError, with eval's fix (a smaller --lengths), if the longest prompt plus its new tokens would
    exceed the model's positions. A sample of length n has at most n tokens (`duohead.prompts`)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max(lengths) + max_new_tokens > limit:
        raise ValueError(
            f"--lengths {max(lengths)} plus --max-new-tokens {max_new_tokens} exceeds this model's {limit} positions; "
            f"pass --lengths of at most {limit - max_new_tokens}"
        )


def build_prompts(args: argparse.Namespace, tokenizer, text: str | None = None) -> list[Prompt]:
    """Every prompt of the run, tokenized once. Each sample's seed derives from --seed and its cell. `text`: the
    essay haystack of `ruler.ESSAY_TASKS` (None: the built-in essays)."""
    out: list[Prompt] = []
    for task in args.tasks:
        depths = args.depths if task in prompts.SAMPLERS else [None]  # RULER tasks draw their depths from the seed
        cells = [(n, d, k) for n in args.lengths for d in depths for k in range(args.samples)]
        for length, depth, k in select_cells(cells, args.limit):
            seed = random.Random(f"{args.seed}/{task}/{length}/{depth}/{k}").randrange(2**31)
            if task in prompts.SAMPLERS:
                sample = prompts.SAMPLERS[task](tokenizer, length, depth, seed)
            elif task in ruler.ESSAY_TASKS and text is not None:
                sample = ruler.TASKS[task](tokenizer, length, seed, text=text)
            else:
                sample = ruler.TASKS[task](tokenizer, length, seed)
            ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
            out.append(Prompt(sample, k, ids))
    return out


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

    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    if method.pattern is not None:
        duohead.enable(model, method.pattern, sparsity=method.sparsity, sink=args.sink, window=args.window)
    try:
        rows = []
        for item in items:
            s = item.sample
            result = run_prompt(model, item.input_ids, new_tokens(args, s.task), chunk=args.prefill_chunk, stop_ids=stop)
            output = tokenizer.decode(result.tokens, skip_special_tokens=True)
            rows.append(
                {
                    "task": s.task,
                    "length": s.length,
                    "depth": s.depth,
                    "sample": item.index,
                    "prompt_tokens": result.prompt_tokens,
                    "answer": s.answer,
                    "answers": list(s.answers),
                    "output": output,
                    "score": ruler.score(s.answers, output),
                    "prefill_seconds": result.prefill_seconds,
                    "kv_bytes": result.memory["total_bytes"],
                }
            )
            if on_row is not None:
                on_row(rows[-1])
            if bar is not None:
                bar.write(
                    f"  {method.name:<14} {s.task:<17} len {s.length:>6} "
                    + ("" if s.depth is None else f"depth {s.depth:.2f}  ")
                    + f"score {rows[-1]['score']:.2f}  answer {s.answer[:40]!r} output {output.strip()[:40]!r}",
                    file=sys.stderr,
                )
                bar.update(1)
        return rows
    finally:
        if method.pattern is not None:
            duohead.disable(model)


def row_key(row: dict) -> tuple:
    """What identifies a prompt of the grid in a result row."""
    return (row["task"], row["length"], row["depth"], row["sample"])


def prompt_key(item: Prompt) -> tuple:
    return (item.sample.task, item.sample.length, item.sample.depth, item.index)


def _keep(rows: list[dict], save: Callable[[], None], row: dict) -> None:
    """Add a finished prompt's row to its method's rows and write the results so far."""
    rows.append(row)
    save()


def check_writable(folder: Path) -> None:
    """Raise ValueError unless `folder` can be made and 64 KiB written in it (a full disk fails here, before any
    model work, not after the last prompt)."""
    check_output_folder(folder, "--out")  # a file in the way, a read-only parent: said in their own words
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(65536))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        raise ValueError(f"--out {folder}: cannot write there ({e.strerror or e}); pass a writable folder") from None


def _evaluate(args: argparse.Namespace, given: set[str]) -> int:
    if {"suite", "tasks"} <= given:
        raise ValueError("--suite and --tasks both choose the tasks; pass one")
    _check_out(args, given)
    if args.tasks is None:
        args.tasks = list(SUITES[args.suite or "needle"])
    _check_args(args)
    if args.model is None or Path(args.model).is_dir():  # a folder's config is read at once (a GGUF one is not)
        from transformers import AutoConfig

        from duohead.loading import resolve_model_path

        check_model_source(args.model, args.gguf_file)
        config = AutoConfig.from_pretrained(resolve_model_path(args.model, args.gguf_file))
        check_lengths(args.lengths, max(new_tokens(args, t) for t in args.tasks), config)
    if ranks.is_main():
        check_writable(Path(args.out))
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from duohead.plots import have_matplotlib

    check_model_source(args.model, args.gguf_file)
    pattern = load_pattern_for_cli(args.pattern, args.model, args.gguf_file) if "pattern" in args.methods else None
    out = Path(args.out)
    device = resolve_device(args.device)
    threads = use_cpu_threads(args.threads)[1] if device.type == "cpu" else None  # said below, with the grid's size
    model, tokenizer = load_model_for_cli(args.model, args.gguf_file, args.dtype, device, pattern, tp=args.tp)
    methods = build_methods(args, pattern, model.config)
    check_lengths(args.lengths, max(new_tokens(args, t) for t in args.tasks), model.config)
    text = read_regular_text(args.haystack, "--haystack file", HAYSTACK_LIMIT) if args.haystack else None
    items = build_prompts(args, tokenizer, text)
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

    unsaved: list[OSError] = []  # the last save's error, if it failed

    def save() -> None:
        if quiet:
            return
        try:
            atomic_write_text(out / RESULTS, json.dumps(report, indent=1) + "\n")
        except OSError as e:
            if not unsaved:
                print(f"duohead eval: cannot save {out / RESULTS} ({e.strerror or e}); the run goes on", file=sys.stderr)
            unsaved[:] = [e]
        else:
            unsaved.clear()

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
    if unsaved:
        print(f"duohead eval: error: nothing was saved to {out} ({unsaved[0].strerror or unsaved[0]}); the table above "
              "is the run's only record", file=sys.stderr)  # fmt: skip
        return 1
    if have_matplotlib():
        write_heatmaps(report, out)
        print(f"wrote {out / RESULTS} and the heat maps", file=sys.stderr)
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
