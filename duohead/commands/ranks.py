"""The CLIs under `torchrun` (`--tp`): one process per GPU, rank 0 speaks for all.

    torchrun --nproc-per-node 2 -m duohead generate --tp --model ./my-llama --pattern p.json --prompt-file doc.txt

Every rank loads the model with transformers' `tp_plan="auto"` (its slice of the heads) and runs the same
prompt; only rank 0 writes to stdout and to files; per-rank numbers (KV bytes) are gathered to rank 0.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def world() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun set them; ValueError outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError("--tp runs one process per GPU: start it with `torchrun --nproc-per-node N -m duohead ...`")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def is_main() -> bool:
    """True on rank 0 and outside torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def main_rank_speaks() -> Iterator[None]:
    """Inside: stdout of ranks other than 0 goes nowhere (they run the same prompt and would print it again)."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
        sys.stdout.flush()


def gather(value: object) -> list[object]:
    """`value` from every rank, in rank order (on every rank); [value] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
