"""The `duohead` command: each subcommand lives in its own module and parses its own arguments.

duohead calibrate ...   learn gates for a model        (duohead.commands.calibrate)
duohead generate ...    long-context generation        (duohead.commands.generate)
duohead eval ...        passkey / needle evaluation    (duohead.commands.evaluate)
duohead inspect ...     summarise a pattern file       (duohead.commands.inspect_pattern)
duohead plan ...        memory per GPU of a deployment (duohead.commands.plan)
duohead patterns [NAME] the shipped patterns           (duohead.commands.patterns)
duohead --version       the installed version
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "calibrate": ("duohead.commands.calibrate", "learn one gate per (layer, KV head) and write a pattern"),
    "generate": ("duohead.commands.generate", "generate from a long prompt with a head pattern"),
    "eval": ("duohead.commands.evaluate", "passkey / needle-in-a-haystack accuracy grid"),
    "inspect": ("duohead.commands.inspect_pattern", "summarise a pattern file (gate histogram, layout, heat map)"),
    "plan": ("duohead.commands.plan", "weights and KV bytes per GPU for a deployment, from the model config alone"),
    "patterns": ("duohead.commands.patterns", "list the shipped head patterns, or show one (ties, KV bytes)"),
}


def _usage() -> str:
    lines = ["usage: duohead <command> [options]   (or: duohead --version)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run `duohead <command> --help` for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = f"commands: {', '.join(COMMANDS)} (see duohead --help)"
    if not argv:
        print(f"duohead: error: no command given; {commands}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from duohead import __version__

        print(f"duohead {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"duohead: error: unknown command {argv[0]!r}; {commands}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
