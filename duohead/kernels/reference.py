"""The torch backend's kernels: attention for retrieval and streaming heads in plain torch, on any device (the CPU
path, and every fallback on CUDA).

Shape letters: B batch, Hq query heads, Hkv KV heads (Hq = G * Hkv), Q new tokens, T tokens in the
retrieval cache (slots, padding included), D head dim, S sink size, W window size.

Positions: every token has a *real position*, its index among the real (non-padding) tokens of its
row, or -1 for padding and empty cache slots. The Λ rule is stated once, in `duohead.kernels.oracle.lambda_visible`;
these functions are tuned (blocks, bands, dense masks for short caches, host reads where they are free) and checked
against the plain oracle (`duohead.kernels.oracle`) on random inputs (tests/test_oracle.py), as the Triton and
FlashInfer kernels are.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from duohead.kernels.backends import REGISTRY
from duohead.kernels.oracle import lambda_visible
from duohead.kernels.streaming_view import StreamingView

QUERY_BLOCK = 128  # query rows per block in `streaming_attention`; a memory bound, not a semantic one


def real_positions(is_real: torch.Tensor) -> torch.Tensor:
    """Real positions [B, T] of slots whose flags are is_real [B, T] bool (the row's first slot at 0): -1 = padding."""
    return (is_real.long().cumsum(dim=1) - 1).masked_fill(~is_real, -1)


def retrieval_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_is_real: Tensor | None,
    scaling: float,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention of the Q newest tokens over all T cached tokens (retrieval heads).

    q [B, Hq, Q, D]; k, v [B, Hkv, T, D] (the last Q slots are the queries' own keys);
    key_is_real [B, T] bool or None (no padding); softcap / sinks [Hq]: see `masked_attention`. -> [B, Hq, Q, D].
    Query slot i (= T - Q + row) sees key slot j iff j <= i and key j is real. A padding query sees
    every key, so its (unused) output stays finite.
    A masked chunk (Q > 1) runs with KV heads expanded to Hq: CUDA's flash backend takes no mask and its
    memory-efficient one no GQA, so mask + GQA would fall to the math backend's fp32 scores [B, Hq, Q, T].
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    if softcap is not None or sinks is not None:
        visible = retrieval_visible(q_len, key_is_real, kv_len, q.device)
        return masked_attention(q, k, v, visible, scaling, padded=False, softcap=softcap, sinks=sinks)
    if key_is_real is None and q_len in (1, kv_len):  # one new token sees every key; or plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scaling, enable_gqa=group > 1)
    mask = retrieval_visible(q_len, key_is_real, kv_len, q.device)[:, None]  # [B or 1, 1, Q, T]
    if group > 1 and q_len > 1:  # [B, Hkv, T, D] -> [B, Hq, T, D]: a copy of T keys, not Q * T fp32 scores
        k, v, group = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=group > 1)


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

    q [B, Hq, Q, D]; k, v [B, Hkv, Q, D] the new tokens' keys/values (not yet in the cache);
    q_pos [B, Q] their real positions (-1 = padding), increasing along Q for real tokens, which are
    contiguous within a row (left or right padding); cache: the streaming cache before this call, with the Λ rule's
    sink and window (sink [B, Hkv, S, D] holds positions < sink, the ring [B, Hkv, R, D] positions >= sink);
    out [B, Hq, Q, D] to write into, or None; softcap / sinks [Hq]: see `masked_attention`. -> out, or a new [B, Hq, Q, D].

    Work and memory are O(Q * (S + W)): query blocks visit the cache, the new tokens that are sinks,
    and the new tokens in their own window, never a Q x Q mask.
    """
    batch, num_kv_heads, q_len, head_dim = k.shape
    sink, window = cache.sink, cache.window
    if out is None:
        out = q.new_empty(q.shape)
    if q.shape[1] == 0:
        return out
    if q_len == 1:  # decode: the token sees cached keys and itself, nothing else
        keys, values = torch.cat([cache.sink_k, cache.ring_k, k], dim=2), torch.cat([cache.sink_v, cache.ring_v, v], dim=2)
        k_pos = torch.cat([cache.sink_pos, cache.ring_pos, q_pos], dim=1)
        visible = lambda_visible(q_pos[:, :, None], k_pos[:, None, :], sink, window)
        out.copy_(masked_attention(q, keys, values, visible, scaling, softcap=softcap, sinks=sinks))
        return out
    padded = True  # whether some query may be padding (then masked_attention guards queries that see no key)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():  # host reads are free on the CPU
        padded = bool((q_pos < 0).any())
        if not bool((cache.sink_pos >= 0).any() | (cache.ring_pos >= 0).any()):
            first = not padded and bool((q_pos[:, 0] == 0).all())  # a first unpadded prefill: positions 0 .. Q - 1
            if first and softcap is None and sinks is None:
                return unpadded_lambda_attention(q, k, v, sink, window, scaling, out=out)
            # Nothing cached yet (a first prefill): leave the S + R empty slots out of every block. It takes 30-50%
            # of the work of a 1-2K-token prefill off the streaming heads.
            cache = cache.without_slots()
    # New tokens that are sinks (real position < S), gathered per row: [B, Hkv, S', D], S' = min(S, Q).
    n_sink = min(sink, q_len)
    first_real = (q_pos >= 0).int().argmax(-1, keepdim=True)  # [B, 1]; 0 for a row without real tokens
    idx = first_real + torch.arange(n_sink, device=q.device)  # [B, S']; may run past the last slot
    inside = idx < q_len
    idx = idx.clamp_max(q_len - 1)
    new_sink_pos = q_pos.gather(-1, idx)
    new_sink_pos = torch.where(inside & (new_sink_pos < sink), new_sink_pos, torch.full_like(new_sink_pos, -1))
    gather_idx = idx[:, None, :, None].expand(batch, num_kv_heads, n_sink, head_dim)
    new_sink_k, new_sink_v = k.gather(2, gather_idx), v.gather(2, gather_idx)
    # Keys every query block sees: old sinks, new sinks, the old ring. Positions -1 are hidden.
    fixed_k = torch.cat([cache.sink_k, new_sink_k, cache.ring_k], dim=2)
    fixed_v = torch.cat([cache.sink_v, new_sink_v, cache.ring_v], dim=2)
    fixed_pos = torch.cat([cache.sink_pos, new_sink_pos, cache.ring_pos], dim=1)
    # New tokens that are sinks are already in `fixed`; hide them in the windowed part.
    win_pos = torch.where(q_pos >= sink, q_pos, torch.full_like(q_pos, -1))

    for q0 in range(0, q_len, QUERY_BLOCK):
        q1 = min(q0 + QUERY_BLOCK, q_len)
        k0 = max(0, q0 - window + 1)  # slot distance >= position distance for contiguous real tokens
        keys = torch.cat([fixed_k, k[:, :, k0:q1]], dim=2)
        values = torch.cat([fixed_v, v[:, :, k0:q1]], dim=2)
        k_pos = torch.cat([fixed_pos, win_pos[:, k0:q1]], dim=1)
        visible = lambda_visible(q_pos[:, q0:q1, None], k_pos[:, None, :], sink, window)
        out[:, :, q0:q1] = masked_attention(q[:, :, q0:q1], keys, values, visible, scaling, padded, softcap=softcap, sinks=sinks)
    return out


def retrieval_visible(q_len: int, key_is_real: Tensor | None, kv_len: int, device: torch.device) -> Tensor:
    """Visibility [B or 1, Q, T] bool of the retrieval rule: slot T - Q + row sees slot j <= it that is real; a padding
    query (one that sees nothing) sees every key, so its unused output stays finite."""
    slots = torch.arange(kv_len, device=device)
    visible = (slots[None, :] <= slots[kv_len - q_len :, None])[None]  # [1, Q, T]
    if key_is_real is not None:
        visible = visible & key_is_real[:, None, :]
        visible = visible | ~visible.any(dim=-1, keepdim=True)
    return visible


def slot_masks(
    key_is_real: torch.Tensor | None, q_len: int, kv_len: int, sink: int, window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, Λ) visibility [B, Q, T] bool of the last Q of T slots over all T, from the slots' real positions
    (key_is_real [B, T] bool; None: no padding, then [1, Q, T], built once per shape and shared by every layer)."""
    if key_is_real is None:
        return _unpadded_slot_masks(q_len, kv_len, sink, window, device)
    k_pos = real_positions(key_is_real)  # [B, T]
    q_pos = k_pos[:, -q_len:, None]  # [B, Q, 1]; padding queries have -1 and see nothing
    k_pos = k_pos[:, None, :]
    causal = (k_pos >= 0) & (k_pos <= q_pos)
    return causal, causal & ((k_pos < sink) | (q_pos - k_pos < window))  # `lambda_visible`, sharing `causal`


@functools.lru_cache(maxsize=8)
def _unpadded_slot_masks(
    q_len: int, kv_len: int, sink: int, window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return slot_masks(torch.ones(1, kv_len, dtype=torch.bool, device=device), q_len, kv_len, sink, window, device)


def dense_lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_is_real: torch.Tensor | None,
    sink: int,
    window: int,
    scaling: float,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> torch.Tensor:
    """Λ-masked attention of the last Q of T slots over all T under a dense [Q, T] mask (streaming heads over a short
    full cache, e.g. with padding). q [B, Hq, Q, D]; k, v [B, Hkv, T, D]; key_is_real [B, T] bool or None;
    softcap / sinks [Hq]: see `masked_attention`. -> [B, Hq, Q, D]."""
    _, visible = slot_masks(key_is_real, q.shape[2], k.shape[2], sink, window, q.device)
    return masked_attention(q, k, v, visible, scaling, padded=key_is_real is not None, softcap=softcap, sinks=sinks)


def unpadded_lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    scaling: float,
    out: torch.Tensor | None = None,
    band: int | None = None,
) -> torch.Tensor:
    """Λ-masked attention of the last Q of T slots over all T, without padding (slot = real position).

    q [B, Hq, Q, D]; k, v [B, Hkv, T, D]; out [B, Hq, Q, D] to write into, or None. -> out, or a new
    [B, Hq, Q, D]. Rows before slot S + W see every earlier slot (Λ is causal there): one causal call. Later rows go
    in bands of `band` rows (None: the torch backend's `lambda_band`), each over the S sink slots and its own window
    (W - 1 + band slots) under an additive mask built once per band height, so the work is O(Q (S + W)) and no mask
    is built or converted per call (its speed against a causal pass and a dense mask: benchmarks/RESULTS.md,
    `bench_lambda_prefill.py`).
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    start, head = kv_len - q_len, sink + window
    gqa = q.shape[1] > k.shape[1]
    if out is None:
        out = torch.empty_like(q)
    if start < head:
        rows = min(head, kv_len) - start
        out[:, :, :rows] = retrieval_attention(q[:, :, :rows], k[:, :, : start + rows], v[:, :, : start + rows], None, scaling)
    band = band or REGISTRY["torch"].lambda_band
    for r0 in range(max(start, head), kv_len, band):
        r1 = min(r0 + band, kv_len)
        w0 = r0 - window + 1  # first window slot of row r0; > S since r0 >= S + W
        keys = torch.cat([k[:, :, :sink], k[:, :, w0:r1]], dim=2)
        values = torch.cat([v[:, :, :sink], v[:, :, w0:r1]], dim=2)
        mask = _band_mask(r1 - r0, sink, window, q.dtype, q.device)
        out[:, :, r0 - start : r1 - start] = F.scaled_dot_product_attention(
            q[:, :, r0 - start : r1 - start], keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )
    return out


@functools.lru_cache(maxsize=16)
def _band_mask(rows: int, sink: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive Λ mask [rows, S + W - 1 + rows] (0 visible, -inf hidden) of `rows` consecutive query slots r0 + i,
    r0 >= S + W, over the S sink slots then slots r0 - W + 1 + c (`lambda_visible` at r0 = S + W: the same for every
    r0 >= S + W)."""
    q_pos = sink + window + torch.arange(rows, device=device)
    k_pos = torch.cat([torch.arange(sink, device=device), sink + 1 + torch.arange(window - 1 + rows, device=device)])
    visible = lambda_visible(q_pos[:, None], k_pos[None, :], sink, window)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_is_real: torch.Tensor | None,
    split: int,
    sink: int,
    window: int,
    scaling: float,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> torch.Tensor:
    """Retrieval and streaming heads in one call over one full cache (the unsplit layer past S + W slots).

    q [B, Hq, Q, D]; k, v [B, Hkv, T, D] every slot so far (the last Q are the queries' own); key_is_real [B, T]
    bool or None (no padding); softcap / sinks [Hq]: see `masked_attention`. Query heads [:split] attend causally,
    the rest under the Λ rule, as a per-head mask for one SDPA. -> [B, Hq, Q, D]. Equals `retrieval_attention` on the
    first heads and `streaming_attention` on the rest.
    """
    heads = q.shape[1]
    causal, streaming = slot_masks(key_is_real, q.shape[2], k.shape[2], sink, window, q.device)
    visible = torch.cat([causal[:, None].expand(-1, split, -1, -1), streaming[:, None].expand(-1, heads - split, -1, -1)], 1)
    padded = key_is_real is not None  # unpadded: each query sees itself
    return masked_attention(q, k, v, visible, scaling, padded, softcap=softcap, sinks=sinks)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    padded: bool = True,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> torch.Tensor:
    """Attention under an explicit mask through SDPA (fused on CPU and GPU; traceable, no host sync):
    q [B, Hq, Q, D]; k, v [B, Hkv, K, D]; visible [B, Q, K] (every head) or [B, Hq, Q, K] (per head) bool.
    -> [B, Hq, Q, D]. A query that sees no key outputs zeros; padded=False promises that every query sees a key
    (no padding query), which skips that guard.

    Two changes to the scores the stock modules of some families make (SDPA has neither, so they run an explicit
    fp32 softmax, as those modules' own eager attention does): softcap c caps every score s = scaling * q.k to
    c * tanh(s / c) (Gemma 2); sinks [Hq] add one logit per query head to each softmax's denominator, a key that
    holds no value (GPT-OSS's learned sinks)."""
    if visible.dim() == 3:
        visible = visible[:, None]
    if softcap is not None or sinks is not None:
        return _explicit_attention(q, k, v, visible, scaling, padded, softcap, sinks)
    gqa = q.shape[1] > k.shape[1]
    if not padded:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=gqa)
    seen = visible.any(dim=-1, keepdim=True)  # False only for padding queries
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~seen, scale=scaling, enable_gqa=gqa)
    return attended.masked_fill(~seen, 0.0)


