"""Triton streaming kernel vs the torch reference (TRITON_INTERPRET=1 on CPU, set by conftest), and backend dispatch.

Cache states are built the way `DuoCache` builds them: earlier chunks go through `StreamingKV.append`, so
rings have wrapped and rows of different lengths (left padding, q_pos = -1) share one batch.

The oracle is the Λ rule applied densely (`lambda_visible` + `masked_attention` over cache and new tokens);
`reference.streaming_attention` is checked against it on every chunk too, padded ones included (left and right
padding, in the first chunk and in later chunks over a filled cache).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import masked_attention

from duohead import kernels
from duohead.cache import StreamingKV
from duohead.kernels import StreamingView, reference

triton_streaming = pytest.importorskip("duohead.kernels.triton_streaming")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CACHE_NAMES = ("sink_k", "sink_v", "sink_pos", "ring_k", "ring_v", "ring_pos")
runs_kernel = pytest.mark.skipif(  # an old Triton's interpreter with a new NumPy cannot run it: say so instead of failing
    not ON_GPU and kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem())
)


def make_positions(chunk: int, pads: list[int], seen: list[int], right: bool = False) -> torch.Tensor:
    """q_pos [B, Q] for one chunk: row b has `pads[b]` padding slots (left, or right if `right`), then continues
    from `seen[b]` real tokens; `seen` is advanced in place."""
    pos = torch.full((len(pads), chunk), -1, dtype=torch.long)
    for b, pad in enumerate(pads):
        n = max(chunk - pad, 0)  # a pad as long as the chunk: the row is all padding in it
        cols = slice(0, n) if right else slice(chunk - n, chunk)
        pos[b, cols] = torch.arange(seen[b], seen[b] + n)
        seen[b] += n
    return pos


def fp32(args):
    """Floating tensors, and those of a `StreamingView`, in float32 (the oracle's precision), others unchanged."""

    def one(t):
        if isinstance(t, StreamingView):
            return StreamingView(*fp32(t.tensors()), t.sink, t.window)
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return [one(t) for t in args]


def dense_oracle(q, k, v, pos, cache: StreamingView, scaling):
    """The Λ rule over every cached and new key at once: O(Q * (S + W + Q)), fine for test sizes."""
    keys = torch.cat([cache.sink_k, cache.ring_k, k], dim=2)
    values = torch.cat([cache.sink_v, cache.ring_v, v], dim=2)
    k_pos = torch.cat([cache.sink_pos, cache.ring_pos, pos], dim=1)
    visible = reference.lambda_visible(pos[:, :, None], k_pos[:, None, :], cache.sink, cache.window)
    return masked_attention(q, keys, values, visible, scaling)


def run_chunks(group, head_dim, sink, window, chunks, pads, dtype, *, right=False, seed=0, rollback=0, later_pads=None):
    """Feed `chunks` new-token counts through both implementations; yield (kernel, oracle, q_pos) per chunk.
    `pads` gives the first chunk's padding per row, `later_pads` (default none) every later chunk's."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_kv_heads = len(pads), 2
    cache, seen = None, [0] * batch
    for i, q_len in enumerate(chunks):
        shape = (batch, num_kv_heads, q_len, head_dim)
        q = torch.randn(batch, num_kv_heads * group, q_len, head_dim, generator=gen).to(DEVICE, dtype)
        k, v = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
        pos = make_positions(q_len, pads if i == 0 else (later_pads or [0] * batch), seen, right).to(DEVICE)
        if cache is None:
            cache = StreamingKV(k, sink, window, rollback)
        args = (q, k, v, pos, cache.view(), head_dim**-0.5)
        expected = dense_oracle(*fp32(args))
        reference_out = reference.streaming_attention(*fp32(args))
        torch.testing.assert_close(reference_out, expected, atol=TOL[torch.float32], rtol=TOL[torch.float32])
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        got = triton_streaming.streaming_attention(*args, out=out)
        assert got.data_ptr() == out.data_ptr()
        yield got, expected, pos
        cache.append(k, v, pos)


# (group, head_dim, sink, window, chunks, first-chunk padding per row, dtype): a sample of the grid
# GQA 1/2/4/8 x D 64/128 x sink 0/1/4 x window 1/16/64 x T below sink / below sink + window / far above.
CASES = [
    (1, 64, 4, 16, [3], [0, 1], torch.float32),  # T below sink
    (2, 128, 4, 16, [9, 2], [0, 5], torch.float16),  # T below sink + window
    (4, 64, 0, 16, [40, 1, 1], [0, 7], torch.float32),  # far above, ring wrapped, no sink
    (8, 64, 1, 1, [21, 1, 2], [3, 0], torch.float16),  # window 1: each query sees itself (+ sink)
    (2, 64, 1, 64, [70, 40, 1], [0, 9], torch.float32),  # far above with the large window, ring wrapped
    (1, 128, 0, 1, [5, 1], [2, 0], torch.float16),
    (4, 128, 4, 64, [50, 3], [0, 20], torch.float16),  # below sink + window
    (8, 128, 4, 16, [2, 33, 1], [0, 1], torch.float32),  # sinks split over two chunks
    (2, 64, 0, 64, [130, 1], [0, 0], torch.float16),  # several query blocks, skipped middle
    (1, 64, 1, 16, [36, 36, 1], [4, 0], torch.float32),  # chunked prefill longer than the window
]


@runs_kernel
@pytest.mark.parametrize("group,head_dim,sink,window,chunks,pads,dtype", CASES)
def test_triton_streaming_matches_reference(group, head_dim, sink, window, chunks, pads, dtype):
    for got, expected, _ in run_chunks(group, head_dim, sink, window, chunks, pads, dtype):
        torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@runs_kernel
@pytest.mark.parametrize("right", [False, True])
def test_padding_in_later_chunks_over_a_filled_cache(right):
    """Every chunk padded (left or right, rows padded differently, a row with fewer real tokens than the sink in
    its first chunk): the reference and the kernel both equal the oracle, chunk after chunk."""
    chunks, pads, later = [6, 9, 5, 1], [0, 4, 5], [2, 0, 3]
    for got, expected, pos in run_chunks(2, 64, 4, 8, chunks, pads, torch.float32, right=right, later_pads=later):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        assert bool((got[(pos < 0)[:, None, :, None].expand_as(got)] == 0).all())


BF16_CASES = [(4, 128, 4, 64, [300, 77, 1, 1], [0, 5]), (8, 64, 1, 16, [40, 1], [3, 0]), (1, 128, 0, 16, [33, 2], [0, 0])]


@pytest.mark.skipif(
    not ON_GPU, reason="bf16 Triton runs only on CUDA: the interpreter's bf16 tl.dot is wrong, and this machine has no GPU"
)
@pytest.mark.parametrize("group,head_dim,sink,window,chunks,pads", BF16_CASES)
def test_triton_streaming_in_bf16(group, head_dim, sink, window, chunks, pads):
    for got, expected, _ in run_chunks(group, head_dim, sink, window, chunks, pads, torch.bfloat16):
        torch.testing.assert_close(got.float(), expected.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@runs_kernel
def test_a_ring_longer_than_the_window_holds_older_tokens_out_of_sight():
    """Rollback slots (ring R = W + 5): the ring holds 5 tokens the window no longer shows; they stay hidden."""
    for got, expected, _ in run_chunks(2, 64, 4, 16, [30, 7, 1, 1, 12], [0, 3], torch.float32, rollback=5):
        torch.testing.assert_close(got, expected, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@runs_kernel
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_streaming_writes_into_its_heads_of_a_token_major_buffer(impl):
    """The attention hands the kernels out = buffer[B, Q, Hq_all, D].transpose(1, 2)[:, first:last]: a strided view.
    Exactly those heads are written, with the values of a fresh output."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 37, 64, generator=gen)
    k, v = torch.randn(2, 2, 37, 64, generator=gen), torch.randn(2, 2, 37, 64, generator=gen)
    cache = StreamingKV(k, 4, 16)
    args = (q, k, v, torch.arange(37).expand(2, -1), cache.view(), 0.125)
    fn = reference.streaming_attention if impl == "reference" else triton_streaming.streaming_attention
    buffer = torch.full((2, 37, 7, 64), float("nan"))  # 3 other heads first, then these 4
    got = fn(*args, out=buffer.transpose(1, 2)[:, 3:])
    assert got.data_ptr() == buffer[:, :, 3:].data_ptr()
    torch.testing.assert_close(buffer[:, :, 3:].transpose(1, 2), dense_oracle(*args), atol=2e-5, rtol=2e-5)
    assert bool(buffer[:, :, :3].isnan().all())


APPEND_CASES = [  # (sink, ring slots, chunks, first-chunk padding per row, right padding)
    (4, 16, [3, 1, 1], [0, 2], False),  # sinks only, then decode
    (4, 16, [100, 1, 1, 1], [0, 37], False),  # prefill longer than the ring (several token blocks), decode wraps
    (0, 8, [5, 30, 1], [4, 0], False),  # no sink; a chunk longer than the ring
    (1, 1, [7, 1, 2], [0, 6], True),  # a one-slot ring, right padding
    (2, 64, [10, 80, 1], [0, 3], True),
]


@runs_kernel
@pytest.mark.parametrize("sink,window,chunks,pads,right", APPEND_CASES)
def test_triton_append_stores_what_the_reference_stores(sink, window, chunks, pads, right):
    """`window` here is the ring's size: the cache writes do not depend on how much of the ring the Λ rule shows."""
    gen = torch.Generator().manual_seed(7)
    seen = [0] * len(pads)
    ours = theirs = None
    for i, q_len in enumerate(chunks):
        k, v = (torch.randn(len(pads), 3, q_len, 32, generator=gen).to(DEVICE, torch.float16) for _ in range(2))
        pos = make_positions(q_len, pads if i == 0 else [0] * len(pads), seen, right).to(DEVICE)
        if ours is None:
            ours, theirs = StreamingKV(k, sink, window), StreamingKV(k, sink, window)
            for a, b in zip(ours.tensors(), theirs.tensors()):  # random, never zero: every written slot must change
                if a.is_floating_point():
                    a.normal_(generator=None)
                    b.copy_(a)
        triton_streaming.streaming_append(k, v, pos, ours.view())
        reference.streaming_append(k, v, pos, theirs.view())
        for name, a, b in zip(CACHE_NAMES, ours.tensors(), theirs.tensors()):
            assert torch.equal(a, b), (i, name)
    stored = torch.cat([ours.sink_pos, ours.ring_pos], dim=1).cpu()
    for row, count in enumerate(seen):  # each row keeps its first min(S, n) and last min(W, n - S) tokens
        expected = set(range(min(sink, count))) | set(range(max(sink, count - window), count))
        assert set(stored[row].tolist()) - {-1} == expected


@runs_kernel
@pytest.mark.parametrize("fn", ["append", "attention_and_append"])
def test_append_reads_each_rows_positions_through_their_strides(fn):
    """A decode step's positions arrive as a [B, 1] view with a row stride (the attention slices them out of the
    mask's [B, T]); here every other element in memory holds a far larger number. Each row must read its own
    position (the kernel once read element b of the view as if unit-stride: row 1 saw 10**6 and skipped its write).
    Left-padded batch of 3 (rows of different lengths), ring wrapped."""
    gen = torch.Generator().manual_seed(11)
    batch, sink, ring = 3, 2, 8
    seen = [0] * batch
    ours = theirs = None
    for i, q_len in enumerate([13, 1, 1, 1]):
        k, v = (torch.randn(batch, 2, q_len, 16, generator=gen).to(DEVICE) for _ in range(2))
        pos = make_positions(q_len, [0, 4, 9] if i == 0 else [0] * batch, seen).to(DEVICE)
        if q_len == 1:
            wide = torch.full((batch, 4), 10**6, dtype=torch.long, device=DEVICE)
            wide[:, :1] = pos
            pos = wide[:, :1]  # strides (4, 1)
        if ours is None:
            ours, theirs = StreamingKV(k, sink, ring), StreamingKV(k, sink, ring)
        if fn == "append":
            triton_streaming.streaming_append(k, v, pos, ours.view())
        else:
            q = torch.randn(batch, 4, q_len, 16, generator=gen).to(DEVICE)
            triton_streaming.streaming_attention_and_append(q, k, v, pos, ours.view(), 0.25)
        reference.streaming_append(k, v, pos, theirs.view())
        for name, a, b in zip(CACHE_NAMES, ours.tensors(), theirs.tensors()):
            assert torch.equal(a, b), (i, name)


@runs_kernel
def test_right_padding_and_empty_rows_give_zeros():
    """Right padding, and a row that is all padding in one chunk: padding queries output exactly 0."""
    runs = list(run_chunks(2, 64, 1, 16, [12], [4, 12, 0], torch.float32, right=True))
    got, expected, pos = runs[0]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    padding = (pos < 0)[:, None, :, None].expand_as(got)
    assert bool((got[padding] == 0).all())


@runs_kernel
def test_keys_outside_sink_and_window_are_never_loaded():
    """Block skipping by construction: NaN in every key/value that the last query block cannot see (the middle
    of the new tokens and the whole ring) leaves that block's output finite and exact."""
    group, head_dim, sink, window = 1, 64, 2, 4
    cfg = triton_streaming.launch_config(group, 64, head_dim)
    q_len = 2 * cfg["BLOCK_Q"]  # two query blocks; the second one's window lies inside this chunk
    gen = torch.Generator().manual_seed(1)
    shape = (1, 1, q_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(3))
    cache = StreamingKV(torch.randn(1, 1, 20, head_dim).to(DEVICE), sink, window)
    cache.append(
        *(torch.randn(1, 1, 20, head_dim, generator=gen).to(DEVICE) for _ in range(2)), torch.arange(20, device=DEVICE)[None]
    )
    pos = torch.arange(20, 20 + q_len, device=DEVICE)[None]
    args = (q, k, v, pos, cache.view(), head_dim**-0.5)
    expected = reference.streaming_attention(*args)

    first_query = cfg["BLOCK_Q"]
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, : first_query - window + 1] = float("nan")  # positions 20.. are no sinks (sink = 2)
    v_bad[:, :, : first_query - window + 1] = float("nan")
    cache.ring_k.fill_(float("nan"))
    cache.ring_v.fill_(float("nan"))
    got = triton_streaming.streaming_attention(q, k_bad, v_bad, pos, cache.view(), head_dim**-0.5)
    last_block = got[:, :, first_query:]
    assert bool(torch.isfinite(last_block).all())
    torch.testing.assert_close(last_block, expected[:, :, first_query:], atol=2e-5, rtol=2e-5)
    assert not bool(torch.isfinite(got[:, :, :first_query]).all())  # the first block does read the ring


