"""The Λ oracle: what every attention path of duohead must compute, stated as plainly as possible.

Shape letters: B batch, Hq query heads, Hkv KV heads (Hq = G * Hkv), Q new tokens, T tokens seen, D head dim,
S sink size, W window size, R ring slots.

Nothing here is fast and nothing is shared with a backend except the rule itself (`lambda_visible`) and one masked
softmax: each function builds the full [B, Q, K] visibility from positions and runs one attention under it, and the
append writes one token at a time. The backends (`duohead.kernels.reference`, the torch one; the Triton kernels;
FlashInfer) are tested against these functions on random inputs; nothing in the library calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from duohead.kernels.streaming_view import StreamingView


def lambda_visible(q_pos: Tensor, k_pos: Tensor, sink: int, window: int) -> Tensor:
    """The Λ rule: may a query at real position `q_pos` see a key at real position `k_pos`?

    A streaming head sees key j from query i iff j is a real token, j <= i and (j < sink or i - j < window).
    Broadcasts `q_pos` against `k_pos` (e.g. [B, Q, 1] with [B, 1, K] -> [B, Q, K]).
    """
    causal = (k_pos >= 0) & (k_pos <= q_pos)
    return causal & ((k_pos < sink) | (q_pos - k_pos < window))


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scaling: float, softcap: float | None = None, sinks: Tensor | None = None
) -> Tensor:
    """Softmax attention under an explicit mask, in float32: q [B, Hq, Q, D]; k, v [B, Hkv, K, D]; visible [B, Q, K]
    bool. -> [B, Hq, Q, D] in q's dtype. A query that sees no key outputs zeros. softcap c: each score s becomes
    c * tanh(s / c) before the mask; sinks [Hq]: one more logit per query head in the softmax, whose weight is dropped."""
    group = q.shape[1] // k.shape[1]
    keys, values = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), keys) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float()[None, :, None, None].expand(*scores.shape[:3], 1)], dim=-1)
    weights = torch.nan_to_num(F.softmax(scores, dim=-1), nan=0.0)  # no visible key: a row of NaN -> zeros
    return torch.einsum("bhqk,bhkd->bhqd", weights[..., : keys.shape[2]], values).to(q.dtype)


def retrieval_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_is_real: Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention of the Q newest of T slots over all T (retrieval heads): slot i = T - Q + row sees slot j iff
    j <= i and j is real. q [B, Hq, Q, D]; k, v [B, Hkv, T, D]; key_is_real [B, T] bool or None. -> [B, Hq, Q, D].
    A padding query (one that sees no key) sees every key instead, so its unused output is finite, as the backends'.
    softcap, sinks: as in `masked_attention`."""
    q_len, kv_len = q.shape[2], k.shape[2]
    slots = torch.arange(kv_len, device=q.device)
    visible = (slots[None, :] <= slots[kv_len - q_len :, None])[None].expand(q.shape[0], -1, -1)  # [B, Q, T]
    if key_is_real is not None:
        visible = visible & key_is_real[:, None, :]
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    return masked_attention(q, k, v, visible, scaling, softcap, sinks)


def streaming_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    cache: StreamingView,
    scaling: float,
    out: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Λ attention of Q new tokens over the streaming cache plus themselves (streaming heads): every key the cache
    and the new tokens hold, by position, under `lambda_visible`. q [B, Hq, Q, D]; k, v [B, Hkv, Q, D] (not yet in the
    cache); q_pos [B, Q] (-1 = padding, which sees nothing: zeros); cache read only; softcap, sinks: as in
    `masked_attention`. -> out or a new [B, Hq, Q, D]."""
    keys = torch.cat([cache.sink_k, cache.ring_k, k], dim=2)
    values = torch.cat([cache.sink_v, cache.ring_v, v], dim=2)
    k_pos = torch.cat([cache.sink_pos, cache.ring_pos, q_pos], dim=1)
    visible = lambda_visible(q_pos[:, :, None], k_pos[:, None, :], cache.sink, cache.window)  # [B, Q, S + R + Q]
    got = masked_attention(q, keys, values, visible, scaling, softcap, sinks)
    if out is None:
        return got
    out.copy_(got)
    return out


def streaming_append(keys: Tensor, values: Tensor, pos: Tensor, cache: StreamingView) -> None:
    """Store new tokens keys, values [B, Hkv, Q, D] at real positions pos [B, Q] (-1 = padding, skipped) in the
    streaming cache, one token at a time in order: position p < S goes to sink slot p, p >= S to ring slot
    (p - S) % R (a later token overwrites an earlier one in the same slot)."""
    sink, ring = cache.sink_slots, cache.ring_slots
    for b in range(pos.shape[0]):
        for i in range(pos.shape[1]):
            p = int(pos[b, i])
            if p < 0:
                continue
            if p < sink:
                dst_k, dst_v, dst_pos, slot = cache.sink_k, cache.sink_v, cache.sink_pos, p
            else:
                dst_k, dst_v, dst_pos, slot = cache.ring_k, cache.ring_v, cache.ring_pos, (p - sink) % ring
            dst_k[b, :, slot] = keys[b, :, i]
            dst_v[b, :, slot] = values[b, :, i]
            dst_pos[b, slot] = p