def _explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    visible: Tensor,
    scaling: float,
    padded: bool,
    softcap: float | None,
    sinks: Tensor | None,
) -> Tensor:
    """`masked_attention` with soft-capped scores and/or sinks, in fp32: visible [B, 1 or Hq, Q, K]. The G query heads
    of a KV head share its keys as rows of one matmul (no copy of the keys per query head). A query that sees no key
    outputs zeros (padded=False promises there is none)."""
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, keys_len = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    rows = q.float().reshape(batch, num_kv_heads, group * q_len, head_dim)
    scores = torch.matmul(rows, k.float().transpose(-1, -2)).view(batch, num_kv_heads, group, q_len, keys_len)
    # Without autograd the score tensor is rewritten in place: a fresh [Q, K] buffer per step costs more than the math.
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    scores = scores * scaling if grad else scores.mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap if grad else scores.div_(softcap).tanh_().mul_(softcap)
    heads = (1, 1) if visible.shape[1] == 1 else (num_kv_heads, group)  # one mask for every head, or one per head
    hidden = ~visible.reshape(visible.shape[0], *heads, q_len, keys_len)
    scores = scores.masked_fill(hidden, float("-inf")) if grad else scores.masked_fill_(hidden, float("-inf"))
    if sinks is None:
        weights = F.softmax(scores, dim=-1)
        if padded:
            weights = torch.nan_to_num(weights, nan=0.0)  # no visible key: a row of NaN -> zeros
    else:  # one more logit in each denominator: a key without a value (rows stay finite: the sink is one)
        sink = sinks.float().view(1, num_kv_heads, group, 1, 1)
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
        weights = torch.exp(scores - top) if grad else scores.sub_(top).exp_()
        denominator = weights.sum(dim=-1, keepdim=True) + torch.exp(sink - top)
        weights = weights / denominator if grad else weights.div_(denominator)
    out = torch.matmul(weights.view(batch, num_kv_heads, group * q_len, keys_len), v.float())
    return out.view(batch, num_q_heads, q_len, head_dim).to(q.dtype)


