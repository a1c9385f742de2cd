"""Tiny random checkpoints of every supported architecture, saved as folders vLLM loads, and random prompts.

vLLM's CPU attention takes head dims that are multiples of 32 (the main suite's tiny models use 16), so these
models have their own shape: 4 layers, 8 query heads over 4 KV heads of dim 32. Weights are drawn with a larger
spread than transformers' default, so that next-token distributions are peaked and greedy tokens depend on the
context (with the default init every argmax is the same token, which would compare nothing)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_model

VOCAB = 128


def save_tiny_checkpoint(folder: Path, arch: str, seed: int = 0):
    """Save a seeded random `arch` model (fp32) to `folder` (config + safetensors); return the model."""
    model = tiny_model(
        arch, layers=4, heads=8, kv_heads=4, vocab=VOCAB, seed=seed,
        hidden_size=256,  # = 8 heads x 32: Qwen2 derives its head dim from it
        intermediate_size=192, head_dim=32, max_position_embeddings=4096, initializer_range=0.08, tie_word_embeddings=False,
    )  # fmt: skip
    model.save_pretrained(folder)
    return model


def prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    """Random token ids, one prompt per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
