"""One-call GPU check of duohead's kernels: every GPU path against the torch reference, then timings.

Run it through benchmarks/gpu_check.sh (that file's header has the device-tool call). Sections:
1. correctness on random inputs (outputs poisoned with NaN first): Triton streaming prefill / chunked prefill /
   decode (bf16, fp16) and its cache writes (bit-exact), FlashInfer retrieval prefill / chunked prefill / decode, the SDPA fallback, and the
   "auto" dispatch, each against the torch reference computed in float32; then the whole model path (a 2-layer
   random Llama of the same attention shapes: DuoCache, prefill + decode) against stock transformers and the
   torch backend;
2. the card's copy bandwidth (a large device-to-device copy, read + write bytes);
3. (a) a decode step of all layers' attention, duohead vs full attention, at each context and streaming
   fraction, with bytes moved, achieved bytes/s and the bandwidth floor; eager and CUDA-graph replay;
4. (b) one layer's prefill attention, duohead vs full attention.
Full results go to OUT/gpu_check.json (rewritten after every section); a short table is printed last.

`--dry-run` runs the same code on the CPU at tiny shapes: the Triton interpreter for streaming heads and the
torch reference in place of FlashInfer, timed with perf_counter. tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
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
from duohead.kernels import flashinfer_retrieval, reference


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


def check_streaming(device, dtype, shapes: Shapes, dry: bool) -> dict:
    """Triton Λ attention over a cache built chunk by chunk (left padding, wrapped ring), vs the reference."""
    from duohead.kernels import triton_streaming

    sink, window, chunks = streaming_setup(dry)
    cache, seen, worst = None, [0, 0], 0.0
    for i, q_len in enumerate(chunks):
        q = randn(2, shapes.num_q_heads, q_len, shapes.head_dim, device=device, dtype=dtype)
        k, v = (randn(2, shapes.num_kv_heads, q_len, shapes.head_dim, device=device, dtype=dtype) for _ in range(2))
        pos = chunk_positions(q_len, i == 0, seen, device)
        if cache is None:
            cache = StreamingKV(k, sink, window)
        args = (q, k, v, pos, *cache.tensors(), sink, window, shapes.head_dim**-0.5)
        expected = reference.streaming_attention(*fp32(*args[:10]), *args[10:])
        got = triton_streaming.streaming_attention(*args, out=torch.full_like(q, float("nan")))
        worst = max(worst, max_error(got, expected))
        cache.append(k, v, pos)
    return {"max_error": worst, "chunks": list(chunks)}


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
        triton_streaming.streaming_append(k, v, pos, *ours.tensors())
        reference.streaming_append(k, v, pos, *theirs.tensors())
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


def check_retrieval(fn, device, dtype, shapes: Shapes, chunks: tuple[int, ...], poison: bool) -> dict:
    q, k, v = retrieval_inputs(device, dtype, shapes, chunks)
    scale = shapes.head_dim**-0.5
    expected = reference.retrieval_attention(*fp32(q, k, v), None, scale)
    kwargs = {}
    if poison:
        kwargs["out"] = torch.full((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), float("nan"), device=device, dtype=dtype)
    return {"max_error": max_error(fn(q, k, v, None, scale, **kwargs), expected), "chunks": list(chunks)}


def correctness(device: torch.device, shapes: Shapes, duo_backend: str, dry: bool) -> list[dict]:
    """Every GPU path vs the reference; a failing check is recorded, never fatal."""
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    model_tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative to the largest logit
    use_flashinfer = device.type == "cuda" and flashinfer_retrieval.available()
    prefill, chunked, decode = ((96,), (96, 17), (150, 1)) if dry else ((333,), (333, 64), (1000, 1))
    plan = [("triton streaming", dt, lambda dt=dt: check_streaming(device, dt, shapes, dry)) for dt in (shapes.dtype, torch.float16)]
    plan.append(("triton streaming append", shapes.dtype, lambda: check_append(device, shapes.dtype, shapes, dry)))
    for name, fn in (("flashinfer retrieval", flashinfer_retrieval.retrieval_attention), ("sdpa retrieval", reference.retrieval_attention)):
        if name.startswith("flashinfer") and not use_flashinfer:
            continue
        for label, chunks in (("prefill", prefill), ("chunked prefill", chunked), ("decode", decode)):
            poison = name.startswith("flashinfer")
            plan.append((f"{name} {label}", shapes.dtype, lambda fn=fn, c=chunks, p=poison: check_retrieval(fn, device, shapes.dtype, shapes, c, p)))
    plan.append(("auto dispatch retrieval decode", shapes.dtype, lambda: check_retrieval(kernels.retrieval_attention, device, shapes.dtype, shapes, decode, False)))
    results = []
    for name, dtype, run in plan:
        t0 = time.perf_counter()
        try:
            row = run()
            row["ok"] = row["max_error"] <= tol[dtype]
        except Exception as e:  # recorded and shown in the table; the timings still run
            row = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        row.update(name=name, dtype=str(dtype).removeprefix("torch."), tolerance=tol[dtype], seconds=round(time.perf_counter() - t0, 2))
        print(f"[check] {row}", flush=True)
        results.append(row)
    t0 = time.perf_counter()
    try:
        model_rows = check_model(device, shapes, duo_backend, dry)
    except Exception as e:
        traceback.print_exc()
        model_rows = [{"name": "model", "max_error": float("inf"), "error": f"{type(e).__name__}: {e}"[:500]}]
    for row in model_rows:
        row.update(ok=row["max_error"] <= model_tol[shapes.dtype], dtype=str(shapes.dtype).removeprefix("torch."),
                   tolerance=model_tol[shapes.dtype], seconds=round(time.perf_counter() - t0, 2))
        print(f"[check] {row}", flush=True)
    results += model_rows
    if not use_flashinfer:
        reason = "no CUDA device" if device.type != "cuda" else "flashinfer not installed"
        results.append({"name": "flashinfer retrieval", "ok": None, "skipped": reason})
    return results


# ---- 1b. the whole model path ----


def check_model(device: torch.device, shapes: Shapes, duo_backend: str, dry: bool) -> list[dict]:
    """duohead inside a transformers model: a random-weight Llama with the benchmark's attention shapes (2 layers,
    small vocab). Prefill of all tokens but 8, then 8 one-token decode steps; the logits of every step compared
    (max |difference| / max |logit|): the all-retrieval pattern vs stock transformers (sdpa, DynamicCache), and a
    50% pattern on `duo_backend` vs the torch reference on the same device."""
    import duohead
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    from duohead.cache import cache_argument

    torch.manual_seed(0)
    hidden = shapes.num_q_heads * shapes.head_dim
    tokens = 64 if dry else 3000
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden if dry else 14336, num_hidden_layers=2,
        num_attention_heads=shapes.num_q_heads, num_key_value_heads=shapes.num_kv_heads, head_dim=shapes.head_dim,
        max_position_embeddings=2 * tokens,
    )
    with torch.device(device):  # random init on the device: fast for 8B-shaped layers
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=shapes.dtype).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)

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
        rows.append({"name": f"model all-retrieval ({duo_backend}) vs stock", "max_error": relative(step_logits(lambda: duohead.DuoCache.from_model(model)), stock)})
    duohead.disable(model)
    duohead.enable(model, duohead.HeadPattern(torch.rand(2, shapes.num_kv_heads), **sink_window), sparsity=0.5)
    with kernels.use_backend("torch"):
        expected = step_logits(lambda: duohead.DuoCache.from_model(model))
    with kernels.use_backend(duo_backend):
        rows.append({"name": f"model 50% streaming ({duo_backend}) vs torch", "max_error": relative(step_logits(lambda: duohead.DuoCache.from_model(model)), expected)})
    duohead.disable(model)
    for row in rows:
        row["tokens"] = tokens
    return rows


# ---- 2-4. timings ----


def copy_bandwidth(device: torch.device, clock: Clock, dry: bool) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    n = (16 << 20) if dry else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = clock(lambda: dst.copy_(src))
    return 2 * n / (ms / 1e3)


def streaming_state(num_heads: int, seen: int, shapes: Shapes, device) -> list[torch.Tensor]:
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
    return cache.tensors()


def graph_ms(step, clock: Clock) -> float | str:
    """Median time of a CUDA-graph replay of `step` (kernels only, no Python), or why it could not be captured."""
    try:
        step()  # plans and compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return clock(graph.replay)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]


def decode_bench(device, shapes: Shapes, clock: Clock, bandwidth: float, full_backend: str, duo_backend: str) -> list[dict]:
    """(a) One decode step of every layer's attention at each context and streaming fraction."""
    group, d, item = shapes.num_q_heads // shapes.num_kv_heads, shapes.head_dim, shapes.dtype.itemsize
    scale = d**-0.5
    rows = []
    for context in shapes.contexts:
        kv = [randn(2, 1, shapes.num_kv_heads, context, d, device=device, dtype=shapes.dtype) for _ in range(shapes.layers)]
        q = randn(1, shapes.num_q_heads, 1, d, device=device, dtype=shapes.dtype)

        def full_step():
            for buf in kv:
                kernels.retrieval_attention(q, buf[0], buf[1], None, scale)

        with kernels.use_backend(full_backend):
            full_ms = clock(full_step)
            full_graph = graph_ms(full_step, clock) if device.type == "cuda" else None
        full_bytes = shapes.layers * 2 * shapes.num_kv_heads * context * d * item
        for fraction in shapes.fractions:
            hs = round(fraction * shapes.num_kv_heads)
            hr = shapes.num_kv_heads - hs
            new_k, new_v = (randn(1, hs, 1, d, device=device, dtype=shapes.dtype) for _ in range(2))
            pos = torch.full((1, 1), context - 1, dtype=torch.long, device=device)
            states = [streaming_state(hs, context - 1, shapes, device) for _ in range(shapes.layers)] if hs else []

            def retrieval_part():
                for buf in kv:
                    kernels.retrieval_attention(q[:, : hr * group], buf[0][:, :hr], buf[1][:, :hr], None, scale)

            def streaming_part():
                for state in states:
                    kernels.streaming_attention(q[:, hr * group :], new_k, new_v, pos, *state, shapes.sink, shapes.window, scale)

            def duo_step():
                if hr:
                    retrieval_part()
                if hs:
                    streaming_part()

            with kernels.use_backend(duo_backend):
                duo_ms = clock(duo_step)
                parts = {"retrieval_ms": clock(retrieval_part) if hr else 0.0, "streaming_ms": clock(streaming_part) if hs else 0.0}
                duo_graph = graph_ms(duo_step, clock) if device.type == "cuda" else None
            duo_bytes = shapes.layers * 2 * (hr * context + hs * (shapes.sink + shapes.window)) * d * item
            rows.append({
                "context": context, "streaming_fraction": fraction, "retrieval_kv_heads": hr, "streaming_kv_heads": hs,
                "full_ms": full_ms, "duo_ms": duo_ms, "speedup": full_ms / duo_ms, **parts,
                "full_graph_ms": full_graph, "duo_graph_ms": duo_graph,
                "full_bytes": full_bytes, "duo_bytes": duo_bytes,
                "full_GBps": full_bytes / full_ms / 1e6, "duo_GBps": duo_bytes / duo_ms / 1e6,
                "duo_floor_ms": duo_bytes / bandwidth * 1e3, "full_floor_ms": full_bytes / bandwidth * 1e3,
                "duo_of_copy_bw": duo_bytes / (duo_ms / 1e3) / bandwidth,
            })
            print(f"[decode] {rows[-1]}", flush=True)
        del kv
    return rows


