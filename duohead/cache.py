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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from duohead import kernels
from duohead.accounting import kv_bytes
from duohead.architecture import LayerLayout, attention_modules, layer_layouts
from duohead.kernels import reference
from duohead.kernels.flashinfer_retrieval import FlashInferPlans
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


@dataclass(frozen=True)
class Padding:
    """Which tokens of one forward are real, computed once per forward (by the mask function) for every layer.

    query_is_real [B, Q] bool: the new tokens; query_rank [B, Q] long: each new real token's index among the row's new
    real tokens (-1 = padding), so a layer's real positions are its `real_seen` + query_rank; query_count [B]: real
    new tokens per row; key_is_real [B, T] bool: every slot, cached and new, or None for a static `DuoCache` (it
    keeps the earlier slots' flags itself)."""

    query_is_real: torch.Tensor
    query_rank: torch.Tensor
    query_count: torch.Tensor
    key_is_real: torch.Tensor | None

    @classmethod
    def of(cls, query_is_real: torch.Tensor, key_is_real: torch.Tensor | None) -> Padding:
        rank = (query_is_real.long().cumsum(dim=1) - 1).masked_fill(~query_is_real, -1)
        return cls(query_is_real, rank, query_is_real.sum(dim=1), key_is_real)

    def on(self, device: torch.device) -> Padding:
        """The same facts on `device` (itself when they are there already)."""
        if self.query_is_real.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)
        return Padding(*(move(t) for t in (self.query_is_real, self.query_rank, self.query_count, self.key_is_real)))


