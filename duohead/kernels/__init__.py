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

Choose with the environment variable DUOHEAD_BACKEND, or in code:

    duohead.kernels.set_backend("triton")      # None returns to the environment / "auto"
    with duohead.kernels.use_backend("torch"):
        model.generate(...)

A forced backend raises RuntimeError when called on a device where it cannot run at all ("flashinfer" on the
CPU; "triton" on the CPU without TRITON_INTERPRET=1). Where it runs, inputs its kernel cannot take go to the
reference instead: FlashInfer takes no padding, no fp32, head dims 64/128/256 only and strides that form pages
(SDPA runs the others); Triton takes no fp32 on CUDA (its fp32 tiles spill registers: the reference runs those
streaming heads, with one warning). A FlashInfer error under "auto" (e.g. its JIT cannot compile) is logged once
and SDPA serves retrieval heads from then on; forced "flashinfer" raises it. Under torch.compile the Triton
kernels run as the ops duohead::streaming_attention / streaming_append / streaming_decode (`triton_streaming`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from duohead.kernels import reference
from duohead.kernels.reference import lambda_visible
from duohead.kernels.streaming_view import StreamingView

BACKENDS = ("auto", "torch", "triton", "flashinfer")
ENV_VAR = "DUOHEAD_BACKEND"

logger = logging.getLogger("duohead")
_chosen: str | None = None
_flashinfer_failure: str | None = None  # why FlashInfer failed under "auto"; it is not tried again


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown duohead backend {name!r}; choose one of {', '.join(BACKENDS)}")
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


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that run on `device` ("auto" and "torch" always do)."""
    device = torch.device(device)
    names = ["auto", "torch"]
    if _triton_runs_on(device):
        names.append("triton")
    if device.type == "cuda" and _has("flashinfer") and _has("triton"):
        names.append("flashinfer")
    return names


def _require(backend: str, device: torch.device) -> None:
    if backend not in available_backends(device):
        if backend == "triton":
            interpreting = device.type == "cpu" and _has("triton") and os.environ.get("TRITON_INTERPRET") == "1"
            hint = (interpreting and interpreter_problem()) or (
                "install triton, and on CPU set TRITON_INTERPRET=1 before triton is imported"
            )
        else:
            hint = "it needs a CUDA device, the flashinfer-python package and triton"
        raise RuntimeError(f"duohead backend {backend!r} is not available for tensors on {device}: {hint}")


CPU_SPLIT_MARGIN = 1536  # tokens; see `split_margin`


def split_margin(device: torch.device) -> int:
    """Tokens past S + W for which a dynamic layer keeps all heads' KV in one buffer and attends in one call
    (`reference.mixed_attention`: the Λ rule as a per-head mask), before it splits into retrieval KV and sink + ring.

    Where streaming heads run the torch reference on the CPU, a split decode step costs a second attention call and
    a dozen small ops per layer, which pay only once the streaming heads skip about 1.5K tokens
    (`benchmarks/bench_ratio.py`, SmolLM2, decode speed vs full attention: split at S + W, 0.85x at 512 tokens and
    0.94x at 1K; split at S + W + 1,024, 0.97x at 1,344 tokens, 1.00x at 1,536, 1.05x at 2K). Unsplit, a decode step
    is full attention's (1.03-1.07x) and a prefill runs the streaming heads in bands either way. Elsewhere (Triton,
    FlashInfer) 0: split at S + W.
    """
    streaming_on_reference = get_backend() == "torch" or (get_backend() == "auto" and device.type != "cuda")
    return CPU_SPLIT_MARGIN if device.type == "cpu" and streaming_on_reference else 0


def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_is_real: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Causal attention of the Q newest tokens over all T cached tokens (retrieval heads).

    q [B, Hq, Q, D]; k, v [B, Hkv, T, D]; key_is_real [B, T] bool or None. -> [B, Hq, Q, D].
    See `duohead.kernels.reference.retrieval_attention`.
    """
    global _flashinfer_failure
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return reference.retrieval_attention(q, k, v, key_is_real, scaling)
    _require(backend, q.device)
    if not q.is_cuda:  # "triton" on the CPU interpreter: no retrieval kernel there
        return reference.retrieval_attention(q, k, v, key_is_real, scaling)
    from duohead.kernels import flashinfer_retrieval

    use_flashinfer = backend == "flashinfer" or (
        backend == "auto" and _flashinfer_failure is None and flashinfer_retrieval.available()
    )
    if use_flashinfer and flashinfer_retrieval.supports(q, k, v, key_is_real):
        if backend == "flashinfer":
            return flashinfer_retrieval.retrieval_attention(q, k, v, key_is_real, scaling)
        try:
            return flashinfer_retrieval.retrieval_attention(q, k, v, key_is_real, scaling)
        except flashinfer_retrieval.PlanInCaptureError:
            raise  # the caller's capture is wrong, not FlashInfer: keep it
        except Exception as e:  # e.g. its kernels fail to compile (no nvcc): "auto" falls back to SDPA for good
            _flashinfer_failure = f"{type(e).__name__}: {e}"
            logger.warning("duohead: FlashInfer failed (%s); retrieval heads use SDPA from now on", _flashinfer_failure)
    return reference.retrieval_attention(q, k, v, key_is_real, scaling)  # SDPA (flash / memory-efficient on CUDA)


