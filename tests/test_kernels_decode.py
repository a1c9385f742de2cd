"""The fused streaming decode (attention + cache write in one launch, split over keys with a combine) against its twin,
`reference.streaming_attention` then `reference.streaming_append`; the torch.library ops behind torch.compile.

Triton runs under TRITON_INTERPRET=1 on CPU (set by conftest). Caches are filled the way `DuoCache` fills them
(a left-padded prefill through `reference.streaming_append`), so rows of different lengths share a batch and
rings wrap; every decode step is checked, a padding token included.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from duohead import kernels
from duohead.cache import StreamingKV
from duohead.kernels import StreamingView, reference

triton_streaming = pytest.importorskip("duohead.kernels.triton_streaming")
triton_decode = pytest.importorskip("duohead.kernels.triton_decode")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
pytestmark = pytest.mark.skipif(
    not ON_GPU and kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem())
)
NO_BF16 = "bf16 Triton runs only on CUDA: the interpreter's bf16 tl.dot is wrong, and this machine has no GPU"
CACHE_NAMES = ("sink_k", "sink_v", "sink_pos", "ring_k", "ring_v", "ring_pos")


def decode_steps(group, head_dim, sink, window, prefill, steps, dtype, *, rollback=0, splits=None, seed=0):
    """Prefill `prefill` tokens (rows 1 and 2 left-padded by 3 and prefill - 2), then `steps` decode steps through
    both sides; row 2's token of step 1 is padding (-1). Yields (kernel out, reference out, step) and checks
    the caches are equal after every step."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_kv_heads = 3, 2
    pads = [0, 3, prefill - 2]
    keys, values = (torch.randn(batch, num_kv_heads, prefill, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    pos = torch.full((batch, prefill), -1, dtype=torch.long)
    for b, pad in enumerate(pads):
        pos[b, pad:] = torch.arange(prefill - pad)
    pos = pos.to(DEVICE)
    ours, theirs = StreamingKV(keys, sink, window, rollback), StreamingKV(keys, sink, window, rollback)
    reference.streaming_append(keys, values, pos, ours.view())
    reference.streaming_append(keys, values, pos, theirs.view())
    seen = torch.tensor([prefill - pad for pad in pads], device=DEVICE)
    scaling = head_dim**-0.5
    for step in range(steps):
        q = torch.randn(batch, num_kv_heads * group, 1, head_dim, generator=gen).to(DEVICE, dtype)
        k, v = (torch.randn(batch, num_kv_heads, 1, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
        q_pos = seen[:, None].clone()
        if step == 1:
            q_pos[2] = -1
        expected = reference.streaming_attention(q, k, v, q_pos, theirs.view(), scaling)
        reference.streaming_append(k, v, q_pos, theirs.view())
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        triton_decode.streaming_decode(q, k, v, q_pos, ours.view(), scaling, out, splits=splits)
        for name, a, b in zip(CACHE_NAMES, ours.tensors(), theirs.tensors(), strict=True):
            assert torch.equal(a, b), (step, name)
        yield out, expected, step
        seen += (q_pos[:, 0] >= 0).long()


# (group, head_dim, sink, window, prefill, steps, rollback, splits, dtype)
CASES = [
    (1, 64, 4, 16, 3, 4, 0, None, torch.float32),  # T below sink: the new tokens go to the sink
    (4, 64, 4, 16, 40, 3, 0, None, torch.float32),  # ring wrapped, splits chosen by the device (none on the interpreter)
    (2, 128, 0, 16, 30, 3, 0, 2, torch.float16),  # no sink, two splits
    (8, 64, 1, 1, 9, 3, 0, 1, torch.float32),  # window 1, one split: the fused path without a combine
    (3, 80, 2, 16, 25, 3, 5, 3, torch.float32),  # odd G and D, a ring with rollback slots hidden by the window
    (2, 64, 4, 64, 70, 2, 0, 7, torch.float16),  # more splits than the cache needs: empty splits combine to nothing
]


@pytest.mark.parametrize("group,head_dim,sink,window,prefill,steps,rollback,splits,dtype", CASES)
def test_fused_decode_equals_attention_then_append(group, head_dim, sink, window, prefill, steps, rollback, splits, dtype):
    for got, expected, step in decode_steps(
        group, head_dim, sink, window, prefill, steps, dtype, rollback=rollback, splits=splits
    ):
        torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype], msg=f"step {step}")
        if step == 1:
            assert bool((got[2] == 0).all())  # the padding token's output is exactly 0


@pytest.mark.skipif(not ON_GPU, reason=NO_BF16)
@pytest.mark.parametrize("splits", [None, 1])
def test_fused_decode_in_bf16(splits):
    for got, expected, step in decode_steps(4, 128, 4, 64, 300, 3, torch.bfloat16, splits=splits):
        torch.testing.assert_close(
            got.float(), expected.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16], msg=f"step {step}"
        )


@pytest.mark.parametrize(
    "rows,keys,block_n,sms", [(1, 321, 64, 132), (4, 321, 64, 132), (512, 321, 64, 132), (3, 17, 16, 4), (1, 1, 16, 4)]
)
def test_decode_splits_cover_the_keys_once(monkeypatch, rows, keys, block_n, sms):
    """Splits are whole key tiles, cover every key, leave no split empty, and stop at about two programs per SM."""
    monkeypatch.setattr(triton_decode, "_multiprocessors", lambda device: sms)
    splits, per_split = triton_decode.decode_splits(rows, keys, block_n, torch.device(DEVICE))
    assert per_split % block_n == 0 and (splits - 1) * per_split < keys <= splits * per_split
    assert splits == 1 or rows * (splits - 1) < 2 * sms
    if rows >= 2 * sms:
        assert splits == 1


def test_dispatcher_attend_then_store_matches_the_reference_twin():
    """`kernels.streaming_attention_and_append` with Triton forced (decode: fused; a chunk: two launches) equals the
    reference pair, outputs and caches; with the torch backend it is the reference pair, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    sink, window = 2, 8
    caches = {}
    for q_len in (12, 1, 1, 3):
        q = torch.randn(2, 4, q_len, 32, generator=gen).to(DEVICE)
        k, v = (torch.randn(2, 2, q_len, 32, generator=gen).to(DEVICE) for _ in range(2))
        start = sum(caches.get("lens", [0]))
        caches["lens"] = caches.get("lens", []) + [q_len]
        pos = torch.arange(start, start + q_len, device=DEVICE).expand(2, -1).contiguous()
        outs = {}
        for backend in ("torch", "triton", "reference"):
            cache = caches.setdefault(backend, StreamingKV(k, sink, window))
            if backend == "reference":
                outs[backend] = reference.streaming_attention(q, k, v, pos, cache.view(), 0.2)
                reference.streaming_append(k, v, pos, cache.view())
            else:
                with kernels.use_backend(backend):
                    outs[backend] = kernels.streaming_attention_and_append(q, k, v, pos, cache.view(), 0.2)
        assert torch.equal(outs["torch"], outs["reference"])
        torch.testing.assert_close(outs["triton"], outs["reference"], atol=2e-5, rtol=2e-5)
        for name, a, b in zip(CACHE_NAMES, caches["triton"].tensors(), caches["reference"].tensors(), strict=True):
            assert torch.equal(a, b), (q_len, name)


# ---- torch.library ops ----


def cloned(cache: StreamingView) -> StreamingView:
    return StreamingView(*(t.clone() for t in cache.tensors()), cache.sink, cache.window)


def op_args(q_len: int, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, q_len, 16, generator=gen).to(device, dtype)
    k, v = (torch.randn(2, 2, q_len, 16, generator=gen).to(device, dtype) for _ in range(2))
    cache = StreamingKV(torch.randn(2, 2, 20, 16, generator=gen).to(device, dtype), 2, 8)
    cache.append(
        *(torch.randn(2, 2, 20, 16, generator=gen).to(device, dtype) for _ in range(2)),
        torch.arange(20, device=device).expand(2, -1),
    )
    pos = torch.arange(20, 20 + q_len, device=device).expand(2, -1).contiguous()
    return q, k, v, pos, cache


@pytest.mark.parametrize("op,q_len", [("streaming_attention", 5), ("streaming_decode", 1), ("streaming_append", 5)])
@pytest.mark.parametrize("changed", [False, True])
def test_ops_run_the_kernels_and_pass_opcheck(op, q_len, changed):
    """Each op equals the reference (outputs and cache writes) and passes torch.library.opcheck (schema, fake
    tensor, autograd registration, AOT dispatch: what torch.compile relies on), with and without a soft cap and sinks."""
    q, k, v, pos, cache = op_args(q_len)
    changes = {"softcap": 1.5, "sinks": torch.randn(4, generator=torch.Generator().manual_seed(3))} if changed else {}
    theirs = cloned(cache.view())
    flat = (*cache.tensors(), 2, 8)  # an op's arguments end with the view's fields
    if op == "streaming_append":
        args = (k, v, pos, *flat)
        reference.streaming_append(k, v, pos, theirs)
        expected = None
    else:
        args = (q, k, v, pos, torch.full_like(q, float("nan")), 0.25, changes.get("softcap"), changes.get("sinks"), *flat)
        expected = reference.streaming_attention(q, k, v, pos, theirs, 0.25, **changes)
        if op == "streaming_decode":
            reference.streaming_append(k, v, pos, theirs)
    getattr(torch.ops.duohead, op)(*args)
    if expected is not None:
        torch.testing.assert_close(args[4], expected, atol=2e-5, rtol=2e-5)
    for name, a, b in zip(CACHE_NAMES, cache.tensors(), theirs.tensors(), strict=True):
        assert torch.equal(a, b), name
    torch.library.opcheck(getattr(torch.ops.duohead, op).default, args)


def test_fake_implementations_check_shapes_and_write_nothing():
    """Under FakeTensorMode (torch.compile's tracing) the ops accept matching shapes and raise on a mismatch,
    naming the tensor; the decode op refuses Q > 1."""
    mode = FakeTensorMode()

    def fake(q_len):
        q, k, v, pos, cache = op_args(q_len, device="cpu")
        return [mode.from_tensor(t) for t in (q, k, v, pos, *cache.tensors())]

    q, k, v, pos, *cache = fake(1)
    with mode:
        out = torch.empty_like(q)
        torch.ops.duohead.streaming_decode(q, k, v, pos, out, 0.25, None, None, *cache, 2, 8)
        torch.ops.duohead.streaming_append(k, v, pos, *cache, 2, 8)
        assert out.shape == (2, 4, 1, 16)
        with pytest.raises(ValueError, match="ring_pos has shape"):
            torch.ops.duohead.streaming_append(k, v, pos, *cache[:5], torch.empty(2, 3, dtype=torch.long), 2, 8)
        with pytest.raises(ValueError, match="out has shape"):
            torch.ops.duohead.streaming_attention(q, k, v, pos, out[:, :2], 0.25, None, None, *cache, 2, 8)
    q5, k5, v5, pos5, *cache5 = fake(5)
    with mode, pytest.raises(ValueError, match="one new token per row"):
        torch.ops.duohead.streaming_decode(q5, k5, v5, pos5, torch.empty_like(q5), 0.25, None, None, *cache5, 2, 8)


def test_compiled_attend_then_store_has_no_graph_break_and_equals_eager():
    """torch.compile(fullgraph=True) of attend-then-store with Triton forced traces the ops (a graph break would
    raise) and gives the eager reference's output and cache, for a chunk and a decode step."""

    def step(q, k, v, pos, cache: StreamingKV):
        return kernels.streaming_attention_and_append(q, k, v, pos, cache.view(), 0.25)  # the view built while tracing

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for q_len in (5, 1):
        q, k, v, pos, cache = op_args(q_len)
        theirs = cloned(cache.view())
        expected = reference.streaming_attention(q, k, v, pos, theirs, 0.25)
        reference.streaming_append(k, v, pos, theirs)
        with kernels.use_backend("triton"):
            got = compiled(q, k, v, pos, cache)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        for name, a, b in zip(CACHE_NAMES, cache.tensors(), theirs.tensors(), strict=True):
            assert torch.equal(a, b), (q_len, name)
