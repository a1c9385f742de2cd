"""One-call GPU check of duohead's kernels: every GPU path against the torch reference, then timings.

Run it through benchmarks/gpu_check.sh (that file's header has the device-tool call). First the preflight table
(benchmarks/gpu_preflight.py: a missing compiler, Python.h, nvcc or FlashInfer turns off the rows that need it,
with the reason), then one FlashInfer warm-up in a subprocess: a failure or a crash there (a sticky CUDA error
included) is reported once and every later row runs without FlashInfer (SDPA for retrieval heads). Sections:
1. correctness on random inputs (outputs poisoned with NaN first): Triton streaming attend-then-store (prefill /
   chunked prefill: attention + cache write; decode: the fused kernel, split and unsplit; outputs and caches,
   bf16 and fp16) and its cache writes alone (bit-exact), FlashInfer retrieval prefill / chunked prefill / decode,
   the SDPA fallback, and the "auto" dispatch, each against the torch reference computed in float32; then the
   whole model path (a 2-layer random Llama of the same attention shapes: DuoCache, prefill + decode) against
   stock transformers and the torch backend;
2. the card's copy bandwidth (a large device-to-device copy, read + write bytes);
3. (a) a decode step of all layers' attention including the new token's cache writes, duohead vs full attention,
   at each context and streaming fraction, with bytes moved, the share of copy bandwidth reached and the floor;
   eager and CUDA-graph replay;
4. (b) one layer's prefill attention, duohead vs full attention;
5. (c) a whole-model decode step at the longest context (random Llama, `--model-layers` layers of the benchmark's
   shapes): stock transformers with its StaticCache vs duohead at 50% streaming, eager and CUDA-graph replay;
6. (d) a decode step of all layers' attention at 1M tokens, 50% streaming, when `duohead plan`'s KV bytes fit the
   card's free memory (full attention's 128 GiB of KV do not: its side is the plan, not a timing).
One failure loses one row: each row (context, fraction) is measured in its own try and written to
OUT/gpu_check.json as soon as it exists; a sticky CUDA error stops the later rows with that reason. A short table
is printed last; error texts are cut to one short line.

`--dry-run` runs the same code on the CPU at tiny shapes: the Triton interpreter for streaming heads and the
torch reference in place of FlashInfer, timed with perf_counter; its FlashInfer warm-up subprocess crashes on
purpose (SIGABRT) to show that the other rows survive. tests/test_kernels_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch

from duohead import kernels
from duohead.cache import RetrievalKV, StreamingKV
from duohead.files import atomic_write_text
from duohead.kernels import StreamingView, flashinfer_retrieval, reference

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_preflight beside this script, also when imported
import gpu_preflight  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    """The attention being timed: L layers, Hq query heads, Hkv KV heads, D head dim, S sink, W window."""

    layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    sink: int
    window: int
    contexts: tuple[int, ...]
    fractions: tuple[float, ...]  # share of KV heads that stream
    dtype: torch.dtype


LLAMA3_8B = Shapes(32, 32, 8, 128, 64, 256, (32768, 131072), (0.0, 0.5, 0.75), torch.bfloat16)
TINY = Shapes(2, 8, 4, 64, 4, 16, (96, 160), (0.0, 0.5, 0.75), torch.float32)


class Clock:
    """Median milliseconds of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn, iters: int | None = None) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(iters or self.iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def randn(*shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference; inf if anything is not finite (an unwritten poisoned element)."""
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got.float() - expected.float()).abs().max())


def fp32(*tensors):
    return [t.float() if t.is_floating_point() else t for t in tensors]


def fp32_view(cache: StreamingView) -> StreamingView:
    """A streaming cache's fp32 copy, for the reference."""
    return StreamingView(*fp32(*cache.tensors()), cache.sink, cache.window)


def short(error: BaseException | str, limit: int = 160) -> str:
    """An error as one line of at most `limit` characters (the table and the JSON stay readable)."""
    text = " ".join((error if isinstance(error, str) else f"{type(error).__name__}: {error}").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- 0. toolchain ----


def warm_up_flashinfer(device: torch.device, shapes: Shapes) -> str | None:
    """Run FlashInfer's prefill and decode once on a small cache (its JIT compiles here); the error, or None."""
    try:
        for chunks in ((96,), (96, 1)):
            q, k, v = retrieval_inputs(device, shapes.dtype, shapes, chunks)
            flashinfer_retrieval.retrieval_attention(q, k, v, None, shapes.head_dim**-0.5)
        torch.cuda.synchronize(device)
    except Exception as e:  # no nvcc, a compile error, an unsupported GPU: reported once, then rows run without it
        return short(e, 300)
    return None


# the one FlashInfer module gpu_check runs (bf16, head dim 128: fa2 prefill and tensor-core decode share it), as
# FlashInfer 0.6.13 names it; benchmarks/flashinfer_aot.py builds it ahead of time
NEEDED_MODULE = (
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128"
    "_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False"
)
WARM_UP_SECONDS = 300  # FlashInfer's JIT compiles two modules on first use (prebuilt modules load in seconds)


def warm_up_in_subprocess(dry: bool, timeout: float = WARM_UP_SECONDS) -> str | None:
    """`warm_up_flashinfer` in a child process, so that a crash or a sticky CUDA error there costs FlashInfer's
    rows, not the run. The error (its last line, the signal, or the timeout), or None. `dry`: the child crashes
    on purpose (SIGABRT), the rehearsal of that failure."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--warm-up-only",
        "--prefill-backend",
        flashinfer_retrieval.PREFILL_BACKEND,
    ]
    command += ["--dry-run"] if dry else []
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the warm-up subprocess ran past {timeout:.0f} s (FlashInfer's JIT compile?)"
    last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
    if proc.returncode < 0:
        return short(f"the warm-up subprocess died of {signal.Signals(-proc.returncode).name}: {last}", 300)
    return None if proc.returncode == 0 else short(last or f"the warm-up subprocess exited {proc.returncode}", 300)


def warm_up_child(dry: bool) -> None:
    """The body of `--warm-up-only`: exit 0 when FlashInfer ran, 1 with its error on stderr."""
    if dry:
        print("simulated FlashInfer crash (--dry-run)", file=sys.stderr, flush=True)
        os.abort()
    failure = warm_up_flashinfer(torch.device("cuda"), LLAMA3_8B)
    if failure is not None:
        print(failure, file=sys.stderr, flush=True)
    raise SystemExit(0 if failure is None else 1)


# ---- 1. correctness ----


def streaming_setup(dry: bool) -> tuple[int, int, tuple[int, ...]]:
    """(sink, window, chunk lengths) of the streaming checks: a prefill past sink + window, a chunk, two decode steps."""
    return (4, 16, (40, 9, 1, 1)) if dry else (16, 64, (300, 77, 1, 1))


def chunk_positions(q_len: int, first: bool, seen: list[int], device) -> torch.Tensor:
    """Real positions [2, Q] of one chunk of two rows; row 1's first chunk starts with 5 padding slots (-1).
    Advances `seen` (real tokens per row) in place."""
    pos = torch.full((2, q_len), -1, dtype=torch.long, device=device)
    for b, pad in enumerate((0, 5) if first else (0, 0)):
        pos[b, pad:] = torch.arange(seen[b], seen[b] + q_len - pad, device=device)
        seen[b] += q_len - pad
    return pos


def check_streaming(device, dtype, shapes: Shapes, dry: bool, score_changes: bool = False) -> dict:
    """Triton attend-then-store over a cache built chunk by chunk (left padding, wrapped ring) vs the reference pair
    (attention, then append): chunks run attention + cache write, decode steps the fused kernel (split as the device
    chooses, then unsplit). score_changes: with Gemma 2's soft cap (50) and GPT-OSS-like learned sinks. max_error
    over outputs; cache_mismatches must be 0."""
    from duohead.kernels import triton_decode, triton_streaming

    sink, window, chunks = streaming_setup(dry)
    scale = shapes.head_dim**-0.5
    sinks = randn(shapes.num_q_heads, device=device, dtype=torch.float32)
    changes = {"softcap": 50.0, "sinks": sinks} if score_changes else {}
    ours, theirs, seen, worst, mismatches, decode_steps = None, None, [0, 0], 0.0, 0, 0
    for i, q_len in enumerate(chunks):
        q = randn(2, shapes.num_q_heads, q_len, shapes.head_dim, device=device, dtype=dtype)
        k, v = (randn(2, shapes.num_kv_heads, q_len, shapes.head_dim, device=device, dtype=dtype) for _ in range(2))
        pos = chunk_positions(q_len, i == 0, seen, device)
        if ours is None:
            ours, theirs = StreamingKV(k, sink, window), StreamingKV(k, sink, window)
        expected = reference.streaming_attention(*fp32(q, k, v, pos), fp32_view(theirs.view()), scale, **changes)
        reference.streaming_append(k, v, pos, theirs.view())
        got = torch.full_like(q, float("nan"))
        if q_len == 1 and decode_steps % 2:
            triton_decode.streaming_decode(q, k, v, pos, ours.view(), scale, got, splits=1, **changes)
        else:
            triton_streaming.streaming_attention_and_append(q, k, v, pos, ours.view(), scale, out=got, **changes)
        decode_steps += q_len == 1
        worst = max(worst, max_error(got, expected))
        mismatches += sum(int((a != b).sum()) for a, b in zip(ours.tensors(), theirs.tensors()))
    return {"max_error": worst if mismatches == 0 else float("inf"), "cache_mismatches": mismatches, "chunks": list(chunks)}


def check_append(device, dtype, shapes: Shapes, dry: bool) -> dict:
    """Triton cache writes (prefill with left padding, chunks, decode steps) vs the torch reference: equal bits."""
    from duohead.kernels import triton_streaming

    sink, window, chunks = streaming_setup(dry)
    seen, ours, theirs, mismatches = [0, 0], None, None, 0
    for i, q_len in enumerate(chunks):
        k, v = (randn(2, shapes.num_kv_heads, q_len, shapes.head_dim, device=device, dtype=dtype) for _ in range(2))
        pos = chunk_positions(q_len, i == 0, seen, device)
        if ours is None:
            ours, theirs = StreamingKV(k, sink, window), StreamingKV(k, sink, window)
        triton_streaming.streaming_append(k, v, pos, ours.view())
        reference.streaming_append(k, v, pos, theirs.view())
        mismatches += sum(int((a != b).sum()) for a, b in zip(ours.tensors(), theirs.tensors()))
    return {"max_error": float(mismatches), "chunks": list(chunks)}


def retrieval_inputs(device, dtype, shapes: Shapes, chunks: tuple[int, ...]):
    cache = None
    for q_len in chunks:
        k, v = (randn(2, shapes.num_kv_heads, q_len, shapes.head_dim, device=device, dtype=dtype) for _ in range(2))
        if cache is None:
            cache = RetrievalKV.empty(k, capacity=max(q_len, 256))
        keys, values = cache.append(k, v)
    q = randn(2, shapes.num_q_heads, chunks[-1], shapes.head_dim, device=device, dtype=dtype)
    return q, keys, values


def check_retrieval(fn, device, dtype, shapes: Shapes, chunks: tuple[int, ...]) -> dict:
    q, k, v = retrieval_inputs(device, dtype, shapes, chunks)
    scale = shapes.head_dim**-0.5
    expected = reference.retrieval_attention(*fp32(q, k, v), None, scale)
    return {"max_error": max_error(fn(q, k, v, None, scale), expected), "chunks": list(chunks)}


def correctness(device: torch.device, shapes: Shapes, duo_backend: str, dry: bool, skipped: dict[str, str | None], emit) -> None:
    """Every GPU path vs the reference, each row passed to `emit` as it is done; a failing check is recorded,
    never fatal. The "triton" and "flashinfer" rows are skipped with `skipped[name]` as the reason when set."""
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    model_tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative to the largest logit
    use_flashinfer = skipped["flashinfer"] is None
    prefill, chunked, decode = ((96,), (96, 17), (150, 1)) if dry else ((333,), (333, 64), (1000, 1))
    plan = []
    if skipped["triton"] is None:
        plan += [
            ("triton streaming", dt, lambda dt=dt: check_streaming(device, dt, shapes, dry))
            for dt in (shapes.dtype, torch.float16)
        ]
        plan.append(("triton streaming append", shapes.dtype, lambda: check_append(device, shapes.dtype, shapes, dry)))
        plan.append(  # Gemma 2 / GPT-OSS
            ("triton streaming softcap+sinks", shapes.dtype, lambda: check_streaming(device, shapes.dtype, shapes, dry, True))
        )
    for name, fn in (
        ("flashinfer retrieval", flashinfer_retrieval.retrieval_attention),
        ("sdpa retrieval", reference.retrieval_attention),
    ):
        if name.startswith("flashinfer") and not use_flashinfer:
            continue
        for label, chunks in (("prefill", prefill), ("chunked prefill", chunked), ("decode", decode)):
            plan.append(
                (f"{name} {label}", shapes.dtype, lambda fn=fn, c=chunks: check_retrieval(fn, device, shapes.dtype, shapes, c))
            )
    plan.append(
        (
            "auto dispatch retrieval decode",
            shapes.dtype,
            lambda: check_retrieval(kernels.retrieval_attention, device, shapes.dtype, shapes, decode),
        )
    )
    for name, dtype, run in plan:
        t0 = time.perf_counter()
        try:
            row = run()
            row["ok"] = row["max_error"] <= tol[dtype]
        except Exception as e:  # recorded and shown in the table; the timings still run
            row = {"ok": False, "error": short(e)}
        row.update(
            name=name, dtype=str(dtype).removeprefix("torch."), tolerance=tol[dtype], seconds=round(time.perf_counter() - t0, 2)
        )
        print(f"[check] {row}", flush=True)
        emit(row)
    t0 = time.perf_counter()
    try:
        model_rows = check_model(device, shapes, duo_backend, dry)
    except Exception as e:
        traceback.print_exc()
        model_rows = [{"name": "model", "max_error": float("inf"), "error": short(e)}]
    for row in model_rows:
        row.update(
            ok=row["max_error"] <= model_tol[shapes.dtype],
            dtype=str(shapes.dtype).removeprefix("torch."),
            tolerance=model_tol[shapes.dtype],
            seconds=round(time.perf_counter() - t0, 2),
        )
        print(f"[check] {row}", flush=True)
        emit(row)
    for name, reason in skipped.items():
        if reason is not None:
            emit({"name": f"{name} rows", "ok": None, "skipped": reason})


# ---- 1b. the whole model path ----


def check_model(device: torch.device, shapes: Shapes, duo_backend: str, dry: bool) -> list[dict]:
    """duohead inside a transformers model: a random-weight Llama with the benchmark's attention shapes (2 layers,
    small vocab). Prefill of all tokens but 8, then 8 one-token decode steps; the logits of every step compared
    (max |difference| / max |logit|): the all-retrieval pattern vs stock transformers (sdpa, DynamicCache), and a
    50% pattern on `duo_backend` vs the torch reference on the same device."""
    from transformers import DynamicCache

    import duohead
    from duohead.cache import cache_argument

    tokens = 64 if dry else 3000
    model = random_llama(device, shapes, 2, 2 * tokens, dry)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)

    def step_logits(make_cache) -> torch.Tensor:
        cache, name = make_cache(), cache_argument(model)
        with torch.no_grad():
            steps = [model(ids[:, :-8], **{name: cache}, use_cache=True).logits[0, -1]]
            steps += [model(ids[:, t : t + 1], **{name: cache}, use_cache=True).logits[0, -1] for t in range(tokens - 8, tokens)]
        return torch.stack(steps).float()

    def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
        return float((got - expected).abs().max() / expected.abs().max()) if bool(torch.isfinite(got).all()) else float("inf")

    stock = step_logits(DynamicCache)
    sink_window = dict(sink=shapes.sink, window=shapes.window)
    rows = []
    duohead.enable(model, duohead.HeadPattern(torch.ones(2, shapes.num_kv_heads), **sink_window))
    with kernels.use_backend(duo_backend):
        rows.append(
            {
                "name": f"model all-retrieval ({duo_backend}) vs stock",
                "max_error": relative(step_logits(lambda: duohead.DuoCache.from_model(model)), stock),
            }
        )
    duohead.disable(model)
    duohead.enable(model, duohead.HeadPattern(torch.rand(2, shapes.num_kv_heads), **sink_window), sparsity=0.5)
    with kernels.use_backend("torch"):
        expected = step_logits(lambda: duohead.DuoCache.from_model(model))
    with kernels.use_backend(duo_backend):
        rows.append(
            {
                "name": f"model 50% streaming ({duo_backend}) vs torch",
                "max_error": relative(step_logits(lambda: duohead.DuoCache.from_model(model)), expected),
            }
        )
    duohead.disable(model)
    for row in rows:
        row["tokens"] = tokens
    return rows


def random_llama(device: torch.device, shapes: Shapes, layers: int, positions: int, dry: bool) -> torch.nn.Module:
    """A random-weight Llama (seed 0) with the benchmark's attention shapes, `layers` layers and a 512-token vocab."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hidden = shapes.num_q_heads * shapes.head_dim
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden if dry else 14336,
        num_hidden_layers=layers,
        num_attention_heads=shapes.num_q_heads,
        num_key_value_heads=shapes.num_kv_heads,
        head_dim=shapes.head_dim,
        max_position_embeddings=positions,
    )
    with torch.device(device):  # random init on the device: fast for 8B-shaped layers
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=shapes.dtype).eval()