def prefill_bench(device, shapes: Shapes, clock: Clock, full_backend: str, duo_backend: str, dry: bool) -> list[dict]:
    """(b) One layer's prefill attention over T new tokens, duohead vs full."""
    group, d = shapes.num_q_heads // shapes.num_kv_heads, shapes.head_dim
    scale = d**-0.5
    rows = []
    for context in shapes.contexts:
        few = Clock(device, 1, 3) if context > 65536 and not dry else clock
        q = randn(1, shapes.num_q_heads, context, d, device=device, dtype=shapes.dtype)
        buf = randn(2, 1, shapes.num_kv_heads, context, d, device=device, dtype=shapes.dtype)
        with kernels.use_backend(full_backend):
            full_ms = few(lambda: kernels.retrieval_attention(q, buf[0], buf[1], None, scale))
        pos = torch.arange(context, device=device)[None]
        for fraction in shapes.fractions:
            hs = round(fraction * shapes.num_kv_heads)
            hr = shapes.num_kv_heads - hs
            state = streaming_state(hs, 0, shapes, device) if hs else None

            def duo():
                if hr:
                    kernels.retrieval_attention(q[:, : hr * group], buf[0][:, :hr], buf[1][:, :hr], None, scale)
                if hs:
                    kernels.streaming_attention(q[:, hr * group :], buf[0][:, hr:], buf[1][:, hr:], pos, *state, shapes.sink, shapes.window, scale)

            with kernels.use_backend(duo_backend):
                duo_ms = few(duo)
            rows.append({"context": context, "streaming_fraction": fraction, "full_ms": full_ms, "duo_ms": duo_ms, "speedup": full_ms / duo_ms})
            print(f"[prefill] {rows[-1]}", flush=True)
        del q, buf
    return rows


