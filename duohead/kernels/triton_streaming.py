"""Triton Λ-attention for streaming heads: one kernel for any Q (prefill, chunked prefill, decode), the cache-write
kernel, "attend then store" (decode: the fused kernel of `duohead.kernels.triton_decode`), and the torch.library
ops that torch.compile traces in their place.

Shape letters: B batch, Hq query heads, Hkv KV heads (Hq = G * Hkv), Q new tokens, D head dim,
S sink slots, W ring slots. Same contract as `duohead.kernels.reference.streaming_attention`.

Tensors (last dim contiguous; every other stride is passed to the kernel):
    q, out            [B, Hq, Q, D]    strides (b, h, t); out is written in full (padding rows get 0)
    k, v              [B, Hkv, Q, D]   the new tokens' keys/values, not yet in the cache
    q_pos             [B, Q] int64     real positions of the new tokens, -1 = padding
    cache             a `StreamingView`, taken apart only where a kernel is launched or an op is called:
      sink_k, sink_v  [B, Hkv, S, D]   cached tokens at positions < sink; sink_pos [B, S] int64
      ring_k, ring_v  [B, Hkv, W, D]   cached tokens at positions >= sink; ring_pos [B, W] int64

Grid: (ceil(Q / BLOCK_Q), B * Hkv). One program owns BLOCK_Q new tokens of one KV head and all G query
heads that share it: its BLOCK_M = G_PAD * BLOCK_Q rows are (query head g, token t), so every key tile
is loaded once for the whole group. Per program, keys come from four ranges, visited in tiles of BLOCK_N
with an online softmax and the Λ rule applied inside each tile:
    1. the sink cache (S slots);
    2. the ring (W slots), skipped when the window of the block's earliest query starts inside this call;
    3. the new tokens that are sinks (real positions < sink);
    4. the new tokens in the window of the block's queries: slots [first query - window + 1, last query].
Ranges 3 and 4 are cut so they never overlap. Real tokens of a row are contiguous, so a new token's
position is its slot minus one per-row offset; the ranges follow from that offset. New tokens outside
sink ∪ window are never loaded: the work is O(Q * (S + W)).
Offsets: batch and head indices are int64 before they meet a stride. A token slot times Hq * D passes 2^31 past
512K tokens of Llama-3-8B's layout: a launch whose tensors reach that far (`needs_int64`) takes the WIDE variant,
with token slots in int64 too; the others keep int32 slots, which cost fewer registers (ptxas: int64 slots
everywhere spilled in the bf16 prefill and decode kernels). tests/test_kernels_offsets.py checks past 4M tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from duohead.kernels.streaming_view import StreamingView
from duohead.kernels.triton_common import (
    attend_range,
    interpreted,
    kernel_strides,
    last_dim_contiguous,
    needs_int64,
    score_change_args,
)
from duohead.kernels.triton_decode import streaming_decode

_FAR = tl.constexpr(1 << 40)  # larger than any slot or position


@triton.jit
def _streaming_attention_kernel(
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
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_pb,
    stride_pt,
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
    stride_ot,
    num_kv_heads,
    q_len,
    sink_slots,
    ring_slots,
    sink,
    window,
    qk_scale,
    Sinks,
    softcap2,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
    WIDE: tl.constexpr = False,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, GROUP_PAD * BLOCK_Q)  # BLOCK_M rows: (query head g, token t)
    g = rows // BLOCK_Q
    t = pid_q * BLOCK_Q + rows % BLOCK_Q
    if WIDE:  # token slot * stride passes 2^31 (see the header)
        t = t.to(tl.int64)
    row_ok = (g < GROUP) & (t < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_head = h * GROUP + g

    q_pos = tl.load(QPos + b * stride_pb + t * stride_pt, mask=row_ok, other=-1)
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    # Per-row geometry of this block: real queries share offset = slot - position.
    real = row_ok & (q_pos >= 0)
    has_real = tl.max(real.to(tl.int32), 0) > 0
    offset = tl.max(tl.where(real, t - q_pos, -_FAR), 0)
    first = tl.min(tl.where(real, t, q_len), 0)  # slot of the block's earliest real query
    last = tl.max(tl.where(real, t, -1), 0)
    # Is the earliest query's window inside this call's tokens? Then the ring is too old for every row.
    win_slot = first - window + 1
    win_pos = tl.load(QPos + b * stride_pb + win_slot * stride_pt, mask=has_real & (win_slot >= 0), other=-1)
    sink_end = tl.where(has_real, sink_slots, 0)
    ring_end = tl.where(has_real & (win_pos < 0), ring_slots, 0)
    new_sink_start = tl.maximum(offset, 0)
    new_sink_end = tl.where(has_real, tl.minimum(offset + sink, last + 1), 0)
    new_win_start = tl.maximum(tl.maximum(win_slot, 0), tl.maximum(new_sink_end, 0))
    new_win_end = tl.where(has_real, last + 1, 0)

    m_i = tl.full([GROUP_PAD * BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD * BLOCK_Q], dtype=tl.float32)
    if HAS_SINKS:  # a learned logit per query head (base 2): a key without a value that every query sees once
        sink_logit = tl.load(Sinks + q_head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(row_ok, sink_logit, m_i)
        l_i = tl.where(row_ok, 1.0, l_i)
    acc = tl.zeros([GROUP_PAD * BLOCK_Q, BLOCK_D], dtype=tl.float32)
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
        0,
        sink_end.to(tl.int32),
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
        False,  # cache slots: int32 offsets
    )
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
        0,
        ring_end.to(tl.int32),
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
        False,
    )
    new_k = K + b * stride_kb + h * stride_kh
    new_v = V + b * stride_vb + h * stride_vh
    new_pos = QPos + b * stride_pb
    acc, m_i, l_i = attend_range(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        new_k,
        new_v,
        new_pos,
        stride_kt,
        stride_vt,
        stride_pt,
        new_sink_start.to(tl.int32),
        new_sink_end.to(tl.int32),
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
        WIDE,  # the new tokens' slots
    )
    acc, m_i, l_i = attend_range(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        new_k,
        new_v,
        new_pos,
        stride_kt,
        stride_vt,
        stride_pt,
        new_win_start.to(tl.int32),
        new_win_end.to(tl.int32),
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
        WIDE,
    )

    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # a row that saw nothing has acc = 0
    o_ptrs = Out + b * stride_ob + q_head[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


def launch_config(group: int, q_len: int, head_dim: int) -> dict[str, int]:
    """Tile sizes for a launch: G query heads per KV head, Q new tokens, D head dim.

    BLOCK_M = G_PAD * BLOCK_Q rows per program (at least 16, the smallest `tl.dot`); decode packs the group's
    heads into those rows, prefill takes 64 (interpreter: 32) rows. Key tiles of BLOCK_N (interpreter: 16).
    """
    group_pad = triton.next_power_of_2(group)
    rows = 32 if interpreted() else 64
    decode = q_len * group_pad <= 16
    if decode:
        block_q = max(triton.next_power_of_2(q_len), 16 // group_pad, 1)
    else:
        block_q = max(rows // group_pad, 1)
    block_n = 16 if interpreted() else (128 if decode else 64)  # decode is latency bound: fewer, larger key tiles
    num_warps = 4 if group_pad * block_q <= 64 else 8
    block_d = max(16, triton.next_power_of_2(head_dim))
    return {"GROUP_PAD": group_pad, "BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps}


def streaming_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    cache: StreamingView,
    scaling: float,
    out: Tensor | None = None,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Λ-masked attention of Q new tokens over the streaming cache plus themselves (streaming heads).

    q [B, Hq, Q, D]; k, v [B, Hkv, Q, D]; q_pos [B, Q]; cache (read only) as in the header; out [B, Hq, Q, D] or
    None (allocated); softcap / sinks [Hq]: as in `reference.masked_attention`. -> [B, Hq, Q, D]. Semantics of
    `duohead.kernels.reference.streaming_attention`; one launch (under torch.compile: the op duohead::streaming_attention).
    """
    out = _checked_out(q, out)
    if torch.compiler.is_compiling():
        _call_op(torch.ops.duohead.streaming_attention, q, k, v, q_pos, out, scaling, softcap, sinks, cache=cache)
    else:
        _launch_attention(q, k, v, q_pos, cache, scaling, out, softcap, sinks)
    return out


