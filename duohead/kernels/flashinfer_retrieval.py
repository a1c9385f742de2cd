"""FlashInfer for retrieval heads: causal GQA prefill and decode over the retrieval KV, read in place as a paged cache.

Shape letters: B batch, Hq query heads, Hkv KV heads (Hq = G * Hkv), Q new tokens, T tokens in the cache,
D head dim, C cache capacity, P page size.

`RetrievalKV` stores keys and values as [B, Hkv, C, D] buffers and hands out views k, v [B, Hkv, T, D]
with strides (Hkv*C*D, C*D, D, 1). FlashInfer's HND paged cache is [pages, Hkv, P, D] with any strides,
so the same memory is viewed, without a copy, as pages of P tokens: page (b, p) starts at element
b*Hkv*C*D + p*P*D, i.e. page index b*(Hkv*C/P) + p, with strides (P*D, C*D, D, 1). Row b uses pages
b*(Hkv*C/P) + [0, ceil(T/P)), the last one holding T - (ceil(T/P) - 1) * P tokens. P is the largest of
64, 32, ..., 1 that divides C, so long rows split into many pages and FlashInfer's split-KV scheduler
keeps the whole GPU busy in decode.

One plan serves every layer of a step: wrappers are kept by their owner (`FlashInferPlans`: one per `DuoCache`,
`DEFAULT_PLANS` without one) under the static problem (kind, B, Hq, Hkv, D, dtype, scale; at most `MAX_WRAPPERS`,
least recently used first out) and re-planned only when Q, T or the page geometry changes. Decode wrappers are
FlashInfer's CUDA-graph variant (`use_cuda_graph=True` with fixed index buffers): a captured step replays as long
as it was planned before the capture (`plan` raises inside a capture instead of planning there). A wrapper used
inside a capture is pinned: never re-planned, evicted or replaced (a new geometry gets a new wrapper), so the
buffers the graph reads stay alive and unchanged; `pin_to(graph)` ties the pins taken since the last call to that
graph's lifetime (without it they last as long as their owner). Written against the keyword APIs that flashinfer
0.6.x and 0.7.x share (`plan(indptr, indices, last_page_len, ...)`, `run(q, (k, v), out=)`). Inputs FlashInfer
cannot take (padding, fp32, other head dims, CPU) are the caller's to route elsewhere: see `supports`.
"""

from __future__ import annotations

import importlib.util
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

PAGE_SIZES = (64, 32, 16, 8, 4, 2, 1)
HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 128 << 20
MAX_WRAPPERS = 8  # planned wrappers kept (each holds FlashInfer's plan and a few small index buffers)
PREFILL_BACKEND = "fa2"  # shares one compiled module with tensor-core decode; "auto" lets FlashInfer pick (FA3 on Hopper)
_UINT32_MAX = (1 << 32) - 1


def available() -> bool:
    """Whether the flashinfer package is installed (it imports on CPU too; running needs CUDA)."""
    return importlib.util.find_spec("flashinfer") is not None


