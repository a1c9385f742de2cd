"""The "duohead" attention, registered with transformers (attention function + mask function).

Shape letters: B batch, Hq query heads, Hkv KV heads, Q new tokens, T slots seen, D head dim.

Per layer, the KV heads are ordered retrieval first (see `duohead.hook`): the first
`Hr * G` query heads attend causally over the full cache, the rest follow the Λ rule over
sink + window. The mask function turns transformers' 2-D padding mask into `Padding` once per
forward; the attention function hands the new tokens to the `DuoCacheLayer`, which stores them and says what to
attend to, and runs the kernels (it writes no cache state itself).
On a static `DuoCache` a decode step has fixed shapes and no host sync (compilable with fullgraph=True).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duohead import kernels
from duohead.cache import DynamicDuoLayer, LayerStep, Padding, PendingKV, check_layout
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
    return Padding.of(real[:, -q_length:], key_is_real)


@dataclass(frozen=True)
class ScoreChanges:
    """What a family's attention module asks of the scores besides `scaling`: softcap c (scores capped to
    c * tanh(s / c), Gemma 2's `softcap`) and sinks [Hq] (one learned logit per query head in each softmax's
    denominator, GPT-OSS's `s_aux`), both None for most families. `heads(a, b)`: the kernels' keywords for query heads
    [a, b) (none where nothing changes)."""

    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def none(self) -> bool:
        return self.softcap is None and self.sinks is None

    def heads(self, start: int, stop: int | None = None) -> dict:
        if self.none:
            return {}  # the kernels' defaults
        return {"softcap": self.softcap, "sinks": None if self.sinks is None else self.sinks[start:stop]}


def _retrieval_attention(step: LayerStep, q: torch.Tensor, scaling: float, changes: dict) -> torch.Tensor:
    """Retrieval heads: q [B, Hq', Q, D] over what the layer returned (causal, or its explicit mask). -> [B, Hq', Q, D]."""
    read = step.retrieval
    if read.visible is not None:
        return masked_attention(q, read.keys, read.values, read.visible, scaling, **changes)
    return kernels.retrieval_attention(q, read.keys, read.values, read.key_is_real, scaling, step.plans, **changes)


def _unsplit_attention(step: LayerStep, q: torch.Tensor, scaling: float, changes: ScoreChanges) -> torch.Tensor:
    """Every head over the unsplit buffer (step.unsplit: keys, values [B, Hkv, T, D]): q [B, Hq, Q, D] -> [B, Hq, Q, D].

    Up to S + W slots the Λ rule is causal: one call. Past that (the CPU's split margin): a decode step is one call
    with the Λ rule as a per-head mask; a prefill chunk runs the retrieval heads causally and the streaming heads
    in bands of sink + window slots (`unpadded_lambda_attention`); with padding, under a dense [Q, T] Λ mask up to
    3 (S + W) slots (`dense_lambda_attention`), past that through the blocked reference, whose work is
    O(Q * (cached + W)). With score changes (softcap, sinks) an unpadded chunk takes the dense Λ mask too.
    """
    read, sink, window, hr = step.unsplit, step.sink, step.window, step.num_retrieval_heads
    keys, values, key_is_real = read.keys, read.values, read.key_is_real
    q_len = q.shape[2]
    if keys.shape[2] <= sink + window:
        return kernels.retrieval_attention(q, keys, values, key_is_real, scaling, step.plans, **changes.heads(0))
    split = hr * (q.shape[1] // keys.shape[1])
    if q_len == 1:
        return mixed_attention(q, keys, values, key_is_real, split, sink, window, scaling, **changes.heads(0))
    out = torch.empty_like(q)
    if hr > 0:
        retrieval = changes.heads(0, split)
        out[:, :split] = kernels.retrieval_attention(
            q[:, :split], keys[:, :hr], values[:, :hr], key_is_real, scaling, step.plans, **retrieval
        )
    streaming_k, streaming_v, streaming = keys[:, hr:], values[:, hr:], changes.heads(split)
    if key_is_real is None and changes.none:
        unpadded_lambda_attention(q[:, split:], streaming_k, streaming_v, sink, window, scaling, out=out[:, split:])
        return out
    if key_is_real is None or keys.shape[2] <= 3 * (sink + window):  # few slots: one dense Λ mask costs less than blocks
        dense = dense_lambda_attention(q[:, split:], streaming_k, streaming_v, key_is_real, sink, window, scaling, **streaming)
        out[:, split:] = dense
        return out
    cached = step.cached
    cached_pos = real_positions(key_is_real[:, :cached])
    sink_part = (streaming_k[:, :, :0], streaming_v[:, :, :0], cached_pos[:, :0])
    ring_part = (streaming_k[:, :, :cached], streaming_v[:, :, :cached], cached_pos)  # every cached slot; Λ hides the far ones
    cache = StreamingView(*sink_part, *ring_part, sink, window)
    new_k, new_v = streaming_k[:, :, cached:], streaming_v[:, :, cached:]
    streaming_attention(q[:, split:], new_k, new_v, step.q_pos, cache, scaling, out=out[:, split:], **streaming)
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
    (no cache: the forward sees only these tokens). Returns ([B, Q, Hq, D] contiguous, None). The layer stores the
    new tokens and says what to attend to (`DuoCacheLayer.store`); this function only computes: every head in one
    call while a dynamic layer is unsplit, else the retrieval heads over their full KV and the streaming heads through
    the attend-then-store kernel, each writing its heads of the output in place. `softcap` and `s_aux` (learned
    sinks [Hq], in the enabled head order) are applied as the family's module asks (`ScoreChanges`).
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
        check_layout(layer, layout)
    elif key.shape[2] != query.shape[2]:
        raise ValueError(
            "duohead attention got keys from a cache other than DuoCache; pass cache=duohead.DuoCache.from_model(model) "
            "(or let generate() create one)"
        )
    else:  # no cache: a throw-away layer holds this forward's tokens
        layer = DynamicDuoLayer(layout)
        layer.lazy_initialization(key, value)
        new_k, new_v = key, value
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    changes = ScoreChanges(kwargs.get("softcap"), kwargs.get("s_aux"))

    padding = None if attention_mask is None else attention_mask.on(query.device)  # device maps: a layer elsewhere
    step = layer.store(new_k, new_v, padding)

    if step.unsplit is not None:
        return _unsplit_attention(step, query, scaling, changes).transpose(1, 2).contiguous(), None
    split = step.num_retrieval_heads * (query.shape[1] // new_k.shape[1])  # query heads of the retrieval KV heads
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # [B, Q, Hq, D], transformers'
    by_head = out.transpose(1, 2)  # [B, Hq, Q, D] view: the kernels' layout
    if step.retrieval is not None:
        by_head[:, :split] = _retrieval_attention(step, query[:, :split], scaling, changes.heads(0, split))
    if step.streaming is not None:
        s = step.streaming  # attend, then store (one launch at decode with Triton)
        kernels.streaming_attention_and_append(
            query[:, split:], s.keys, s.values, s.q_pos, s.cache, scaling, out=by_head[:, split:], **changes.heads(split)
        )
    return out, None


def register() -> None:
    """Register the attention and mask functions under the name "duohead" (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, duohead_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, duohead_mask)