def _checked_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return q.new_empty(q.shape)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must have the shape of q {list(q.shape)} and a contiguous last dim")
    return out


def _launch_attention(q, k, v, q_pos, cache: StreamingView, scaling: float, out, softcap=None, sinks=None) -> None:
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q_heads == 0 or q_len == 0 or batch == 0:
        return
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos = cache.tensors()
    q, k, v, sink_k, sink_v, ring_k, ring_v = map(last_dim_contiguous, (q, k, v, sink_k, sink_v, ring_k, ring_v))
    group = num_q_heads // num_kv_heads
    cfg = launch_config(group, q_len, head_dim)
    grid = (triton.cdiv(q_len, cfg["BLOCK_Q"]), batch * num_kv_heads)
    _streaming_attention_kernel[grid](
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
        *kernel_strides(q, k, v, q_pos, sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos, out),
        num_kv_heads,
        q_len,
        cache.sink_slots,
        cache.ring_slots,
        cache.sink,
        cache.window,
        scaling * 1.4426950408889634,
        GROUP=group,
        GROUP_PAD=cfg["GROUP_PAD"],
        **score_change_args(q, softcap, sinks),
        BLOCK_Q=cfg["BLOCK_Q"],
        BLOCK_N=cfg["BLOCK_N"],
        HEAD_DIM=head_dim,
        BLOCK_D=cfg["BLOCK_D"],
        IEEE_DOT=q.dtype == torch.float32,
        WIDE=needs_int64(q, k, v, q_pos, out),
        num_warps=cfg["num_warps"],
        num_stages=1 if q.dtype == torch.float32 else 2,
    )