@runs_kernel
def test_decode_without_out_allocates_its_output_and_matches_the_oracle():
    """One decode token after a 30-token prefill (ring wrapped; rows of 30 and 27 real tokens), no `out=`: the kernel
    returns a new [B, Hq, 1, D] tensor (sharing memory with no input) holding the oracle's values."""
    gen = torch.Generator().manual_seed(3)
    seen = [0, 0]
    k, v = torch.randn(2, 2, 30, 64, generator=gen).to(DEVICE), torch.randn(2, 2, 30, 64, generator=gen).to(DEVICE)
    cache = StreamingKV(k, 4, 16)
    cache.append(k, v, make_positions(30, [0, 3], seen).to(DEVICE))
    q = torch.randn(2, 8, 1, 64, generator=gen).to(DEVICE)
    k1, v1 = torch.randn(2, 2, 1, 64, generator=gen).to(DEVICE), torch.randn(2, 2, 1, 64, generator=gen).to(DEVICE)
    args = (q, k1, v1, make_positions(1, [0, 0], seen).to(DEVICE), cache.view(), 64**-0.5)
    got = triton_streaming.streaming_attention(*args)
    assert got.shape == (2, 8, 1, 64) and got.is_contiguous()
    inputs = (q, k1, v1, *cache.tensors())
    assert all(got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)
    torch.testing.assert_close(got, dense_oracle(*args), atol=TOL[torch.float32], rtol=TOL[torch.float32])