@dataclass
class PendingKV:
    """New keys/values of one layer, handed by `DuoCacheLayer.update` to the duohead attention, which passes them
    back to `DuoCacheLayer.store` together with the forward's padding. keys, values [B, Hkv, Q, D]."""

    layer: DuoCacheLayer
    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class RetrievalRead:
    """What the retrieval heads attend to once the layer has stored the new tokens: keys, values [B, Hr, T, D], the
    Q queries' own keys last, causal; key_is_real [B, T] bool or None (no padding). visible [B, Q, T] bool, when not
    None, says exactly which keys each query sees instead (a static layer's fixed-shape step over every slot)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_is_real: torch.Tensor | None
    visible: torch.Tensor | None = None


@dataclass(frozen=True)
class StreamingWrite:
    """The streaming heads' new tokens, keys, values [B, Hs, Q, D] at real positions q_pos [B, Q] (-1 = padding), and
    the streaming cache as it was before them. The kernel attends, then stores them (attend-then-store:
    `kernels.streaming_attention_and_append`), so no ring slot is overwritten before the new queries have read it."""

    keys: torch.Tensor
    values: torch.Tensor
    q_pos: torch.Tensor
    cache: StreamingView


@dataclass(frozen=True)
class LayerStep:
    """What one forward's attention reads from a `DuoCacheLayer` after `store`.

    Unsplit (a dynamic layer holding every head's KV in one buffer): `unsplit` is every KV head's read
    ([B, Hkv, T, D]) and `cached` the T - Q slots held before; past S + W slots the Λ rule hides some of them from
    the streaming heads (heads `num_retrieval_heads`..). Split: `retrieval` (None without retrieval heads) and
    `streaming` (None without streaming heads). q_pos [B, Q]: the new tokens' real positions (-1 = padding).
    """

    num_retrieval_heads: int
    sink: int
    window: int
    q_pos: torch.Tensor
    cached: int = 0
    unsplit: RetrievalRead | None = None
    retrieval: RetrievalRead | None = None
    streaming: StreamingWrite | None = None
    plans: FlashInferPlans | None = None  # the owner of FlashInfer's plans for this step (the cache's)


def check_layout(layer: DuoCacheLayer, layout: LayerLayout | None) -> None:
    """Raise ValueError unless `layer` was made for `layout`, the head layout its model's attention now has."""
    if layout is layer.layout or layout == layer.layout:
        return
    if layout is None:
        raise ValueError(
            "this DuoCache belongs to a duohead-enabled model, and the model is no longer enabled (duohead.disable): "
            "use a new cache of the model's own kind"
        )
    raise ValueError(
        f"this DuoCache was made for another head layout ({layer.layout.num_retrieval_heads} retrieval KV heads, "
        f"order {list(layer.layout.kv_order)}, sink {layer.layout.sink}, window {layer.layout.window}; the model now has "
        f"{layout.num_retrieval_heads}, {list(layout.kv_order)}, {layout.sink}, {layout.window}): the model was enabled "
        "again since; create a new cache with duohead.DuoCache.from_model(model)"
    )


class DuoCacheLayer(CacheLayerMixin):
    """One decoder layer's cache: `RetrievalKV` for the first `num_retrieval_heads` KV heads, `StreamingKV` for the
    rest. The layer stores tokens and counts them; the attention asks it what to attend to (`store`).

    transformers calls `update` before the attention knows which tokens are padding, so `update` hands the new
    tokens on (`PendingKV`) and the duohead attention calls `store` with the forward's padding: the layer writes
    the retrieval heads' tokens, advances `seen` (slots, padding included) and `real_seen` [B] (real tokens per
    row), and returns a `LayerStep`. The streaming heads' tokens are written by the kernel that attends to them.
    Two storage regimes, one class each: `DynamicDuoLayer` (grows; a short-prompt "unsplit" phase) and
    `StaticDuoLayer` (fixed buffers, compilable). `layout` is the `LayerLayout` the layer was made for: a model
    whose layout differs (re-enabled with another pattern, or disabled) is refused.
    """

    is_sliding = False

    def __init__(self, layout: LayerLayout, max_length: int | None = None, rollback: int = 0):
        super().__init__()
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"DuoCache max_length must be a positive number of tokens or None; got {max_length!r}")
        if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
            raise ValueError(f"DuoCache rollback must be an integer >= 0 (tokens); got {rollback!r}")
        self.layout = layout
        self.num_retrieval_heads, self.sink, self.window = layout.num_retrieval_heads, layout.sink, layout.window
        self.max_length = max_length  # expected tokens (slots); sizes the retrieval buffer up front
        self.rollback = rollback  # tokens `crop` can take back: streaming heads keep W + rollback recent tokens
        self.retrieval: RetrievalKV | None = None
        self.streaming: StreamingKV | None = None
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen per row
        self.seen: int | torch.Tensor = 0  # slots seen, padding included
        self.num_kv_heads = len(layout.kv_order)
        self.head_dim = 0
        self.dtype = None
        self._module: weakref.ref | None = None  # the attention module this layer serves, when known (`watch`)
        self.plans: FlashInferPlans | None = None  # set by `DuoCache`: one owner of FlashInfer plans for all its layers

    def watch(self, module: torch.nn.Module) -> None:
        """Serve only `module` as it is now: once it is disabled or re-enabled with another layout, `update` refuses."""
        self._module = weakref.ref(module)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.head_dim = key_states.shape[3]
        self.real_seen = torch.zeros(key_states.shape[0], dtype=torch.long, device=self.device)
        self._allocate(key_states)
        self.is_initialized = True

    def _allocate(self, like: torch.Tensor) -> None:
        """Allocate the buffers at the first forward (like [B, Hkv, Q, D]: the first tokens)."""
        raise NotImplementedError

    def _new_streaming(self, like: torch.Tensor) -> StreamingKV | None:
        hr = self.num_retrieval_heads
        return StreamingKV(like[:, hr:], self.sink, self.window, self.rollback) if self.has_streaming_heads else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[PendingKV, PendingKV]:
        """Defer: the duohead attention stores the tokens through `store` (it knows the padding). Returns the pending
        tokens twice, in the places of keys and values."""
        if self._module is not None and not torch.compiler.is_compiling():
            module = self._module()
            if module is not None:
                check_layout(self, getattr(module, "duohead_layout", None))
        batch, heads = key_states.shape[:2]
        if heads != self.num_kv_heads:
            raise ValueError(
                f"this DuoCache layer was made for {self.num_kv_heads} KV heads; the model gave {heads}: "
                "create the cache with duohead.DuoCache.from_model(model) for this model"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif batch != self.real_seen.shape[0]:
            raise ValueError(
                f"this DuoCache holds a batch of {self.real_seen.shape[0]} rows; the forward gave {batch}: a new batch "
                "needs a new cache (duohead.DuoCache.from_model(model)), or use its batch methods (batch_select_indices, ...)"
            )
        pending = PendingKV(self, key_states, value_states)
        return pending, pending

    def store(self, keys: torch.Tensor, values: torch.Tensor, padding: Padding | None) -> LayerStep:
        """Store the new tokens keys, values [B, Hkv, Q, D] of one forward and advance the counters; return what the
        attention reads. padding: the forward's `Padding` on this layer's device, or None (every token is real)."""
        q_len = keys.shape[2]
        if padding is None:
            q_pos = self.real_seen[:, None] + torch.arange(q_len, device=keys.device)
            step = self._store(keys, values, q_pos, None, None)
            self.real_seen.add_(q_len)
            return step
        q_pos = torch.where(padding.query_rank >= 0, self.real_seen[:, None] + padding.query_rank, -1)
        step = self._store(keys, values, q_pos, padding.query_is_real, padding.key_is_real)
        self.real_seen.add_(padding.query_count)
        return step

    def _store(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        q_pos: torch.Tensor,
        query_is_real: torch.Tensor | None,
        key_is_real: torch.Tensor | None,
    ) -> LayerStep:
        raise NotImplementedError

    def _streaming_write(self, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor) -> StreamingWrite | None:
        if self.streaming is None:
            return None
        hr = self.num_retrieval_heads
        return StreamingWrite(keys[:, hr:], values[:, hr:], q_pos, self.streaming.view())

    def _step(self, q_pos: torch.Tensor, **reads) -> LayerStep:
        return LayerStep(self.num_retrieval_heads, self.sink, self.window, q_pos, plans=self.plans, **reads)

    def _stores(self) -> tuple[RetrievalKV | None, ...]:
        """The layer's growable KV stores (retrieval, and the unsplit buffer of a dynamic layer)."""
        return (self.retrieval,)

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for static addresses)."""
        held = [self.real_seen]
        for kv in self._stores():
            if kv is not None:
                held += [kv.keys, kv.values]
        if self.streaming is not None:
            held += self.streaming.tensors()
        return held

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def memory(self) -> dict[str, int]:
        """Bytes of KV held: retrieval (T tokens), streaming (S + W + rollback tokens), and what full attention would
        hold. While a dynamic layer is unsplit every head holds its T tokens, as with full attention."""
        if not self.is_initialized:
            return {"retrieval_bytes": 0, "streaming_bytes": 0, "full_bytes": 0, "reserved_bytes": 0}
        shape = (self.head_dim, self.dtype.itemsize, self.real_seen.shape[0])
        hs = self.num_kv_heads - self.num_retrieval_heads
        slots = self.sink + self.streaming.ring_k.shape[2] if self.streaming else 0
        seen = int(self.seen)
        held = kv_bytes(self.num_retrieval_heads, hs, seen, slots, *shape, full_tokens=self.layout.full_tokens(seen))
        capacity = self.retrieval.keys.shape[2] if self.retrieval else 0
        reserved = held["streaming_bytes"] + kv_bytes(self.num_retrieval_heads, 0, capacity, 0, *shape)["retrieval_bytes"]
        return {**held, "reserved_bytes": reserved}

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (select, reorder, repeat) to every stored tensor."""
        if not self.is_initialized:
            return
        for kv in self._stores():
            if kv is not None:
                kv.keys, kv.values = fn(kv.keys), fn(kv.values)
        if self.streaming is not None:
            s = self.streaming
            s.sink_k, s.sink_v, s.sink_pos, s.ring_k, s.ring_v, s.ring_pos = map(fn, s.tensors())
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
        return self.rollback > 0 or not self.has_streaming_heads

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """transformers' hook before assisted / prompt-lookup decoding, which rolls back rejected draft tokens:
        keep at least `RECORDING_ROLLBACK` extra tokens in the streaming heads' ring, or the draft length transformers
        >= 5.25 passes (`recurrent_states_to_keep`) where it is longer."""
        self.set_rollback(max(self.rollback, RECORDING_ROLLBACK, recurrent_states_to_keep or 0))

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
        self._drop_slots(count)
        self.real_seen.sub_(count).clamp_(min=0)
        if self.streaming is not None:
            self.streaming.drop_from(self.real_seen)

    def _drop_slots(self, count: int) -> None:
        """Forget the newest `count` slots of the retrieval stores and of `seen`."""
        raise NotImplementedError

    def reset(self) -> None:
        self.__init__(self.layout, self.max_length, self.rollback)