@dataclass(frozen=True)
class PagedView:
    """The retrieval KV as FlashInfer pages: keys, values [N, Hkv, P, D]; row b uses pages
    b * row_pages + [0, used), the last one holding last_len tokens."""

    keys: torch.Tensor
    values: torch.Tensor
    page_size: int
    row_pages: int
    used: int
    last_len: int

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        return self.page_size, self.row_pages, self.used, self.last_len

    def plan_tensors(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """indptr [B + 1], indices [B * used], last_page_len [B], int32 on the CPU (FlashInfer's `plan` copies them)."""
        pages = torch.arange(self.used, dtype=torch.int32)
        indices = (torch.arange(batch, dtype=torch.int32)[:, None] * self.row_pages + pages).flatten()
        indptr = torch.arange(batch + 1, dtype=torch.int32) * self.used
        return indptr, indices, torch.full((batch,), self.last_len, dtype=torch.int32)


def _page_size(k: torch.Tensor) -> int | None:
    """The largest page size P such that k [B, Hkv, T, D] splits into whole pages of strides (P*D, k.stride(1), D, 1)."""
    _, _, _, head_dim = k.shape
    row_stride, head_stride = k.stride(0), k.stride(1)
    if k.stride(3) != 1 or k.stride(2) != head_dim or head_stride > _UINT32_MAX:
        return None
    for page in PAGE_SIZES:
        if row_stride % (page * head_dim) == 0 and head_stride % (page * head_dim) == 0:
            return page
    return None


def paged_view(k: torch.Tensor, v: torch.Tensor) -> PagedView | None:
    """View k, v [B, Hkv, T, D] (see the module docstring) as FlashInfer HND pages; None if their strides do not allow it."""
    page = _page_size(k)
    if page is None or k.stride() != v.stride():
        return None
    batch, num_kv_heads, kv_len, head_dim = k.shape
    row_pages = k.stride(0) // (page * head_dim)
    used = -(-kv_len // page)
    size = ((batch - 1) * row_pages + used, num_kv_heads, page, head_dim)
    stride = (page * head_dim, k.stride(1), head_dim, 1)
    return PagedView(
        keys=torch.as_strided(k, size, stride, k.storage_offset()),
        values=torch.as_strided(v, size, stride, v.storage_offset()),
        page_size=page,
        row_pages=row_pages,
        used=used,
        last_len=kv_len - (used - 1) * page,
    )


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_is_real: torch.Tensor | None) -> bool:
    """Whether `retrieval_attention` below can take these inputs (else use SDPA): CUDA, fp16/bf16, D in 64/128/256,
    no padding, and strides that form pages."""
    return (
        q.is_cuda
        and key_is_real is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype == v.dtype
        and k.stride() == v.stride()
        and q.shape[-1] in HEAD_DIMS
        and q.shape[1] % k.shape[1] == 0
        and _page_size(k) is not None
    )


class PlanInCaptureError(RuntimeError):
    """A FlashInfer plan was needed while a CUDA graph was being captured (plan before capturing)."""


@dataclass
class _Planned:
    wrapper: Any
    geometry: tuple[int, ...] | None = None
    index_capacity: int = 0  # decode: length of the fixed page-index buffer
    pinned: bool = False  # used inside a CUDA-graph capture: frozen (see the module docstring)


_workspaces: dict[torch.device, torch.Tensor] = {}  # FlashInfer's scratch space: used within one call, shared by all


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


def _new_wrapper(decode: bool, device: torch.device, batch: int, pages: int, tensor_cores: bool) -> _Planned:
    """A decode wrapper in CUDA-graph mode (fixed buffers for indptr [B + 1], `pages` page indices and
    last_page_len [B]), or a prefill wrapper."""
    import flashinfer

    workspace = _workspace(device)
    if not decode:
        return _Planned(flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "HND", backend=PREFILL_BACKEND))
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "HND",
        use_cuda_graph=True,
        use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=device),
        paged_kv_indices_buffer=torch.zeros(pages, dtype=torch.int32, device=device),
        paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=device),
    )
    return _Planned(wrapper, index_capacity=pages)