HOPPER_BUILDS = [("bf16", 4, 1, 128), ("fp16", 3, 100, 80)]  # (dtype, G, Q, D): decode, and prefill with odd G and D


def compile_for_hopper(builds: list[tuple[str, int, int, int]]) -> None:
    """Compile both kernels to sm_90 cubins with Triton's real compiler (no GPU needed; not under the interpreter)."""
    import triton

    from duohead.kernels import triton_decode
    from duohead.kernels.triton_common import compile_for_sm90

    def build(kernel, dtype: str, constexprs: dict, num_warps: int) -> None:
        compiled = compile_for_sm90(kernel, dtype, constexprs, num_warps)
        assert "cubin" in compiled.asm, (kernel.__name__, dtype, constexprs)

    for dtype, group, q_len, head_dim in builds:
        cfg = triton_streaming.launch_config(group, q_len, head_dim)
        constexprs = dict(
            GROUP=group,
            GROUP_PAD=cfg["GROUP_PAD"],
            BLOCK_Q=cfg["BLOCK_Q"],
            BLOCK_N=cfg["BLOCK_N"],
            HEAD_DIM=head_dim,
            BLOCK_D=cfg["BLOCK_D"],
            IEEE_DOT=dtype == "fp32",
        )
        build(triton_streaming._streaming_attention_kernel, dtype, constexprs, cfg["num_warps"])
        block_t = min(64, triton.next_power_of_2(q_len))
        build(
            triton_streaming._streaming_append_kernel, dtype, dict(BLOCK_T=block_t, HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"]), 4
        )
        rows = max(16, triton.next_power_of_2(group))
        for splits in (1, 4):  # the fused decode, unsplit and split (+ its combine)
            build(
                triton_decode._streaming_decode_kernel,
                dtype,
                dict(
                    GROUP=group,
                    ROWS=rows,
                    BLOCK_N=64,
                    HEAD_DIM=head_dim,
                    BLOCK_D=cfg["BLOCK_D"],
                    SPLITS=splits,
                    IEEE_DOT=dtype == "fp32",
                ),
                4,
            )
        build(
            triton_decode._combine_splits_kernel,
            dtype,
            dict(GROUP=group, ROWS=rows, HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], SPLITS=4),
            4,
        )


