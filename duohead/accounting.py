"""KV-cache byte accounting: the one formula behind `DuoCacheLayer.memory()` and `duohead plan`.

A leaf module (it imports nothing of duohead). Shape letters: B batch, Hr retrieval KV heads, Hs streaming
KV heads, T tokens (slots, padding included), D head dim.
"""

from __future__ import annotations


def kv_bytes(
    retrieval_heads: int,
    streaming_heads: int,
    tokens: int,
    streaming_slots: int,
    head_dim: int,
    itemsize: int,
    batch: int = 1,
    full_tokens: int | None = None,
) -> dict[str, int]:
    """Bytes of keys + values one layer holds: each of the Hr retrieval heads keeps T tokens, each of the Hs
    streaming heads `streaming_slots` (S + W + rollback), whatever T is.

    Returns `retrieval_bytes` = 2 B Hr T D itemsize, `streaming_bytes` = 2 B Hs slots D itemsize and `full_bytes`
    = 2 B (Hr + Hs) T' D itemsize, what the stock model would hold for the same tokens: T' = T, or `full_tokens`
    for a layer the stock model itself keeps a window of (a local sliding-window layer: min(T, W))."""
    per_token_head = 2 * batch * head_dim * itemsize  # keys + values
    return {
        "retrieval_bytes": per_token_head * retrieval_heads * tokens,
        "streaming_bytes": per_token_head * streaming_heads * streaming_slots,
        "full_bytes": per_token_head * (retrieval_heads + streaming_heads) * (tokens if full_tokens is None else full_tokens),
    }
