"""What determines a calibration run, checked without torch: `TrainConfig`, the update rules, the file names of a
run folder, and the settings a checkpoint records (read from its safetensors header alone).

`duohead calibrate` checks its numbers here before torch loads, and `--resume` reads the run's settings from its
checkpoint, so a bad value or a conflicting option is answered at once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duohead.files import check_regular_file

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"
RULES = ("relaxed", "evidence")  # the user's --rule (rules kept for comparison only live with their benchmark)
CHECKPOINT_LIMIT = 1 << 30  # bytes a calibration checkpoint may have (gates and optimiser state: kilobytes)
HAYSTACK_LIMIT = 256 << 20  # bytes read at most per --haystack file (a 32K-token sample needs ~150 KB of prose)


def check_options(steps: int, lr: float, reg: float, target_sparsity: float | None, rule: str | None = None) -> None:
    """Raise ValueError, naming the option and its range, for a value no calibration can run with. `rule` (the
    user's --rule) must be one of `RULES`; None skips that check (a rule registered elsewhere, e.g. a benchmark's)."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1; got {steps}")
    if not 0 < lr < math.inf:
        raise ValueError(f"--lr must be a finite number > 0; got {lr}")
    if not 0 <= reg < math.inf:
        raise ValueError(f"--reg must be a finite number >= 0; got {reg}")
    if target_sparsity is not None and not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"--target-sparsity must be in [0, 1] (fraction of KV heads that stream); got {target_sparsity}")
    if rule is not None and rule not in RULES:
        raise ValueError(f"--rule must be one of {', '.join(RULES)}; got {rule!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the result of a calibration run (checked on --resume, except `steps`)."""

    steps: int
    lr: float
    reg: float
    target_sparsity: float | None
    sink: int
    window: int
    ctx_min: int
    ctx_max: int
    num_passkeys: int
    passkey_words: int
    seed: int
    rule: str = "relaxed"
    warmup: float = 0.2
    decay: float = 0.2

    def __post_init__(self) -> None:
        check_options(self.steps, self.lr, self.reg, self.target_sparsity)

    @property
    def mode(self) -> str:
        """The rule in effect: "l1" without a target, else `rule`."""
        return "l1" if self.target_sparsity is None else self.rule


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its `__metadata__`), read from the header without loading tensors.
    Raises ValueError if the file is not a safetensors file."""
    path = Path(path)
    check_regular_file(path, "checkpoint", CHECKPOINT_LIMIT)
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            if not 0 < size <= 100_000_000:
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a readable safetensors checkpoint; start over with --force") from None
    return header.get("__metadata__") or {}


def checkpoint_settings(path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """(step, settings) of a calibration checkpoint: the `TrainConfig` fields and the run options the command
    recorded beside them (model, haystack, dtype, ...; absent in checkpoints written before they were recorded)."""
    metadata = checkpoint_metadata(path)
    settings = {**json.loads(metadata.get("run", "{}")), **json.loads(metadata.get("config", "{}"))}
    return int(metadata.get("step", 0)), settings