def test_kernel_compiles_for_hopper():
    """The interpreter never runs Triton's compiler: build the real kernel for sm_90 in a process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(__file__)
    code = (
        f"import runpy, sys; sys.path.insert(0, {here!r}); runpy.run_path({__file__!r})['compile_for_hopper']({HOPPER_BUILDS!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kernel_functions_take_the_streaming_cache_as_one_view():
    """No function of the kernels (dispatch, reference, Triton wrappers and launchers) takes the cache's tensors one
    by one: only the torch.library ops, which cannot take objects, and the Triton kernels, which take pointers."""
    import inspect

    from duohead.kernels import triton_decode

    for module in (kernels, reference, triton_streaming, triton_decode):
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                loose = set(inspect.signature(fn).parameters) & set(CACHE_NAMES)
                assert not loose, f"{module.__name__}.{name} takes {sorted(loose)}: pass a StreamingView"


# ---- dispatch ----


def streaming_args(dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, 16, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(device, dtype) for _ in range(2))
    cache = StreamingKV(k, 2, 8)
    return (q, k, v, torch.arange(6, device=device)[None], cache.view(), 0.25)


def test_backend_names_env_and_context(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.get_backend() == "torch"
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("flashinfer"):
            assert kernels.get_backend() == "flashinfer"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "torch"
    kernels.set_backend("triton")
    try:
        assert kernels.get_backend() == "triton"
    finally:
        kernels.set_backend(None)
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="DUOHEAD_BACKEND.*choose one of"):
        kernels.get_backend()
    with pytest.raises(ValueError, match="unknown duohead backend"):
        kernels.set_backend("xformers")


@pytest.mark.skipif(ON_GPU, reason="checks the CPU refusal")
def test_forced_backends_unavailable_on_cpu_raise(monkeypatch):
    args = streaming_args()
    with kernels.use_backend("flashinfer"):
        with pytest.raises(RuntimeError, match="'flashinfer' is not available.*CUDA"):
            kernels.streaming_attention(*args)
        with pytest.raises(RuntimeError, match="'flashinfer' is not available"):
            kernels.retrieval_attention(args[0], args[1], args[2], None, 0.25)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.streaming_attention(*args)


@runs_kernel
@pytest.mark.skipif(ON_GPU, reason="CPU routing")
def test_cpu_routing(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    args = streaming_args()
    expected = reference.streaming_attention(*args)
    assert torch.equal(kernels.streaming_attention(*args), expected)  # auto on CPU = the reference, bit for bit
    with kernels.use_backend("triton"):  # the interpreter
        torch.testing.assert_close(kernels.streaming_attention(*args), expected, atol=2e-5, rtol=2e-5)
        q, k, v = args[:3]
        assert torch.equal(kernels.retrieval_attention(q, k, v, None, 0.25), reference.retrieval_attention(q, k, v, None, 0.25))


def test_old_interpreter_with_new_numpy_is_refused_with_a_reason(monkeypatch):
    versions = {"triton": "3.6.0", "numpy": "2.4.1"}
    monkeypatch.setattr(kernels.importlib.metadata, "version", lambda name: versions[name])
    kernels.interpreter_problem.cache_clear()
    try:
        assert "install triton>=3.7 or numpy<2.4" in kernels.interpreter_problem()
        if not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1":
            assert "triton" not in kernels.available_backends("cpu")
            with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="Triton 3.6.0 interpreter cannot run"):
                kernels.streaming_attention(*streaming_args())
        for triton_version, numpy_version in (("3.7.0", "2.4.1"), ("3.6.0", "2.3.5"), ("3.10.0rc1", "2.5.0")):
            versions.update(triton=triton_version, numpy=numpy_version)
            kernels.interpreter_problem.cache_clear()
            assert kernels.interpreter_problem() is None, versions
    finally:
        kernels.interpreter_problem.cache_clear()