def streaming_append(keys: Tensor, values: Tensor, pos: Tensor, cache: StreamingView) -> None:
    """Store new tokens in the streaming cache, in place (the layout of `StreamingView`).

    keys, values [B, Hkv, Q, D] at real positions pos [B, Q] (-1 = padding, skipped; a row's real tokens are
    contiguous with consecutive positions). With S sink slots and R ring slots (R >= the window; more keeps
    older tokens for a rollback), a token at position p < S goes to sink slot p, one at p >= S to ring slot
    (p - S) % R if it is among the last R real tokens of its row (an earlier one would be overwritten within
    this call, so no slot is written twice). Per row that is at most three contiguous runs of slots, copied
    as slices after one read of three numbers per row. One new token (decode) being compiled or on an accelerator
    goes through `append_one` instead (index writes: no device-to-host read, no data-dependent branch); eager on
    the CPU the read costs nothing and the slices take a third of the ops.
    """
    if keys.shape[2] == 1 and (torch.compiler.is_compiling() or keys.device.type != "cpu"):
        append_one(keys, values, pos, cache)
        return
    sink, ring = cache.sink_slots, cache.ring_slots
    real = pos >= 0
    first = real.int().argmax(dim=1)  # slot of each row's first real token (0 if none)
    rows = torch.stack([real.sum(dim=1), first, pos.gather(1, first[:, None])[:, 0]], dim=1).tolist()
    for b, (count, slot, start) in enumerate(rows):  # new tokens: slots slot + i, positions start + i, i < count
        end = start + count
        to_sink = max(0, min(end, sink) - start)
        _copy_run(keys, values, pos, b, slot, cache.sink_k, cache.sink_v, cache.sink_pos, start, to_sink)
        first_ring = max(start + to_sink, end - ring)  # positions [first_ring, end) reach the ring
        while first_ring < end:  # at most two runs: the ring may wrap
            ring_slot = (first_ring - sink) % ring
            n = min(end - first_ring, ring - ring_slot)
            _copy_run(keys, values, pos, b, slot + first_ring - start, cache.ring_k, cache.ring_v, cache.ring_pos, ring_slot, n)
            first_ring += n


