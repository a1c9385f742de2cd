"""Tiny random checkpoints of every supported architecture, saved as folders vLLM loads, and their oracles.

vLLM's CPU attention takes head dims that are multiples of 32 (the main suite's tiny models use 16), so these
models have their own shape: 4 layers, 8 query heads over 4 KV heads of dim 32. Weights are drawn with a larger
spread than transformers' default, so that next-token distributions are peaked and greedy tokens depend on the
context (with the default init every argmax is the same token, which would compare nothing)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ARCHITECTURES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
VOCAB = 128


def save_tiny_checkpoint(folder: Path, arch: str, seed: int = 0):
    """Save a seeded random `arch` model (fp32) to `folder` (config + safetensors); return the model."""
    torch.manual_seed(seed)
    extra = {"sliding_window": None} if arch == "mistral" else {}
    if arch == "qwen2":
        extra["use_sliding_window"] = False
    config = ARCHITECTURES[arch](
        vocab_size=VOCAB,
        hidden_size=256,  # = 8 heads x 32: Qwen2 derives its head dim from it
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=4096,
        initializer_range=0.08,
        tie_word_embeddings=False,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    if arch == "qwen2":  # random init leaves biases at zero; make the bias reordering matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return model


def prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    """Random token ids, one prompt per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
