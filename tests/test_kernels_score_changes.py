"""The Triton streaming kernels with a soft cap (Gemma 2) and learned sinks (GPT-OSS) against the plain oracle: the
prefill kernel chunk after chunk and the fused decode, split over keys or not, with padded rows and a wrapping ring.

Triton runs under TRITON_INTERPRET=1 on CPU (set by conftest); the shapes are small for the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from duohead import kernels
from duohead.cache import StreamingKV
from duohead.kernels import oracle

triton_streaming = pytest.importorskip("duohead.kernels.triton_streaming")
triton_decode = pytest.importorskip("duohead.kernels.triton_decode")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem())
)
CHANGES = [(2.0, False), (None, True), (1.5, True)]  # soft cap, sinks, both


def changes_for(softcap: float | None, with_sinks: bool, heads: int, gen: torch.Generator) -> dict:
    sinks = (2 * torch.randn(heads, generator=gen)).to(DEVICE) if with_sinks else None
    return {"softcap": softcap, "sinks": sinks}


@pytest.mark.parametrize("softcap, with_sinks", CHANGES)
@pytest.mark.parametrize("group, sink", [(1, 2), (4, 0)])
def test_prefill_kernel_applies_soft_caps_and_sinks_as_the_oracle(softcap, with_sinks, group, sink):
    gen = torch.Generator().manual_seed(group + sink)
    batch, kv_heads, head_dim, window = 2, 2, 16, 5
    changes = changes_for(softcap, with_sinks, kv_heads * group, gen)
    seen = [0, 0]
    cache = None
    for chunk, pads in ((9, [0, 4]), (7, [0, 0])):  # the second chunk wraps the ring
        pos = torch.full((batch, chunk), -1, dtype=torch.long)
        for b, pad in enumerate(pads):
            pos[b, pad:] = torch.arange(seen[b], seen[b] + chunk - pad)
            seen[b] += chunk - pad
        q = 3 * torch.randn(batch, kv_heads * group, chunk, head_dim, generator=gen)
        k, v = (
            torch.randn(batch, kv_heads, chunk, head_dim, generator=gen),
            torch.randn(batch, kv_heads, chunk, head_dim, generator=gen),
        )
        q, k, v, pos = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), pos.to(DEVICE)
        if cache is None:
            cache = StreamingKV(k, sink, window)
        expected = oracle.streaming_attention(q, k, v, pos, cache.view(), 0.3, **changes)
        plain = oracle.streaming_attention(q, k, v, pos, cache.view(), 0.3)
        got = triton_streaming.streaming_attention(q, k, v, pos, cache.view(), 0.3, **changes)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        assert (expected - plain).abs().max() > 1e-2  # the change matters on these inputs
        cache.append(k, v, pos)


@pytest.mark.parametrize("softcap, with_sinks", CHANGES)
@pytest.mark.parametrize("splits", [1, 3])
def test_fused_decode_applies_soft_caps_and_sinks_as_the_oracle(softcap, with_sinks, splits):
    """The sink logit enters once (split 0's state) whatever the split; a padding token still outputs zeros."""
    gen = torch.Generator().manual_seed(splits)
    batch, kv_heads, group, head_dim, sink, window, prefill = 3, 2, 2, 16, 2, 6, 20
    changes = changes_for(softcap, with_sinks, kv_heads * group, gen)
    keys, values = (torch.randn(batch, kv_heads, prefill, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    pos = torch.arange(prefill).expand(batch, -1).clone()
    pos[1, :5] = -1  # a left-padded row
    pos[1, 5:] = torch.arange(prefill - 5)
    pos = pos.to(DEVICE)
    ours, theirs = StreamingKV(keys, sink, window), StreamingKV(keys, sink, window)
    for cache in (ours, theirs):
        oracle.streaming_append(keys, values, pos, cache.view())
    seen = torch.tensor([prefill, prefill - 5, prefill], device=DEVICE)
    for step in range(3):
        q = 3 * torch.randn(batch, kv_heads * group, 1, head_dim, generator=gen).to(DEVICE)
        k, v = (torch.randn(batch, kv_heads, 1, head_dim, generator=gen).to(DEVICE) for _ in range(2))
        q_pos = seen[:, None].clone()
        if step == 1:
            q_pos[2] = -1  # a padding token
        expected = oracle.streaming_attention(q, k, v, q_pos, theirs.view(), 0.3, **changes)
        oracle.streaming_append(k, v, q_pos, theirs.view())
        out = torch.full_like(q, float("nan"))
        triton_decode.streaming_decode(q, k, v, q_pos, ours.view(), 0.3, out, splits=splits, **changes)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=f"step {step}")
        for a, b in zip(ours.tensors(), theirs.tensors(), strict=True):
            assert torch.equal(a, b)
        if step == 1:
            assert bool((out[2] == 0).all())
        seen += (q_pos[:, 0] >= 0).long()
