"""A calibration testbed: a tiny random GQA model whose long-range attention is carried by known KV heads.

The value rows of the `carriers` (flat (layer, KV head) indices) are scaled by `strong`, all others by `weak`,
so replacing a carrier's full attention by streaming attention moves the final hidden states far more than
replacing any other head's (`layout_mse` measures it). A rule that calibrates well streams the other heads at
sparsity 1 - len(carriers) / heads. The tokenizer is word-level over the built-in haystack's own vocabulary
(no download), so the real passkey data runs through it.
"""

from __future__ import annotations

import re

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from duohead.calibrate import haystack
from duohead.calibrate.data import NATO, PasskeyDataset
from duohead.calibrate.gates import GatedModel


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the built-in haystack's words, the NATO alphabet and the prompt words."""
    words = set(NATO) | {str(i) for i in range(100)}
    for name in dir(haystack):
        value = getattr(haystack, name)
        if name.isupper() and isinstance(value, tuple):
            for text in value:
                words |= set(re.findall(r"\w+|[^\w\s]", text))
    words |= set(re.findall(r"\w+|[^\w\s]", "The secret passphrase number is: Remember it. Question: what is? Answer:"))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def carrier_model(
    vocab_size: int,
    carriers: list[int],
    *,
    layers: int = 4,
    kv_heads: int = 4,
    group: int = 2,
    strong: float = 1.0,
    weak: float = 0.3,
    first_layer: float = 0.2,
    seed: int = 0,
) -> torch.nn.Module:
    """A Qwen2-architecture model (q/k/v biases, GQA `group`) whose flat KV heads `carriers` carry the context."""
    torch.manual_seed(seed)
    head_dim = 16
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=kv_heads * group,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        use_sliding_window=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.bias.normal_(0, 0.5)
            for head in range(kv_heads):
                scale = (strong if index * kv_heads + head in carriers else weak) * (first_layer if index == 0 else 1.0)
                rows = slice(head * head_dim, (head + 1) * head_dim)
                attn.v_proj.weight[rows] *= scale
                attn.v_proj.bias[rows] *= scale
    return model


def layout_mse(gated: GatedModel, dataset: PasskeyDataset, streaming: list[int], samples: range) -> float:
    """Mean distillation MSE over `samples` with the flat heads `streaming` streaming and the rest full."""
    saved = gated.gates.detach().clone()
    with torch.no_grad():
        gated.gates.fill_(1.0)
        gated.gates.view(-1)[streaming] = 0.0
    total = 0.0
    for i in samples:
        sample = dataset[i]
        ids = sample.input_ids[None]
        total += gated.distill_backward(ids, sample.supervised, gated.teacher_states(ids, sample.supervised))
    with torch.no_grad():
        gated.gates.copy_(saved)
    gated.gates.grad = None
    return total / len(samples)
