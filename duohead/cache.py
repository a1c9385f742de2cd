"""DuoCache: a transformers `Cache` whose layers keep full KV for retrieval heads and sink + window for
streaming heads.

Shape letters: B batch, Hr retrieval KV heads, Hs streaming KV heads, Q new tokens, T tokens seen
(slots, padding included), D head dim, S sink, W window.

Weights are reordered by `duohead.enable` so that in every layer the retrieval KV heads come first:
`keys[:, :Hr]` are retrieval, `keys[:, Hr:]` streaming. The cache only stores and counts; the
attention (`duohead.attention`) decides what each query sees.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from duohead import kernels
from duohead.accounting import kv_bytes
from duohead.architecture import LayerLayout, layer_layouts
from duohead.kernels import reference
from duohead.kernels.streaming_view import StreamingView

RECORDING_ROLLBACK = 64  # tokens a cache can take back once generate() starts assisted / prompt-lookup decoding


def _round_up(tokens: int, multiple: int = 64) -> int:
    return -(-tokens // multiple) * multiple


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes a cache: "cache" (transformers >= 5.24) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class RetrievalKV:
    """Full KV of the retrieval heads, [B, Hr, T, D], in one buffer [2, B, Hr, capacity, D].

    When full, the capacity grows by a quarter (amortised O(1) copies per token, at most 25% unused);
    a cache sized up front (`DuoCache.from_model(model, max_length=)`, as `generate()` does) never grows.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # [B, Hr, capacity, D]
        self.length = 0

    @classmethod
    def empty(cls, like: torch.Tensor, capacity: int) -> RetrievalKV:
        batch, heads, _, head_dim = like.shape
        buf = like.new_empty(2, batch, heads, capacity, head_dim)
        return cls(buf[0], buf[1])

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [B, Hr, Q, D] after the stored ones; return views of all T tokens."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            grown = RetrievalKV.empty(self.keys, _round_up(max(end, self.keys.shape[2] * 5 // 4)))
            grown.keys[:, :, : self.length] = self.keys[:, :, : self.length]
            grown.values[:, :, : self.length] = self.values[:, :, : self.length]
            self.keys, self.values = grown.keys, grown.values
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class StreamingKV:
    """Constant-size KV of the streaming heads: the first S real tokens and a ring of the last R >= W.

    sink_k/sink_v [B, Hs, S, D] with sink_pos [B, S]; ring_k/ring_v [B, Hs, R, D] with ring_pos [B, R].
    Positions are real-token indices (padding excluded), -1 marks an empty slot. A token at position
    p < S lives in the sink, one at p >= S in ring slot (p - S) % R. R = W + rollback: the extra slots hold
    the tokens that a rollback of up to `rollback` tokens (`drop_from`) brings back into the window.
    """

    def __init__(self, like: torch.Tensor, sink: int, window: int, rollback: int = 0):
        batch, heads, _, head_dim = like.shape
        self.sink, self.window = sink, window
        self.sink_k = like.new_zeros(batch, heads, sink, head_dim)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.sink_pos = torch.full((batch, sink), -1, dtype=torch.long, device=like.device)
        self.ring_k, self.ring_v, self.ring_pos = self._empty_ring(like, window + rollback)

    @staticmethod
    def _empty_ring(like: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, heads, _, head_dim = like.shape
        keys = like.new_zeros(batch, heads, slots, head_dim)
        return keys, torch.zeros_like(keys), torch.full((batch, slots), -1, dtype=torch.long, device=like.device)

    @property
    def rollback(self) -> int:
        return self.ring_k.shape[2] - self.window

    def grow_ring(self, rollback: int) -> None:
        """Re-allocate the ring with W + rollback slots, moving every stored token to its slot in the new ring."""
        old_k, old_v, old_pos = self.ring_k, self.ring_v, self.ring_pos
        self.ring_k, self.ring_v, self.ring_pos = self._empty_ring(old_k, self.window + rollback)
        rows, cols = (old_pos >= 0).nonzero(as_tuple=True)
        positions = old_pos[rows, cols]
        slots = (positions - self.sink) % self.ring_k.shape[2]  # distinct: the stored positions span < old R <= new R
        self.ring_k[rows, :, slots] = old_k[rows, :, cols]
        self.ring_v[rows, :, slots] = old_v[rows, :, cols]
        self.ring_pos[rows, slots] = positions

    def drop_from(self, real_length: torch.Tensor) -> None:
        """Forget the tokens at positions >= real_length [B] (a rollback): their slots become empty."""
        self.sink_pos.masked_fill_(self.sink_pos >= real_length[:, None], -1)
        self.ring_pos.masked_fill_(self.ring_pos >= real_length[:, None], -1)

    def append(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """Store new tokens' keys/values [B, Hs, Q, D] at real positions pos [B, Q] (-1 = padding, skipped).
        In place; on CUDA one Triton launch without a device-to-host sync. See `duohead.kernels.streaming_append`."""
        kernels.streaming_append(keys, values, pos, self.view())

    def view(self) -> StreamingView:
        """The cache as the kernels take it: its tensors (shared, so kernels write this cache), sink and window."""
        return StreamingView(
            self.sink_k, self.sink_v, self.sink_pos, self.ring_k, self.ring_v, self.ring_pos, self.sink, self.window
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.view().tensors()


@dataclass
class PendingKV:
    """New keys/values of one layer, handed by `DuoCacheLayer.update` to the duohead attention, which
    stores them once it knows which tokens are padding. keys, values [B, Hkv, Q, D]."""

    layer: DuoCacheLayer
    keys: torch.Tensor
    values: torch.Tensor


class DuoCacheLayer(CacheLayerMixin):
    """One decoder layer's cache: `RetrievalKV` for the first `num_retrieval_heads` KV heads,
    `StreamingKV` for the rest. Filled by `duohead.attention`; `update` only defers.

    Dynamic (default): while every streaming head still sees every token (T <= S + W slots), all heads' KV sit
    in one `unsplit` buffer and the attention runs as one call, exactly what full attention computes. On the CPU
    the buffer keeps going for `kernels.split_margin` more slots (one call, the Λ rule as a per-head mask), where
    two calls would cost more than the skipped tokens save. The first forward past `split_at` (S + W + that
    margin) splits it into retrieval KV and sink + ring (allocated then). `seen` is a Python int.

    Static (`static=True`, needs `max_length`): every buffer is allocated at the first forward, `seen` is a
    0-dim device tensor, writes are index writes at `seen` and `slot_real` [B, C] keeps which retrieval slots
    hold real tokens, so a decode step has fixed shapes, no host sync and no data-dependent branch: it can be
    compiled (`torch.compile(..., fullgraph=True)`) and replayed.
    """

    is_sliding = False

    def __init__(
        self,
        num_retrieval_heads: int,
        sink: int,
        window: int,
        max_length: int | None = None,
        rollback: int = 0,
        static: bool = False,
    ):
        super().__init__()
        if static and not max_length:
            raise ValueError("a static DuoCache needs max_length (tokens, padding included) to size its buffers")
        self.num_retrieval_heads, self.sink, self.window = num_retrieval_heads, sink, window
        self.max_length = max_length  # expected tokens (slots); sizes the retrieval buffer up front
        self.rollback = rollback  # tokens `crop` can take back: streaming heads keep W + rollback recent tokens
        self.static = static
        self.is_compileable = static
        self.unsplit: RetrievalKV | None = None  # all heads' KV while T <= split_at (dynamic only)
        self.split_at = sink + window  # slots the unsplit buffer may hold: S + W + `kernels.split_margin(device)`
        self.retrieval: RetrievalKV | None = None
        self.streaming: StreamingKV | None = None
        self.slot_real: torch.Tensor | None = None  # static only: [B, C] bool, which retrieval slots hold real tokens
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen per row
        self.seen: int | torch.Tensor = 0  # slots seen, padding included (a 0-dim device tensor when static)
        self.num_kv_heads = 0
        self.head_dim = 0
        self.dtype = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        batch, self.num_kv_heads, q_len, self.head_dim = key_states.shape
        hr = self.num_retrieval_heads
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        if self.static:
            self._allocate_static(key_states)
        else:
            self.split_at = self.sink + self.window + kernels.split_margin(self.device)
            if self.num_kv_heads > hr and q_len <= self.split_at:
                short = self.sink + self.window if self.max_length is None else min(self.split_at, self.max_length)
                self.unsplit = RetrievalKV.empty(key_states, capacity=_round_up(max(q_len, short)))
            else:
                self._allocate_split(key_states, q_len)
        self.is_initialized = True

    def _allocate_static(self, like: torch.Tensor) -> None:
        """Allocate every buffer for max_length slots, at fixed addresses (static)."""
        hr, batch = self.num_retrieval_heads, like.shape[0]
        capacity = _round_up(self.max_length)
        self.seen = torch.zeros((), dtype=torch.long, device=self.device)
        self.slot_real = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        if hr > 0:  # zeros: the attention reads every slot (masked), and 0 x NaN of stale memory would be NaN
            self.retrieval = RetrievalKV.empty(like[:, :hr], capacity=capacity)
            self.retrieval.keys.zero_()
            self.retrieval.values.zero_()
        if self.num_kv_heads > hr:
            self.streaming = StreamingKV(like[:, hr:], self.sink, self.window, self.rollback)
        if not torch.compiler.is_compiling():  # fixed addresses let a compiled step be replayed (CUDA graphs)
            for tensor in self._tensors():
                torch._dynamo.mark_static_address(tensor)

    def _allocate_split(self, like: torch.Tensor, tokens: int) -> None:
        """Allocate retrieval KV (sized for max_length, else `tokens`, at least 256) and sink + ring (dynamic)."""
        hr = self.num_retrieval_heads
        if hr > 0:
            self.retrieval = RetrievalKV.empty(like[:, :hr], capacity=_round_up(max(tokens, self.max_length or 256)))
        if like.shape[1] > hr:
            self.streaming = StreamingKV(like[:, hr:], self.sink, self.window, self.rollback)

    def needs_split(self, q_len: int) -> bool:
        """Whether `q_len` more slots take the unsplit layer past `split_at` (then call `split` before storing them)."""
        return self.unsplit is not None and self.seen + q_len > self.split_at

    def split(self, key_is_real: torch.Tensor | None) -> None:
        """Move the unsplit KV into retrieval KV and sink + ring. key_is_real [B, >= seen] bool (None: no padding)
        gives the stored tokens' real positions. Once per layer, in eager mode (the reference append reads the host)."""
        held = self.unsplit.length
        keys, values = self.unsplit.keys[:, :, :held], self.unsplit.values[:, :, :held]
        self.unsplit = None
        self._allocate_split(keys, held + 1)
        hr = self.num_retrieval_heads
        if self.retrieval is not None:
            self.retrieval.append(keys[:, :hr], values[:, :hr])
        if key_is_real is None:
            pos = torch.arange(held, device=keys.device).expand(keys.shape[0], held)
        else:
            pos = reference.real_positions(key_is_real[:, :held])
        self.streaming.append(keys[:, hr:], values[:, hr:], pos)

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for static addresses)."""
        held = [self.real_seen]
        if self.static:
            held += [self.seen, self.slot_real]
        for kv in (self.unsplit, self.retrieval):
            if kv is not None:
                held += [kv.keys, kv.values]
        if self.streaming is not None:
            held += self.streaming.tensors()
        return held

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[PendingKV, PendingKV]:
        """Defer: the duohead attention stores the tokens (it knows the padding). Returns the pending tokens twice,
        in the places of keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pending = PendingKV(self, key_states, value_states)
        return pending, pending

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(cached + new slots, 0); a 0-dim tensor for a static layer, which tells the mask function to read only the
        new tokens' columns of attention_mask (the cache keeps the earlier slots' padding)."""
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.max_length if self.static else -1

    def memory(self) -> dict[str, int]:
        """Bytes of KV held: retrieval (T tokens), streaming (S + W + rollback tokens), and what full attention would
        hold. While the layer is unsplit (T <= `split_at`) every head holds its T tokens, as with full attention."""
        if not self.is_initialized:
            return {"retrieval_bytes": 0, "streaming_bytes": 0, "full_bytes": 0, "reserved_bytes": 0}
        seen = int(self.seen)
        shape = (self.head_dim, self.dtype.itemsize, self.real_seen.shape[0])
        if self.unsplit is not None:  # every head holds its T tokens, as with full attention
            held = kv_bytes(self.num_kv_heads, 0, seen, 0, *shape)
            reserved = kv_bytes(self.num_kv_heads, 0, self.unsplit.keys.shape[2], 0, *shape)["retrieval_bytes"]
            return {**held, "reserved_bytes": reserved}
        hs = self.num_kv_heads - self.num_retrieval_heads
        slots = self.sink + self.streaming.ring_k.shape[2] if self.streaming else 0
        held = kv_bytes(self.num_retrieval_heads, hs, seen, slots, *shape)
        capacity = self.retrieval.keys.shape[2] if self.retrieval else 0
        reserved = held["streaming_bytes"] + kv_bytes(self.num_retrieval_heads, 0, capacity, 0, *shape)["retrieval_bytes"]
        return {**held, "reserved_bytes": reserved}

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (select, reorder, repeat) to every stored tensor."""
        if not self.is_initialized:
            return
        for name in ("unsplit", "retrieval"):
            kv = getattr(self, name)
            if kv is not None:
                mapped = RetrievalKV(fn(kv.keys), fn(kv.values))
                mapped.length = kv.length
                setattr(self, name, mapped)
        if self.streaming is not None:
            s = self.streaming
            s.sink_k, s.sink_v, s.sink_pos, s.ring_k, s.ring_v, s.ring_pos = map(fn, s.tensors())
        if self.slot_real is not None:
            self.slot_real = fn(self.slot_real)
        self.real_seen = fn(self.real_seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def has_streaming_heads(self) -> bool:
        return self.num_kv_heads > self.num_retrieval_heads

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can take tokens back: always for retrieval heads; streaming heads need rollback slots."""
        return self.rollback > 0 or (self.is_initialized and not self.has_streaming_heads)

    def activate_past_recording(self) -> None:
        """transformers' hook before assisted / prompt-lookup decoding, which rolls back rejected draft tokens:
        keep at least `RECORDING_ROLLBACK` extra tokens in the streaming heads' ring."""
        self.set_rollback(max(self.rollback, RECORDING_ROLLBACK))

    def set_rollback(self, rollback: int) -> None:
        """Let `crop` take back up to `rollback` tokens (grows the streaming ring to W + rollback slots)."""
        self.rollback = rollback
        if self.streaming is not None and self.streaming.rollback < rollback:
            self.streaming.grow_ring(rollback)

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise ValueError, changing nothing, if `crop(tokens_to_remove)` cannot be done."""
        if tokens_to_remove > 0:
            raise ValueError(f"DuoCache.crop takes 0 or a negative number of tokens to remove; got {tokens_to_remove}")
        count = -tokens_to_remove
        seen = int(self.seen)
        if count > seen:
            raise ValueError(f"cannot remove {count} tokens from a cache holding {seen}")
        if self.has_streaming_heads and count > self.rollback:  # (an empty layer already failed on count > seen)
            raise ValueError(
                f"DuoCache can take back at most {self.rollback} tokens (streaming heads keep window + {self.rollback} "
                f"recent tokens); asked for {count}. Create it with duohead.DuoCache.from_model(model, rollback={count}) or more"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens (transformers' convention: 0 or negative). Rows must have
        no right padding among those tokens (true for unpadded and left-padded batches)."""
        self.check_crop(tokens_to_remove)
        count = -tokens_to_remove
        if count == 0 or not self.is_initialized:
            return
        if self.static:
            end = int(self.seen)
            self.slot_real[:, end - count : end] = False
            self.seen.sub_(count)
            self.real_seen.sub_(count).clamp_(min=0)
        else:
            self.seen -= count
            self.real_seen = (self.real_seen - count).clamp_min(0)
        for kv in (self.unsplit, self.retrieval):
            if kv is not None and not self.static:
                kv.length -= count
        if self.streaming is not None:
            self.streaming.drop_from(self.real_seen)

    def reset(self) -> None:
        self.__init__(self.num_retrieval_heads, self.sink, self.window, self.max_length, self.rollback, self.static)


class DuoCache(Cache):
    """The KV cache of a duohead-enabled model: one `DuoCacheLayer` per decoder layer.

    `DuoCache.from_model(model)` builds an empty cache for a model prepared with `duohead.enable`
    (`DuoCache(layouts)` from its `LayerLayout`s, one per layer); pass it as `past_key_values=` / `cache=` to
    `forward()` or `generate()` (generate creates one by itself).
    `max_length` (tokens, padding included), when known, sizes the retrieval buffers once: no regrowth.
    `rollback` (tokens) is how many of the newest tokens `crop` can take back (speculative decoding rejects
    draft tokens): streaming heads then keep window + rollback recent tokens. Assisted and prompt-lookup
    decoding in `generate()` raise it to at least `RECORDING_ROLLBACK` by themselves.
    `static=True` (needs `max_length`) makes every decode step fixed-shape and free of host syncs, for
    `torch.compile` (`generate(..., cache_implementation="static")` creates one); see `DuoCacheLayer`.
    """

    def __init__(self, layouts: Sequence[LayerLayout], max_length: int | None = None, rollback: int = 0, static: bool = False):
        layers = [DuoCacheLayer(lay.num_retrieval_heads, lay.sink, lay.window, max_length, rollback, static) for lay in layouts]
        super().__init__(layers=layers)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, max_length: int | None = None, rollback: int = 0, static: bool = False
    ) -> DuoCache:
        """An empty cache for a model prepared with `duohead.enable` (its layouts read off its attention modules)."""
        return cls(layer_layouts(model), max_length=max_length, rollback=rollback, static=static)

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the newest -tokens_to_remove tokens in every layer, or raise ValueError and change nothing."""
        for layer in self.layers:
            layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def memory(self) -> dict[str, int]:
        """Bytes held, summed over layers: `retrieval_bytes` (T tokens per retrieval head), `streaming_bytes`
        (S + W + rollback tokens per streaming head), `full_bytes` (what full attention would hold for the same tokens),
        `reserved_bytes` (allocated, including spare capacity), `total_bytes` (retrieval + streaming)."""
        totals: dict[str, int] = {}
        for layer in self.layers:
            for key, value in layer.memory().items():
                totals[key] = totals.get(key, 0) + value
        totals["total_bytes"] = totals["retrieval_bytes"] + totals["streaming_bytes"]
        return totals
