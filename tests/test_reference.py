"""The blocked torch reference for streaming heads equals a dense Λ mask, including padded and short rows."""

from __future__ import annotations

import pytest
import torch
from tiny_models import masked_attention

from duohead.cache import StreamingKV
from duohead.kernels.reference import (
    dense_lambda_attention,
    lambda_visible,
    mixed_attention,
    streaming_attention,
    unpadded_lambda_attention,
)


def dense_lambda(q, k, v, pos, sink, window, scaling):
    """Attention over all keys of the sequence under an explicit [B, Q, Q] Λ mask."""
    return masked_attention(q, k, v, lambda_visible(pos[:, :, None], pos[:, None, :], sink, window), scaling)


@pytest.mark.parametrize("sink, window", [(0, 1), (4, 3), (4, 16), (1, 200)])
@pytest.mark.parametrize("real_lengths", [(3, 3), (2, 40), (0, 300)])
def test_blocked_reference_equals_dense_mask(sink, window, real_lengths):
    gen = torch.Generator().manual_seed(sink * 1000 + window)
    batch, kv_heads, group, head_dim = len(real_lengths), 2, 3, 8
    q_len = max(real_lengths) + 2
    pos = torch.full((batch, q_len), -1)
    for row, n in enumerate(real_lengths):  # left padding
        pos[row, q_len - n :] = torch.arange(n)
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, q_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, q_len, head_dim, generator=gen)
    empty = StreamingKV(k, sink, window)
    got = streaming_attention(q, k, v, pos, empty.view(), 0.35)
    expected = dense_lambda(q, k, v, pos, sink, window, 0.35)
    real = (pos >= 0)[:, None, :, None]  # [B, 1, Q, 1]
    assert torch.allclose(got * real, expected * real, atol=1e-5)
    assert (got.masked_select(~real.expand_as(got)) == 0).all()  # padding queries see nothing


def test_chunks_over_the_cache_equal_one_pass():
    gen = torch.Generator().manual_seed(0)
    sink, window, q_len = 3, 5, 37
    q = torch.randn(1, 4, q_len, 8, generator=gen)
    k = torch.randn(1, 2, q_len, 8, generator=gen)
    v = torch.randn(1, 2, q_len, 8, generator=gen)
    pos = torch.arange(q_len)[None]
    expected = dense_lambda(q, k, v, pos, sink, window, 0.5)
    cache = StreamingKV(k, sink, window)
    outs = []
    for start, stop in [(0, 2), (2, 3), (3, 11), (11, 12), (12, 30), (30, 37)]:
        sl = slice(start, stop)
        outs.append(streaming_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], pos[:, sl], cache.view(), 0.5))
        cache.append(k[:, :, sl], v[:, :, sl], pos[:, sl])
    assert torch.allclose(torch.cat(outs, dim=2), expected, atol=1e-5)


def test_one_token_per_row_equals_dense_mask_and_padding_sees_nothing():
    """The decode path: rows whose new token is a sink, far past the window, or padding (right-padded row)."""
    gen = torch.Generator().manual_seed(1)
    sink, window, prompt = 4, 8, 41
    lengths = (2, 40, 5)  # real prompt tokens per row (left padding)
    k_all = torch.randn(3, 2, prompt + 1, 8, generator=gen)
    v_all = torch.randn(3, 2, prompt + 1, 8, generator=gen)
    pos = torch.full((3, prompt + 1), -1)
    for row, n in enumerate(lengths):
        pos[row, prompt - n : prompt] = torch.arange(n)
    pos[:2, prompt] = torch.tensor(lengths[:2])  # rows 0 and 1 decode one token; row 2's is padding
    cache = StreamingKV(k_all, sink, window)
    cache.append(k_all[:, :, :prompt], v_all[:, :, :prompt], pos[:, :prompt])
    q = torch.randn(3, 6, 1, 8, generator=gen)
    new = slice(prompt, prompt + 1)
    got = streaming_attention(q, k_all[:, :, new], v_all[:, :, new], pos[:, new], cache.view(), 0.4)
    visible = lambda_visible(pos[:, new, None], pos[:, None, :], sink, window)  # [B, 1, all slots]
    expected = masked_attention(q, k_all, v_all, visible, 0.4)
    assert torch.allclose(got[:2], expected[:2], atol=1e-5)
    assert (got[2] == 0).all()