class FlashInferPlans:
    """Planned FlashInfer wrappers and their owner: each `DuoCache` holds one for its layers (`DuoCache.plans`), so
    a cache's plans live and die with it and two caches never evict each other's; forwards without a cache use
    `DEFAULT_PLANS`. At most `max_wrappers` are kept, least recently used first out; a wrapper used inside a CUDA-graph
    capture is pinned (see the module docstring)."""

    def __init__(self, max_wrappers: int = MAX_WRAPPERS) -> None:
        self.max_wrappers = max_wrappers
        self.wrappers: OrderedDict[tuple, _Planned] = OrderedDict()
        self.pinned: list[_Planned] = []  # wrappers a captured graph may replay: alive while they are here
        self.unowned: list[_Planned] = []  # pinned since the last `pin_to`

    def _unpin(self, entries: list[_Planned]) -> None:
        for entry in entries:
            entry.pinned = False
            self.pinned.remove(entry)

    def pin_to(self, graph: Any) -> None:
        """Keep the wrappers pinned by the captures since the last call pinned while `graph` (a torch.cuda.CUDAGraph,
        or any object that owns the capture) lives; then they are evicted or re-planned as usual."""
        owned = list(self.unowned)
        self.unowned.clear()
        weakref.finalize(graph, self._unpin, owned)

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> Any:
        """The wrapper for this problem, planned for it: q [B, Hq, Q, D]; k, v [B, Hkv, T, D] (see `supports`).
        Layers with the same heads share one plan per step. Call it before capturing a CUDA graph of a step (a first
        eager step does); inside a capture a problem that needs a new plan raises `PlanInCaptureError`."""
        batch, num_q_heads, q_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        pages = paged_view(k, v)
        decode = q_len == 1
        key = (decode, q.device, batch, num_q_heads, num_kv_heads, head_dim, q.dtype, float(scaling))
        geometry = (q_len, *pages.geometry)
        entry = self.wrappers.get(key)
        capturing = _capturing()
        if entry is not None and entry.geometry == geometry:
            self.wrappers.move_to_end(key)
            if capturing and not entry.pinned:
                entry.pinned = True
                self.pinned.append(entry)
                self.unowned.append(entry)
            return entry.wrapper
        if capturing:
            raise PlanInCaptureError(
                "FlashInfer cannot plan inside a CUDA-graph capture: run the step once eagerly (or call "
                "duohead.kernels.flashinfer_retrieval.plan(q, k, v, scaling)) before capturing it"
            )
        needed = batch * pages.row_pages
        if entry is None or entry.pinned or (decode and entry.index_capacity < needed):
            entry = _new_wrapper(decode, q.device, batch, needed, num_q_heads // num_kv_heads >= 4)
            self.wrappers[key] = entry  # a pinned one it replaces lives on in self.pinned
            while len(self.wrappers) > self.max_wrappers:
                self.wrappers.popitem(last=False)
        self.wrappers.move_to_end(key)
        indptr, indices, last_page_len = pages.plan_tensors(batch)
        common = dict(sm_scale=float(scaling), q_data_type=q.dtype, kv_data_type=k.dtype)
        if decode:
            entry.wrapper.plan(indptr, indices, last_page_len, num_q_heads, num_kv_heads, head_dim, pages.page_size, **common)
        else:
            qo_indptr = torch.arange(batch + 1, dtype=torch.int32) * q_len
            entry.wrapper.plan(
                qo_indptr,
                indptr,
                indices,
                last_page_len,
                num_q_heads,
                num_kv_heads,
                head_dim,
                pages.page_size,
                causal=True,
                **common,
            )
        entry.geometry = geometry
        return entry.wrapper


DEFAULT_PLANS = FlashInferPlans()  # the owner of forwards without a DuoCache (and of direct kernel calls)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, plans: FlashInferPlans | None = None) -> Any:
    """`FlashInferPlans.plan` of `plans` (default `DEFAULT_PLANS`)."""
    return (plans or DEFAULT_PLANS).plan(q, k, v, scaling)


def pin_to(graph: Any, plans: FlashInferPlans | None = None) -> None:
    """`FlashInferPlans.pin_to` of `plans` (default `DEFAULT_PLANS`)."""
    (plans or DEFAULT_PLANS).pin_to(graph)


def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_is_real: torch.Tensor | None,
    scaling: float,
    plans: FlashInferPlans | None = None,
) -> torch.Tensor:
    """Causal attention of the Q newest tokens over all T cached tokens, with FlashInfer.

    q [B, Hq, Q, D]; k, v [B, Hkv, T, D] (the last Q slots are the queries' own keys); key_is_real must be None
    (padding is not supported here; check `supports` first). -> [B, Hq, Q, D], a view of a new [B, Q, Hq, D] tensor.
    Query slot T - Q + i sees key slots <= T - Q + i (FlashInfer's bottom-right causal alignment).
    """
    if not supports(q, k, v, key_is_real):
        raise ValueError("flashinfer retrieval_attention: unsupported input (needs CUDA, fp16/bf16, D in 64/128/256, no padding)")
    batch, num_q_heads, q_len, head_dim = q.shape
    wrapper = plan(q, k, v, scaling, plans)
    pages = paged_view(k, v)
    q_flat = q.transpose(1, 2).reshape(batch * q_len, num_q_heads, head_dim).contiguous()  # [B*Q, Hq, D]
    out = torch.empty_like(q_flat)
    wrapper.run(q_flat, (pages.keys, pages.values), out=out)
    return out.view(batch, q_len, num_q_heads, head_dim).transpose(1, 2)