# ---- report ----


def table(report: dict) -> str:
    lines = [f"duohead gpu_check  {report['device']}  {report['date']}  (full = {report['full_backend']}, duohead = {report['duo_backend']})"]
    lines.append(f"copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s")
    failed = [c["name"] + (f" ({c['error']})" if "error" in c else f" err={c.get('max_error')}") for c in report["checks"] if c.get("ok") is False]
    skipped = [f"{c['name']}: {c['skipped']}" for c in report["checks"] if c.get("ok") is None]
    passed = sum(1 for c in report["checks"] if c.get("ok"))
    lines.append(f"correctness: {passed} passed, {len(failed)} failed" + (": " + "; ".join(failed) if failed else "") + ("; skipped " + "; ".join(skipped) if skipped else ""))
    lines.append("decode step, all layers' attention (ms; graph = CUDA-graph replay)")
    lines.append(f"{'context':>8} {'stream':>6} {'full':>8} {'duo':>8} {'speedup':>7} {'full_g':>8} {'duo_g':>8} {'speedup_g':>9} {'duo GB/s':>9} {'of copy':>7} {'floor':>7}")
    for r in report["decode"]:
        fg, dg = r["full_graph_ms"], r["duo_graph_ms"]
        graphs = isinstance(fg, float) and isinstance(dg, float)
        g = f"{fg:8.3f} {dg:8.3f} {fg / dg:9.2f}" if graphs else f"{'-':>8} {'-':>8} {'-':>9}"
        lines.append(
            f"{r['context']:>8} {r['streaming_fraction']:>6.2f} {r['full_ms']:8.3f} {r['duo_ms']:8.3f} {r['speedup']:7.2f} {g} "
            f"{r['duo_GBps']:9.0f} {r['duo_of_copy_bw']:7.0%} {r['duo_floor_ms']:7.3f}"
        )
    lines.append("prefill, one layer's attention (ms)")
    lines.append(f"{'context':>8} {'stream':>6} {'full':>9} {'duo':>9} {'speedup':>7}")
    for r in report["prefill"]:
        lines.append(f"{r['context']:>8} {r['streaming_fraction']:>6.2f} {r['full_ms']:9.2f} {r['duo_ms']:9.2f} {r['speedup']:7.2f}")
    lines += [f"ERROR {e}" for e in report.get("errors", [])]
    lines.append(f"total {report.get('seconds', '?')} s; full results in gpu_check.json")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, torch reference")
    parser.add_argument("--contexts", type=lambda s: tuple(int(x) for x in s.split(",")), help="override, e.g. 32768,131072")
    parser.add_argument("--prefill-backend", default="fa2", choices=["fa2", "auto"],
                        help="FlashInfer prefill backend: fa2 (one JIT module shared with decode) or auto (FA3 on Hopper)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run for the CPU rehearsal")
    shapes = TINY if args.dry_run else LLAMA3_8B
    if args.contexts:
        shapes = Shapes(**{**asdict(shapes), "contexts": args.contexts})
    flashinfer_retrieval.PREFILL_BACKEND = args.prefill_backend
    has_flashinfer = device.type == "cuda" and flashinfer_retrieval.available()
    full_backend = "flashinfer" if has_flashinfer else ("triton" if device.type == "cuda" else "torch")
    duo_backend = "flashinfer" if has_flashinfer else "triton"
    clock = Clock(device, warmup=0 if args.dry_run else 5, iters=1 if args.dry_run else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"

    import triton

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "flashinfer": _version("flashinfer") if has_flashinfer else None},
        "shapes": {**asdict(shapes), "dtype": str(shapes.dtype)},
        "full_backend": full_backend, "duo_backend": duo_backend, "prefill_backend": args.prefill_backend,
        "checks": [], "copy_bandwidth_GBps": 0.0, "decode": [], "prefill": [],
    }

    def save():
        path.write_text(json.dumps(report, indent=1, default=str))

    t0 = time.perf_counter()
    report["checks"] = correctness(device, shapes, duo_backend, args.dry_run)
    save()
    bandwidth = copy_bandwidth(device, clock, args.dry_run)
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    for section, bench in (
        ("decode", lambda: decode_bench(device, shapes, clock, bandwidth, full_backend, duo_backend)),
        ("prefill", lambda: prefill_bench(device, shapes, clock, full_backend, duo_backend, args.dry_run)),
    ):
        try:
            report[section] = bench()
        except Exception as e:  # keep what the other sections measured; the table says what failed
            traceback.print_exc()
            report.setdefault("errors", []).append(f"{section}: {type(e).__name__}: {e}"[:500])
        save()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(table(report), flush=True)
    return report


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "?")


if __name__ == "__main__":
    main()
