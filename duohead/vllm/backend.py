"""Streaming-head attention on vLLM's paged KV cache: the attention backend of `SinkWindowSpec` layers.

Per step, the metadata builder turns vLLM's batch (query_start_loc, seq_lens, the group's block table) into the
index tensors every streaming layer of the group uses: for each request r with C_r cached tokens and Q_r new ones,
the queries' positions, the cache slots of the sink positions [0, min(S, C_r)) and of the window positions
[max(S, C_r - W + 1), C_r) (the only cached keys a new token can see: key j is visible from query i iff j <= i and
(j < S or i - j < W)). Each layer then gathers those keys into duohead's streaming-cache shape (sink [R, Hs, S, D],
ring [R, Hs, W - 1, D], positions -1 where empty: a `StreamingView`) and calls `duohead.kernels.streaming_attention`
twice at most, once for the decoding requests (one query each) and once for the prefilling ones (padded to the
longest chunk), so a chunk's length never pads the decodes: the torch reference on the CPU, duohead's Triton kernel
on CUDA. The gather reads S + W - 1 slots per
request and head, never the whole context.

Cache layout (per layer): [num_blocks, Hs, block_size, 2 * D], keys in the first D channels, values in the last D.
Shape letters: R requests, N tokens in the step, Hq query heads, Hs streaming KV heads, D head dim, S sink, W window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from duohead import kernels

BACKEND_NAME = "DUOHEAD_STREAMING"  # a member of vLLM's AttentionBackendEnum, added by `duohead.vllm.register`


class StreamingBackend(AttentionBackend):
    """duohead's streaming heads: Λ attention over the sink and window slots of vLLM's paged cache."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[StreamingImpl]:
        return StreamingImpl

    @staticmethod
    def get_builder_cls() -> type[StreamingMetadataBuilder]:
        return StreamingMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class StreamingBatch:
    """Requests of one step that attend together; index tensors are int64 on the step's device.

    q_index, q_pos [R, Qm]: token index (into the step's N tokens) and position of each request's new tokens,
    Qm = the longest query of these requests; q_pos = -1 past a request's own query length (q_index then 0).
    sink_slot, sink_pos [R, S] and ring_slot, ring_pos [R, W - 1]: cache slots (block * block_size + offset) and
    positions of the cached keys a new token may see; positions -1 (slot 0) where there is no such key."""

    q_index: torch.Tensor
    q_pos: torch.Tensor
    sink_slot: torch.Tensor
    sink_pos: torch.Tensor
    ring_slot: torch.Tensor
    ring_pos: torch.Tensor


@dataclass
class StreamingMetadata:
    """Per step, shared by the streaming layers of one KV-cache group: the decoding requests (one new token each)
    and the prefilling ones as separate batches, so a prefill chunk's length never pads a decode; slot_mapping [N]:
    where the step's keys are written (-1 = padding, not written)."""

    sink: int
    window: int
    batches: list[StreamingBatch]
    slot_mapping: torch.Tensor