class DynamicDuoLayer(DuoCacheLayer):
    """A layer whose buffers grow with the tokens (the default). `seen` is a Python int.

    Two phases. Unsplit: while the streaming heads still see every token (T <= S + W slots), all heads' KV sit in
    one buffer (`unsplit`) and the attention is one call, exactly full attention. The buffer keeps going for the
    backend's split margin (`kernels.split_margin`: on the CPU two calls would cost more than the skipped tokens
    save; 0 elsewhere), the Λ rule then being a per-head mask. Split: the first forward past `split_at` moves the KV
    into retrieval KV and sink + ring, once.
    """

    def __init__(self, layout: LayerLayout, max_length: int | None = None, rollback: int = 0, split_margin: int | None = None):
        super().__init__(layout, max_length, rollback)
        if split_margin is not None and (isinstance(split_margin, bool) or not isinstance(split_margin, int) or split_margin < 0):
            raise ValueError(f"DuoCache split_margin must be an integer >= 0 (tokens) or None; got {split_margin!r}")
        self.split_margin = split_margin  # None: the backend's, `kernels.split_margin(device)`
        self.unsplit: RetrievalKV | None = None  # every head's KV while T <= split_at
        self.split_at = self.sink + self.window  # S + W + the split margin, set at the first forward

    def _allocate(self, like: torch.Tensor) -> None:
        q_len = like.shape[2]
        margin = kernels.split_margin(self.device) if self.split_margin is None else self.split_margin
        self.split_at = self.sink + self.window + margin
        if self.has_streaming_heads and q_len <= self.split_at:
            short = self.sink + self.window if self.max_length is None else min(self.split_at, self.max_length)
            self.unsplit = RetrievalKV.empty(like, capacity=_round_up(max(q_len, short)))
        else:
            self._allocate_split(like, q_len)

    def _allocate_split(self, like: torch.Tensor, tokens: int) -> None:
        """Allocate retrieval KV (sized for max_length, else `tokens`, at least 256) and sink + ring."""
        hr = self.num_retrieval_heads
        if hr > 0:
            self.retrieval = RetrievalKV.empty(like[:, :hr], capacity=_round_up(max(tokens, self.max_length or 256)))
        self.streaming = self._new_streaming(like)

    def _split(self, key_is_real: torch.Tensor | None) -> None:
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

    def _store(self, keys, values, q_pos, query_is_real, key_is_real) -> LayerStep:
        cached, q_len = self.seen, keys.shape[2]
        if self.unsplit is not None and cached + q_len > self.split_at:
            self._split(key_is_real)
        self.seen += q_len
        if self.unsplit is not None:
            all_keys, all_values = self.unsplit.append(keys, values)
            return self._step(q_pos, cached=cached, unsplit=RetrievalRead(all_keys, all_values, key_is_real))
        retrieval = None
        if self.retrieval is not None:
            hr = self.num_retrieval_heads
            retrieval = RetrievalRead(*self.retrieval.append(keys[:, :hr], values[:, :hr]), key_is_real)
        return self._step(q_pos, cached=cached, retrieval=retrieval, streaming=self._streaming_write(keys, values, q_pos))

    def _stores(self) -> tuple[RetrievalKV | None, ...]:
        return (self.unsplit, self.retrieval)

    def memory(self) -> dict[str, int]:
        if self.unsplit is None:
            return super().memory()
        shape = (self.head_dim, self.dtype.itemsize, self.real_seen.shape[0])
        held = kv_bytes(self.num_kv_heads, 0, self.seen, 0, *shape)
        held["full_bytes"] = kv_bytes(self.num_kv_heads, 0, self.layout.full_tokens(self.seen), 0, *shape)["full_bytes"]
        reserved = kv_bytes(self.num_kv_heads, 0, self.unsplit.keys.shape[2], 0, *shape)["retrieval_bytes"]
        return {**held, "reserved_bytes": reserved}

    def reset(self) -> None:
        self.__init__(self.layout, self.max_length, self.rollback, self.split_margin)

    def _drop_slots(self, count: int) -> None:
        self.seen -= count
        for kv in self._stores():
            if kv is not None:
                kv.length -= count


