"""The streaming heads' KV in vLLM's paged pool: a spec that keeps the first S and the last W tokens, and its manager.

vLLM's `SlidingWindowSpec` keeps the last W tokens of a request and its manager frees every block before them, the
first S tokens included; during a prefill chunk it also holds a block for every token of the chunk. A streaming
head needs neither: `SinkWindowManager` keeps the sink blocks, frees the blocks strictly between them and the window,
and gives a new chunk real blocks only where its tokens will be sinks or inside the window once the chunk is done.
The other positions of the chunk map to vLLM's null block: their keys and values are written there and never read,
because the streaming backend takes a chunk's own keys from the step (`duohead.vllm.backend`) and reads the cache
only at sink and window positions. So a request holds at most ceil(S / block) + 2 (ceil((W - 1) / block) + 1)
blocks per streaming group (its window before and after a chunk), whatever its length and the chunk size.

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

    @property
    def window_blocks(self) -> int:
        """Blocks that can hold the W - 1 cached tokens a new token may see (the window may straddle a boundary)."""
        return cdiv(self.sliding_window - 1, self.block_size) + 1

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """Blocks a request holds at its peak: the sink blocks, and the window before and after a step (both held
        while the step runs); never more than the whole request. vLLM sizes the pool and admits requests by it."""
        return min(self.sink_blocks + 2 * self.window_blocks, cdiv(max_model_len, self.block_size))

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
        self._freed_up_to: dict[str, int] = {}  # per request: blocks before this index (past the sink) are null

    def _keeps(self, block: int, num_tokens: int) -> bool:
        """Whether block index `block` must hold real KV once `num_tokens` tokens are computed (sink or window)."""
        return block < self.sink_blocks or block >= self.get_num_skipped_tokens(num_tokens) // self.block_size

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        """Real blocks the request needs for `num_tokens` slots: the new ones that `allocate_new_blocks` keeps
        (new sink blocks, and new blocks from the window's first on), counted without a walk over the prompt."""
        have, need = len(self.req_to_blocks.get(request_id, ())), cdiv(num_tokens, self.block_size)
        window_start = max(have, self.sink_blocks, self.get_num_skipped_tokens(num_tokens) // self.block_size)
        return max(0, min(need, self.sink_blocks) - have) + max(0, need - window_start)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        """Extend the request's block table to `num_tokens` slots: real blocks for sink and window positions, the
        null block for the rest of a long chunk (written, never read). Returns the blocks appended, null ones included."""
        blocks = self.req_to_blocks[request_id]
        added = range(len(blocks), cdiv(num_tokens, self.block_size))
        real = self.block_pool.get_new_blocks(sum(self._keeps(b, num_tokens) for b in added))
        fresh = iter(real)
        extension = [next(fresh) if self._keeps(b, num_tokens) else self._null_block for b in added]
        blocks.extend(extension)
        if self.records_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in real)
        return extension  # null blocks included: the worker's block table is positional

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        """Free the blocks wholly before the window of the next token, except the sink blocks. Unlike a sliding
        window's table, ours has null blocks between real ones (the middle of each long chunk), so the walk cannot
        stop at the first null block: it starts where the previous one ended (`_freed_up_to`)."""
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return
        start = self._freed_up_to.get(request_id, self.sink_blocks)
        stop = min(self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size, len(blocks))
        freed = [blocks[b] for b in range(start, stop) if not blocks[b].is_null]
        for b in range(start, stop):
            blocks[b] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)
        self._freed_up_to[request_id] = max(start, stop)

    def pop_blocks_for_free(self, request_id: str) -> list:
        self._freed_up_to.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

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