def _slots(block_table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of positions pos [R, K] (-1 = none, slot 0) through block_table [R, blocks]."""
    at = pos.clamp_min(0)
    blocks = block_table.gather(1, (at // block_size).clamp_max(block_table.shape[1] - 1).long())
    return (blocks.long() * block_size + at % block_size).masked_fill(pos < 0, 0)


class StreamingMetadataBuilder(AttentionMetadataBuilder[StreamingMetadata]):
    """Builds `StreamingMetadata` once per step for a group of streaming layers (one sink and window)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sink, self.window, self.block_size = kv_cache_spec.sink, kv_cache_spec.sliding_window, kv_cache_spec.block_size

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> StreamingMetadata:
        meta = common_attn_metadata
        reqs = meta.num_reqs
        starts = meta.query_start_loc[: reqs + 1].long()
        q_lens = starts[1:] - starts[:-1]
        cached = meta.seq_lens[:reqs].long() - q_lens  # C_r: tokens already in the cache
        table = meta.block_table_tensor[:reqs]
        host_lens = meta.query_start_loc_cpu[1 : reqs + 1] - meta.query_start_loc_cpu[:reqs]
        batches = []
        for rows in (torch.nonzero(host_lens == 1)[:, 0], torch.nonzero(host_lens > 1)[:, 0]):
            if len(rows):
                longest = int(host_lens[rows].max())
                rows = rows.to(starts.device)
                batches.append(self._batch(starts[rows], q_lens[rows], cached[rows], table[rows], longest))
        return StreamingMetadata(sink=self.sink, window=self.window, batches=batches, slot_mapping=meta.slot_mapping)

    def _batch(self, starts, q_lens, cached, table, longest: int) -> StreamingBatch:
        """The `StreamingBatch` of requests with first tokens `starts`, query lengths `q_lens` and `cached` tokens
        (each [R]), block table [R, blocks], `longest` = max(q_lens)."""
        device, reqs = starts.device, starts.shape[0]
        steps = torch.arange(longest, device=device)
        real = steps[None, :] < q_lens[:, None]
        sink_pos = torch.arange(self.sink, device=device).expand(reqs, self.sink)
        sink_pos = sink_pos.masked_fill(sink_pos >= cached[:, None], -1)
        ring_pos = cached[:, None] - (self.window - 1) + torch.arange(self.window - 1, device=device)
        ring_pos = ring_pos.masked_fill(ring_pos < self.sink, -1)  # earlier positions are sinks, or before the start
        return StreamingBatch(
            q_index=(starts[:, None] + steps).masked_fill(~real, 0),
            q_pos=(cached[:, None] + steps).masked_fill(~real, -1),
            sink_slot=_slots(table, sink_pos, self.block_size),
            sink_pos=sink_pos,
            ring_slot=_slots(table, ring_pos, self.block_size),
            ring_pos=ring_pos,
        )


def _gather(kv_cache: torch.Tensor, slots: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [R, Hs, K, D] of cache slots [R, K] from kv_cache [blocks, Hs, block_size, 2D]."""
    block_size = kv_cache.shape[2]
    kv = kv_cache[slots // block_size, :, slots % block_size]  # [R, K, Hs, 2D]
    kv = kv.transpose(1, 2)
    return kv[..., :head_dim], kv[..., head_dim:]


class StreamingImpl(AttentionImpl):
    """Stores a step's keys and values in the paged cache, and runs the streaming heads' Λ attention."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
    ) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "logits_soft_cap": logits_soft_cap}
        unsupported["kv_sharing_target_layer_name"] = kv_sharing_target_layer_name
        given = [name for name, value in unsupported.items() if value is not None]
        if given or kv_cache_dtype != "auto":
            raise ValueError(f"duohead's streaming heads do not support {', '.join(given) or f'kv_cache_dtype={kv_cache_dtype}'}")
        self.num_heads, self.head_size, self.scale, self.num_kv_heads = num_heads, head_size, float(scale), num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None

    def do_kv_cache_update(self, layer, key, value, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write key, value [N, Hs, D] at slot_mapping [N] (-1 = padding, skipped) of kv_cache [blocks, Hs, bs, 2D]."""
        tokens = slot_mapping.shape[0]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        block_size = kv_cache.shape[2]
        kv_cache[slots // block_size, :, slots % block_size] = torch.cat([key[:tokens][keep], value[:tokens][keep]], dim=-1)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: StreamingMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [N, Hq, D], key, value [N, Hs, D] (already written to kv_cache) -> output [N, Hq, D]."""
        if attn_metadata is None:  # vLLM's warm-up and profiling runs
            return output
        d = self.head_size
        for b in attn_metadata.batches:
            q = query[b.q_index].transpose(1, 2)  # [R, Hq, Qm, D]
            k, v = key[b.q_index].transpose(1, 2), value[b.q_index].transpose(1, 2)  # [R, Hs, Qm, D]
            sink_k, sink_v = _gather(kv_cache, b.sink_slot, d)
            ring_k, ring_v = _gather(kv_cache, b.ring_slot, d)
            cache = kernels.StreamingView(
                sink_k, sink_v, b.sink_pos, ring_k, ring_v, b.ring_pos, attn_metadata.sink, attn_metadata.window
            )
            out = kernels.streaming_attention(q, k, v, b.q_pos, cache, self.scale)  # [R, Hq, Qm, D]
            real = b.q_pos >= 0
            output[b.q_index[real]] = out.transpose(1, 2)[real].to(output.dtype)
        return output
