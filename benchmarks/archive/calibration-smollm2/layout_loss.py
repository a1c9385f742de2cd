"""The distillation MSE of patterns' binary layouts on held-out calibration samples (SmolLM2-135M-Instruct).

Each pattern's 50% layout (its 45 lowest gates stream, the rest full) runs as the calibration student with
gates 0/1; the MSE against the teacher's final hidden states on the question/answer tail is averaged over
samples 1000.. of the default recipe's data (seed 0, 4 passkeys x 16 words) at the given context range.

    python benchmarks/archive/calibration-smollm2/layout_loss.py 768 1280 8 shipped path/to/pattern.json ...
"""

import sys

import torch

from duohead.calibrate.data import PasskeyDataset, PasskeySpec
from duohead.calibrate.gates import GatedModel
from duohead.calibrate.train import weakest
from duohead.loading import load_model, resolve_model_path
from duohead.pattern import HeadPattern, find_pattern

ctx_min, ctx_max, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model, tokenizer = load_model(resolve_model_path(None, None), dtype=torch.float32, device="cpu")
gated = GatedModel(model, sink=64, window=256, gradient_checkpointing=False)
dataset = PasskeyDataset(tokenizer, PasskeySpec(ctx_min, ctx_max, 4, 16), seed=0)
samples = []
for i in range(count):
    sample = dataset[1000 + i]
    ids = sample.input_ids[None]
    samples.append((ids, sample.supervised, gated.teacher_states(ids, sample.supervised)))
for name in sys.argv[4:]:
    gates = HeadPattern.load(find_pattern("smollm2-135m-instruct") if name == "shipped" else name).gates
    streaming = weakest(gates, gates.numel() // 2).tolist()
    with torch.no_grad():
        gated.gates.fill_(1.0)
        gated.gates.view(-1)[streaming] = 0.0
    mse = sum(gated.distill_backward(*s) for s in samples) / count  # the gradient is not used
    print(f"{name:70s} {mse:.4f}", flush=True)