# ---- 2-5. timings ----


def copy_bandwidth(device: torch.device, clock: Clock, dry: bool) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    n = (16 << 20) if dry else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = clock(lambda: dst.copy_(src))
    return 2 * n / (ms / 1e3)


class ContextLost(RuntimeError):
    """A sticky CUDA error: every later kernel launch fails, so the later rows are not attempted."""


def after_failure(device: torch.device) -> None:
    """Free what a failed row left and check that the device still works; raises ContextLost when it does not."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as e:
        raise ContextLost(short(e)) from e


def of_copy(nbytes: int, ms, bandwidth: float | None) -> float | None:
    """The share of the copy bandwidth that moving `nbytes` in `ms` reaches (None: no time or no bandwidth)."""
    return nbytes / (ms / 1e3) / bandwidth if isinstance(ms, float) and bandwidth else None


def floor_ms(nbytes: int, bandwidth: float | None) -> float | None:
    return nbytes / bandwidth * 1e3 if bandwidth else None


def streaming_state(num_heads: int, seen: int, shapes: Shapes, device) -> StreamingView:
    """The streaming cache after `seen` >= S + W tokens (sink positions [0, S), ring positions [seen - W, seen)),
    or an empty one for `seen` = 0. Random contents."""
    like = torch.empty(1, num_heads, 1, shapes.head_dim, device=device, dtype=shapes.dtype)
    cache = StreamingKV(like, shapes.sink, shapes.window)
    for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v):
        t.normal_()
    if seen:
        cache.sink_pos.copy_(torch.arange(shapes.sink, device=device))
        ring = torch.arange(seen - shapes.window, seen, device=device)
        cache.ring_pos[0, (ring - shapes.sink) % shapes.window] = ring
    return cache.view()


def graph_ms(step, clock: Clock, before_capture=None, plans=None) -> float | str:
    """Median time of a CUDA-graph replay of `step` (kernels only, no Python), or why it could not be captured.
    As PyTorch documents capture: one eager step on a side stream first (FlashInfer plans, Triton compiles, the
    allocator settles), then `before_capture` (e.g. take that token back), then the capture; FlashInfer's wrappers
    that the graph replays are pinned to it (`plans`: their owner, a DuoCache's; None: the default owner)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if before_capture is not None:
            before_capture()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        flashinfer_retrieval.pin_to(graph, plans)  # the wrappers it replays live as long as it does
        return clock(graph.replay)
    except Exception as e:
        return short(e)


@dataclass
class DuoDecode:
    """One decode step of every layer's attention at one streaming fraction, with its cache writes: `kv` [2, 1,
    Hkv', T, D] per layer (its first `hr` heads are the retrieval heads), `states` the streaming heads' caches."""

    kv: list[torch.Tensor]
    states: list[StreamingView]
    q: torch.Tensor  # [1, Hq, 1, D]
    new_kv: torch.Tensor  # [2, 1, Hkv, 1, D]
    pos: torch.Tensor  # [1, 1]
    hr: int
    hs: int
    group: int

    def retrieval_part(self) -> None:
        scale = self.q.shape[-1] ** -0.5
        for buf in self.kv:
            buf[:, :, : self.hr, -1:].copy_(self.new_kv[:, :, : self.hr])
            kernels.retrieval_attention(
                self.q[:, : self.hr * self.group], buf[0][:, : self.hr], buf[1][:, : self.hr], None, scale
            )

    def streaming_part(self) -> None:
        scale, hr = self.q.shape[-1] ** -0.5, self.hr
        for state in self.states:
            kernels.streaming_attention_and_append(
                self.q[:, hr * self.group :], self.new_kv[0][:, hr:], self.new_kv[1][:, hr:], self.pos, state, scale
            )

    def step(self) -> None:
        if self.hr:
            self.retrieval_part()
        if self.hs:
            self.streaming_part()

    def bytes(self, shapes: Shapes, context: int) -> int:
        """KV bytes read and written: retrieval heads' T tokens, streaming heads' S + W, the new token's K and V."""
        d, item = shapes.head_dim, shapes.dtype.itemsize
        read = self.hr * context + self.hs * (shapes.sink + shapes.window)
        return shapes.layers * 2 * (read + self.hr + self.hs) * d * item


def decode_bench(
    device, shapes: Shapes, clock: Clock, bandwidth: float | None, full_backend: str, duo_backend: str, emit
) -> None:
    """(a) One decode step of every layer's attention at each context and streaming fraction, the new token's cache
    writes included on both sides (full: one slot of the KV buffer; duohead: the retrieval slot, and the streaming
    heads' fused attend-then-store). Each row is passed to `emit` when done; a failed row becomes an error row."""
    d = shapes.head_dim
    scale = d**-0.5
    for context in shapes.contexts:
        try:
            kv = [randn(2, 1, shapes.num_kv_heads, context, d, device=device, dtype=shapes.dtype) for _ in range(shapes.layers)]
            new_kv = randn(2, 1, shapes.num_kv_heads, 1, d, device=device, dtype=shapes.dtype)
            q = randn(1, shapes.num_q_heads, 1, d, device=device, dtype=shapes.dtype)

            def full_step():
                for buf in kv:
                    buf[:, :, :, -1:].copy_(new_kv)  # the new token's slot (the buffer holds exactly `context` tokens)
                    kernels.retrieval_attention(q, buf[0], buf[1], None, scale)

            with kernels.use_backend(full_backend):
                full_ms = clock(full_step)
                full_graph = graph_ms(full_step, clock) if device.type == "cuda" else None
        except Exception as e:  # this context's rows fail; the next context still runs
            for fraction in shapes.fractions:
                emit({"context": context, "streaming_fraction": fraction, "error": f"full attention: {short(e)}"})
            kv = None
            after_failure(device)
            continue
        full_bytes = shapes.layers * 2 * shapes.num_kv_heads * (context + 1) * d * shapes.dtype.itemsize
        for fraction in shapes.fractions:
            try:
                row = duo_row(device, shapes, clock, bandwidth, duo_backend, kv, q, new_kv, context, fraction)
                row |= full_side(full_ms, full_graph, full_bytes, bandwidth) | {"speedup": full_ms / row["duo_ms"]}
                print(f"[decode] {row}", flush=True)
                emit(row)
            except Exception as e:
                emit({"context": context, "streaming_fraction": fraction, "error": short(e)})
                after_failure(device)
        del kv


def full_side(full_ms: float, full_graph, full_bytes: int, bandwidth: float | None) -> dict:
    return {
        "full_ms": full_ms,
        "full_graph_ms": full_graph,
        "full_bytes": full_bytes,
        "full_GBps": full_bytes / full_ms / 1e6,
        "full_floor_ms": floor_ms(full_bytes, bandwidth),
        "full_of_copy_bw": of_copy(full_bytes, full_ms, bandwidth),
        "full_graph_of_copy_bw": of_copy(full_bytes, full_graph, bandwidth),
    }


def duo_row(device, shapes: Shapes, clock: Clock, bandwidth, duo_backend: str, kv, q, new_kv, context, fraction) -> dict:
    """duohead's side of one decode row: eager, its two parts, CUDA-graph replay, bytes and shares of bandwidth."""
    hs = round(fraction * shapes.num_kv_heads)
    hr = shapes.num_kv_heads - hs
    pos = torch.full((1, 1), context - 1, dtype=torch.long, device=device)
    states = [streaming_state(hs, context - 1, shapes, device) for _ in range(shapes.layers)] if hs else []
    step = DuoDecode(kv, states, q, new_kv, pos, hr, hs, shapes.num_q_heads // shapes.num_kv_heads)
    with kernels.use_backend(duo_backend):
        duo_ms = clock(step.step)
        parts = {
            "retrieval_ms": clock(step.retrieval_part) if hr else 0.0,
            "streaming_ms": clock(step.streaming_part) if hs else 0.0,
        }
        duo_graph = graph_ms(step.step, clock) if device.type == "cuda" else None
    duo_bytes = step.bytes(shapes, context)
    return {
        "context": context,
        "streaming_fraction": fraction,
        "retrieval_kv_heads": hr,
        "streaming_kv_heads": hs,
        "duo_ms": duo_ms,
        **parts,
        "duo_graph_ms": duo_graph,
        "duo_bytes": duo_bytes,
        "duo_GBps": duo_bytes / duo_ms / 1e6,
        "duo_floor_ms": floor_ms(duo_bytes, bandwidth),
        "duo_of_copy_bw": of_copy(duo_bytes, duo_ms, bandwidth),
        "duo_graph_of_copy_bw": of_copy(duo_bytes, duo_graph, bandwidth),
    }
    return row


def prefill_bench(device, shapes: Shapes, clock: Clock, full_backend: str, duo_backend: str, dry: bool, emit) -> None:
    """(b) One layer's prefill attention over T new tokens, duohead vs full; each row to `emit` when done."""
    group, d = shapes.num_q_heads // shapes.num_kv_heads, shapes.head_dim
    scale = d**-0.5
    for context in shapes.contexts:
        few = Clock(device, 1, 3) if context > 65536 and not dry else clock
        try:
            q = randn(1, shapes.num_q_heads, context, d, device=device, dtype=shapes.dtype)
            buf = randn(2, 1, shapes.num_kv_heads, context, d, device=device, dtype=shapes.dtype)
            with kernels.use_backend(full_backend):
                full_ms = few(lambda: kernels.retrieval_attention(q, buf[0], buf[1], None, scale))
        except Exception as e:
            for fraction in shapes.fractions:
                emit({"context": context, "streaming_fraction": fraction, "error": f"full attention: {short(e)}"})
            q = buf = None
            after_failure(device)
            continue
        pos = torch.arange(context, device=device)[None]
        for fraction in shapes.fractions:
            hs = round(fraction * shapes.num_kv_heads)
            hr = shapes.num_kv_heads - hs
            try:
                state = streaming_state(hs, 0, shapes, device) if hs else None

                def duo():
                    if hr:
                        kernels.retrieval_attention(q[:, : hr * group], buf[0][:, :hr], buf[1][:, :hr], None, scale)
                    if hs:
                        kernels.streaming_attention(q[:, hr * group :], buf[0][:, hr:], buf[1][:, hr:], pos, state, scale)

                with kernels.use_backend(duo_backend):
                    duo_ms = few(duo)
                row = {"context": context, "streaming_fraction": fraction, "full_ms": full_ms, "duo_ms": duo_ms}
                row["speedup"] = full_ms / duo_ms
            except Exception as e:
                row = {"context": context, "streaming_fraction": fraction, "error": short(e)}
                after_failure(device)
            print(f"[prefill] {row}", flush=True)
            emit(row)
        del q, buf


def model_decode_bench(
    device, shapes: Shapes, clock: Clock, bandwidth: float | None, duo_backend: str, layers: int, dry: bool, emit
) -> None:
    """(c) A whole-model decode step at the longest context: a random Llama (`layers` layers of the benchmark's
    shapes), stock transformers with its StaticCache (sdpa) vs duohead at 50% streaming on `duo_backend`, both
    prefilled in chunks, then timed eagerly and as a CUDA-graph replay of one captured step (a replay repeats that
    step at the same position: a timing, not a generation). Bytes: weights + the KV each side reads. Each row goes
    to `emit` when done; a failed stock row does not stop duohead's."""
    from transformers import StaticCache

    import duohead
    from duohead.cache import cache_argument

    context, chunk = max(shapes.contexts), (64 if dry else 8192)
    model = random_llama(device, shapes, layers, context + 128, dry)
    name = cache_argument(model)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), device=device)
    next_id = ids[:, context:]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token = 2 * shapes.head_dim * shapes.dtype.itemsize * layers  # bytes per token per KV head, all layers
    stock_row = None

    def prefill(cache) -> None:
        for start in range(0, context, chunk):
            end = min(start + chunk, context)
            model(ids[:, start:end], **{name: cache}, use_cache=True, cache_position=torch.arange(start, end, device=device))

    def row(label: str, step, kv_bytes: int, before_capture=None, plans=None) -> dict:
        eager = clock(step)
        graph = graph_ms(step, clock, before_capture, plans) if device.type == "cuda" else None
        total = weights + kv_bytes
        return {
            "model": label,
            "context": context,
            "layers": layers,
            "eager_ms": eager,
            "graph_ms": graph,
            "bytes": total,
            "floor_ms": floor_ms(total, bandwidth),
            "graph_of_copy_bw": of_copy(total, graph, bandwidth),
        }

    def report(r: dict) -> None:
        print(f"[model decode] {r}", flush=True)
        emit(r)

    label = "stock transformers (StaticCache, sdpa)"
    with torch.no_grad():
        try:
            static = StaticCache(config=model.config, max_cache_len=context + 1)
            prefill(static)
            position = torch.tensor([context], device=device)
            stock = lambda: model(next_id, **{name: static}, use_cache=True, cache_position=position)  # noqa: E731
            stock_row = row(label, stock, shapes.num_kv_heads * (context + 1) * kv_token)
            report(stock_row)
        except Exception as e:
            report({"model": label, "context": context, "layers": layers, "error": short(e)})
            after_failure(device)
        static = None
        pattern = duohead.HeadPattern(torch.rand(layers, shapes.num_kv_heads), sink=shapes.sink, window=shapes.window)
        duohead.enable(model, pattern, sparsity=0.5)
        label = f"duohead 50% streaming ({duo_backend})"
        try:
            with kernels.use_backend(duo_backend):
                cache = duohead.DuoCache.from_model(model, max_length=context + 96, rollback=1)
                prefill(cache)
                duo = lambda: model(next_id, **{name: cache}, use_cache=True)  # noqa: E731
                hs = shapes.num_kv_heads // 2
                kv_bytes = ((shapes.num_kv_heads - hs) * (context + 1) + hs * (shapes.sink + shapes.window)) * kv_token
                duo_row = row(label, duo, kv_bytes, before_capture=lambda: cache.crop(-1), plans=cache.plans)
        except Exception as e:
            report({"model": label, "context": context, "layers": layers, "error": short(e)})
            after_failure(device)
            return
        finally:
            duohead.disable(model)
    if stock_row is not None:
        duo_row["speedup_eager"] = stock_row["eager_ms"] / duo_row["eager_ms"]
        if isinstance(stock_row["graph_ms"], float) and isinstance(duo_row["graph_ms"], float):
            duo_row["speedup_graph"] = stock_row["graph_ms"] / duo_row["graph_ms"]
    report(duo_row)


