"""The streaming heads' KV in vLLM's paged pool: a spec that keeps the first S and the last W tokens, and its manager.

vLLM's `SlidingWindowSpec` keeps the last W tokens of a request and its manager frees every block before them, the
first S tokens included. `SinkWindowSpec` adds the sink: `SinkWindowManager` frees the blocks strictly between the
sink blocks and the window, so a streaming head's request holds ceil(S / block) + ceil((W - 1 + chunk) / block) + 1
blocks at most, whatever its length. Freed blocks are replaced by vLLM's null block in the block table, as for
sliding windows; attention never reads them (`duohead.vllm.backend` gathers only sink and window positions).

Prefix caching: a streaming group reports no cache hit, so a model served with duohead recomputes shared prefixes
(vLLM takes the hit common to every group). The KV of a cached block would be right (it depends on the prefix
only), but a hit needs both the sink blocks and the last W tokens before it, which vLLM's hit search does not
express for one group; reuse is future work, correctness first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """KV of streaming heads: `sink` first tokens and the last `sliding_window` tokens (W) of every request."""

    sink: int

    @property
    def sink_blocks(self) -> int:
        """Blocks that hold the sink tokens, kept for the whole request."""
        return cdiv(self.sink, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """The sliding window's cap (window and in-flight tokens) plus the sink blocks; never more than the whole
        request. vLLM sizes the pool and admits requests by this number."""
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.sink_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(
            isinstance(spec, SinkWindowSpec) and (spec.sink, spec.sliding_window) == (self.sink, self.sliding_window)
            for spec in kv_cache_specs.values()
        )


class SinkWindowManager(SlidingWindowManager):
    """Frees the blocks between the sink blocks and the window; never reports a prefix-cache hit."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = cdiv(kv_cache_spec.sink, self.block_size)

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        """Free the blocks wholly before the window of the next token, except the sink blocks."""
        skipped_blocks = self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size
        blocks = self.req_to_blocks.get(request_id)
        if blocks is not None:
            self._remove_blocks_in_range(request_id, self.sink_blocks, min(skipped_blocks, len(blocks)))

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        """No prefix reuse for streaming heads (see the module's docstring)."""
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens: int, retention_interval=None, *, replay_boundaries) -> None:
        """Nothing to cache: no hit is ever looked up."""
