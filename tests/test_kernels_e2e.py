"""End to end: a tiny random Llama with a mixed head pattern generates the same logits with the Triton backend
forced (the interpreter on CPU) as with the torch reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import duohead
from duohead import kernels

triton_streaming = pytest.importorskip("duohead.kernels.triton_streaming")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem())
)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def generate_logits(model, input_ids, attention_mask, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with kernels.use_backend(backend), torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


def test_generate_with_triton_backend_equals_torch_backend(monkeypatch):
    model = tiny_llama()
    pattern = duohead.HeadPattern([[1.0, 0.0], [0.0, 0.0]], sink=4, window=8)  # layer 0 mixed, layer 1 all streaming
    duohead.enable(model, pattern)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 101, (2, 40), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0  # row 1 is left-padded: rows of different lengths in one batch
    input_ids[1, :6] = 0

    seq_torch, logits_torch = generate_logits(model, input_ids, attention_mask, "torch")
    calls = {"attention": 0, "decode": 0}
    for name, fn in (("attention", "streaming_attention"), ("decode", "streaming_decode")):
        kernel = getattr(triton_streaming, fn)
        monkeypatch.setattr(
            triton_streaming, fn, lambda *a, _k=kernel, _n=name, **kw: calls.update({_n: calls[_n] + 1}) or _k(*a, **kw)
        )
    seq_triton, logits_triton = generate_logits(model, input_ids, attention_mask, "triton")
    assert calls == {"attention": 2, "decode": 2 * 3}  # both layers: prefill, then 3 fused decode steps
    assert torch.equal(seq_triton, seq_torch)
    torch.testing.assert_close(logits_triton, logits_torch, atol=1e-4, rtol=1e-4)
