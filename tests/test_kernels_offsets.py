"""The Triton kernels' offsets stay right past 2^31 elements: a chunk's token slot times its stride is int64.

Llama-3-8B's layout puts 32 * 128 = 4096 elements between tokens of q, so 4M tokens in one chunk address element
2^34; int32 arithmetic wraps past 512K tokens. Allocating that is out of the question here, so the tensors are views
with the same token stride scale (2^28 elements between tokens, 66 tokens: offsets up to 1.7e10 > 4M * 4096) into a
sparse file: only the pages the kernels touch exist. Positions are a 4M-token sequence's tail. The kernels run
under the Triton interpreter (numpy wraps int32 as the GPU does) in a child process, since a wrapped offset is a
wild pointer there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from duohead import kernels

pytestmark = pytest.mark.skipif(kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem()))

_PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    from duohead.cache import StreamingKV
    from duohead.kernels import reference, triton_decode, triton_streaming
    from duohead.kernels.streaming_view import StreamingView

    B, HQ, HKV, Q, D, SINK, WINDOW = 1, 4, 2, 66, 16, 4, 24
    STRIDE_T = 2**28  # elements between two tokens (an i32 stride); token 65 sits at 1.7e10 > 4M tokens * 4096
    START = 4 * 2**20  # the chunk's first real position: the tail of a 4M-token sequence
    torch.manual_seed(0)

    def fp32(view):
        return StreamingView(*(t.float() if t.is_floating_point() else t.clone() for t in view.tensors()), view.sink, view.window)

    def errors(got, cache, expected, expected_cache):
        return float((got.float() - expected).abs().max()), sum(
            int((a.float() != b.float()).sum()) for a, b in zip(cache.tensors(), expected_cache.tensors())
        )

    with tempfile.TemporaryFile() as f:
        f.truncate(Q * STRIDE_T * 2)
        flat = torch.from_file(f"/proc/self/fd/{f.fileno()}", shared=True, size=Q * STRIDE_T, dtype=torch.float16)
        # one token row holds q | k | v | out of every head; rows are STRIDE_T apart
        def view(offset, heads):
            return flat.as_strided((B, heads, Q, D), (0, D, STRIDE_T, 1), offset)

        q, k, v, out = view(0, HQ), view(HQ * D, HKV), view((HQ + HKV) * D, HKV), view((HQ + 2 * HKV) * D, HQ)
        for t in (q, k, v):
            t.normal_()
        pos = torch.arange(START, START + Q)[None]
        cache = StreamingKV(k[:, :, :1], SINK, WINDOW)
        for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v):
            t.normal_()
        cache.sink_pos.copy_(torch.arange(SINK))
        ring = torch.arange(START - WINDOW, START)
        cache.ring_pos[0, (ring - SINK) % WINDOW] = ring
        theirs = fp32(cache.view())
        expected = reference.streaming_attention(q.float(), k.float(), v.float(), pos, theirs, D**-0.5)
        reference.streaming_append(k.float(), v.float(), pos, theirs)
        triton_streaming.streaming_attention_and_append(q, k, v, pos, cache.view(), D**-0.5, out=out)
        prefill = errors(out, cache.view(), expected, theirs)

        # a decode step at position 4M + Q, its new token read from the last row (offset 1.7e10)
        one = [t[:, :, -1:] for t in (q, k, v)]
        at = torch.tensor([[START + Q]])
        expected = reference.streaming_attention(*(t.float() for t in one), at, theirs, D**-0.5)
        reference.streaming_append(one[1].float(), one[2].float(), at, theirs)
        got = torch.empty_like(one[0])
        triton_decode.streaming_decode(*one, at, cache.view(), D**-0.5, got)
        decode = errors(got, cache.view(), expected, theirs)
    print(json.dumps({"prefill": prefill, "decode": decode, "last_offset": (Q - 1) * STRIDE_T}))
    """
)


def test_offsets_past_int32_at_4m_tokens():
    """Prefill chunk (attention + cache write) and a decode step with token offsets up to 1.7e10 elements and
    positions past 4M: outputs match the float32 reference, caches match bit for bit."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"child exited {proc.returncode} (a wrapped offset segfaults): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["last_offset"] > 4 * 2**20 * 32 * 128  # beyond 4M tokens of Llama-3-8B's q
    for name in ("prefill", "decode"):
        max_error, cache_mismatches = result[name]
        assert max_error < 5e-3 and cache_mismatches == 0, (name, result)


def test_only_launches_that_reach_2_31_elements_take_int64_offsets():
    """int64 token offsets cost registers (ptxas spilled the bf16 kernels with them everywhere): the launcher asks
    for them exactly when an element lies 2^31 or more elements past the first."""
    from duohead.kernels.triton_common import needs_int64

    just_fits = torch.empty(2**20, 2**11, device="meta")  # last element at 2^31 - 1
    assert not needs_int64(just_fits, torch.empty(0, device="meta"))
    assert needs_int64(just_fits, torch.empty(2**20, 2**11 + 1, device="meta"))
    assert needs_int64(torch.empty(1, 4096, device="meta").as_strided((2**19 + 1, 32, 128), (4096, 128, 1)))
