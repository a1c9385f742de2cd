"""A FlashInfer wrapper that a captured CUDA graph replays is pinned: evicting or replacing it must not free (or
re-plan) the buffers the graph reads, until the graph is gone."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_kernels_retrieval import FakePagedWrapper, fake_flashinfer  # noqa: F401 (the fixture)

from duohead.cache import RetrievalKV
from duohead.kernels import flashinfer_retrieval, reference


class Owner:
    """Stands in for a torch.cuda.CUDAGraph on the CPU: something a weak reference can follow."""


def test_a_captured_wrapper_outlives_eviction_and_replanning_until_its_graph_dies(fake_flashinfer, monkeypatch):  # noqa: F811
    plans = flashinfer_retrieval.FlashInferPlans(max_wrappers=1)
    cache = RetrievalKV.empty(torch.empty(1, 2, 1, 16), capacity=256)
    keys, values = cache.append(torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
    q = torch.randn(1, 4, 1, 16)
    flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans)  # the eager step plans
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans)  # "captured"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    (entry,) = plans.wrappers.values()
    captured = weakref.ref(entry.wrapper)
    plan = (entry.wrapper.indices.clone(), entry.wrapper.last.clone())
    del entry

    keys, values = cache.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))  # a new geometry: not re-planned
    got = flashinfer_retrieval.retrieval_attention(q, keys, values, None, 0.25, plans=plans)
    torch.testing.assert_close(got, reference.retrieval_attention(q, keys, values, None, 0.25), atol=1e-5, rtol=1e-5)
    flashinfer_retrieval.retrieval_attention(torch.randn(1, 2, 1, 16), keys, values, None, 0.25, plans=plans)  # evicts the rest
    gc.collect()
    assert captured() is not None and all(e.wrapper is not captured() for e in plans.wrappers.values())
    assert torch.equal(captured().indices, plan[0]) and torch.equal(captured().last, plan[1])  # the captured plan

    graph = Owner()
    flashinfer_retrieval.pin_to(graph, plans)
    gc.collect()
    assert captured() is not None  # the graph lives
    del graph
    gc.collect()
    assert captured() is None and plans.pinned == []


CUDA_FLASHINFER = torch.cuda.is_available() and flashinfer_retrieval.available()


@pytest.mark.skipif(
    not CUDA_FLASHINFER, reason="needs a CUDA device and flashinfer (a real graph capture); the CPU test above fakes both"
)
def test_graph_replay_after_its_wrapper_was_evicted_and_replaced(monkeypatch):
    """Capture a decode step (warm-up on a side stream, as PyTorch documents), evict and replace its wrapper, churn
    the allocator, replay: the output is still the reference's."""
    plans = flashinfer_retrieval.FlashInferPlans(max_wrappers=1)
    torch.manual_seed(0)
    like = torch.empty(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    cache = RetrievalKV.empty(like, capacity=4096)
    keys, values = cache.append(*(torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    expected = reference.retrieval_attention(q.float(), keys.float(), values.float(), None, 128**-0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flashinfer_retrieval.retrieval_attention(q, keys, values, None, 128**-0.5, plans=plans)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashinfer_retrieval.retrieval_attention(q, keys, values, None, 128**-0.5, plans=plans)
    flashinfer_retrieval.pin_to(graph, plans)

    more_keys, more_values = cache.append(*(torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
    flashinfer_retrieval.retrieval_attention(q, more_keys, more_values, None, 128**-0.5, plans=plans)  # replaces it
    flashinfer_retrieval.retrieval_attention(
        q[:, :16], more_keys[:, :4], more_values[:, :4], None, 128**-0.5, plans=plans
    )  # evicts
    gc.collect()
    junk = [torch.full((1 << 20,), -1, dtype=torch.int32, device="cuda") for _ in range(64)]  # reuses freed memory
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    del junk
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    del graph
    gc.collect()
    assert plans.pinned == []