_FP32_ON_CUDA = (
    "fp32 streaming heads on CUDA run the torch reference: the Triton kernel's fp32 tiles spill registers "
    "(ptxas for sm_90a: 7 KB of stack at Q = 1, 12 KB at Q = 512; benchmarks/kernel_registers.py); use bf16/fp16 for Triton"
)


def _streaming_module(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Where streaming heads run: `triton_streaming` (CUDA with triton under "auto"; forced "triton"/"flashinfer"),
    else `reference`. fp32 on CUDA always runs the reference (`_FP32_ON_CUDA`), logged once."""
    backend = get_backend()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _has("triton") else "torch"
    if backend == "torch":
        return reference
    _require(backend, device)
    if device.type == "cuda" and dtype == torch.float32:
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
    return _streaming_module(q.device, q.dtype).streaming_attention(q, k, v, q_pos, cache, scaling, out=out)


def streaming_append(keys: Tensor, values: Tensor, pos: Tensor, cache: StreamingView) -> None:
    """Store new tokens keys, values [B, Hkv, Q, D] at real positions pos [B, Q] in the streaming cache, in place.
    Triton where the streaming attention uses it (one launch, no host sync), else the torch reference.
    See `duohead.kernels.reference.streaming_append`."""
    _streaming_module(keys.device, keys.dtype).streaming_append(keys, values, pos, cache)


def streaming_attention_and_append(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, cache: StreamingView, scaling: float, out: Tensor | None = None
) -> Tensor:
    """Attend, then store: `streaming_attention` of the new tokens, then `streaming_append` of their keys/values.

    Shapes as in `streaming_attention`. -> out, or a new [B, Hq, Q, D] tensor. With Triton, a decode step (Q = 1)
    is one fused launch (split over keys, plus a combine, when B * Hkv programs leave the GPU idle); the
    reference (and Triton for Q > 1) runs the two calls.
    """
    module = _streaming_module(q.device, q.dtype)
    if module is reference:
        out = reference.streaming_attention(q, k, v, q_pos, cache, scaling, out=out)
        reference.streaming_append(k, v, q_pos, cache)
        return out
    return module.streaming_attention_and_append(q, k, v, q_pos, cache, scaling, out=out)


__all__ = [
    "BACKENDS",
    "StreamingView",
    "available_backends",
    "get_backend",
    "lambda_visible",
    "retrieval_attention",
    "set_backend",
    "split_margin",
    "streaming_append",
    "streaming_attention",
    "streaming_attention_and_append",
    "use_backend",
]
