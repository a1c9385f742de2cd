"""What `duohead generate` and `duohead eval` share besides argument parsing (each CLI parses its own):
turning user errors into one line, checking inputs before the slow model load, and loading model + pattern.

Importing this module imports neither torch nor transformers (the CLIs check their arguments first).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from duohead.pattern import HeadPattern

DEFAULT_PATTERN = "smollm2-135m-instruct"  # shipped pattern of the default model (duohead/patterns/<name>/pattern.json)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError)  # ImportError: a missing optional package


class _DtypeTable(Mapping):
    """dtype name -> torch dtype; the names (argparse choices) are known without importing torch."""

    names = ("float32", "bfloat16", "float16")

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in self.names:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


DTYPES = _DtypeTable()


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (unknown option, value of the wrong type) are one line and exit 2,
    like every other user error of the CLIs (argparse's own add the usage text above it)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error_line(error: BaseException) -> str:
    """A user error as one line: an OS error as "PATH: what went wrong", anything else its message, lines joined."""
    if isinstance(error, OSError) and error.strerror and len(error.args) > 1:  # raised by the OS, not by duohead
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
        return f"{where}: {error.strerror}" if error.filename else error.strerror
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run_cli(command: str, body: Callable[[], int]) -> int:
    """Run a CLI body: the one place where a user error (bad value, missing file, file in the way, missing optional
    package, a file system that refuses a write) becomes one line on stderr and exit code 2, and Ctrl-C exit code
    130."""
    try:
        return body()
    except (*USER_ERRORS, OSError) as e:
        print(f"duohead {command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"duohead {command}: interrupted", file=sys.stderr)
        return 130


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options `argv` sets explicitly (their argparse dests), as opposed to those left at their defaults."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def recorded_value(value: object) -> object:
    """An option's value as a run folder records it: local paths (a string or a list of them) made absolute, so the
    run can be continued from any folder; anything else as it is."""
    if isinstance(value, list):
        return [recorded_value(v) for v in value]
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def adopt_recorded(
    args: argparse.Namespace,
    given: set[str],
    recorded: Mapping,
    run: str,
    paths: tuple[str, ...] = (),
    extends: tuple[str, ...] = (),
) -> None:
    """`--resume`: every setting `recorded` holds for an option of `args` replaces the option's default; an option
    given explicitly must agree with it (those in `paths` compared as `recorded_value`), except those in `extends`.
    Raises ValueError naming each conflicting option. `run`: the run folder, for the message."""
    conflicts = []
    for dest, value in recorded.items():
        if not hasattr(args, dest):
            continue
        if dest not in given:
            setattr(args, dest, value)
        elif dest not in extends and (recorded_value(getattr(args, dest)) if dest in paths else getattr(args, dest)) != value:
            option = "--" + dest.replace("_", "-")
            conflicts.append(f"{option} {getattr(args, dest)} (the run has {value})")
    if conflicts:
        raise ValueError(
            f"--resume continues {run} with the settings it was started with, and {'; '.join(conflicts)}: drop "
            f"{'that option' if len(conflicts) == 1 else 'those options'} (or start a new run with another --out or --force)"
        )


def cpu_threads(requested: int | None) -> tuple[int, str]:
    """(threads, why) for torch's CPU work: `requested` (--threads); else OMP_NUM_THREADS where the user set it; else
    the CPUs this process may use less the load other processes put on them (the 1-minute load average), at least 1.
    On a busy 2-core CPU one thread ran a 901-token SmolLM2 prefill 1.3-3.1x faster than two (benchmarks/RESULTS.md)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1; got {requested}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(cpus, int(cpus - load)))
    return threads, f"{cpus} CPUs, load {load:.1f}"


def use_cpu_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's CPU threads as `cpu_threads` chooses; returns them and the line that says what was used and why."""
    import torch

    threads, why = cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads, f"CPU threads: {threads} ({why}; --threads N to choose)"


def check_fraction(name: str, value: float | None) -> None:
    """Raise ValueError unless value is None or a number in [0, 1]."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (fraction of KV heads that stream); got {value}")


def resolve_device(name: str | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1"), or CUDA when available, else CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; write cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: duohead runs on cpu or cuda; write cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def check_model_source(model: str | None, gguf_file: str | None) -> None:
    """Fail fast on a missing path or a GGUF file of an architecture duohead does not support."""
    from duohead.loading import check_gguf, resolve_model_path

    if model is None:
        if gguf_file is not None:
            raise ValueError("--gguf-file needs --model FOLDER (the folder that holds the GGUF file)")
        return
    path = Path(model)
    if path.suffix == ".gguf" and gguf_file is not None:
        raise ValueError(f"--model {model} is a GGUF file and --gguf-file {gguf_file} names another; pass one of them")
    gguf = path if path.suffix == ".gguf" else (path / gguf_file if gguf_file else None)
    if gguf is None:
        resolve_model_path(model)  # FileNotFoundError: a missing folder, one without config.json, an id that does not resolve
        return
    check_gguf(gguf)


def load_model_for_cli(
    model: str | None,
    gguf_file: str | None,
    dtype: str,
    device: torch.device,
    pattern: HeadPattern | None = None,
    tp: bool = False,
    sink: int | None = None,
    window: int | None = None,
):
    """(model, tokenizer) for a CLI: the default SmolLM2 when `model` is None. Checks the source and validates
    `pattern` (with `sink` / `window` in place of its own where given) against the model's config before the weights
    are loaded; no progress bars from transformers. `tp`: tensor parallel under torchrun (see `duohead.commands.ranks`)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from duohead.loading import load_model, resolve_model_path
    from duohead.pattern import check_positions

    check_model_source(model, gguf_file)
    folder = resolve_model_path(model, gguf_file)
    if pattern is not None:
        config = AutoConfig.from_pretrained(folder)
        pattern.validate(config)
        check_positions(pattern.sink if sink is None else sink, pattern.window if window is None else window, config)
    hf_logging.disable_progress_bar()
    return load_model(folder, dtype=DTYPES[dtype], device=device, tp=tp)


def load_pattern_for_cli(pattern: str | None, model: str | None, gguf_file: str | None = None) -> HeadPattern:
    """The pattern a CLI asked for: a file, folder or shipped name, or "auto" (the shipped pattern made for `model`,
    matched on the model's name and config); without one, the default model's shipped pattern."""
    from duohead.pattern import HeadPattern

    if pattern is None:
        if model is not None:
            raise ValueError(
                "pass --pattern FILE|NAME|auto: a head pattern made for this model (`duohead patterns` lists the shipped "
                "ones; `duohead calibrate` makes one)"
            )
        pattern = DEFAULT_PATTERN
    if pattern == "auto":
        from transformers import AutoConfig

        from duohead.catalogue import auto_pattern
        from duohead.loading import resolve_model_path

        source = resolve_model_path(model, gguf_file)
        name, found = auto_pattern(AutoConfig.from_pretrained(source), model if model is not None else source)
        print(f"pattern auto: {name} (shipped, made for {found.model.get('hf_id') or found.model.get('name')})", file=sys.stderr)
        return found
    return HeadPattern.load(pattern)


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, config) -> None:
    """Raise ValueError if the prompt is empty or prompt + new tokens exceed the model's positions (never truncate)."""
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty; pass text with --prompt-file FILE or on stdin")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, but this model has "
            f"{limit} positions; truncate the prompt to at most {limit - max_new_tokens} tokens or split the document "
            "into chunks and ask about each (duohead never truncates silently)"
        )
