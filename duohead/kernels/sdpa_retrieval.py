"""Retrieval heads on CUDA without FlashInfer: torch SDPA (flash / memory-efficient kernels).

Shape letters: B batch, Hq query heads, Hkv KV heads, Q new tokens, T tokens in the cache, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from duohead.kernels import reference


def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_is_real: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Causal attention of the Q newest tokens over all T cached tokens. q [B, Hq, Q, D]; k, v [B, Hkv, T, D];
    key_is_real [B, T] bool or None. -> [B, Hq, Q, D].

    A single new token without padding sees every key, so decode runs mask-free (SDPA's flash kernel);
    everything else takes the reference's masked SDPA.
    """
    if key_is_real is None and q.shape[2] == 1 and q.shape[1] > 0:
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    return reference.retrieval_attention(q, k, v, key_is_real, scaling)
