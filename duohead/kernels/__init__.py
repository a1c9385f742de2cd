"""Attention kernels for retrieval and streaming heads, chosen by backend, device and availability.

`retrieval_attention`, `streaming_attention` and `streaming_append` have the signatures of their twins in
`duohead.kernels.reference`, the oracle and the CPU path; `streaming_attention_and_append` is "attend, then store"
(the attention's call for streaming heads: with Triton one fused launch per decode step). The streaming cache goes
to every backend as one `StreamingView` (`duohead.cache.StreamingKV.view()` hands one out). Backends:

    torch       the reference everywhere (SDPA for retrieval heads, blocked torch for streaming heads)
    triton      streaming heads (attention and cache writes): Triton (CUDA, or the CPU interpreter when TRITON_INTERPRET=1);
                retrieval heads: SDPA
    flashinfer  retrieval heads: FlashInfer (CUDA only); streaming heads: Triton
    auto        (default) on CUDA: FlashInfer if installed, else SDPA, and Triton if installed; elsewhere torch

Each backend is a `Backend` record in one registry (`duohead.kernels.backends`): its retrieval and streaming
kernels, devices, dtypes, head dims, CUDA-graph and torch.compile support, and its split margin. Dispatch reads
those records; `register_backend` adds one, `backend_options(name, ...)` changes one for a `with` block.
Choose with the environment variable DUOHEAD_BACKEND, or in code:

    duohead.kernels.set_backend("triton")      # None returns to the environment / "auto"
    with duohead.kernels.use_backend("torch"):
        model.generate(...)

A forced backend raises RuntimeError when called on a device where it cannot run at all ("flashinfer" on the
CPU; "triton" on the CPU without TRITON_INTERPRET=1). Where it runs, inputs its kernel cannot take go to the
reference instead: FlashInfer takes no padding, no fp32, head dims 64/128/256 only and strides that form pages
(SDPA runs the others); Triton takes no fp32 on CUDA (its fp32 tiles spill registers: the reference runs those
streaming heads, with one warning). A FlashInfer error under "auto" (e.g. its JIT cannot compile) is logged once
and SDPA serves retrieval heads from then on (`backend_report()` says why; `reset_sticky_state()` forgets it);
forced "flashinfer" raises it. Under torch.compile the Triton
kernels run as the ops duohead::streaming_attention / streaming_append / streaming_decode (`triton_streaming`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from duohead.kernels import reference
from duohead.kernels.backends import REGISTRY, STICKY, Backend, backend_report, register_backend, reset_sticky_state
from duohead.kernels.oracle import lambda_visible
from duohead.kernels.streaming_view import StreamingView

ENV_VAR = "DUOHEAD_BACKEND"

if TYPE_CHECKING:
    from duohead.kernels.flashinfer_retrieval import FlashInferPlans

logger = logging.getLogger("duohead")
_chosen: str | None = None


def backend_names() -> tuple[str, ...]:
    """ "auto" and every registered backend's name."""
    return ("auto", *REGISTRY)


def _check_name(name: str, where: str) -> str:
    if name not in backend_names():
        raise ValueError(f"{where}: unknown duohead backend {name!r}; choose one of {', '.join(backend_names())}")
    return name


def get_backend() -> str:
    """The backend in force: the one set in code, else $DUOHEAD_BACKEND, else "auto"."""
    if _chosen is not None:
        return _chosen
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (None: back to $DUOHEAD_BACKEND / "auto")."""
    global _chosen
    _chosen = None if name is None else _check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a `with` block; the previous choice is restored on exit."""
    global _chosen
    previous = _chosen
    set_backend(name)
    try:
        yield
    finally:
        _chosen = previous


@contextlib.contextmanager
def backend_options(name: str, **changes) -> Iterator[Backend]:
    """Run a `with` block with the registered backend `name` declaring other options, e.g.
    `backend_options("torch", split_margin={"cpu": 0})` (split every dynamic layer at S + W, as on the GPU) or
    `lambda_band=8`; the registered backend is restored on exit. Yields the changed backend."""
    previous = REGISTRY[_check_name(name, "backend_options")]
    changed = register_backend(dataclasses.replace(previous, **changes))
    try:
        yield changed
    finally:
        register_backend(previous)


@functools.cache
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _major_minor(package: str) -> tuple[int, int]:
    major, minor = importlib.metadata.version(package).split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run duohead's kernel in this environment, or None.

    Triton <= 3.6's interpreter turns a data-dependent loop bound into a Python int with int() of a
    one-element array, which NumPy >= 2.4 refuses (TypeError); compiled kernels on CUDA are unaffected.
    """
    if _major_minor("triton") <= (3, 6) and _major_minor("numpy") >= (2, 4):
        return (
            f"the Triton {importlib.metadata.version('triton')} interpreter cannot run duohead's kernel with "
            f"NumPy {importlib.metadata.version('numpy')}: install triton>=3.7 or numpy<2.4"
        )
    return None


@torch.compiler.assume_constant_result  # torch.compile: decided once at trace time, never traced into
def _triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or on the CPU in interpreter mode (TRITON_INTERPRET=1 before triton is imported)."""
    if not _has("triton"):
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and interpreter_problem() is None


