"""Retrieval-head paths: the paged view FlashInfer reads (checked on CPU), the SDPA path against an explicit mask,
and FlashInfer itself against the reference (CUDA only)."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import masked_attention

from duohead.cache import RetrievalKV
from duohead.kernels import flashinfer_retrieval, reference

ON_GPU = torch.cuda.is_available()


def retrieval_cache(batch, num_kv_heads, head_dim, chunks, dtype=torch.float32, device="cpu", seed=0):
    """Fill a `RetrievalKV` chunk by chunk (capacity grows as in a DuoCache); return the final k, v views."""
    gen = torch.Generator().manual_seed(seed)
    cache = None
    for q_len in chunks:
        k, v = (torch.randn(batch, num_kv_heads, q_len, head_dim, generator=gen).to(device, dtype) for _ in range(2))
        if cache is None:
            cache = RetrievalKV.empty(k, capacity=max(q_len, 256))
        keys, values = cache.append(k, v)
    return keys, values


@pytest.mark.parametrize("batch,chunks", [(1, [5]), (3, [300, 2]), (2, [100, 1, 1]), (2, [257])])
def test_paged_view_reads_the_cache_in_place(batch, chunks):
    """Gathering each row's pages in order gives back exactly its T keys/values, and the pages alias the cache."""
    k, v = retrieval_cache(batch, 3, 16, chunks)
    pages = flashinfer_retrieval.paged_view(k, v)
    assert pages is not None and pages.keys.data_ptr() == k.data_ptr()
    indptr, indices, last_page_len = pages.plan_tensors(batch)
    kv_len = k.shape[2]
    for b in range(batch):
        rows = indices[indptr[b] : indptr[b + 1]].long()
        for paged, dense in ((pages.keys, k), (pages.values, v)):
            gathered = paged[rows].transpose(0, 1).reshape(3, -1, 16)  # [Hkv, used * P, D]
            assert torch.equal(gathered[:, :kv_len], dense[b])
        assert int(last_page_len[b]) == kv_len - (len(rows) - 1) * pages.page_size
    capacity = k.stride(1) // 16
    assert pages.page_size == max(p for p in flashinfer_retrieval.PAGE_SIZES if capacity % p == 0)


def test_paged_view_refuses_strides_it_cannot_page():
    k = torch.randn(2, 3, 7, 16).transpose(2, 3)  # not [.., T, D] with D contiguous
    assert flashinfer_retrieval.paged_view(k, k) is None


@pytest.mark.parametrize("group,q_len,padded", [(1, 1, False), (4, 1, False), (2, 3, False), (4, 1, True)])
def test_sdpa_retrieval_matches_an_explicit_mask(group, q_len, padded):
    """The SDPA path (mask-free for one new token, masked otherwise) equals attention under an explicit mask."""
    k, v = retrieval_cache(2, 2, 16, [20, q_len])
    q = torch.randn(2, 2 * group, q_len, 16)
    kv_len = k.shape[2]
    key_is_real = torch.ones(2, kv_len, dtype=torch.bool)
    if padded:
        key_is_real[1, :4] = False
    query_slot = torch.arange(kv_len - q_len, kv_len)[:, None]
    visible = (torch.arange(kv_len)[None, :] <= query_slot)[None] & key_is_real[:, None, :]  # [B, Q, T]
    expected = masked_attention(q, k, v, visible, 0.25)
    got = reference.retrieval_attention(q, k, v, key_is_real if padded else None, 0.25)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flashinfer_refuses_what_it_cannot_take():
    plans = flashinfer_retrieval.FlashInferPlans()
    k, v = retrieval_cache(1, 2, 64, [8])
    q = torch.randn(1, 4, 1, 64)
    assert not flashinfer_retrieval.supports(q, k, v, None)  # CPU, fp32
    with pytest.raises(ValueError, match="unsupported input"):
        flashinfer_retrieval.retrieval_attention(q, k, v, None, 0.125, plans=plans)


