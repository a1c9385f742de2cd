"""Calibration rules kept only to be compared with the ones users run (`duohead.calibrate.rules`), registered under
their names for `TrainConfig(rule=...)` when this module is imported (bench_calibration_rules.py and the tests do).

- "lagrange": loss + mu * m * mean(G), m = the sample's mean |pull|, AdamW on the gates; the multiplier mu rises by
  dual ascent while mean(G) > 1 - target. Gates start at 1 - target. (The relaxed rule runs these dynamics on its
  relaxed layout R and takes signed steps from their running mean.)
- "instant": the rule before "evidence": lambda is re-solved after every backward so that exactly k gates get a
  downward net gradient from that one sample; AdamW; gates start at 1 (warm-up floor `reg`).
docs/calibration.md compares them on the testbed and on SmolLM2.
"""

from __future__ import annotations

import torch

from duohead.calibrate.rules import AdamRule, MultiplierRule, register_rule
from duohead.calibrate.settings import TrainConfig


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


@register_rule
class LagrangeRule(MultiplierRule):
    name = "lagrange"

    def __init__(self, gates: torch.nn.Parameter, config: TrainConfig) -> None:
        with torch.no_grad():
            gates.fill_(1.0 - config.target_sparsity)  # at G = 1 the pull is zero: start at the expected target
        super().__init__(gates, config)


@register_rule
class InstantRule(AdamRule):
    name = "instant"

    def penalty(self, grad: torch.Tensor, step_index: int) -> float:
        lam = target_lambda(grad, self.num_streaming)
        if step_index < self.config.warmup * self.config.steps:
            lam = max(lam, self.config.reg)
        return lam