@torch.compiler.assume_constant_result  # torch.compile: decided once at trace time, never traced into
def runs_on(backend: Backend, device: torch.device | str) -> bool:
    """Whether `backend` can run on `device`: a device type it declares, its modules installed, and Triton runnable
    there when it uses Triton."""
    device = torch.device(device)
    if device.type not in backend.devices or not all(_has(module) for module in backend.needs):
        return False
    return backend.streaming != "triton" or _triton_runs_on(device)


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that run on `device` ("auto" and "torch" always do)."""
    return ["auto", *(name for name, backend in REGISTRY.items() if runs_on(backend, device))]


def _require(backend: Backend, device: torch.device) -> None:
    if not runs_on(backend, device):
        if backend.streaming == "triton" and device.type == "cpu" and device.type in backend.devices:
            interpreting = _has("triton") and os.environ.get("TRITON_INTERPRET") == "1"
            hint = (interpreting and interpreter_problem()) or (
                "install triton, and on CPU set TRITON_INTERPRET=1 before triton is imported"
            )
        else:
            where = " or ".join("CUDA" if d == "cuda" else d for d in backend.devices)
            hint = f"it runs on {where} and needs {', '.join(backend.needs) or 'torch only'}"
        raise RuntimeError(f"duohead backend {backend.name!r} is not available for tensors on {device}: {hint}")


def _auto(device: torch.device) -> Backend:
    """What "auto" runs on `device`: on CUDA FlashInfer (unless it failed in this process), else Triton, where they
    run; elsewhere the torch backend."""
    if device.type == "cuda":
        for name in ("flashinfer", "triton"):
            backend = REGISTRY.get(name)
            if backend and runs_on(backend, device) and not (name == "flashinfer" and STICKY.flashinfer_failure):
                return backend
    return REGISTRY["torch"]


def resolve(device: torch.device) -> tuple[Backend, bool]:
    """(the backend that runs tensors on `device`, whether it was forced). A forced backend that cannot run there
    raises RuntimeError."""
    name = get_backend()
    if name == "auto":
        return _auto(device), False
    backend = REGISTRY[name]
    _require(backend, device)
    return backend, True


def split_margin(device: torch.device) -> int:
    """Tokens past S + W for which a dynamic layer keeps all heads' KV in one buffer and attends in one call
    (`reference.mixed_attention`: the Λ rule as a per-head mask), before it splits into retrieval KV and sink + ring:
    the margin the backend in force declares for this device (`Backend.split_margin`; the torch backend's on the CPU,
    `backends.DEFAULT_CPU_SPLIT_MARGIN`: where a split decode step's second call and small ops cost more than the
    skipped tokens save, measured in benchmarks/RESULTS.md; 0 elsewhere: split at S + W).
    `DuoCache.from_model(model, split_margin=)` sets it per cache."""
    backend = _auto(device) if get_backend() == "auto" else REGISTRY[get_backend()]
    return backend.margin(device.type)


def _serves(declared: tuple[str, ...], softcap: float | None, sinks: Tensor | None) -> bool:
    """Whether a kernel that `declared` these score changes applies every one the call needs (else the torch kernel runs)."""
    return (softcap is None or "softcap" in declared) and (sinks is None or "sinks" in declared)


def retrieval_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_is_real: Tensor | None,
    scaling: float,
    plans: FlashInferPlans | None = None,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention of the Q newest tokens over all T cached tokens (retrieval heads).

    q [B, Hq, Q, D]; k, v [B, Hkv, T, D]; key_is_real [B, T] bool or None. -> [B, Hq, Q, D]. plans: the owner of
    FlashInfer's plans (a `DuoCache`'s; None: the module's default owner). softcap / sinks [Hq]: the scores' soft cap
    and learned sinks (`reference.masked_attention`). See `duohead.kernels.reference.retrieval_attention`.
    """
    backend, forced = resolve(q.device)
    if backend.retrieval == "flashinfer" and q.is_cuda and _serves(backend.retrieval_score_changes, softcap, sinks):
        from duohead.kernels import flashinfer_retrieval

        if flashinfer_retrieval.supports(q, k, v, key_is_real):
            if forced:
                return flashinfer_retrieval.retrieval_attention(q, k, v, key_is_real, scaling, plans)
            try:
                return flashinfer_retrieval.retrieval_attention(q, k, v, key_is_real, scaling, plans)
            except flashinfer_retrieval.PlanInCaptureError:
                raise  # the caller's capture is wrong, not FlashInfer: keep it
            except Exception as e:  # e.g. its kernels fail to compile (no nvcc): "auto" falls back to SDPA for good
                STICKY.flashinfer_failure = f"{type(e).__name__}: {e}"
                logger.warning(
                    "duohead: FlashInfer failed (%s); retrieval heads use SDPA from now on "
                    "(duohead.kernels.backend_report() says so; reset_sticky_state() tries again)",
                    STICKY.flashinfer_failure,
                )
    # SDPA (flash / memory-efficient on CUDA); an explicit softmax with softcap or sinks
    return reference.retrieval_attention(q, k, v, key_is_real, scaling, softcap=softcap, sinks=sinks)