@pytest.mark.skipif(not ON_GPU, reason="FlashInfer runs only on CUDA; this machine has none")
@pytest.mark.skipif(not flashinfer_retrieval.available(), reason="flashinfer is not installed")
@pytest.mark.parametrize("group,head_dim", [(1, 64), (2, 128), (4, 128), (8, 64)])
@pytest.mark.parametrize("chunks", [[77], [300, 1], [200, 9], [130, 1, 1]])
def test_flashinfer_matches_reference(group, head_dim, chunks):
    plans = flashinfer_retrieval.FlashInferPlans()
    dtype = torch.bfloat16
    k, v = retrieval_cache(2, 2, head_dim, chunks, dtype, "cuda")
    q = torch.randn(2, 2 * group, chunks[-1], head_dim, device="cuda", dtype=dtype)
    assert flashinfer_retrieval.supports(q, k, v, None)
    got = flashinfer_retrieval.retrieval_attention(q, k, v, None, head_dim**-0.5, plans=plans)
    expected = reference.retrieval_attention(q, k, v, None, head_dim**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


class FakePagedWrapper:
    """A CPU stand-in for FlashInfer's paged wrappers with their documented semantics (HND pages, bottom-right causal;
    decode in CUDA-graph mode: fixed buffers, indptr [B + 1] and last_page_len [B] fix the batch size, the index
    buffer must hold every page index of a plan), to test duohead's glue: argument order, page indices, output
    layout, one plan per step, bounded wrapper cache."""

    plans: list[tuple] = []
    created = 0

    def __init__(self, workspace, kv_layout, **kwargs):
        assert kv_layout == "HND"
        self.decode = "use_tensor_cores" in kwargs
        if self.decode:
            assert kwargs["use_cuda_graph"] is True
            self.buffers = (
                kwargs["paged_kv_indptr_buffer"],
                kwargs["paged_kv_indices_buffer"],
                kwargs["paged_kv_last_page_len_buffer"],
            )
            assert len(self.buffers[0]) == len(self.buffers[2]) + 1
        FakePagedWrapper.created += 1

    def plan(self, *args, **kwargs):
        if self.decode:
            args = (None, *args)  # no qo_indptr: one query per row
        self.qo_indptr, self.indptr, self.indices, self.last, self.num_q_heads, self.num_kv_heads, self.head_dim, self.page = args
        self.scale = kwargs["sm_scale"]
        if self.decode:  # FlashInfer copies the plan into the fixed buffers; they must fit
            indptr_buf, indices_buf, last_buf = self.buffers
            assert len(self.indptr) == len(indptr_buf) and len(self.indices) <= len(indices_buf)
            indptr_buf.copy_(self.indptr)
            indices_buf[: len(self.indices)] = self.indices
            last_buf.copy_(self.last)
        FakePagedWrapper.plans.append((self.decode, int(self.last[0]), len(self.indices)))

    def run(self, q, paged_kv, out):
        keys, values = paged_kv
        batch = len(self.indptr) - 1
        q_len = q.shape[0] // batch
        for b in range(batch):
            pages = self.indices[self.indptr[b] : self.indptr[b + 1]].long()
            kv_len = (len(pages) - 1) * self.page + int(self.last[b])
            k, v = (
                t[pages].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[None, :, :kv_len] for t in (keys, values)
            )
            qb = q[b * q_len : (b + 1) * q_len].transpose(0, 1)[None]  # [1, Hq, Q, D]
            out[b * q_len : (b + 1) * q_len] = reference.retrieval_attention(qb, k, v, None, self.scale)[0].transpose(0, 1)
        return out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    import types

    fake = types.SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=FakePagedWrapper, BatchPrefillWithPagedKVCacheWrapper=FakePagedWrapper
    )
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(flashinfer_retrieval, "supports", lambda *a: True)
    FakePagedWrapper.plans, FakePagedWrapper.created = [], 0


def test_flashinfer_glue_with_a_fake_flashinfer(fake_flashinfer):
    plans = flashinfer_retrieval.FlashInferPlans()
    gen = torch.Generator().manual_seed(5)
    layers = [RetrievalKV.empty(torch.empty(2, 2, 1, 16), capacity=320) for _ in range(3)]
    for q_len in [300, 7, 1, 1]:  # prefill, chunked prefill, two decode steps
        for cache in layers:
            k, v = (torch.randn(2, 2, q_len, 16, generator=gen) for _ in range(2))
            keys, values = cache.append(k, v)
            q = torch.randn(2, 8, q_len, 16, generator=gen)
            got = flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans)
            torch.testing.assert_close(got, reference.retrieval_attention(q, keys, values, None, 0.25), atol=1e-5, rtol=1e-5)
    # one plan per step, shared by the three layers; capacity 320 -> pages of 64 tokens
    assert FakePagedWrapper.plans == [(False, 44, 10), (False, 51, 10), (True, 52, 10), (True, 53, 10)]
    assert FakePagedWrapper.created == 2  # one prefill wrapper (re-planned for Q = 7), one decode wrapper


def test_flashinfer_wrappers_do_not_grow_with_query_lengths(fake_flashinfer, monkeypatch):
    """Chunks of ever new lengths re-plan one prefill wrapper; many head shapes keep at most max_wrappers."""
    plans = flashinfer_retrieval.FlashInferPlans(max_wrappers=3)
    cache = RetrievalKV.empty(torch.empty(1, 2, 1, 16), capacity=512)
    for q_len in range(2, 12):
        keys, values = cache.append(torch.randn(1, 2, q_len, 16), torch.randn(1, 2, q_len, 16))
        flashinfer_retrieval.retrieval_attention(torch.randn(1, 4, q_len, 16), keys, values, None, 0.25, plans=plans)
    assert len(plans.wrappers) == 1 and FakePagedWrapper.created == 1
    for heads in (2, 4, 6, 8, 10):
        flashinfer_retrieval.retrieval_attention(torch.randn(1, heads, 3, 16), keys, values, None, 0.25, plans=plans)
    assert len(plans.wrappers) == 3


def test_flashinfer_never_plans_inside_a_graph_capture(fake_flashinfer, monkeypatch):
    """A step planned before the capture runs inside it (the replayed graph reads the fixed buffers); a step that
    needs a new plan raises with the fix instead of planning on the host mid-capture."""
    plans = flashinfer_retrieval.FlashInferPlans()
    cache = RetrievalKV.empty(torch.empty(1, 2, 1, 16), capacity=256)
    keys, values = cache.append(torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
    q = torch.randn(1, 4, 1, 16)
    flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans)  # the eager step plans
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    expected = reference.retrieval_attention(q, keys, values, None, 0.25)
    torch.testing.assert_close(
        flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans), expected, atol=1e-5, rtol=1e-5
    )
    keys, values = cache.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    with pytest.raises(flashinfer_retrieval.PlanInCaptureError, match="cannot plan inside a CUDA-graph capture"):
        flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans)
