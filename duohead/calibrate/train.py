"""The calibration loop: one sample per step, a gate-update rule, schedule, checkpoints, JSON-lines log.

Gates G [L, Hkv] (N = L * Hkv of them) stay in [0, 1]; the distillation loss is MSE(student, teacher final
hidden states at the supervised positions), and its gradient's negative, the *pull* -dMSE/dG, says how much a
gate is wanted open. How the gates move (`TrainConfig.rule`, docs/calibration.md compares them):

- "l1" (`target_sparsity=None`): the reference's fixed push, loss + `reg` * mean(G), AdamW; gates start at 1.
- "evidence" (the default before "relaxed"): the student runs with every gate at the probe value 1 - target (the
  target's expected sparsity), so a head's pull is its own cost of streaming plus its overlap with the others',
  the same for every head whatever its current side. Each step adds the sample's pull, scaled to mean
  |pull| = 1, to a running mean (the evidence); the k = round(target * N) gates with the weakest evidence step
  down by the learning rate, all others up (signed steps, no optimiser). Gates start at 1 - target. As the
  evidence settles, the k streaming gates reach 0 and the rest 1: the run lands on its target by construction,
  and one noisy sample cannot flip a head.
- "relaxed" (the default with a target): like "evidence", but the student runs at a *relaxed layout* R
  [L, Hkv] instead of the uniform probe: continuous gates that follow the "lagrange" dynamics below, so a
  head's pull is measured where the other heads are heading (a head whose overlapping neighbours stream is
  wanted more). The evidence is the running mean of R; the deployed gates take the same signed steps as under
  "evidence", so they converge like them.
- "lagrange": loss + mu * m * mean(G), m = the sample's mean |pull|, AdamW on the gates; the multiplier mu
  rises by dual ascent while mean(G) > 1 - target (the expected sparsity below target). Gates start at 1 - target.
- "instant": the rule before "evidence", kept for comparison: lambda is re-solved after every backward so that exactly
  k gates get a downward net gradient from that one sample; AdamW; gates start at 1 (warm-up floor `reg`).

A checkpoint holds the gates, the rule's state (AdamW moments, evidence, relaxed layout, multiplier) and the
step, copied between two steps (`Calibrator.state`; a step interrupted half-way is never saved); sample i depends
only on (seed, i), so a resumed run reproduces an uninterrupted one bit for bit. A
finished run can be continued with more steps (the schedule is then the one of the new step count).
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
from duohead.calibrate.settings import TrainConfig, checkpoint_metadata
from duohead.files import atomic_write
from duohead.pattern import cut, stream_order, streaming_count

SIGNED = ("relaxed", "evidence")  # rules that move the deployed gates by signed steps toward the evidence's top-k
DUAL_LR = 2.0  # "lagrange": multiplier change per unit of (mean gate - (1 - target)) per step


def lr_factor(step: int, steps: int, warmup: float = 0.2, decay: float = 0.2) -> float:
    """Learning-rate multiplier at 0-based `step`: linear 0.1 -> 1 over the first `warmup` of the steps,
    1, then linear 1 -> 0.1 over the last `decay`."""
    warm, cool = warmup * steps, decay * steps
    if warm > 0 and step < warm:
        return 0.1 + 0.9 * step / warm
    if cool > 0 and step >= steps - cool:
        return 0.1 + 0.9 * (steps - 1 - step) / max(cool - 1, 1)
    return 1.0


def target_lambda(grad: torch.Tensor, num_streaming: int) -> float:
    """The lambda (coefficient of mean(G)) at which exactly `num_streaming` gates get a downward net gradient.

    grad [L, Hkv] = dMSE/dG. A gate goes down iff lambda / N > -grad (N = L * Hkv); lambda / N is put
    halfway between the num_streaming-th and the next weakest pull -grad.
    """
    pull = (-grad.flatten().double()).sort().values
    n = pull.numel()
    if num_streaming <= 0:
        threshold = pull[0].item() - 1e-6 - 1e-3 * abs(pull[0].item())
    elif num_streaming >= n:
        threshold = pull[-1].item() + 1e-6 + 1e-3 * abs(pull[-1].item())
    else:
        threshold = (pull[num_streaming - 1].item() + pull[num_streaming].item()) / 2
    return threshold * n


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
        gates = gated.gates
        self.num_streaming = streaming_count(config.target_sparsity, gates.numel()) if config.target_sparsity is not None else 0
        self.evidence = torch.zeros(gates.numel(), dtype=torch.float64)
        self.multiplier = 0.0
        if config.mode in ("relaxed", "evidence", "lagrange"):
            with torch.no_grad():
                gates.fill_(1.0 - config.target_sparsity)  # at G = 1 the pull is zero: start at the expected target
        # the gates AdamW moves: the relaxed layout R under "relaxed", none under "evidence", else the gates
        self.relaxed = torch.nn.Parameter(gates.detach().clone()) if config.mode == "relaxed" else None
        self.optimizer = (
            torch.optim.AdamW([self._adam_gates], lr=config.lr, weight_decay=0.0) if config.mode != "evidence" else None
        )
        self.step_index = 0
        self.device = gates.device

    @property
    def gates(self) -> torch.Tensor:
        return self.gated.gates.detach()

    @property
    def _adam_gates(self) -> torch.nn.Parameter:
        return self.relaxed if self.relaxed is not None else self.gated.gates

    def step(self) -> dict[str, Any]:
        """One optimisation step on sample `step_index`; returns its log record."""
        cfg, gates = self.config, self.gated.gates
        start = time.perf_counter()
        sample = self.dataset[self.step_index]
        ids = sample.input_ids[None].to(self.device)
        supervised = sample.supervised.to(self.device)
        target = self.gated.teacher_states(ids, supervised)
        gates.grad = None
        if cfg.mode in SIGNED:  # the student runs at the probe, the deployed gates wait (restored whatever happens)
            kept = gates.detach().clone()
            try:
                with torch.no_grad():
                    gates.copy_(self._probe())
                distill = self.gated.distill_backward(ids, supervised, target)
            finally:
                with torch.no_grad():
                    gates.copy_(kept)
        else:
            distill = self.gated.distill_backward(ids, supervised, target)
        lr = cfg.lr * lr_factor(self.step_index, cfg.steps, cfg.warmup, cfg.decay)
        record: dict[str, Any] = {"step": self.step_index + 1, "distill": distill, "lr": lr}
        if cfg.mode in SIGNED:
            record.update(self._add_evidence(lr))
            self._signed_step(lr)
        else:
            record.update(self._adam_step(gates, lr))
        self.step_index += 1
        flat = self.gates.flatten().float().cpu()
        k = self.num_streaming if cfg.target_sparsity is not None else int((flat < 0.5).sum())
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
        """[L, Hkv]: the order heads stream in at every sparsity (`HeadPattern.ranking`), for the rules whose gates end
        at 0/1 (relaxed, evidence); None where the gates are graded and rank themselves, or without a target.

        Score = (2 * side + e) / 3: side is 1 for the heads the gates keep retrieving at the target (their cut), e the
        evidence (the running mean of the relaxed layout R, or of the scaled pulls) min-max scaled to [0, 1]. So the
        cut at the target is the gates' cut, and on each side heads follow their evidence: the streaming heads with
        the most evidence are the first to retrieve below the target, the retrieval heads with the least the first
        to stream above it."""
        if self.config.mode not in SIGNED or self.config.target_sparsity is None:
            return None
        side = cut(self.gates.detach().cpu(), self.config.target_sparsity).float()
        evidence = self.evidence.view(side.shape).float()
        span = (evidence.max() - evidence.min()).item()
        scaled = (evidence - evidence.min()) / span if span > 0 else torch.zeros_like(evidence)
        return (2 * side + scaled) / 3

    def _probe(self) -> torch.Tensor:
        """Where the student runs under a signed rule: the relaxed layout, or every gate at 1 - target."""
        if self.relaxed is not None:
            return self.relaxed.detach()
        return torch.full_like(self.gates, 1.0 - self.config.target_sparsity)

    def _add_evidence(self, lr: float) -> dict[str, Any]:
        """Fold this sample into the running-mean evidence: the relaxed layout after its AdamW step ("relaxed"),
        or the pulls at the probe scaled to mean |pull| = 1 ("evidence"). Consumes the gates' gradient."""
        gates = self.gated.gates
        record: dict[str, Any] = {}
        if self.relaxed is not None:
            self.relaxed.grad, gates.grad = gates.grad, None
            record = self._adam_step(self.relaxed, lr)
            sample = self.relaxed.detach().flatten().double().cpu()
        else:
            pull = -gates.grad.detach().flatten().double().cpu()
            gates.grad = None
            scale = pull.abs().mean().item()
            if scale == 0:
                return record
            sample = pull / scale
        self.evidence += (sample - self.evidence) / (self.step_index + 1)
        return record

    def _signed_step(self, lr: float) -> None:
        """The k gates with the weakest evidence step down by `lr`, all others up; clamped to [0, 1]."""
        gates = self.gated.gates
        direction = torch.ones_like(self.evidence)
        direction[weakest(self.evidence, self.num_streaming)] = -1.0
        with torch.no_grad():
            gates.add_(lr * direction.view_as(gates).to(gates))
            gates.clamp_(0.0, 1.0)

    def _adam_step(self, param: torch.nn.Parameter, lr: float) -> dict[str, Any]:
        """One AdamW step of loss + lam * mean(param) on `param` (the gates, or the relaxed layout)."""
        cfg = self.config
        mean_gate = param.detach().mean().item()
        if cfg.mode == "l1":
            lam = cfg.reg
        elif cfg.mode == "instant":
            lam = target_lambda(param.grad, self.num_streaming)
            if self.step_index < cfg.warmup * cfg.steps:
                lam = max(lam, cfg.reg)
        else:  # lagrange, relaxed
            lam = self.multiplier * param.grad.detach().abs().mean().item() * param.numel()
        param.grad += lam / param.numel()  # d(lam * mean(G)) / dG
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            param.clamp_(0.0, 1.0)
        param.grad = None
        if cfg.mode in ("lagrange", "relaxed"):
            excess = param.detach().mean().item() - (1.0 - cfg.target_sparsity)
            self.multiplier = max(0.0, self.multiplier + DUAL_LR * excess)
        return {"lambda": lam, "reg": lam * mean_gate}

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> CheckpointState:
        """A copy of everything a checkpoint holds, as it is now (take it between steps: a step interrupted half-way
        leaves the live state between two steps, and such a state must never be saved)."""
        copy = lambda t: t.detach().to("cpu", copy=True).contiguous()
        tensors = {"gates": copy(self.gates), "evidence": copy(self.evidence)}
        if self.relaxed is not None:
            tensors["relaxed"] = copy(self.relaxed)
        state = self.optimizer.state.get(self._adam_gates, {}) if self.optimizer is not None else {}
        if state:
            tensors["adam.exp_avg"] = copy(state["exp_avg"])
            tensors["adam.exp_avg_sq"] = copy(state["exp_avg_sq"])
            tensors["adam.step"] = torch.as_tensor(state["step"], dtype=torch.float32).to("cpu", copy=True).reshape(1)
        metadata = {
            "step": str(self.step_index),
            "multiplier": repr(self.multiplier),
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
        self.evidence = tensors["evidence"]
        if self.relaxed is not None:
            with torch.no_grad():
                self.relaxed.copy_(tensors["relaxed"].to(self.device))
        self.multiplier = float(metadata["multiplier"])
        if "adam.step" in tensors and self.optimizer is not None:
            self.optimizer.state[self._adam_gates] = {
                "step": tensors["adam.step"].reshape(()),
                "exp_avg": tensors["adam.exp_avg"].to(self.device),
                "exp_avg_sq": tensors["adam.exp_avg_sq"].to(self.device),
            }
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