_FP32_ON_CUDA = (
    "fp32 streaming heads on CUDA run the torch reference: the Triton kernel's fp32 tiles spill registers "
    "(ptxas for sm_90a: 7 KB of stack at Q = 1, 12 KB at Q = 512; benchmarks/kernel_registers.py); use bf16/fp16 for Triton"
)


def _streaming_module(device: torch.device, dtype: torch.dtype, softcap: float | None, sinks: Tensor | None) -> ModuleType:
    """Where streaming heads run: `triton_streaming` where the backend's streaming kernel is Triton and takes this
    dtype and these score changes, else `reference`. fp32 on CUDA always runs the reference (`_FP32_ON_CUDA`), logged once."""
    backend, _ = resolve(device)
    if backend.streaming != "triton" or not _serves(backend.streaming_score_changes, softcap, sinks):
        return reference
    if device.type == "cuda" and backend.streaming_dtypes and str(dtype).removeprefix("torch.") not in backend.streaming_dtypes:
        _warn_once(_FP32_ON_CUDA)
        return reference
    from duohead.kernels import triton_streaming

    return triton_streaming


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning("duohead: %s", message)


def streaming_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, cache: StreamingView, scaling: float, out: Tensor | None = None
) -> Tensor:
    """Λ-masked attention of Q new tokens over the streaming cache plus themselves (streaming heads).

    q [B, Hq, Q, D]; k, v [B, Hkv, Q, D]; q_pos [B, Q]; cache: sink [B, Hkv, S, D] and ring [B, Hkv, R, D] with their
    positions, sink and window (read only); out [B, Hq, Q, D] (any strides, last dim contiguous) or None.
    -> out, or a new [B, Hq, Q, D] tensor. See `duohead.kernels.reference.streaming_attention`.
    """
    return _streaming_module(q.device, q.dtype, None, None).streaming_attention(q, k, v, q_pos, cache, scaling, out=out)


def streaming_append(keys: Tensor, values: Tensor, pos: Tensor, cache: StreamingView) -> None:
    """Store new tokens keys, values [B, Hkv, Q, D] at real positions pos [B, Q] in the streaming cache, in place.
    Triton where the streaming attention uses it (one launch, no host sync), else the torch reference.
    See `duohead.kernels.reference.streaming_append`."""
    _streaming_module(keys.device, keys.dtype, None, None).streaming_append(keys, values, pos, cache)


def streaming_attention_and_append(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    cache: StreamingView,
    scaling: float,
    out: Tensor | None = None,
    *,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attend, then store: `streaming_attention` of the new tokens, then `streaming_append` of their keys/values.

    Shapes as in `streaming_attention`; softcap / sinks [Hq] as in `retrieval_attention`. -> out, or a new
    [B, Hq, Q, D] tensor. With Triton, a decode step (Q = 1)
    is one fused launch (split over keys, plus a combine, when B * Hkv programs leave the GPU idle); the
    reference (and Triton for Q > 1) runs the two calls.
    """
    module = _streaming_module(q.device, q.dtype, softcap, sinks)
    changes = {} if softcap is None and sinks is None else {"softcap": softcap, "sinks": sinks}
    if module is reference:
        out = reference.streaming_attention(q, k, v, q_pos, cache, scaling, out=out, **changes)
        reference.streaming_append(k, v, q_pos, cache)
        return out
    return module.streaming_attention_and_append(q, k, v, q_pos, cache, scaling, out=out, **changes)


__all__ = [
    "Backend",
    "StreamingView",
    "available_backends",
    "backend_names",
    "backend_options",
    "backend_report",
    "get_backend",
    "lambda_visible",
    "register_backend",
    "reset_sticky_state",
    "resolve",
    "retrieval_attention",
    "set_backend",
    "split_margin",
    "streaming_append",
    "streaming_attention",
    "streaming_attention_and_append",
    "use_backend",
]