MILLION = 2**20  # tokens of the 1M row
HEADROOM = 4 << 30  # bytes the 1M row leaves free beside its KV (FlashInfer's workspace, the graph's pool, q)


def million_plan(shapes: Shapes) -> dict:
    """`duohead plan` for Llama-3.1-8B (the shipped pattern's model config) at 1M tokens, half the KV heads
    streaming, on one GPU: bytes of the weights, of full attention's KV and of duohead's."""
    from duohead import planner

    config = planner.shipped_model_config("llama-3.1-8b-instruct")
    layout = planner.spread_layout(config.num_hidden_layers, config.num_key_value_heads, 1, 0.5)
    rank = planner.plan_deployment(config, layout, sink=shapes.sink, window=shapes.window, context=MILLION).fullest()
    return {"weights_bytes": rank.weight_bytes, "full_kv_bytes": rank.full_kv_bytes, "duo_kv_bytes": rank.duohead_kv_bytes}


def million_bench(device, shapes: Shapes, clock: Clock, bandwidth: float | None, duo_backend: str, dry: bool, emit) -> None:
    """(d) A decode step of every layer's attention at 1M tokens (dry run: 1K), 50% streaming, with its cache
    writes, eager and CUDA-graph replay, when the card's free memory holds the retrieval heads' KV plus HEADROOM.
    Full attention is not run: the plan's bytes say why (Llama-3.1-8B: 128 GiB of KV plus 15 GiB of weights)."""
    context = 1024 if dry else MILLION
    plan = million_plan(LLAMA3_8B)
    group, d = shapes.num_q_heads // shapes.num_kv_heads, shapes.head_dim
    hs = shapes.num_kv_heads // 2
    hr = shapes.num_kv_heads - hs
    need = shapes.layers * 2 * hr * context * d * shapes.dtype.itemsize
    row = {"context": context, "streaming_fraction": hs / shapes.num_kv_heads, "retrieval_kv_heads": hr, "plan": plan}
    row["plan_fits"] = None  # whether weights + KV fit the card: known on a GPU
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        row["plan_fits"] = {side: plan["weights_bytes"] + plan[f"{side}_kv_bytes"] <= total for side in ("full", "duo")}
        if free < need + HEADROOM:
            row["skipped"] = f"needs {need / 2**30:.1f} GiB of KV + {HEADROOM >> 30} GiB; {free / 2**30:.1f} GiB free"
            print(f"[1M decode] {row}", flush=True)
            emit(row)
            return
    kv = [randn(2, 1, hr, context, d, device=device, dtype=shapes.dtype) for _ in range(shapes.layers)]
    new_kv = randn(2, 1, shapes.num_kv_heads, 1, d, device=device, dtype=shapes.dtype)
    q = randn(1, shapes.num_q_heads, 1, d, device=device, dtype=shapes.dtype)
    pos = torch.full((1, 1), context - 1, dtype=torch.long, device=device)
    states = [streaming_state(hs, context - 1, shapes, device) for _ in range(shapes.layers)]
    step = DuoDecode(kv, states, q, new_kv, pos, hr, hs, group)
    with kernels.use_backend(duo_backend):
        duo_ms = clock(step.step)
        duo_graph = graph_ms(step.step, clock) if device.type == "cuda" else None
    duo_bytes = step.bytes(shapes, context)
    row |= {
        "duo_ms": duo_ms,
        "duo_graph_ms": duo_graph,
        "duo_bytes": duo_bytes,
        "duo_floor_ms": floor_ms(duo_bytes, bandwidth),
        "duo_of_copy_bw": of_copy(duo_bytes, duo_ms, bandwidth),
        "duo_graph_of_copy_bw": of_copy(duo_bytes, duo_graph, bandwidth),
        "full_floor_ms": floor_ms(shapes.layers * 2 * shapes.num_kv_heads * (context + 1) * d * shapes.dtype.itemsize, bandwidth),
    }
    print(f"[1M decode] {row}", flush=True)
    emit(row)