@triton.jit
def _streaming_append_kernel(
    K,
    V,
    Pos,
    Newest,
    SinkK,
    SinkV,
    SinkPos,
    RingK,
    RingV,
    RingPos,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_pb,
    stride_pt,
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
    stride_nb,
    num_kv_heads,
    q_len,
    sink_slots,
    ring_slots,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (ceil(Q / BLOCK_T), B * Hkv): one program copies BLOCK_T new tokens of one KV head to their slots."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # token slot: int64 offsets (t * stride_kt) at any Q
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    p = tl.load(Pos + b * stride_pb + t * stride_pt, mask=t < q_len, other=-1)
    newest = tl.load(Newest + b * stride_nb)  # a strided view when it is pos[:, 0]
    to_sink = (p >= 0) & (p < sink_slots)
    to_ring = (p >= sink_slots) & (p > newest - ring_slots)  # the last R real tokens: no ring slot is written twice
    sink_slot = tl.where(to_sink, p, 0)
    ring_slot = tl.where(to_ring, (p - sink_slots) % ring_slots, 0)
    moved = (to_sink | to_ring)[:, None] & d_mask[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + offs_d[None, :], mask=moved, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + offs_d[None, :], mask=moved, other=0.0)
    sink_mask = to_sink[:, None] & d_mask[None, :]
    ring_mask = to_ring[:, None] & d_mask[None, :]
    tl.store(SinkK + b * stride_skb + h * stride_skh + sink_slot[:, None] * stride_skt + offs_d[None, :], k, mask=sink_mask)
    tl.store(SinkV + b * stride_svb + h * stride_svh + sink_slot[:, None] * stride_svt + offs_d[None, :], v, mask=sink_mask)
    tl.store(RingK + b * stride_rkb + h * stride_rkh + ring_slot[:, None] * stride_rkt + offs_d[None, :], k, mask=ring_mask)
    tl.store(RingV + b * stride_rvb + h * stride_rvh + ring_slot[:, None] * stride_rvt + offs_d[None, :], v, mask=ring_mask)
    if h == 0:  # positions are per row, shared by the heads
        tl.store(SinkPos + b * stride_spb + sink_slot * stride_spt, p, mask=to_sink)
        tl.store(RingPos + b * stride_rpb + ring_slot * stride_rpt, p, mask=to_ring)


def streaming_append(keys: Tensor, values: Tensor, pos: Tensor, cache: StreamingView) -> None:
    """Store new tokens in the streaming cache, in place: semantics of `duohead.kernels.reference.streaming_append`.

    keys, values [B, Hkv, Q, D] at real positions pos [B, Q] (-1 = padding); cache (written) as in the header.
    One launch (plus a row-wise max for Q > 1), no host sync (under torch.compile: the op duohead::streaming_append).
    """
    if torch.compiler.is_compiling():
        _call_op(torch.ops.duohead.streaming_append, keys, values, pos, cache=cache)
    else:
        _launch_append(keys, values, pos, cache)


def _launch_append(keys, values, pos, cache: StreamingView) -> None:
    batch, num_kv_heads, q_len, head_dim = keys.shape
    if batch == 0 or num_kv_heads == 0 or q_len == 0:
        return
    keys, values = last_dim_contiguous(keys), last_dim_contiguous(values)
    sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos = cache.tensors()
    if any(t.stride(-1) != 1 for t in (sink_k, sink_v, ring_k, ring_v)):
        raise ValueError("the streaming cache buffers must have a contiguous last dim")
    newest = pos[:, 0] if q_len == 1 else pos.amax(dim=1)  # [B]; real tokens are the row's largest positions
    block_t = min(64, triton.next_power_of_2(q_len))
    grid = (triton.cdiv(q_len, block_t), batch * num_kv_heads)
    _streaming_append_kernel[grid](
        keys,
        values,
        pos,
        newest,
        sink_k,
        sink_v,
        sink_pos,
        ring_k,
        ring_v,
        ring_pos,
        *kernel_strides(keys, values, pos, sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos),
        newest.stride(0),
        num_kv_heads,
        q_len,
        cache.sink_slots,
        cache.ring_slots,
        BLOCK_T=block_t,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=4,
    )


def streaming_attention_and_append(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    cache: StreamingView,
    scaling: float,
    out: Tensor | None = None,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """`streaming_attention` then `streaming_append` of the same new tokens: q, out [B, Hq, Q, D]; k, v
    [B, Hkv, Q, D]; q_pos [B, Q]; cache (written) as in the header; softcap / sinks [Hq] as in `streaming_attention`.
    -> out (allocated if None). Decode (Q = 1) is one fused launch (`streaming_decode`); longer chunks are the two
    launches."""
    out = _checked_out(q, out)
    if q.shape[2] == 1:
        if torch.compiler.is_compiling():
            _call_op(torch.ops.duohead.streaming_decode, q, k, v, q_pos, out, scaling, softcap, sinks, cache=cache)
        else:
            streaming_decode(q, k, v, q_pos, cache, scaling, out, softcap=softcap, sinks=sinks)
        return out
    streaming_attention(q, k, v, q_pos, cache, scaling, out=out, softcap=softcap, sinks=sinks)
    streaming_append(k, v, q_pos, cache)
    return out


# ---- torch.library ops: what torch.compile traces (opaque to it; their fakes check shapes and write nothing) ----
# An op takes tensors and numbers, not a `StreamingView`: every op's arguments end with the view's eight fields
# (six tensors, sink, window). `_call_op` takes the view apart and each op (and fake) puts it back together: nowhere
# else is the cache passed as separate tensors.

_CACHE_ARGS = ("sink_k", "sink_v", "sink_pos", "ring_k", "ring_v", "ring_pos")


def _call_op(op, *args, cache: StreamingView) -> None:
    op(*args, *cache.tensors(), cache.sink, cache.window)


@torch.library.custom_op("duohead::streaming_attention", mutates_args=("out",))
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    out: Tensor,
    scaling: float,
    softcap: float | None,
    sinks: Tensor | None,
    sink_k: Tensor,
    sink_v: Tensor,
    sink_pos: Tensor,
    ring_k: Tensor,
    ring_v: Tensor,
    ring_pos: Tensor,
    sink: int,
    window: int,
) -> None:
    cache = StreamingView(sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos, sink, window)
    _launch_attention(q, k, v, q_pos, cache, scaling, out, softcap, sinks)


@torch.library.custom_op("duohead::streaming_append", mutates_args=_CACHE_ARGS)
def _append_op(
    keys: Tensor,
    values: Tensor,
    pos: Tensor,
    sink_k: Tensor,
    sink_v: Tensor,
    sink_pos: Tensor,
    ring_k: Tensor,
    ring_v: Tensor,
    ring_pos: Tensor,
    sink: int,
    window: int,
) -> None:
    _launch_append(keys, values, pos, StreamingView(sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos, sink, window))


@torch.library.custom_op("duohead::streaming_decode", mutates_args=("out", *_CACHE_ARGS))
def _decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    out: Tensor,
    scaling: float,
    softcap: float | None,
    sinks: Tensor | None,
    sink_k: Tensor,
    sink_v: Tensor,
    sink_pos: Tensor,
    ring_k: Tensor,
    ring_v: Tensor,
    ring_pos: Tensor,
    sink: int,
    window: int,
) -> None:
    cache = StreamingView(sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos, sink, window)
    streaming_decode(q, k, v, q_pos, cache, scaling, out, softcap=softcap, sinks=sinks)