def _copy_run(keys, values, pos, row, src, dst_k, dst_v, dst_pos, dst, n) -> None:
    """Copy n new tokens of one row, slots [src, src + n), to slots [dst, dst + n) of a cache part."""
    if n > 0:
        dst_k[row, :, dst : dst + n] = keys[row, :, src : src + n]
        dst_v[row, :, dst : dst + n] = values[row, :, src : src + n]
        dst_pos[row, dst : dst + n] = pos[row, src : src + n]


def append_one(keys: Tensor, values: Tensor, pos: Tensor, cache: StreamingView) -> None:
    """`streaming_append` of one new token per row, keys/values [B, Hkv, 1, D] at pos [B, 1], as index writes:
    no device-to-host read and no data-dependent branch, so a decode step stays traceable and capturable."""
    sink, ring = cache.sink_slots, cache.ring_slots
    p = pos[:, 0]  # [B]
    if sink > 0:
        _put_one(keys, values, p, (p >= 0) & (p < sink), p.clamp(0, sink - 1), cache.sink_k, cache.sink_v, cache.sink_pos)
    _put_one(keys, values, p, p >= sink, (p - sink).clamp_min(0) % ring, cache.ring_k, cache.ring_v, cache.ring_pos)


def _put_one(keys, values, p, write, slot, dst_k, dst_v, dst_pos) -> None:
    """Store one new token per row, keys/values [B, Hkv, 1, D] at position p [B], in slot [B] of a cache part
    where write [B] is True (elsewhere the slot keeps its content)."""
    rows = torch.arange(p.shape[0], device=p.device)
    keep = ~write[:, None, None]
    dst_k[rows, :, slot] = torch.where(keep, dst_k[rows, :, slot], keys[:, :, 0])
    dst_v[rows, :, slot] = torch.where(keep, dst_v[rows, :, slot], values[:, :, 0])
    dst_pos[rows, slot] = torch.where(write, p, dst_pos[rows, slot])
