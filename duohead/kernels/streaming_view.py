"""`StreamingView`: the streaming heads' cache as every kernel takes it, one frozen object instead of six tensors.

Shape letters: B batch, Hkv KV heads (the streaming ones), D head dim, S sink slots, R ring slots (R >= W, the window).
A leaf module: it imports nothing of duohead, so the cache, the reference and the Triton kernels can all name it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class StreamingView:
    """One layer's streaming cache as the kernels read and write it: its tensors are shared, not copied, so an
    append through the view writes the cache (`duohead.cache.StreamingKV.view` hands one out).

    sink_k, sink_v [B, Hkv, S, D], sink_pos [B, S]: the tokens at real positions < sink, position p in slot p;
    ring_k, ring_v [B, Hkv, R, D], ring_pos [B, R]: tokens at positions >= sink, position p in slot (p - sink) % R.
    Positions are int64, -1 marks an empty slot; K/V last dims contiguous. sink, window: the S and W of the Λ rule
    (`duohead.kernels.reference.lambda_visible`). Attention reads positions only, so a view to attend over may hold
    other slots (none, or every cached token, the far ones hidden by the rule); an append places tokens by the slot
    counts S and R, so a view to append to has S = sink slots and R >= window.
    """

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_pos: torch.Tensor
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    ring_pos: torch.Tensor
    sink: int
    window: int

    @property
    def sink_slots(self) -> int:
        """S, the slots of the sink (a view to attend over may hold fewer than `sink`)."""
        return self.sink_k.shape[2]

    @property
    def ring_slots(self) -> int:
        """R, the slots of the ring (>= `window` in a cache; rollback slots hold tokens the window no longer shows)."""
        return self.ring_k.shape[2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos): the order of the torch.library ops' arguments and of
        the Triton kernels' pointers, the only places where a view is taken apart."""
        return (self.sink_k, self.sink_v, self.sink_pos, self.ring_k, self.ring_v, self.ring_pos)

    def without_slots(self) -> StreamingView:
        """The same sink and window over no cached token (zero-slot slices: nothing cached yet)."""
        return replace(
            self,
            sink_k=self.sink_k[:, :, :0],
            sink_v=self.sink_v[:, :, :0],
            sink_pos=self.sink_pos[:, :0],
            ring_k=self.ring_k[:, :, :0],
            ring_v=self.ring_v[:, :, :0],
            ring_pos=self.ring_pos[:, :0],
        )
