"""Attention kernels for retrieval and streaming heads, chosen by device and availability.

`retrieval_attention` and `streaming_attention` have the signatures of their twins in
`duohead.kernels.reference`, which is the oracle and the CPU path.
"""

from duohead.kernels.reference import lambda_visible, retrieval_attention, streaming_attention

__all__ = ["lambda_visible", "retrieval_attention", "streaming_attention"]
