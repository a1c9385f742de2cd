"""The "duohead" attention, registered with transformers (attention function + mask function).

Shape letters: B batch, Hq query heads, Hkv KV heads, Q new tokens, T slots seen, D head dim.

Per layer, the KV heads are ordered retrieval first (see `duohead.hook`): the first
`Hr * G` query heads attend causally over the full cache, the rest follow the Λ rule over
sink + window. The mask function turns transformers' 2-D padding mask into `Padding` once per
forward; the attention function writes the new tokens into the `DuoCacheLayer` and runs the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duohead import kernels
from duohead.cache import DuoCacheLayer, PendingKV

ATTENTION_NAME = "duohead"


@dataclass
class Padding:
    """Which slots hold real tokens. key_is_real [B, T] bool; query_pos [B, Q] real positions of the
    new tokens (-1 = padding)."""

    key_is_real: torch.Tensor
    query_pos: torch.Tensor


def duohead_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> Padding | None:
    """Mask function for transformers' `AttentionMaskInterface`: None without padding, else `Padding`.

    Causality and the Λ rule are applied by the attention itself, so only padding is carried over.
    Real tokens must be contiguous in each row (left or right padding).
    """
    if attention_mask is None:
        return None
    real = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if real.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {real.shape[1]} tokens; expected {kv_length} (cached + new)")
    if bool(real.all()):
        return None
    starts = (real[:, 1:] & ~real[:, :-1]).sum(dim=1) + real[:, 0].long()
    if bool((starts > 1).any()):
        raise ValueError("duohead supports left or right padding only: each row's real tokens must be contiguous in attention_mask")
    pos = real.long().cumsum(dim=1) - 1
    pos = torch.where(real, pos, torch.full_like(pos, -1))
    return Padding(key_is_real=real, query_pos=pos[:, kv_length - q_length :])


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
    (no cache: the forward sees only these tokens). Returns ([B, Q, Hq, D] contiguous, None): the streaming
    kernel writes its heads in place, the retrieval heads' output is copied in.
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
    if attention_mask is None:
        q_pos = layer.real_seen[:, None] + torch.arange(q_len, device=query.device)
        key_is_real = None
    else:
        q_pos, key_is_real = attention_mask.query_pos.to(query.device), attention_mask.key_is_real.to(query.device)  # device maps

    hr = layer.num_retrieval_heads
    split = hr * (query.shape[1] // new_k.shape[1])  # query heads of the retrieval KV heads
    out = query.new_empty(query.shape[0], q_len, query.shape[1], query.shape[3])  # [B, Q, Hq, D], what transformers wants
    by_head = out.transpose(1, 2)  # [B, Hq, Q, D] view: the kernels' layout
    if layer.retrieval is not None:
        keys, values = layer.retrieval.append(new_k[:, :hr], new_v[:, :hr])
        by_head[:, :split] = kernels.retrieval_attention(query[:, :split], keys, values, key_is_real, scaling)
    if layer.streaming is not None:
        s = layer.streaming
        k_s, v_s = new_k[:, hr:], new_v[:, hr:]
        kernels.streaming_attention(
            query[:, split:], k_s, v_s, q_pos,
            s.sink_k, s.sink_v, s.sink_pos, s.ring_k, s.ring_v, s.ring_pos,
            layer.sink, layer.window, scaling, out=by_head[:, split:],
        )
        s.append(k_s, v_s, q_pos)
    layer.seen += q_len
    layer.real_seen += q_len if attention_mask is None else (q_pos >= 0).sum(dim=1)
    return out, None


def register() -> None:
    """Register the attention and mask functions under the name "duohead" (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, duohead_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, duohead_mask)
