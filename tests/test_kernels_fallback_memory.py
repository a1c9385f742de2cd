"""The retrieval fallback a missing FlashInfer falls to fits in memory: a masked GQA chunk never takes SDPA's math path.

CUDA's SDPA picks flash (no mask tensor), memory-efficient (a mask, but no GQA) or math (anything; it holds fp32
scores [B, Hq, Q, T]). The CPU has no such rule, so these tests apply CUDA's documented rule to every SDPA call and
measure the peak memory of a fresh process: the chosen path must hold several times less than the math one would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from duohead.kernels import reference

B, HQ, HKV, Q, T, D = 1, 16, 2, 2048, 4096, 32  # math's fp32 scores: 512 MiB; expanded K, V: 16 MiB
SCORES_MIB = B * HQ * Q * T * 4 / 2**20

# One process per measurement: ru_maxrss is a high-water mark, so a pytest process that ran anything else hides it.
_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from duohead.kernels import reference

    B, HQ, HKV, Q, T, D = {shape}
    form, padded = sys.argv[1], sys.argv[2] == "padded"
    sdpa, taken = F.scaled_dot_product_attention, []

    def cuda_rule(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        gqa = enable_gqa and q.shape[1] != k.shape[1]
        backend = "flash" if attn_mask is None else "efficient" if not gqa else "math"
        taken.append(backend)
        with sdpa_kernel([SDPBackend.MATH if backend == "math" else SDPBackend.FLASH_ATTENTION]):
            return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = cuda_rule
    torch.manual_seed(0)
    q, k, v = torch.randn(B, HQ, Q, D), torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    real = torch.ones(B, T, dtype=torch.bool)
    real[:, :7] = False
    key_is_real = real if padded else None
    reference.retrieval_attention(q[:, :, -8:], k[:, :, -64:], v[:, :, -64:], None, 0.25)  # warm-up, tiny
    taken.clear()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if form == "duohead":
        reference.retrieval_attention(q, k, v, key_is_real, D**-0.5)
    else:  # the form before the fix: one bool mask with enable_gqa=True
        mask = torch.arange(T)[None, :] <= torch.arange(T - Q, T)[:, None]
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({{"peak_mib": peak / 1024, "taken": taken}}))
    """
).format(shape=(B, HQ, HKV, Q, T, D))


def _probe(form: str, padding: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, form, padding], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_masked_gqa_chunk_takes_an_efficient_backend_and_holds_no_scores(padding):
    """A 2048-query chunk over 4096 keys, 16 query heads on 2 KV heads: the old mask + GQA form goes to math and
    peaks above half its 512 MiB of scores; duohead's form goes to the memory-efficient backend and peaks at under
    a quarter of them."""
    ours = _probe("duohead", padding)
    assert ours["taken"] == ["efficient"]
    assert ours["peak_mib"] < SCORES_MIB / 4, ours
    if padding == "unpadded":  # the control, once: the size does show the difference
        old = _probe("mask+gqa", padding)
        assert old["taken"] == ["math"]
        assert old["peak_mib"] > SCORES_MIB / 2 > 2 * ours["peak_mib"], (old, ours)


@pytest.mark.parametrize("padded", [False, True])
def test_expanded_chunk_equals_grouped_attention(padded):
    """The expanded-KV form gives what GQA over the shared heads gives (the float64 math oracle)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    real = torch.ones(2, 11, dtype=torch.bool)
    real[1, :3] = False
    got = reference.retrieval_attention(q, k, v, real if padded else None, 0.3)
    keys, values = k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1)
    mask = torch.arange(11)[None, :] <= torch.arange(6, 11)[:, None]
    mask = (mask[None] & real[:, None, :])[:, None] if padded else mask
    expected = F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