def check_shapes(q: Tensor | None, k: Tensor, v: Tensor, q_pos: Tensor, cache: StreamingView, out: Tensor | None) -> None:
    """Raise ValueError unless q, out [B, Hq, Q, D]; k, v [B, Hkv, Q, D]; q_pos [B, Q]; the cache's sink_k, sink_v
    [B, Hkv, S, D], sink_pos [B, S]; ring_k, ring_v [B, Hkv, W, D], ring_pos [B, W] agree (the ops' fake implementations)."""
    batch, heads, q_len, head_dim = k.shape
    expected = {
        "v": (v.shape, k.shape),
        "q_pos": (q_pos.shape, (batch, q_len)),
        "sink_v": (cache.sink_v.shape, cache.sink_k.shape),
        "ring_v": (cache.ring_v.shape, cache.ring_k.shape),
        "sink_k": (cache.sink_k.shape[:2] + cache.sink_k.shape[3:], (batch, heads, head_dim)),
        "ring_k": (cache.ring_k.shape[:2] + cache.ring_k.shape[3:], (batch, heads, head_dim)),
        "sink_pos": (cache.sink_pos.shape, (batch, cache.sink_slots)),
        "ring_pos": (cache.ring_pos.shape, (batch, cache.ring_slots)),
    }
    if q is not None:
        expected["q"] = ((q.shape[0], q.shape[2], q.shape[3]), (batch, q_len, head_dim))
        if out is not None:
            expected["out"] = (out.shape, q.shape)
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"duohead streaming op: {name} has shape {list(got)}; expected {list(want)}")


@_attention_op.register_fake
def _(q, k, v, q_pos, out, scaling, softcap, sinks, *cache) -> None:
    check_shapes(q, k, v, q_pos, StreamingView(*cache), out)


@_append_op.register_fake
def _(keys, values, pos, *cache) -> None:
    check_shapes(None, keys, values, pos, StreamingView(*cache), None)


@_decode_op.register_fake
def _(q, k, v, q_pos, out, scaling, softcap, sinks, *cache) -> None:
    check_shapes(q, k, v, q_pos, StreamingView(*cache), out)
    if q.shape[2] != 1:
        raise ValueError(f"duohead::streaming_decode takes one new token per row; got Q = {q.shape[2]}")
