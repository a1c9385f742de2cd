"""Pieces shared by duohead's Triton kernels (`triton_streaming`, `triton_decode`): the online-softmax loop over a
range of key slots with the Λ rule, and the launchers' small helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def attend_range(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_base,
    v_base,
    pos_base,
    stride_kt,
    stride_vt,
    stride_pt,
    start,
    end,
    sink,
    window,
    qk_scale,
    softcap2,
    SOFTCAP: tl.constexpr,
    offs_d,
    d_mask,
    skip,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Fold keys in slots [start, end) into the online softmax state (acc [M, BD], m_i/l_i [M], base 2).
    Slot `skip` (-1: none) is neither loaded nor seen. SOFTCAP: scores s (base 2) become c2 * tanh(s / c2), c2 =
    `softcap2` (the soft cap c times log2(e): the natural-log cap c * tanh(s / c) in base 2). WIDE: slot offsets in
    int64 (slot * stride may pass 2^31; int64 costs registers, so only the launches that need it take it)."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if WIDE:
            offs_n = offs_n.to(tl.int64)
        n_mask = (offs_n < end) & (offs_n != skip)
        k_pos = tl.load(pos_base + offs_n * stride_pt, mask=n_mask, other=-1)
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if IEEE_DOT:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        if SOFTCAP:  # tanh(y) = 1 - 2 / (e^(2y) + 1): no tanh in every Triton build (the interpreter included)
            s = softcap2 * (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634) / softcap2) + 1.0))
        qp = q_pos[:, None]
        kp = k_pos[None, :]
        visible = (kp >= 0) & (kp <= qp) & ((kp < sink) | (qp - kp < window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


def score_change_args(q: Tensor, softcap: float | None, sinks: Tensor | None) -> dict:
    """The kernels' arguments for a soft cap and learned sinks [Hq] (placeholders where absent)."""
    if sinks is not None and (sinks.shape != (q.shape[1],) or sinks.device != q.device):
        raise ValueError(f"sinks must be one logit per query head, [{q.shape[1]}] on {q.device}; got {list(sinks.shape)}")
    return {
        "Sinks": q if sinks is None else sinks.contiguous(),
        "softcap2": 0.0 if softcap is None else float(softcap) * 1.4426950408889634,
        "SOFTCAP": softcap is not None,
        "HAS_SINKS": sinks is not None,
    }


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element of these tensors lies 2^31 or more elements past its first one (then int32 offsets wrap)."""
    return any(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size) >= 2**31 for t in tensors)


def kernel_strides(*tensors: torch.Tensor) -> list[int]:
    """The kernels' stride arguments, in order: (b, h, t) of each [B, H, T, D] tensor (D is contiguous), (b, t)
    of each [B, T] position tensor."""
    return [stride for t in tensors for stride in (t.stride()[:3] if t.dim() == 4 else t.stride())]


# pointer arguments that are not of the kernel's data type; every other capitalised argument is a data pointer
_INDEX_POINTERS = {"Pos": "*i64", "Newest": "*i64", "QPos": "*i64", "SinkPos": "*i64", "RingPos": "*i64"}
_PARTIAL_POINTERS = {"PartAcc": "*fp32", "PartML": "*fp32"}


def compile_for_sm90(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int = 2):
    """Build one of duohead's kernels ahead of time for sm_90 (no GPU needed; not under the interpreter).

    dtype: Triton's name of the data type ("bf16", "fp16", "fp32"); constexprs: the kernel's constexpr arguments.
    Capitalised arguments are pointers, `qk_scale` fp32, the rest i32; constexprs not given take their defaults.
    Returns Triton's compiled kernel (`.asm`).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constexprs = {**defaults, **constexprs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():
            signature[name] = {**_INDEX_POINTERS, **_PARTIAL_POINTERS}.get(name, f"*{dtype}")
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    indexed = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=indexed),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