# ---- report ----


def table(report: dict) -> str:
    def fmt(x, spec: str, width: int) -> str:
        return format(x, spec) if isinstance(x, float) else f"{'-':>{width}}"

    lines = [gpu_preflight.table(report["preflight"])]
    lines.append(
        f"duohead gpu_check  {report['device']}  {report['date']}  "
        f"(full = {report['full_backend']}, duohead = {report['duo_backend']})"
    )
    lines.append(f"flashinfer: {report['flashinfer']} (its module: {report['flashinfer_modules']})")
    bandwidth = report["copy_bandwidth_GBps"]
    lines.append(f"copy bandwidth: {bandwidth:.0f} GB/s" if bandwidth else f"copy bandwidth: failed ({report['errors'][0]})")
    failed = [
        c["name"] + (f" ({c['error']})" if "error" in c else f" err={c.get('max_error')}")
        for c in report["checks"]
        if c.get("ok") is False
    ]
    skipped = [f"{c['name']}: {c['skipped']}" for c in report["checks"] if c.get("ok") is None]
    passed = sum(1 for c in report["checks"] if c.get("ok"))
    lines.append(
        f"correctness: {passed} passed, {len(failed)} failed"
        + (": " + "; ".join(failed) if failed else "")
        + ("; skipped " + "; ".join(skipped) if skipped else "")
    )
    lines.append("decode step, all layers' attention + cache writes (ms; _g = CUDA-graph replay; bw = share of copy bandwidth)")
    lines.append(
        f"{'context':>8} {'stream':>6} {'full':>8} {'duo':>8} {'speedup':>7} {'full_g':>8} {'duo_g':>8} {'speedup_g':>9} "
        f"{'full bw':>7} {'duo bw':>7} {'duo_g bw':>8} {'floor':>7}"
    )
    for r in report["decode"]:
        if "error" in r:
            lines.append(f"{r['context']:>8} {r['streaming_fraction']:>6.2f}  error: {r['error']}")
            continue
        fg, dg = r["full_graph_ms"], r["duo_graph_ms"]
        ratio = fg / dg if isinstance(fg, float) and isinstance(dg, float) else None
        lines.append(
            f"{r['context']:>8} {r['streaming_fraction']:>6.2f} {r['full_ms']:8.3f} {r['duo_ms']:8.3f} {r['speedup']:7.2f} "
            f"{fmt(fg, '8.3f', 8)} {fmt(dg, '8.3f', 8)} {fmt(ratio, '9.2f', 9)} {fmt(r['full_of_copy_bw'], '7.0%', 7)} "
            f"{fmt(r['duo_of_copy_bw'], '7.0%', 7)} {fmt(r['duo_graph_of_copy_bw'], '8.0%', 8)} "
            f"{fmt(r['duo_floor_ms'], '7.3f', 7)}"
        )
    lines.append("prefill, one layer's attention (ms)")
    lines.append(f"{'context':>8} {'stream':>6} {'full':>9} {'duo':>9} {'speedup':>7}")
    for r in report["prefill"]:
        lines.append(
            f"{r['context']:>8} {r['streaming_fraction']:>6.2f}  error: {r['error']}"
            if "error" in r
            else f"{r['context']:>8} {r['streaming_fraction']:>6.2f} {r['full_ms']:9.2f} {r['duo_ms']:9.2f} {r['speedup']:7.2f}"
        )
    if report["model_decode"]:
        lines.append("whole-model decode step (ms; graph = replay of one captured step)")
        lines.append(f"{'model':>44} {'context':>8} {'eager':>8} {'graph':>8} {'floor':>7} {'graph bw':>8}")
        for r in report["model_decode"]:
            if "error" in r:
                lines.append(f"{r['model']:>44} {r['context']:>8}  error: {r['error']}")
                continue
            graph = r["graph_ms"] if isinstance(r["graph_ms"], float) or r["graph_ms"] is None else f"error: {r['graph_ms']}"
            lines.append(
                f"{r['model']:>44} {r['context']:>8} {r['eager_ms']:8.2f} {fmt(graph, '8.2f', 8)} "
                f"{fmt(r['floor_ms'], '7.2f', 7)} "
                f"{fmt(r['graph_of_copy_bw'], '8.0%', 8)}" + (f"  {graph}" if isinstance(graph, str) else "")
            )
        last = report["model_decode"][-1]
        if "speedup_eager" in last:
            graph_ratio = f"{last['speedup_graph']:.2f}x" if "speedup_graph" in last else "-"
            lines.append(f"duohead vs stock: eager {last['speedup_eager']:.2f}x, graph replay {graph_ratio}")
    for r in report["million"]:
        plan = r["plan"]
        lines.append(
            f"1M plan (Llama-3.1-8B, 50% streaming, GiB): weights {plan['weights_bytes'] / 2**30:.1f}, KV full "
            f"{plan['full_kv_bytes'] / 2**30:.1f}, duohead {plan['duo_kv_bytes'] / 2**30:.1f}; fits the card: {r['plan_fits']}"
        )
        if "skipped" in r or "error" in r:
            lines.append(f"decode at {r['context']} tokens: {r.get('skipped') or 'error: ' + r['error']}")
        else:
            lines.append(
                f"decode at {r['context']} tokens, all layers' attention (ms): eager {r['duo_ms']:.3f}, graph "
                f"{fmt(r['duo_graph_ms'], '.3f', 1)}, floor {fmt(r['duo_floor_ms'], '.3f', 1)} (full attention's floor "
                f"{fmt(r['full_floor_ms'], '.3f', 1)}, not run)"
            )
    lines += [f"ERROR {e}" for e in report.get("errors", [])]
    lines.append(f"total {report.get('seconds', '?')} s; full results in gpu_check.json")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, torch reference")
    parser.add_argument("--contexts", type=lambda s: tuple(int(x) for x in s.split(",")), help="override, e.g. 32768,131072")
    parser.add_argument("--model-layers", type=int, default=2, help="layers of the whole-model decode row (8B shapes)")
    parser.add_argument(
        "--prefill-backend",
        default="fa2",
        choices=["fa2", "auto"],
        help="FlashInfer prefill backend: fa2 (one JIT module shared with decode) or auto (FA3 on Hopper)",
    )
    parser.add_argument("--warm-up-only", action="store_true", help=argparse.SUPPRESS)  # the warm-up subprocess
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    flashinfer_retrieval.PREFILL_BACKEND = args.prefill_backend
    if args.warm_up_only:
        warm_up_child(args.dry_run)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run for the CPU rehearsal")
    shapes = TINY if args.dry_run else LLAMA3_8B
    if args.contexts:
        shapes = Shapes(**{**asdict(shapes), "contexts": args.contexts})
    preflight = gpu_preflight.load_or_collect(args.out, args.dry_run)
    skipped = dict(preflight["gates"])
    if skipped["flashinfer"] is None and not args.dry_run and not flashinfer_retrieval.available():
        skipped["flashinfer"] = "flashinfer does not import"
    if skipped["flashinfer"] is None:
        failure = warm_up_in_subprocess(args.dry_run)
        skipped["flashinfer"] = None if failure is None else f"warm-up failed: {failure}"
        print(
            f"[toolchain] flashinfer warm-up (subprocess): {'ok' if failure is None else failure} (later rows run "
            f"{'with' if failure is None else 'without'} FlashInfer)",
            flush=True,
        )
    has_flashinfer = skipped["flashinfer"] is None
    if skipped["triton"] is not None:
        full_backend = duo_backend = "torch"
    else:
        full_backend = "flashinfer" if has_flashinfer else ("triton" if device.type == "cuda" else "torch")
        duo_backend = "flashinfer" if has_flashinfer else "triton"
    clock = Clock(device, warmup=0 if args.dry_run else 5, iters=1 if args.dry_run else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"

    import triton

    report = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "flashinfer": _version("flashinfer") if has_flashinfer else None,
        },
        "preflight": preflight,
        "shapes": {**asdict(shapes), "dtype": str(shapes.dtype)},
        "full_backend": full_backend,
        "duo_backend": duo_backend,
        "prefill_backend": args.prefill_backend,
        "flashinfer": "ok" if has_flashinfer else skipped["flashinfer"],
        "flashinfer_modules": "prebuilt" if NEEDED_MODULE in preflight["prebuilt_flashinfer"] else "JIT",
        "checks": [],
        "copy_bandwidth_GBps": None,
        "decode": [],
        "prefill": [],
        "model_decode": [],
        "million": [],
    }

    def save():
        atomic_write_text(path, json.dumps(report, indent=1, default=str))

    def emitter(section: str):
        def emit(row: dict) -> None:  # each row on disk as soon as it exists
            report[section].append(row)
            save()

        return emit

    def failed(section: str, e: Exception) -> None:
        traceback.print_exc()
        report.setdefault("errors", []).append(f"{section}: {short(e, 300)}")
        save()

    t0 = time.perf_counter()
    save()
    bandwidth = None
    sections = (
        ("checks", lambda: correctness(device, shapes, duo_backend, args.dry_run, skipped, emitter("checks"))),
        ("copy_bandwidth", lambda: copy_bandwidth(device, clock, args.dry_run)),
        ("decode", lambda: decode_bench(device, shapes, clock, bandwidth, full_backend, duo_backend, emitter("decode"))),
        ("prefill", lambda: prefill_bench(device, shapes, clock, full_backend, duo_backend, args.dry_run, emitter("prefill"))),
        (
            "model_decode",
            lambda: model_decode_bench(
                device, shapes, clock, bandwidth, duo_backend, args.model_layers, args.dry_run, emitter("model_decode")
            ),
        ),
        ("million", lambda: million_bench(device, shapes, clock, bandwidth, duo_backend, args.dry_run, emitter("million"))),
    )
    for section, bench in sections:
        try:
            result = bench()
            if section == "copy_bandwidth":
                bandwidth = result
                report["copy_bandwidth_GBps"] = bandwidth / 1e9
                save()
        except ContextLost as e:  # nothing after a sticky CUDA error can run
            failed(section, e)
            report["errors"].append(f"CUDA context lost: the sections after {section} were not run")
            break
        except Exception as e:  # keep what the other sections measured; the table says what failed
            failed(section, e)
            try:
                after_failure(device)
            except ContextLost as lost:
                report["errors"].append(f"CUDA context lost ({lost}): the sections after {section} were not run")
                break
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(table(report), flush=True)
    return report


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "?")


if __name__ == "__main__":
    main()
