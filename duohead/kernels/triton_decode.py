"""Triton decode for streaming heads: attention of one new token per row and its cache write in one launch,
split over the keys (split-K) with a small combine launch when B * Hkv programs would leave the GPU idle.

Shape letters as in `duohead.kernels.triton_streaming` (B, Hq, Hkv = Hq / G, D, S sink slots, W ring slots).
Tensors (last dim contiguous; other strides passed to the kernel):
    q, out            [B, Hq, 1, D]    strides (b, h); padding tokens (q_pos = -1) get 0
    k, v              [B, Hkv, 1, D]   the new token's key/value, written into the cache by the kernel
    q_pos             [B, 1] int64     real position of the new token (any row stride)
    cache             a `StreamingView` (sink_*, ring_* as in `triton_streaming`); updated in place
    PartAcc, PartML   fp32 partial softmax states [B * Hkv, SPLITS, ROWS, BLOCK_D] and [B * Hkv, SPLITS, 2, ROWS]

Grid (SPLITS, B * Hkv); ROWS = the G query heads of one KV head, padded to >= 16 (the smallest `tl.dot`).
Semantics: `reference.streaming_attention` then `reference.streaming_append` (`streaming_decode` below).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from duohead.kernels.streaming_view import StreamingView
from duohead.kernels.triton_common import attend_range, interpreted, kernel_strides, last_dim_contiguous, score_change_args


@triton.jit
def _streaming_decode_kernel(
    Q,
    K,
    V,
    QPos,
    SinkK,
    SinkV,
    SinkPos,
    RingK,
    RingV,
    RingPos,
    Out,
    PartAcc,
    PartML,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_pb,
    stride_skb,
    stride_skh,
    stride_skt,
    stride_svb,
    stride_svh,
    stride_svt,
    stride_spb,
    stride_spt,
    stride_rkb,
    stride_rkh,
    stride_rkt,
    stride_rvb,
    stride_rvh,
    stride_rvt,
    stride_rpb,
    stride_rpt,
    stride_ob,
    stride_oh,
    num_kv_heads,
    sink_slots,
    ring_slots,
    sink,
    window,
    qk_scale,
    keys_per_split,
    Sinks,
    softcap2,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
):
    """Grid (SPLITS, B * Hkv). Program (s, b, h) attends the G query heads of KV head h over keys
    [s * keys_per_split, (s + 1) * keys_per_split) of the sequence sink slots | ring slots | the new token, and split 0
    stores the new token's key/value (and, for h = 0, its position) in the slot it takes. That slot's old content
    is never visible (a ring slot holds position p - R with R >= W; a sink slot p is empty), so every program skips
    it and the write races with no reader. SPLITS = 1 writes Out; else partial (acc, m, l) for the combine."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_head = h * GROUP + rows

    p = tl.load(QPos + b * stride_pb)  # the new token's real position (-1: padding)
    real = p >= 0
    q_pos = tl.zeros([ROWS], dtype=tl.int64) + p
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    sink_slot = tl.where(real & (p < sink_slots), p, -1)  # where the new token goes; -1: not there
    ring_slot = tl.where(real & (p >= sink_slots), (p - sink_slots) % tl.maximum(ring_slots, 1), -1)

    n_keys = tl.where(real, sink_slots + ring_slots + 1, 0)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_SINKS:  # a learned logit per query head (base 2): a key without a value, in split 0's state only
        carries = row_ok & (rows * 0 + pid_s == 0)  # (a vector compare: the interpreter takes no scalar in a mask)
        sink_logit = tl.load(Sinks + q_head, mask=carries, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(carries, sink_logit, m_i)
        l_i = tl.where(carries, 1.0, l_i)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = attend_range(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        SinkK + b * stride_skb + h * stride_skh,
        SinkV + b * stride_svb + h * stride_svh,
        SinkPos + b * stride_spb,
        stride_skt,
        stride_svt,
        stride_spt,
        tl.minimum(lo, sink_slots).to(tl.int32),
        tl.maximum(tl.minimum(hi, sink_slots), 0).to(tl.int32),
        sink,
        window,
        qk_scale,
        softcap2,
        SOFTCAP,
        offs_d,
        d_mask,
        sink_slot,
        BLOCK_N,
        IEEE_DOT,
        False,  # slots of the cache and the one new token: int32 offsets
    )
    ring_lo = tl.minimum(tl.maximum(lo - sink_slots, 0), ring_slots)
    ring_hi = tl.minimum(tl.maximum(hi - sink_slots, 0), ring_slots)
    acc, m_i, l_i = attend_range(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        RingK + b * stride_rkb + h * stride_rkh,
        RingV + b * stride_rvb + h * stride_rvh,
        RingPos + b * stride_rpb,
        stride_rkt,
        stride_rvt,
        stride_rpt,
        ring_lo.to(tl.int32),
        ring_hi.to(tl.int32),
        sink,
        window,
        qk_scale,
        softcap2,
        SOFTCAP,
        offs_d,
        d_mask,
        ring_slot,
        BLOCK_N,
        IEEE_DOT,
        False,  # slots of the cache and the one new token: int32 offsets
    )
    new_k = K + b * stride_kb + h * stride_kh
    new_v = V + b * stride_vb + h * stride_vh
    self_slot = sink_slots + ring_slots
    has_self = (lo <= self_slot) & (self_slot < hi)
    acc, m_i, l_i = attend_range(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        new_k,
        new_v,
        QPos + b * stride_pb,
        0,
        0,
        0,
        0,
        tl.where(has_self, 1, 0).to(tl.int32),
        sink,
        window,
        qk_scale,
        softcap2,
        SOFTCAP,
        offs_d,
        d_mask,
        -1,
        BLOCK_N,
        IEEE_DOT,
        False,  # slots of the cache and the one new token: int32 offsets
    )

    if SPLITS == 1:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]  # a padding token saw nothing: acc = 0
        o_ptrs = Out + b * stride_ob + q_head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    else:
        part = pid_bh.to(tl.int64) * SPLITS + pid_s
        tl.store(PartAcc + (part * ROWS + rows[:, None]) * BLOCK_D + offs_d[None, :], acc)
        tl.store(PartML + (part * 2) * ROWS + rows, m_i)
        tl.store(PartML + (part * 2 + 1) * ROWS + rows, l_i)

    if pid_s == 0:  # the cache write: after this program's reads; other programs skip the slot
        p_d = tl.zeros([BLOCK_D], dtype=tl.int64) + p  # the scalars as vectors over D: masks of one shape
        sink_d = d_mask & (p_d >= 0) & (p_d < sink_slots)
        ring_d = d_mask & (p_d >= sink_slots)
        kv = tl.load(new_k + offs_d, mask=sink_d | ring_d, other=0.0)
        vv = tl.load(new_v + offs_d, mask=sink_d | ring_d, other=0.0)
        tl.store(SinkK + b * stride_skb + h * stride_skh + sink_slot * stride_skt + offs_d, kv, mask=sink_d)
        tl.store(SinkV + b * stride_svb + h * stride_svh + sink_slot * stride_svt + offs_d, vv, mask=sink_d)
        tl.store(RingK + b * stride_rkb + h * stride_rkh + ring_slot * stride_rkt + offs_d, kv, mask=ring_d)
        tl.store(RingV + b * stride_rvb + h * stride_rvh + ring_slot * stride_rvt + offs_d, vv, mask=ring_d)
        if h == 0:  # positions are per row, shared by the heads; one lane writes
            first = offs_d == 0
            tl.store(SinkPos + b * stride_spb + sink_slot * stride_spt + offs_d * 0, p_d, mask=first & sink_d)
            tl.store(RingPos + b * stride_rpb + ring_slot * stride_rpt + offs_d * 0, p_d, mask=first & ring_d)


