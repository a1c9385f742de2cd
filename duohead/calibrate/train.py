"""The calibration loop: one sample per step, a gate-update rule (`duohead.calibrate.rules`), schedule,
checkpoints, JSON-lines log.

Gates G [L, Hkv] stay in [0, 1]. Each step the rule says where the student runs (`Rule.probe`), the student's
distillation backward runs there (the deployed gates restored whatever happens), and the rule moves the gates
(`Rule.update`). A checkpoint holds the gates, the rule's state and the step, copied between two steps
(`Calibrator.state`; a step interrupted half-way is never saved); sample i depends only on (seed, i), so a resumed
run reproduces an uninterrupted one bit for bit. A finished run can be continued with more steps (the schedule is
then the one of the new step count).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from duohead.calibrate.convergence import decided_fraction
from duohead.calibrate.data import PasskeyDataset
from duohead.calibrate.gates import GatedModel
from duohead.calibrate.rules import make_rule
from duohead.calibrate.settings import TrainConfig, checkpoint_metadata
from duohead.files import atomic_write
from duohead.pattern import stream_order


def lr_factor(step: int, steps: int, warmup: float = 0.2, decay: float = 0.2) -> float:
    """Learning-rate multiplier at 0-based `step`: linear 0.1 -> 1 over the first `warmup` of the steps,
    1, then linear 1 -> 0.1 over the last `decay`."""
    warm, cool = warmup * steps, decay * steps
    if warm > 0 and step < warm:
        return 0.1 + 0.9 * step / warm
    if cool > 0 and step >= steps - cool:
        return 0.1 + 0.9 * (steps - 1 - step) / max(cool - 1, 1)
    return 1.0


def weakest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the `count` smallest of `values` (any shape), ties by flat index: the first `count` of
    `duohead.pattern.stream_order`, as every cut."""
    return stream_order(values)[:count]


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint holds, copied at one moment: `step` steps done, the tensors and the string metadata."""

    step: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


class Calibrator:
    """Owns the gates' update rule, its state and the step counter; `step()` runs one sample."""

    def __init__(self, gated: GatedModel, dataset: PasskeyDataset, config: TrainConfig) -> None:
        self.gated = gated
        self.dataset = dataset
        self.config = config
        self.rule = make_rule(gated.gates, config)
        self.step_index = 0
        self.device = gated.gates.device

    @property
    def gates(self) -> torch.Tensor:
        return self.gated.gates.detach()

    def step(self) -> dict[str, Any]:
        """One optimisation step on sample `step_index`; returns its log record."""
        cfg, gates = self.config, self.gated.gates
        start = time.perf_counter()
        sample = self.dataset[self.step_index]
        ids = sample.input_ids[None].to(self.device)
        supervised = sample.supervised.to(self.device)
        target = self.gated.teacher_states(ids, supervised)
        gates.grad = None
        probe = self.rule.probe()
        if probe is not None:  # the student runs at the probe, the deployed gates wait (restored whatever happens)
            kept = gates.detach().clone()
            try:
                with torch.no_grad():
                    gates.copy_(probe)
                distill = self.gated.distill_backward(ids, supervised, target)
            finally:
                with torch.no_grad():
                    gates.copy_(kept)
        else:
            distill = self.gated.distill_backward(ids, supervised, target)
        lr = cfg.lr * lr_factor(self.step_index, cfg.steps, cfg.warmup, cfg.decay)
        record: dict[str, Any] = {"step": self.step_index + 1, "distill": distill, "lr": lr}
        record.update(self.rule.update(lr, self.step_index))
        self.step_index += 1
        flat = self.gates.flatten().float().cpu()
        k = self.rule.num_streaming if cfg.target_sparsity is not None else int((flat < 0.5).sum())
        ordered = flat[stream_order(flat)]
        record.update(
            mean_gate=flat.mean().item(),
            retrieval_heads=int((flat >= 0.5).sum()),
            margin=round((ordered[k] - ordered[k - 1]).item(), 4) if 0 < k < flat.numel() else None,
            decided=round(decided_fraction(flat), 4),
            streaming=weakest(flat, k).tolist(),
            ctx=int(ids.shape[1]),
            seconds=round(time.perf_counter() - start, 3),
        )
        return record

    def ranking(self) -> torch.Tensor | None:
        """[L, Hkv]: the order heads stream in at every sparsity (`HeadPattern.ranking`), for rules whose gates end
        at 0/1 (`Rule.ranking`); None where the gates are graded and rank themselves."""
        return self.rule.ranking()

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> CheckpointState:
        """A copy of everything a checkpoint holds, as it is now (take it between steps: a step interrupted half-way
        leaves the live state between two steps, and such a state must never be saved)."""
        tensors = {"gates": self.gates.to("cpu", copy=True).contiguous(), **self.rule.tensors()}
        metadata = {
            "step": str(self.step_index),
            **self.rule.metadata(),
            "config": json.dumps(asdict(self.config), sort_keys=True),
        }
        return CheckpointState(self.step_index, tensors, metadata)

    def save(self, path: str | os.PathLike, run: dict[str, Any] | None = None, state: CheckpointState | None = None) -> None:
        """Write `state` (default: the state now) to a safetensors file, atomically; `run`: further JSON-ready settings
        to record beside the config (what `duohead calibrate --resume` needs to continue)."""
        state = state if state is not None else self.state()
        metadata = dict(state.metadata)
        if run is not None:
            metadata["run"] = json.dumps(run, sort_keys=True)
        atomic_write(Path(path), lambda tmp: save_file(state.tensors, tmp, metadata=metadata))

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by `save`; refuses one made with different settings (`steps` may
        differ: a longer run continues a finished one)."""
        path = Path(path)
        metadata = checkpoint_metadata(path)
        saved = json.loads(metadata.get("config", "{}"))
        mine = asdict(self.config)
        diffs = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in mine.items() if k != "steps" and saved.get(k) != v]
        if diffs:
            raise ValueError(
                f"{path} was made with other settings: {', '.join(diffs)}; rerun with the same options or use --force"
            )
        step = int(metadata["step"])
        if step > self.config.steps:
            raise ValueError(f"{path} is at step {step} already; pass --steps of at least {step} to continue it")
        tensors = load_file(str(path), device="cpu")
        with torch.no_grad():
            self.gated.gates.copy_(tensors["gates"].to(self.device))
        self.rule.load(tensors, metadata)
        self.step_index = step


def read_log(path: Path, upto_step: int) -> list[str]:
    """The log lines of steps <= `upto_step` (a resumed run drops the steps after its checkpoint)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", math.inf) <= upto_step:
                lines.append(line)
        except json.JSONDecodeError:
            break  # a line cut by an interruption ends the usable log
    return lines
