"""Layout refinement: swap heads across the cut while the measured loss of the deployed layout falls.

The rules rank heads from pulls taken at blended gates (rule evidence: every gate at the probe), but a
pattern deploys a binary layout, where heads interact differently: on SmolLM2 the evidence rule's layouts
had 1.6-2.7x the distillation loss of the best layout found, measured at the binary layout itself
(docs/calibration.md). A refinement round works on that layout directly, on a fixed set of held-out samples:

1. Run the student at the binary layout (streaming gates 0, retrieval gates 1): its loss, and the pull
   -dloss/dg of every gate. A streaming head's pull there includes its own cost, so the streaming heads with
   the largest pulls are the ones most wanted open (the candidates to open).
2. The retrieval heads ranked weakest by the rule's evidence are the candidates to close; a retrieval head's
   pull at g = 1 misses its own cost, so it is not used to choose them.
3. Measure the loss with each candidate flipped alone (forward passes only): the gain of opening it, the cost
   of closing it. Swaps are tried in the order of their predicted change (cost - gain, interactions between
   the two heads ignored), each measured, and the first one that lowers the loss is kept. A round without
   such a swap ends the refinement.

Every accepted swap lowers the measured loss on the same samples, so refinement ends after finitely many
rounds; the sparsity never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duohead.calibrate.data import PasskeyDataset
from duohead.calibrate.gates import GatedModel

REFINE_SAMPLES = 4  # held-out samples the layouts are measured on
CANDIDATES = 8  # heads considered on each side, each flipped alone and measured
TRIES = 3  # most swaps measured per round, best predicted first
SAMPLE_OFFSET = 1_000_000  # the refinement samples are dataset[SAMPLE_OFFSET + i], never a training step's


@dataclass(frozen=True)
class Swap:
    """One refinement round's result: the loss of the layout before it; the heads (flat indices) moved to
    retrieval and to streaming and the loss after, or None where no swap lowered the loss."""

    loss_before: float
    opened: int | None
    closed: int | None
    loss_after: float | None


def binary_gates(streaming: list[int], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Gates [L, Hkv]: 0 at the flat indices in `streaming`, 1 elsewhere."""
    gates = torch.ones(shape, device=device)
    gates.view(-1)[torch.as_tensor(streaming, dtype=torch.long, device=device)] = 0.0
    return gates


class LayoutRefiner:
    """Measures binary layouts of `gated` on `REFINE_SAMPLES` fixed samples and finds the best swap."""

    def __init__(self, gated: GatedModel, dataset: PasskeyDataset) -> None:
        self.gated = gated
        self.samples = []
        for i in range(REFINE_SAMPLES):
            sample = dataset[SAMPLE_OFFSET + i]
            ids = sample.input_ids[None].to(gated.gates.device)
            supervised = sample.supervised.to(gated.gates.device)
            self.samples.append((ids, supervised, gated.teacher_states(ids, supervised)))

    def _wear(self, streaming: list[int]) -> None:
        with torch.no_grad():
            self.gated.gates.copy_(binary_gates(streaming, self.gated.gates.shape, self.gated.gates.device))

    def loss(self, streaming: list[int]) -> float:
        """Mean loss of the layout over the samples (forward passes only)."""
        self._wear(streaming)
        return sum(self.gated.distill_loss(*s) for s in self.samples) / len(self.samples)

    def loss_and_pulls(self, streaming: list[int]) -> tuple[float, torch.Tensor]:
        """Mean loss of the layout and the mean pull on each gate there (each sample's pulls scaled to mean
        |pull| = 1), flat [L * Hkv] float64 on the CPU."""
        self._wear(streaming)
        total, pulls = 0.0, torch.zeros(self.gated.gates.numel(), dtype=torch.float64)
        for sample in self.samples:
            self.gated.gates.grad = None
            total += self.gated.distill_backward(*sample)
            pull = -self.gated.gates.grad.detach().flatten().double().cpu()
            scale = pull.abs().mean().item()
            if scale > 0:
                pulls += pull / scale
        self.gated.gates.grad = None
        return total / len(self.samples), pulls / len(self.samples)

    def best_swap(self, streaming: list[int], ranking: torch.Tensor) -> Swap:
        """One round from the layout `streaming` (flat indices); `ranking` [L * Hkv]: the rule's order of the
        heads, weakest first (lowest value), which picks the candidates to close. Costs 2 * CANDIDATES + at most
        TRIES layout measurements after one with gradients."""
        before, pulls = self.loss_and_pulls(streaming)
        stream_set = set(streaming)
        retrieval = [h for h in range(pulls.numel()) if h not in stream_set]
        to_open = sorted(streaming, key=lambda h: (-pulls[h].item(), h))[:CANDIDATES]
        to_close = sorted(retrieval, key=lambda h: (ranking[h].item(), h))[:CANDIDATES]
        gain = {h: before - self.loss(sorted(stream_set - {h})) for h in to_open}
        cost = {h: self.loss(sorted(stream_set | {h})) - before for h in to_close}
        pairs = sorted((cost[c] - gain[o], o, c) for o in to_open for c in to_close)
        for predicted, opened, closed in pairs[:TRIES]:
            if predicted >= 0:
                break
            after = self.loss(sorted((stream_set - {opened}) | {closed}))
            if after < before:
                return Swap(before, opened, closed, after)
        return Swap(before, None, None, None)
