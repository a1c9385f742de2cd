"""The torch backend (`duohead.kernels.reference`) against the plain oracle (`duohead.kernels.oracle`) on random
inputs: streaming attention and cache writes chunk after chunk (left and right padding, a ring that wraps, sink and
window edges, GQA ratios), retrieval attention with padding, the one-call and banded CPU paths; and the oracle itself
against the tests' independent masked softmax."""

from __future__ import annotations

import pytest
import torch
from tiny_models import masked_attention

from duohead.cache import StreamingKV
from duohead.kernels import oracle, reference
from duohead.kernels.oracle import lambda_visible


def positions(real_lengths: list[int], width: int, right: bool = False) -> torch.Tensor:
    """Real positions [B, width]: each row's real tokens contiguous (left padding, or right with right=True)."""
    pos = torch.full((len(real_lengths), width), -1)
    for row, n in enumerate(real_lengths):
        start = 0 if right else width - n
        pos[row, start : start + n] = torch.arange(n)
    return pos


def test_the_oracle_equals_an_independent_masked_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 6, 5, 8, generator=gen),
        torch.randn(2, 3, 9, 8, generator=gen),
        torch.randn(2, 3, 9, 8, generator=gen),
    )
    visible = torch.rand(2, 5, 9, generator=gen) > 0.4
    visible[1, 2] = False  # a query that sees nothing: zeros
    torch.testing.assert_close(oracle.masked_attention(q, k, v, visible, 0.3), masked_attention(q, k, v, visible, 0.3))
    assert (oracle.masked_attention(q, k, v, visible, 0.3)[1, :, 2] == 0).all()


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("sink, window", [(0, 1), (1, 1), (4, 3), (3, 16)])
@pytest.mark.parametrize("right", [False, True])
def test_streaming_attention_and_append_equal_the_oracle_chunk_after_chunk(group, sink, window, right):
    """Chunks of 1, 7, 2, 19 and 1 tokens into one cache (the ring wraps several times), rows of different lengths."""
    gen = torch.Generator().manual_seed(sink * 31 + window + group)
    chunks, real = [1, 7, 2, 19, 1], [30, 17, 0]
    width = sum(chunks)
    pos = positions(real, width, right)
    k_all = torch.randn(3, 2, width, 8, generator=gen)
    v_all = torch.randn(3, 2, width, 8, generator=gen)
    ours, theirs = StreamingKV(k_all, sink, window), StreamingKV(k_all, sink, window)
    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        q = torch.randn(3, 2 * group, n, 8, generator=gen)
        got = reference.streaming_attention(q, k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], ours.view(), 0.3)
        expected = oracle.streaming_attention(q, k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], theirs.view(), 0.3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        reference.streaming_append(k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], ours.view())
        oracle.streaming_append(k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], theirs.view())
        for a, b in zip(ours.tensors(), theirs.tensors(), strict=True):
            assert torch.equal(a, b)
        start += n


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_len", [1, 5, 24])
def test_retrieval_attention_equals_the_oracle(padded, q_len):
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k, v = torch.randn(2, 2, 24, 8, generator=gen), torch.randn(2, 2, 24, 8, generator=gen)
    key_is_real = torch.ones(2, 24, dtype=torch.bool)
    key_is_real[1, :10] = False
    mask = key_is_real if padded else None
    torch.testing.assert_close(
        reference.retrieval_attention(q, k, v, mask, 0.25), oracle.retrieval_attention(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("sink, window", [(0, 1), (2, 5), (4, 30)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_len", [1, 9, 40])
def test_the_one_call_cpu_paths_equal_the_oracle(sink, window, padded, q_len):
    """`mixed_attention` (retrieval heads causal, streaming heads Λ, one call), `dense_lambda_attention` and the banded
    `unpadded_lambda_attention` over a full cache of 40 slots."""
    gen = torch.Generator().manual_seed(q_len * 7 + sink)
    slots, split = 40, 2
    key_is_real = torch.ones(2, slots, dtype=torch.bool)
    if padded:
        key_is_real[1, :11] = False
    pos = reference.real_positions(key_is_real)
    q = torch.randn(2, 6, q_len, 8, generator=gen)
    k, v = torch.randn(2, 3, slots, 8, generator=gen), torch.randn(2, 3, slots, 8, generator=gen)
    mask = key_is_real if padded else None
    lam = lambda_visible(pos[:, -q_len:, None], pos[:, None, :], sink, window)
    real = (pos[:, -q_len:] >= 0)[:, None, :, None]
    expected_streaming = oracle.masked_attention(q[:, split:], k[:, 1:], v[:, 1:], lam, 0.3)
    mixed = reference.mixed_attention(q, k, v, mask, split, sink, window, 0.3)
    torch.testing.assert_close(
        mixed[:, :split] * real, oracle.retrieval_attention(q[:, :split], k[:, :1], v[:, :1], mask, 0.3) * real
    )
    torch.testing.assert_close(mixed[:, split:] * real, expected_streaming * real)
    dense = reference.dense_lambda_attention(q[:, split:], k[:, 1:], v[:, 1:], mask, sink, window, 0.3)
    torch.testing.assert_close(dense * real, expected_streaming * real)
    if not padded:
        bands = reference.unpadded_lambda_attention(q[:, split:], k[:, 1:], v[:, 1:], sink, window, 0.3, band=4)
        torch.testing.assert_close(bands, expected_streaming)


SCORE_CHANGES = [(2.0, None), (None, "sinks"), (1.5, "sinks")]  # Gemma 2's soft cap, GPT-OSS's learned sinks, both


@pytest.mark.parametrize("softcap, with_sinks", SCORE_CHANGES)
@pytest.mark.parametrize("right", [False, True])
def test_soft_caps_and_sinks_in_streaming_attention_equal_the_oracle(softcap, with_sinks, right):
    """The explicit path (`reference.masked_attention` with score changes) chunk after chunk, padded rows and a
    ring that wraps: the first chunk takes the banded path's place, later ones the blocks and the decode step."""
    gen = torch.Generator().manual_seed(11)
    chunks, real, sink, window = [9, 1, 14, 1], [25, 12, 0], 2, 5
    width = sum(chunks)
    pos = positions(real, width, right)
    k_all, v_all = torch.randn(3, 2, width, 8, generator=gen), torch.randn(3, 2, width, 8, generator=gen)
    sinks = torch.randn(4, generator=gen) if with_sinks else None
    ours, theirs = StreamingKV(k_all, sink, window), StreamingKV(k_all, sink, window)
    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        q = 3 * torch.randn(3, 4, n, 8, generator=gen)  # large scores, so the cap bends them
        changes = {"softcap": softcap, "sinks": sinks}
        got = reference.streaming_attention(q, k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], ours.view(), 0.3, **changes)
        expected = oracle.streaming_attention(q, k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], theirs.view(), 0.3, **changes)
        plain = oracle.streaming_attention(q, k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], theirs.view(), 0.3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (expected - plain).abs().max() > 1e-2  # the change matters on these inputs
        reference.streaming_append(k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], ours.view())
        oracle.streaming_append(k_all[:, :, sl], v_all[:, :, sl], pos[:, sl], theirs.view())
        start += n


@pytest.mark.parametrize("softcap, with_sinks", SCORE_CHANGES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_len", [1, 9])
def test_soft_caps_and_sinks_in_the_full_cache_paths_equal_the_oracle(softcap, with_sinks, padded, q_len):
    """Retrieval attention, the one-call mixed path (the sinks of each head follow it) and the dense Λ mask."""
    gen = torch.Generator().manual_seed(q_len)
    slots, split, sink, window = 30, 2, 2, 6
    key_is_real = torch.ones(2, slots, dtype=torch.bool)
    if padded:
        key_is_real[1, :11] = False
    pos = reference.real_positions(key_is_real)
    q = 3 * torch.randn(2, 6, q_len, 8, generator=gen)
    k, v = torch.randn(2, 3, slots, 8, generator=gen), torch.randn(2, 3, slots, 8, generator=gen)
    sinks = torch.randn(6, generator=gen) if with_sinks else None
    mask = key_is_real if padded else None
    real = (pos[:, -q_len:] >= 0)[:, None, :, None]
    lam = lambda_visible(pos[:, -q_len:, None], pos[:, None, :], sink, window)
    head = lambda a, b: {"softcap": softcap, "sinks": None if sinks is None else sinks[a:b]}
    expected_retrieval = oracle.retrieval_attention(q[:, :split], k[:, :1], v[:, :1], mask, 0.3, **head(0, split))
    expected_streaming = oracle.masked_attention(q[:, split:], k[:, 1:], v[:, 1:], lam, 0.3, **head(split, None))
    retrieval = reference.retrieval_attention(q[:, :split], k[:, :1], v[:, :1], mask, 0.3, **head(0, split))
    torch.testing.assert_close(retrieval * real, expected_retrieval * real)
    mixed = reference.mixed_attention(q, k, v, mask, split, sink, window, 0.3, **head(0, None))
    torch.testing.assert_close(mixed[:, :split] * real, expected_retrieval * real)
    torch.testing.assert_close(mixed[:, split:] * real, expected_streaming * real)
    dense = reference.dense_lambda_attention(q[:, split:], k[:, 1:], v[:, 1:], mask, sink, window, 0.3, **head(split, None))
    torch.testing.assert_close(dense * real, expected_streaming * real)


def test_the_oracle_applies_soft_caps_and_sinks_as_the_stock_eager_attention():
    """The oracle's score changes against transformers' own eager attention of Gemma 2 (soft cap) and GPT-OSS (sinks)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    gen = torch.Generator().manual_seed(5)
    q, k, v = (
        3 * torch.randn(1, 4, 7, 8, generator=gen),
        torch.randn(1, 2, 7, 8, generator=gen),
        torch.randn(1, 2, 7, 8, generator=gen),
    )
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None]
    additive = torch.zeros(1, 1, 7, 7).masked_fill(~causal[:, None], float("-inf"))
    module = torch.nn.Module()
    module.num_key_value_groups, module.training, module.sinks = 2, False, torch.randn(4, generator=gen)
    capped, _ = gemma2_eager(module, q, k, v, additive, scaling=0.3, softcap=2.0)
    torch.testing.assert_close(oracle.masked_attention(q, k, v, causal, 0.3, softcap=2.0), capped.transpose(1, 2))
    sunk, _ = gpt_oss_eager(module, q, k, v, additive, scaling=0.3)
    torch.testing.assert_close(oracle.masked_attention(q, k, v, causal, 0.3, sinks=module.sinks), sunk.transpose(1, 2))
