"""The attention backends duohead can run, each declaring what it supports, and the one registry that holds them.

A backend pairs a retrieval-head kernel with a streaming-head kernel. `duohead.kernels` dispatches by reading these
records (which kernels, on which devices, for which dtypes and head dims, how many tokens a dynamic cache stays
unsplit), not by comparing names; a new backend is one `register_backend` call plus its kernels. Process-wide
state a backend may acquire (FlashInfer failing under "auto") is held here and reported by `backend_report`.
A leaf module: it imports nothing of duohead and no torch at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CPU_SPLIT_MARGIN = 1536  # tokens; benchmarks/RESULTS.md, "Short prompts and compiled decoding"
SCORE_CHANGES = ("softcap", "sinks")  # every change to the scores a family's attention asks for


@dataclass(frozen=True)
class Backend:
    """One way to run duohead's attention, and what it can do.

    retrieval: the retrieval heads' kernel, "sdpa" (torch) or "flashinfer"; streaming: the streaming heads' kernel,
    "torch" (`duohead.kernels.reference`) or "triton". devices: device types it runs on ("cpu" for Triton means its
    interpreter, TRITON_INTERPRET=1). streaming_dtypes: dtypes its streaming kernel takes on CUDA (others run the torch
    kernel; None: any). retrieval_head_dims: head dims D its retrieval kernel takes (others run SDPA; None: any).
    cuda_graphs / torch_compile: whether a decode step can be captured / compiled with fullgraph=True.
    split_margin: tokens past S + W for which a dynamic layer keeps every head's KV in one buffer and attends in one
    call, per device type (absent: 0; `duohead.kernels.split_margin`); `DuoCache.from_model(split_margin=)` overrides
    it per cache. lambda_band: query rows per call of the torch kernel's banded Λ prefill
    (`reference.unpadded_lambda_attention`; a speed knob, 64-128 measured fastest on the CPU). retrieval_score_changes /
    streaming_score_changes: what its retrieval / streaming kernel can apply to the scores besides the scaling,
    "softcap" (c * tanh(s / c), Gemma 2) and "sinks" (a learned logit per query head, GPT-OSS); a call that needs one
    the kernel lacks runs the torch kernel. needs: Python modules it imports.
    """

    name: str
    retrieval: str
    streaming: str
    devices: tuple[str, ...]
    streaming_dtypes: tuple[str, ...] | None = None
    retrieval_head_dims: tuple[int, ...] | None = None
    cuda_graphs: bool = False
    torch_compile: bool = True
    split_margin: dict[str, int] = field(default_factory=dict)
    lambda_band: int = 128
    retrieval_score_changes: tuple[str, ...] = ()
    streaming_score_changes: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()

    def margin(self, device_type: str) -> int:
        return self.split_margin.get(device_type, 0)


REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name; returns it."""
    REGISTRY[backend.name] = backend
    return backend


register_backend(
    Backend(
        "torch",
        retrieval="sdpa",
        streaming="torch",
        devices=("cpu", "cuda", "mps", "xpu", "meta"),
        cuda_graphs=True,
        split_margin={"cpu": DEFAULT_CPU_SPLIT_MARGIN},
        retrieval_score_changes=SCORE_CHANGES,
        streaming_score_changes=SCORE_CHANGES,
    )
)
register_backend(
    Backend(
        "triton",
        retrieval="sdpa",
        streaming="triton",
        devices=("cuda", "cpu"),
        streaming_dtypes=("bfloat16", "float16"),
        cuda_graphs=True,
        retrieval_score_changes=SCORE_CHANGES,  # SDPA's retrieval heads: the torch kernel's explicit softmax
        streaming_score_changes=SCORE_CHANGES,
        needs=("triton",),
    )
)
register_backend(
    Backend(
        "flashinfer",
        retrieval="flashinfer",
        streaming="triton",
        devices=("cuda",),
        streaming_dtypes=("bfloat16", "float16"),
        retrieval_head_dims=(64, 128, 256),
        cuda_graphs=True,
        streaming_score_changes=SCORE_CHANGES,  # retrieval heads with a soft cap or sinks: the torch kernel
        needs=("flashinfer", "triton"),
    )
)


@dataclass
class _Sticky:
    """What this process has learned at run time: why FlashInfer failed under "auto" (it is not tried again)."""

    flashinfer_failure: str | None = None


STICKY = _Sticky()


def backend_report() -> dict[str, str | None]:
    """Process-wide state that changes dispatch: {"flashinfer_failure": why FlashInfer was turned off, or None}.
    `reset_sticky_state()` clears it (e.g. after installing a compiler)."""
    return {"flashinfer_failure": STICKY.flashinfer_failure}


def reset_sticky_state() -> None:
    """Forget run-time failures, so that "auto" tries FlashInfer again."""
    STICKY.flashinfer_failure = None
