"""The "duohead" attention, registered with transformers (attention function + mask function).

Shape letters: B batch, Hq query heads, Hkv KV heads, Q new tokens, T slots seen, D head dim.

Per layer, the KV heads are ordered retrieval first (see `duohead.hook`): the first
`Hr * G` query heads attend causally over the full cache, the rest follow the Λ rule over
sink + window. The mask function turns transformers' 2-D padding mask into `Padding` once per
forward; the attention function writes the new tokens into the `DuoCacheLayer` and runs the kernels.
On a static `DuoCache` a decode step has fixed shapes and no host sync (compilable with fullgraph=True).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duohead import kernels
from duohead.cache import DuoCacheLayer, PendingKV
from duohead.kernels.reference import (
    dense_lambda_attention,
    masked_attention,
    mixed_attention,
    real_positions,
    streaming_attention,
    unpadded_lambda_attention,
)
from duohead.kernels.streaming_view import StreamingView

ATTENTION_NAME = "duohead"


@dataclass
class Padding:
    """Which tokens are real. query_is_real [B, Q] bool: the new tokens; key_is_real [B, T] bool: every slot, cached
    and new, or None for a static `DuoCache` (it keeps the earlier slots' flags itself)."""

    query_is_real: torch.Tensor
    key_is_real: torch.Tensor | None


def duohead_mask(
    batch_size: int,
    q_length: int,
    kv_length: int | torch.Tensor,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> Padding | None:
    """Mask function for transformers' `AttentionMaskInterface`: None without padding, else `Padding`.

    Causality and the Λ rule are applied by the attention itself, so only padding is carried over. Real tokens
    must be contiguous in each row (left or right padding); that is checked when several tokens come at once
    (prefill), where a host sync is fine, not per decode step. A static cache reports kv_length as a tensor: then
    only the last q_length columns of attention_mask are read, so it may hold just the new tokens' columns.
    """
    if attention_mask is None:
        return None
    checking = q_length > 1 and not torch.compiler.is_compiling()
    if isinstance(kv_length, torch.Tensor):  # a static DuoCache
        if checking and attention_mask.shape[1] not in (q_length, int(kv_length)):
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens; expected {int(kv_length)} (cached + new)")
        real = attention_mask[:, -q_length:].to(torch.bool)
        key_is_real = None
    else:
        key_is_real = real = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        if real.shape[1] != kv_length:
            raise ValueError(f"attention_mask covers {real.shape[1]} tokens; expected {kv_length} (cached + new)")
    if checking:
        if bool(real.all()):
            return None
        starts = (real[:, 1:] & ~real[:, :-1]).sum(dim=1) + real[:, 0].long()
        if bool((starts > 1).any()):
            raise ValueError(
                "duohead supports left or right padding only: each row's real tokens must be contiguous in attention_mask"
            )
    return Padding(query_is_real=real[:, -q_length:], key_is_real=key_is_real)


def _positions(real_seen: torch.Tensor, query_is_real: torch.Tensor | None, q_len: int) -> torch.Tensor:
    """Real positions [B, Q] of the new tokens (-1 = padding), from the real tokens seen so far, real_seen [B]."""
    if query_is_real is None:
        return real_seen[:, None] + torch.arange(q_len, device=real_seen.device)
    pos = real_seen[:, None] + query_is_real.long().cumsum(dim=1) - 1
    return pos.masked_fill(~query_is_real, -1)


def _static_retrieval(
    layer: DuoCacheLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_is_real: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Retrieval heads on a static layer: index-write k, v [B, Hr, Q, D] at slots seen.. and attend. q [B, Hq, Q, D] -> same.

    Compiled (fixed shapes): attention over all C slots under the mask `slot_real & causal`. Eager with Q > 1
    (prefill): attention over the filled slots only, after one host read of `seen`."""
    r, q_len = layer.retrieval, q.shape[2]
    slots = layer.seen + torch.arange(q_len, device=q.device)  # [Q]
    r.keys.index_copy_(2, slots, k)
    r.values.index_copy_(2, slots, v)
    real = torch.ones_like(layer.slot_real[:, :q_len]) if query_is_real is None else query_is_real
    layer.slot_real.index_copy_(1, slots, real)
    if q_len > 1 and not torch.compiler.is_compiling():
        end = int(layer.seen) + q_len
        key_is_real = None if query_is_real is None else layer.slot_real[:, :end]
        return kernels.retrieval_attention(q, r.keys[:, :, :end], r.values[:, :, :end], key_is_real, scaling)
    visible = layer.slot_real[:, None, :] & (torch.arange(r.keys.shape[2], device=q.device) <= slots[:, None])  # [B, Q, C]
    return masked_attention(q, r.keys, r.values, visible, scaling)


def _unsplit_attention(
    layer: DuoCacheLayer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_is_real: torch.Tensor | None,
    key_is_real: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Store k, v [B, Hkv, Q, D] in the unsplit buffer and attend: q [B, Hq, Q, D] -> [B, Hq, Q, D].

    Up to S + W slots the Λ rule is causal: one call. Past that (the CPU's split margin): a decode step is one call
    with the Λ rule as a per-head mask; a prefill chunk runs the retrieval heads causally and the streaming heads
    in bands of sink + window slots (`unpadded_lambda_attention`); with padding, under a dense [Q, T] Λ mask up to
    3 (S + W) slots (`dense_lambda_attention`), past that through the blocked reference, whose work is
    O(Q * (cached + W)).
    """
    cached, q_len = layer.seen, q.shape[2]
    keys, values = layer.unsplit.append(k, v)
    if cached + q_len <= layer.sink + layer.window:
        return kernels.retrieval_attention(q, keys, values, key_is_real, scaling)
    hr = layer.num_retrieval_heads
    split = hr * (q.shape[1] // k.shape[1])
    if q_len == 1:
        return mixed_attention(q, keys, values, key_is_real, split, layer.sink, layer.window, scaling)
    out = torch.empty_like(q)
    if hr > 0:
        out[:, :split] = kernels.retrieval_attention(q[:, :split], keys[:, :hr], values[:, :hr], key_is_real, scaling)
    if key_is_real is None:
        unpadded_lambda_attention(
            q[:, split:], keys[:, hr:], values[:, hr:], layer.sink, layer.window, scaling, out=out[:, split:]
        )
        return out
    if keys.shape[2] <= 3 * (layer.sink + layer.window):  # few slots: one dense Λ mask costs less than blocks' small ops
        out[:, split:] = dense_lambda_attention(
            q[:, split:], keys[:, hr:], values[:, hr:], key_is_real, layer.sink, layer.window, scaling
        )
        return out
    cached_pos = real_positions(key_is_real[:, :cached])
    q_pos = _positions(layer.real_seen, query_is_real, q_len)
    sink = (keys[:, hr:, :0], values[:, hr:, :0], cached_pos[:, :0])
    ring = (keys[:, hr:, :cached], values[:, hr:, :cached], cached_pos)  # every cached slot; Λ hides the far ones
    cache = StreamingView(*sink, *ring, layer.sink, layer.window)
    streaming_attention(q[:, split:], k[:, hr:], v[:, hr:], q_pos, cache, scaling, out=out[:, split:])
    return out


def duohead_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | PendingKV,
    value: torch.Tensor | PendingKV,
    attention_mask: Padding | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' `AttentionInterface`.

    query [B, Hq, Q, D]; key/value either `PendingKV` from a `DuoCache` or plain [B, Hkv, Q, D] tensors
    (no cache: the forward sees only these tokens). Returns ([B, Q, Hq, D] contiguous, None). While a dynamic
    layer is unsplit every head attends in one call: causally up to S + W slots (the Λ rule shows streaming heads
    every token then), with a per-head Λ mask up to `split_at`. Once split, the streaming kernel writes its heads
    in place and the retrieval heads' output is copied in.
    """
    layout = getattr(module, "duohead_layout", None)
    if layout is None:
        raise ValueError(
            "this model uses attn_implementation='duohead' but has no head pattern: "
            "call duohead.enable(model, pattern) or load it with duohead.from_pretrained(path, pattern=...)"
        )
    if attention_mask is not None and not isinstance(attention_mask, Padding):
        raise ValueError("duohead attention takes a 2-D padding mask (attention_mask [B, T]); got a prepared mask")
    if isinstance(key, PendingKV):
        layer, new_k, new_v = key.layer, key.keys, key.values
    elif key.shape[2] != query.shape[2]:
        raise ValueError(
            "duohead attention got keys from a cache other than DuoCache; pass cache=duohead.DuoCache.from_model(model) "
            "(or let generate() create one)"
        )
    else:  # no cache: a throw-away layer holds this forward's tokens
        layer = DuoCacheLayer(layout.num_retrieval_heads, layout.sink, layout.window)
        layer.lazy_initialization(key, value)
        new_k, new_v = key, value
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    q_len = query.shape[2]
    query_is_real = key_is_real = None
    if attention_mask is not None:  # .to: with a device map the mask may sit on another device than this layer
        query_is_real = attention_mask.query_is_real.to(query.device)
        key_is_real = None if attention_mask.key_is_real is None else attention_mask.key_is_real.to(query.device)
    if layer.needs_split(q_len):
        layer.split(key_is_real)

    if layer.unsplit is not None:
        out = _unsplit_attention(layer, query, new_k, new_v, query_is_real, key_is_real, scaling).transpose(1, 2).contiguous()
    else:
        q_pos = _positions(layer.real_seen, query_is_real, q_len)
        hr = layer.num_retrieval_heads
        split = hr * (query.shape[1] // new_k.shape[1])  # query heads of the retrieval KV heads
        out = query.new_empty(query.shape[0], q_len, query.shape[1], query.shape[3])  # [B, Q, Hq, D], what transformers wants
        by_head = out.transpose(1, 2)  # [B, Hq, Q, D] view: the kernels' layout
        if layer.retrieval is not None:
            if layer.static:
                by_head[:, :split] = _static_retrieval(
                    layer, query[:, :split], new_k[:, :hr], new_v[:, :hr], query_is_real, scaling
                )
            else:
                keys, values = layer.retrieval.append(new_k[:, :hr], new_v[:, :hr])
                by_head[:, :split] = kernels.retrieval_attention(query[:, :split], keys, values, key_is_real, scaling)
        if layer.streaming is not None:
            k_s, v_s = new_k[:, hr:], new_v[:, hr:]
            kernels.streaming_attention_and_append(  # attend, then store (one launch at decode with Triton)
                query[:, split:], k_s, v_s, q_pos, layer.streaming.view(), scaling, out=by_head[:, split:]
            )
    if layer.static:
        layer.seen.add_(q_len)
    else:
        layer.seen += q_len
    layer.real_seen.add_(q_len if query_is_real is None else query_is_real.sum(dim=1))
    return out, None


def register() -> None:
    """Register the attention and mask functions under the name "duohead" (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, duohead_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, duohead_mask)