class StaticDuoLayer(DuoCacheLayer):
    """A layer with fixed buffers, for compiled decoding (needs `max_length`).

    Every buffer is allocated at the first forward for `capacity` slots (max_length rounded up to 64), `seen` is a
    0-dim device tensor, writes are index writes at `seen` and `slot_real` [B, C] keeps which retrieval slots hold
    real tokens, so a decode step has fixed shapes, no host sync and no data-dependent branch: it can be compiled
    (`torch.compile(..., fullgraph=True)`) and replayed. Eager, a forward past `capacity` is refused.
    """

    is_compileable = True

    def __init__(self, layout: LayerLayout, max_length: int | None = None, rollback: int = 0):
        if not max_length:
            raise ValueError("a static DuoCache needs max_length (tokens, padding included) to size its buffers")
        super().__init__(layout, max_length, rollback)
        self.capacity = _round_up(max_length)  # slots of every buffer
        self.slot_real: torch.Tensor | None = None  # [B, C] bool: which retrieval slots hold real tokens

    def _allocate(self, like: torch.Tensor) -> None:
        hr, batch = self.num_retrieval_heads, like.shape[0]
        self.seen = torch.zeros((), dtype=torch.long, device=self.device)
        self.slot_real = torch.zeros(batch, self.capacity, dtype=torch.bool, device=self.device)
        if hr > 0:  # zeros: the attention reads every slot (masked), and 0 x NaN of stale memory would be NaN
            self.retrieval = RetrievalKV.empty(like[:, :hr], capacity=self.capacity)
            self.retrieval.keys.zero_()
            self.retrieval.values.zero_()
        self.streaming = self._new_streaming(like)
        if not torch.compiler.is_compiling():  # fixed addresses let a compiled step be replayed (CUDA graphs)
            for tensor in self._tensors():
                torch._dynamo.mark_static_address(tensor)

    def _tensors(self) -> list[torch.Tensor]:
        return super()._tensors() + [self.seen, self.slot_real]

    def _check_room(self, q_len: int) -> None:
        """Refuse, eager, a forward that would take the layer past its capacity (compiled steps cannot read `seen`)."""
        if torch.compiler.is_compiling() or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
        end = int(self.seen) + q_len
        if end > self.capacity:
            raise ValueError(
                f"this static DuoCache holds {self.capacity} tokens (max_length={self.max_length}, rounded up to 64); "
                f"this forward would take it to {end}: create it with a larger max_length"
            )

    def _store(self, keys, values, q_pos, query_is_real, key_is_real) -> LayerStep:
        q_len = keys.shape[2]
        if keys.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "a static DuoCache is written in place and does not record gradients: run the model under "
                "torch.no_grad() or torch.inference_mode(), as generate() does"
            )
        self._check_room(q_len)
        retrieval = None
        if self.retrieval is not None:
            retrieval = self._store_retrieval(
                keys[:, : self.num_retrieval_heads], values[:, : self.num_retrieval_heads], query_is_real
            )
        step = self._step(q_pos, retrieval=retrieval, streaming=self._streaming_write(keys, values, q_pos))
        self.seen.add_(q_len)
        return step

    def _store_retrieval(self, keys: torch.Tensor, values: torch.Tensor, query_is_real: torch.Tensor | None) -> RetrievalRead:
        """Index-write keys, values [B, Hr, Q, D] at slots seen.. and say what to attend to. Compiled, or one token:
        every slot under the mask `slot_real & causal` (fixed shapes). Eager with Q > 1 (prefill): the filled slots,
        after one host read of `seen`."""
        r, q_len = self.retrieval, keys.shape[2]
        slots = self.seen + torch.arange(q_len, device=keys.device)  # [Q]
        r.keys.index_copy_(2, slots, keys)
        r.values.index_copy_(2, slots, values)
        real = torch.ones_like(self.slot_real[:, :q_len]) if query_is_real is None else query_is_real
        self.slot_real.index_copy_(1, slots, real)
        if q_len > 1 and not torch.compiler.is_compiling():
            end = int(self.seen) + q_len
            key_is_real = None if query_is_real is None else self.slot_real[:, :end]
            return RetrievalRead(r.keys[:, :, :end], r.values[:, :, :end], key_is_real)
        visible = self.slot_real[:, None, :] & (torch.arange(r.keys.shape[2], device=keys.device) <= slots[:, None])
        return RetrievalRead(r.keys, r.values, None, visible)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(cached + new slots, 0) as a 0-dim tensor, which tells the mask function to read only the new tokens'
        columns of attention_mask (the layer keeps the earlier slots' padding)."""
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.max_length

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_batch(fn)
        if self.slot_real is not None:
            self.slot_real = fn(self.slot_real)

    def _drop_slots(self, count: int) -> None:
        end = int(self.seen)
        self.slot_real[:, end - count : end] = False
        self.seen.sub_(count)


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
    `torch.compile` (`generate(..., cache_implementation="static")` creates one); see `StaticDuoLayer`.
    `split_margin` (tokens, dynamic caches): how far past sink + window a layer keeps every head's KV in one buffer
    before it splits (None: the backend's, `duohead.kernels.split_margin`; 0 splits at S + W); see `DynamicDuoLayer`.
    """

    def __init__(
        self,
        layouts: Sequence[LayerLayout],
        max_length: int | None = None,
        rollback: int = 0,
        static: bool = False,
        split_margin: int | None = None,
    ):
        if isinstance(layouts, torch.nn.Module):
            raise TypeError("DuoCache takes the layouts of a model's layers; for a model use duohead.DuoCache.from_model(model)")
        if static:
            layers = [StaticDuoLayer(layout, max_length, rollback) for layout in layouts]
        else:
            layers = [DynamicDuoLayer(layout, max_length, rollback, split_margin) for layout in layouts]
        super().__init__(layers=layers)
        self.plans = FlashInferPlans()  # the FlashInfer plans of this cache's steps, shared by its layers
        for layer in self.layers:
            layer.plans = self.plans

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        max_length: int | None = None,
        rollback: int = 0,
        static: bool = False,
        split_margin: int | None = None,
    ) -> DuoCache:
        """An empty cache for a model prepared with `duohead.enable` (its layouts read off its attention modules).
        The cache then refuses that model once it is disabled or enabled with another layout."""
        cache = cls(layer_layouts(model), max_length=max_length, rollback=rollback, static=static, split_margin=split_margin)
        for layer, module in zip(cache.layers, attention_modules(model), strict=True):
            layer.watch(module)
        return cache

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