@pytest.mark.parametrize("sink, window", [(4, 8), (1, 30)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_len", [1, 7, 40])
def test_mixed_attention_is_causal_then_lambda_per_head(sink, window, padded, q_len):
    """One call over the whole cache: query heads [:split] causal, the rest Λ (the CPU's unsplit layer past S + W)."""
    gen = torch.Generator().manual_seed(q_len + sink)
    batch, kv_heads, group, head_dim, slots = 2, 3, 2, 8, 40
    split = 1 * group  # the first KV head retrieves
    key_is_real = torch.ones(batch, slots, dtype=torch.bool)
    if padded:
        key_is_real[1, :9] = False  # left padding in row 1
    pos = (key_is_real.long().cumsum(dim=1) - 1).masked_fill(~key_is_real, -1)
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=gen)
    got = mixed_attention(q, k, v, key_is_real if padded else None, split, sink, window, 0.3)
    q_pos, k_pos = pos[:, -q_len:, None], pos[:, None, :]
    causal = (k_pos >= 0) & (k_pos <= q_pos)
    lam = lambda_visible(q_pos, k_pos, sink, window)
    assert not torch.equal(causal, lam)  # the two kinds of heads see different keys here
    expected_retrieval = masked_attention(q[:, :split], k[:, :1], v[:, :1], causal, 0.3)
    expected_streaming = masked_attention(q[:, split:], k[:, 1:], v[:, 1:], lam, 0.3)
    real = (pos[:, -q_len:] >= 0)[:, None, :, None]
    assert torch.allclose(got[:, :split] * real, expected_retrieval * real, atol=1e-5)
    assert torch.allclose(got[:, split:] * real, expected_streaming * real, atol=1e-5)
    assert (got.masked_select(~real.expand_as(got)) == 0).all()  # padding queries see nothing


@pytest.mark.parametrize("band", [3, 128])
@pytest.mark.parametrize("sink, window", [(0, 1), (1, 1), (3, 7), (4, 20)])
@pytest.mark.parametrize("slots, start", [(30, 0), (10, 0), (11, 0), (41, 2), (41, 10), (41, 11), (41, 29), (41, 40)])
def test_unpadded_lambda_attention_equals_the_dense_oracle(band, sink, window, slots, start):
    """Bands of sink + window keys with a cached additive mask: a first prefill (start 0) and chunks after `start`
    cached slots, before, at and past S + W, with bands of 3 rows (many, a short last one) and of 128 (one)."""
    gen = torch.Generator().manual_seed(slots + start + window)
    q = torch.randn(2, 4, slots - start, 8, generator=gen)
    k = torch.randn(2, 2, slots, 8, generator=gen)
    v = torch.randn(2, 2, slots, 8, generator=gen)
    pos = torch.arange(slots)[None].expand(2, -1)
    expected = masked_attention(q, k, v, lambda_visible(pos[:, start:, None], pos[:, None, :], sink, window), 0.4)
    out = torch.full_like(q, float("nan"))
    assert unpadded_lambda_attention(q, k, v, sink, window, 0.4, out=out, band=band) is out
    assert torch.allclose(out, expected, atol=1e-5)


def test_first_unpadded_prefill_through_the_blocked_reference_takes_bands():
    """`streaming_attention` on an empty cache without padding (the CPU's shortcut to the bands) equals the oracle."""
    gen = torch.Generator().manual_seed(5)
    sink, window, q_len = 3, 6, 37
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k = torch.randn(2, 2, q_len, 8, generator=gen)
    v = torch.randn(2, 2, q_len, 8, generator=gen)
    pos = torch.arange(q_len)[None].expand(2, -1)
    empty = StreamingKV(k, sink, window)
    got = streaming_attention(q, k, v, pos, empty.view(), 0.5)
    assert torch.allclose(got, dense_lambda(q, k, v, pos, sink, window, 0.5), atol=1e-5)


@pytest.mark.parametrize("case", ["first prefill", "padded", "after cached slots"])
def test_dense_lambda_attention_equals_the_dense_oracle(case):
    """The streaming heads of a short unsplit cache under one dense mask: a first unpadded prefill, a padded one,
    and a chunk after cached slots."""
    gen = torch.Generator().manual_seed(3)
    sink, window, slots = 3, 7, 30
    q_len = 12 if case == "after cached slots" else slots
    key_is_real = torch.ones(2, slots, dtype=torch.bool)
    if case == "padded":
        key_is_real[0, :5] = False
    pos = (key_is_real.long().cumsum(dim=1) - 1).masked_fill(~key_is_real, -1)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k = torch.randn(2, 2, slots, 8, generator=gen)
    v = torch.randn(2, 2, slots, 8, generator=gen)
    got = dense_lambda_attention(q, k, v, key_is_real if case == "padded" else None, sink, window, 0.4)
    expected = masked_attention(q, k, v, lambda_visible(pos[:, -q_len:, None], pos[:, None, :], sink, window), 0.4)
    assert torch.allclose(got, expected, atol=1e-5)