@triton.jit
def _combine_splits_kernel(
    PartAcc,
    PartML,
    Out,
    stride_ob,
    stride_oh,
    num_kv_heads,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Grid (B * Hkv): merge the SPLITS partial softmax states of one KV head's G query heads and write Out."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for s in range(SPLITS):
        part = pid_bh.to(tl.int64) * SPLITS + s
        m_s = tl.load(PartML + (part * 2) * ROWS + rows)
        l_s = tl.load(PartML + (part * 2 + 1) * ROWS + rows)
        acc_s = tl.load(PartAcc + (part * ROWS + rows[:, None]) * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    q_head = h * GROUP + rows
    o_ptrs = Out + b * stride_ob + q_head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :])


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors on CUDA; 0 under the CPU interpreter (it runs programs one by one: never split)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def decode_splits(rows: int, keys: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) for a decode over `keys` keys with B * Hkv = `rows` programs per split: enough splits
    for about two programs per SM, each at least one key tile; a multiple of BLOCK_N keys per split."""
    tiles = triton.cdiv(keys, block_n)
    wanted = max(1, min(tiles, triton.cdiv(2 * _multiprocessors(device), max(rows, 1))))
    per_split = triton.cdiv(tiles, wanted) * block_n
    return triton.cdiv(keys, per_split), per_split


def streaming_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    cache: StreamingView,
    scaling: float,
    out: Tensor,
    splits: int | None = None,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> None:
    """One decode step of the streaming heads: Λ attention of one new token per row over the cache and itself,
    then its key/value stored in the cache, in place; writes out.

    q, out [B, Hq, 1, D]; k, v [B, Hkv, 1, D]; q_pos [B, 1] (any strides); cache as in
    `triton_streaming.streaming_attention`; softcap / sinks [Hq] as there. Semantics of `reference.streaming_attention`
    then `reference.streaming_append`.
    One launch when B * Hkv programs fill the GPU, else the keys are split (`splits`: None = by device) and a
    second small launch combines the splits. No host sync.
    """
    batch, num_q_heads, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if batch == 0 or num_kv_heads == 0:
        return
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos = cache.tensors()
    q, k, v, sink_k, sink_v, ring_k, ring_v = map(last_dim_contiguous, (q, k, v, sink_k, sink_v, ring_k, ring_v))
    group = num_q_heads // num_kv_heads
    rows, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))
    block_n = 16 if interpreted() else 64
    keys = cache.sink_slots + cache.ring_slots + 1
    if splits is None:
        splits, per_split = decode_splits(batch * num_kv_heads, keys, block_n, q.device)
    else:
        per_split = triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n
        splits = triton.cdiv(keys, per_split)
    part_acc = part_ml = out  # unused placeholders when not split
    if splits > 1:
        part_acc = torch.empty(batch * num_kv_heads * splits * rows * block_d, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(batch * num_kv_heads * splits * 2 * rows, device=q.device, dtype=torch.float32)
    _streaming_decode_kernel[(splits, batch * num_kv_heads)](
        q,
        k,
        v,
        q_pos,
        sink_k,
        sink_v,
        sink_pos,
        ring_k,
        ring_v,
        ring_pos,
        out,
        part_acc,
        part_ml,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_pos.stride(0),
        *kernel_strides(sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos),
        out.stride(0),
        out.stride(1),
        num_kv_heads,
        cache.sink_slots,
        cache.ring_slots,
        cache.sink,
        cache.window,
        scaling * 1.4426950408889634,
        per_split,
        GROUP=group,
        ROWS=rows,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        SPLITS=splits,
        IEEE_DOT=q.dtype == torch.float32,
        **score_change_args(q, softcap, sinks),
        num_warps=4,
        num_stages=1 if q.dtype == torch.float32 else 2,
    )
    if splits > 1:
        _combine_splits_kernel[(batch * num_kv_heads,)](
            part_acc,
            part_ml,
            out,
            out.stride(0),
            out.stride(1),
            num_kv_heads,
            GROUP=group,
            ROWS=rows,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            SPLITS=splits,
            num_warps=4,
        )
