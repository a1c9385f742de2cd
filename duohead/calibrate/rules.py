"""How the gates move during calibration: one small class per rule over a narrow base (as kvpress has one class per
press). Shape letters: L layers, Hkv KV heads; gates G [L, Hkv] in [0, 1], N = L * Hkv of them.

The distillation loss is MSE(student, teacher final hidden states at the supervised positions); its gradient's
negative, the *pull* -dMSE/dG, says how much a gate is wanted open. Each step the `Calibrator` asks the rule where the
student runs (`probe`: None = at the gates themselves), runs the student there, and hands the gradient to `update`,
which moves the gates. A rule's state (optimiser moments, evidence, multiplier) goes into checkpoints through
`tensors` / `metadata` and comes back through `load`, under the names checkpoints have always used.

- `RelaxedRule` ("relaxed", the default with a target): the student runs at a *relaxed layout* R [L, Hkv], continuous
  gates moved by AdamW on loss + mu * m * mean(R) (m = the sample's mean |pull|; the multiplier mu rises by dual
  ascent while mean(R) > 1 - target), so a head's pull is measured where the other heads are heading. The evidence
  is the running mean of R; the k = round(target * N) gates with the weakest evidence step down by the learning
  rate, all others up (signed steps), so the gates converge to 0/1 at the target by construction.
- `EvidenceRule` ("evidence", the default before "relaxed"): the student runs with every gate at the probe value
  1 - target; the evidence is the running mean of the pulls scaled to mean |pull| = 1; the same signed steps.
- `L1Rule` (no target: `--target-sparsity none`): the reference implementation's fixed push, AdamW on
  loss + reg * mean(G); gates start at 1.

Rules kept for comparison only (lagrange, instant) live with the benchmark that compares them
(`benchmarks/calibration_rules_compared.py`), registered through `register_rule`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from duohead.calibrate.settings import TrainConfig
from duohead.pattern import cut, stream_order, streaming_count

DUAL_LR = 2.0  # multiplier change per unit of (mean gate - (1 - target)) per step (RelaxedRule's R)


class Rule:
    """Where the student runs and how the gates move. `gates` [L, Hkv] is the deployed gates' Parameter."""

    name: ClassVar[str]

    def __init__(self, gates: torch.nn.Parameter, config: TrainConfig) -> None:
        self.gates, self.config = gates, config
        self.num_streaming = 0 if config.target_sparsity is None else streaming_count(config.target_sparsity, gates.numel())

    def probe(self) -> torch.Tensor | None:
        """Gate values [L, Hkv] the student runs at (the deployed gates are restored after), or None: the gates."""
        return None

    def update(self, lr: float, step_index: int) -> dict[str, Any]:
        """Move the gates after the student's backward (consumes `gates.grad`); returns fields for the step's log."""
        raise NotImplementedError

    def ranking(self) -> torch.Tensor | None:
        """[L, Hkv]: the order heads stream in at every sparsity, where the gates alone do not give one; else None."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The rule's state for a checkpoint (copies on the CPU)."""
        return {}

    def metadata(self) -> dict[str, str]:
        return {}

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Restore what `tensors` / `metadata` saved."""


class AdamRule(Rule):
    """AdamW on loss + lam * mean(param), `param` being the gates (or a rule's own relaxed layout), clamped to [0, 1]."""

    def __init__(self, gates: torch.nn.Parameter, config: TrainConfig, param: torch.nn.Parameter | None = None) -> None:
        super().__init__(gates, config)
        self.param = gates if param is None else param
        self.optimizer = torch.optim.AdamW([self.param], lr=config.lr, weight_decay=0.0)

    def penalty(self, grad: torch.Tensor, step_index: int) -> float:
        """lam, the coefficient of mean(param), for this step."""
        raise NotImplementedError

    def adam_step(self, lr: float, step_index: int) -> dict[str, Any]:
        """One AdamW step on `param` (its gradient must be set); returns lambda and the penalty's value."""
        param = self.param
        mean_gate = param.detach().mean().item()
        lam = self.penalty(param.grad, step_index)
        param.grad += lam / param.numel()  # d(lam * mean(param)) / dparam
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            param.clamp_(0.0, 1.0)
        param.grad = None
        self.after_step()
        return {"lambda": lam, "reg": lam * mean_gate}

    def after_step(self) -> None:
        """Hook after the AdamW step (the dual ascent of a multiplier)."""

    def update(self, lr: float, step_index: int) -> dict[str, Any]:
        return self.adam_step(lr, step_index)

    def tensors(self) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(self.param, {})
        if not state:
            return {}
        copy = lambda t: t.detach().to("cpu", copy=True).contiguous()
        return {
            "adam.exp_avg": copy(state["exp_avg"]),
            "adam.exp_avg_sq": copy(state["exp_avg_sq"]),
            "adam.step": torch.as_tensor(state["step"], dtype=torch.float32).to("cpu", copy=True).reshape(1),
        }

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if "adam.step" in tensors:
            device = self.param.device
            self.optimizer.state[self.param] = {
                "step": tensors["adam.step"].reshape(()),
                "exp_avg": tensors["adam.exp_avg"].to(device),
                "exp_avg_sq": tensors["adam.exp_avg_sq"].to(device),
            }


class L1Rule(AdamRule):
    """No target: the reference's fixed push, lam = reg; gates start at 1."""

    name = "l1"

    def penalty(self, grad: torch.Tensor, step_index: int) -> float:
        return self.config.reg


class MultiplierRule(AdamRule):
    """lam = mu * (the sample's mean |pull|) * N; mu rises by dual ascent while mean(param) > 1 - target."""

    def __init__(self, gates: torch.nn.Parameter, config: TrainConfig, param: torch.nn.Parameter | None = None) -> None:
        super().__init__(gates, config, param)
        self.multiplier = 0.0

    def penalty(self, grad: torch.Tensor, step_index: int) -> float:
        return self.multiplier * grad.detach().abs().mean().item() * grad.numel()

    def after_step(self) -> None:
        excess = self.param.detach().mean().item() - (1.0 - self.config.target_sparsity)
        self.multiplier = max(0.0, self.multiplier + DUAL_LR * excess)

    def metadata(self) -> dict[str, str]:
        return {"multiplier": repr(self.multiplier)}

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        super().load(tensors, metadata)
        self.multiplier = float(metadata.get("multiplier", "0.0"))


class EvidenceRule(Rule):
    """The student at every gate = 1 - target; evidence = running mean of the scaled pulls; signed steps toward the
    evidence's top N - k. Gates start at 1 - target (at G = 1 the pull is zero)."""

    name = "evidence"

    def __init__(self, gates: torch.nn.Parameter, config: TrainConfig) -> None:
        super().__init__(gates, config)
        self.evidence = torch.zeros(gates.numel(), dtype=torch.float64)
        with torch.no_grad():
            gates.fill_(1.0 - config.target_sparsity)

    def probe(self) -> torch.Tensor | None:
        return torch.full_like(self.gates.detach(), 1.0 - self.config.target_sparsity)

    def sample_evidence(self, lr: float, step_index: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """This sample's evidence [N] float64 (None: nothing to add) and log fields; consumes `gates.grad`."""
        pull = -self.gates.grad.detach().flatten().double().cpu()
        self.gates.grad = None
        scale = pull.abs().mean().item()
        return (None if scale == 0 else pull / scale), {}

    def update(self, lr: float, step_index: int) -> dict[str, Any]:
        sample, record = self.sample_evidence(lr, step_index)
        if sample is not None:
            self.evidence += (sample - self.evidence) / (step_index + 1)
        self.signed_step(lr)
        return record

    def signed_step(self, lr: float) -> None:
        """The k gates with the weakest evidence step down by `lr`, all others up; clamped to [0, 1]."""
        direction = torch.ones_like(self.evidence)
        direction[stream_order(self.evidence)[: self.num_streaming]] = -1.0
        with torch.no_grad():
            self.gates.add_(lr * direction.view_as(self.gates).to(self.gates))
            self.gates.clamp_(0.0, 1.0)

    def ranking(self) -> torch.Tensor:
        """Score = (2 * side + e) / 3: side is 1 for the heads the gates keep retrieving at the target (their cut), e
        the evidence min-max scaled to [0, 1]. So the cut at the target is the gates' cut, and on each side heads follow
        their evidence: the streaming heads with the most evidence are the first to retrieve below the target, the
        retrieval heads with the least the first to stream above it."""
        side = cut(self.gates.detach().cpu(), self.config.target_sparsity).float()
        evidence = self.evidence.view(side.shape).float()
        span = (evidence.max() - evidence.min()).item()
        scaled = (evidence - evidence.min()) / span if span > 0 else torch.zeros_like(evidence)
        return (2 * side + scaled) / 3

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"evidence": self.evidence.clone()}

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.evidence = tensors["evidence"]


class RelaxedRule(EvidenceRule):
    """The student at the relaxed layout R (AdamW with a dual-ascent multiplier, as `MultiplierRule`); evidence =
    running mean of R; the same signed steps as `EvidenceRule`."""

    name = "relaxed"

    def __init__(self, gates: torch.nn.Parameter, config: TrainConfig) -> None:
        super().__init__(gates, config)
        self.relaxed = torch.nn.Parameter(gates.detach().clone())
        self.dynamics = MultiplierRule(gates, config, param=self.relaxed)

    def probe(self) -> torch.Tensor | None:
        return self.relaxed.detach()

    def sample_evidence(self, lr: float, step_index: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        self.relaxed.grad, self.gates.grad = self.gates.grad, None
        record = self.dynamics.adam_step(lr, step_index)
        return self.relaxed.detach().flatten().double().cpu(), record

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "relaxed": self.relaxed.detach().to("cpu", copy=True), **self.dynamics.tensors()}

    def metadata(self) -> dict[str, str]:
        return self.dynamics.metadata()

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        super().load(tensors, metadata)
        with torch.no_grad():
            self.relaxed.copy_(tensors["relaxed"].to(self.relaxed.device))
        self.dynamics.load(tensors, metadata)


RULE_CLASSES: dict[str, type[Rule]] = {rule.name: rule for rule in (RelaxedRule, EvidenceRule, L1Rule)}


def register_rule(rule: type[Rule]) -> type[Rule]:
    """Make a rule selectable by its `name` in `TrainConfig.rule` (the comparison benchmark registers its own)."""
    RULE_CLASSES[rule.name] = rule
    return rule


def make_rule(gates: torch.nn.Parameter, config: TrainConfig) -> Rule:
    """The rule of `config` (`TrainConfig.mode`: "l1" without a target) over `gates`."""
    if config.mode not in RULE_CLASSES:
        raise ValueError(f"unknown calibration rule {config.mode!r}; registered: {', '.join(RULE_CLASSES)}")
    return RULE_CLASSES[config.mode](gates, config)
