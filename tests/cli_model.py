"""The tiny model the CLI tests run: a seeded random 2-layer Llama saved as a model folder, with the real SmolLM2
tokenizer (so chat templates and prompt building are real), and a pattern for it. The fixtures that build them,
`tiny_model_dir` and `tiny_pattern_file`, are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import duohead
from duohead.loading import resolve_model_path

LAYERS, KV_HEADS, SINK, WINDOW = 2, 2, 4, 16
MAX_POSITIONS = 600


def save_tiny_model(folder: Path) -> Path:
    """Write a seeded random 2-layer Llama (4 query / 2 KV heads, 600 positions) and a tokenizer to `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=16,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_pattern(path: Path) -> Path:
    """A pattern for the tiny model: one retrieval and one streaming KV head per layer (threshold 0.5)."""
    duohead.HeadPattern(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), sink=SINK, window=WINDOW).save(path)
    return path
