"""Experiment (2026-11-29, not a duohead rule): pick SmolLM2's 50 % streaming set from an estimated Gram matrix.

    OMP_NUM_THREADS=1 python gram_selection.py 40 8 runs/gram40      # 40 samples, 8 probes each -> runs/gram40.json

Per calibration sample (the default CPU recipe's data: 768-1,280 tokens, 4 passkeys of 16 words, seed 0), the
student runs with every gate at 0.5; for `probes` random directions r in the space of the supervised final hidden
states h, one backward gives J^T r (J = dh/dgates), and the outer products average to G = J^T J, the Gram matrix
of the heads' effects (normalised per sample to mean diagonal 1, then a running mean over samples). The streaming
set S of 45 heads minimises 1_S^T G 1_S (the linearised MSE of streaming exactly S): greedy, then single swaps
until none helps. Re-running resumes from `<out>.pt`. Prints the predicted cost of that set, of the 45 smallest
row sums of G, and of the 45 weakest evidence-rule pulls from the same samples.
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

from duohead.calibrate.data import PasskeyDataset, PasskeySpec
from duohead.calibrate.gates import GATED_ATTENTION, GATING_KWARG, GatedModel, Gating, _attention
from duohead.loading import load_model
from duohead.pattern import HeadPattern

steps, probes, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model, tokenizer = load_model()
gated = GatedModel(model, sink=64, window=256, gradient_checkpointing=False)
dataset = PasskeyDataset(tokenizer, PasskeySpec(768, 1280, 4, 16), seed=0)
n = gated.gates.numel()
gram = torch.zeros(n, n, dtype=torch.float64)
evidence = torch.zeros(n, dtype=torch.float64)
first = 0
if os.path.exists(out + ".pt"):
    state = torch.load(out + ".pt")
    gram, evidence, first = state["G"], state["evidence"], state["step"]
for step in range(first, steps):
    start = time.time()
    sample = dataset[step]
    ids, supervised = sample.input_ids[None], sample.supervised
    target = gated.teacher_states(ids, supervised)
    with torch.no_grad():
        gated.gates.fill_(0.5)
    with _attention(gated.model, GATED_ATTENTION):
        gating = {GATING_KWARG: Gating(gated.gates, 64, 256)}
        h = gated.model.base_model(input_ids=ids, use_cache=False, **gating).last_hidden_state[0, supervised].float()
        loss = F.mse_loss(h, target.float())
        pull = -torch.autograd.grad(loss, gated.gates, retain_graph=True)[0].flatten().double()
        sample_gram = torch.zeros(n, n, dtype=torch.float64)
        for p in range(probes):
            r = torch.randn_like(h)
            g = torch.autograd.grad(h, gated.gates, grad_outputs=r, retain_graph=p < probes - 1)[0].flatten().double()
            sample_gram += torch.outer(g, g) / probes
    gram += (sample_gram / sample_gram.diagonal().mean().item() - gram) / (step + 1)
    evidence += (pull / pull.abs().mean() - evidence) / (step + 1)
    print(f"step {step + 1} {time.time() - start:.1f}s loss {loss.item():.4f}", flush=True)
    torch.save({"G": gram, "evidence": evidence, "step": step + 1}, out + ".pt")


def cost(heads: set[int]) -> float:
    idx = torch.tensor(sorted(heads))
    return gram[idx][:, idx].sum().item()


k = n // 2
chosen: set[int] = set()
for _ in range(k):  # greedy
    chosen.add(min((i for i in range(n) if i not in chosen), key=lambda i: cost(chosen | {i})))
improved = True
while improved:  # single swaps
    improved = False
    current = cost(chosen)
    for i, j in ((i, j) for i in sorted(chosen) for j in range(n) if j not in chosen):
        if cost((chosen - {i}) | {j}) < current - 1e-12:
            chosen, improved = (chosen - {i}) | {j}, True
            break
row_sums = set(torch.argsort(gram.sum(1), stable=True)[:k].tolist())
weakest = set(torch.argsort(evidence, stable=True)[:k].tolist())
print("cost gram", cost(chosen), "rowsum", cost(row_sums), "evidence", cost(weakest),
      "overlap gram/evidence", len(chosen & weakest), "rowsum/evidence", len(row_sums & weakest))  # fmt: skip
gates = torch.ones(n)
gates[list(chosen)] = 0.0
layout = gates.view(gated.gates.shape).tolist()
HeadPattern(layout, sink=64, window=256, model={"name": "SmolLM2-135M-Instruct"}, default_sparsity=0.5).save(
    out + ".json", overwrite=True
)
