"""The backend registry: each backend declares what it runs and supports, dispatch reads those declarations, and the
process-wide state that changes dispatch is reported."""

from __future__ import annotations

import pytest
import torch

from duohead import kernels
from duohead.kernels.backends import DEFAULT_CPU_SPLIT_MARGIN, REGISTRY, STICKY, Backend


@pytest.mark.default_split_margin  # the declared defaults, not the tiny-scale options of tests/conftest.py
def test_every_backend_declares_its_kernels_and_capabilities():
    assert set(kernels.backend_names()) == {"auto", "torch", "triton", "flashinfer"}
    assert REGISTRY["torch"].margin("cpu") == DEFAULT_CPU_SPLIT_MARGIN and REGISTRY["torch"].margin("cuda") == 0
    assert REGISTRY["flashinfer"].retrieval == "flashinfer" and REGISTRY["flashinfer"].devices == ("cuda",)
    assert REGISTRY["flashinfer"].retrieval_head_dims == (64, 128, 256)
    assert all(REGISTRY[name].streaming == "triton" for name in ("triton", "flashinfer"))
    assert "torch" in kernels.available_backends("cpu") and "flashinfer" not in kernels.available_backends("cpu")
    assert all(REGISTRY[name].streaming_score_changes == ("softcap", "sinks") for name in ("torch", "triton", "flashinfer"))
    assert REGISTRY["torch"].retrieval_score_changes == REGISTRY["triton"].retrieval_score_changes == ("softcap", "sinks")
    assert REGISTRY["flashinfer"].retrieval_score_changes == ()  # FlashInfer's retrieval heads: the torch kernel


def test_a_call_needing_a_score_change_its_backend_lacks_runs_the_torch_kernel(monkeypatch):
    """A soft cap or learned sinks go to the torch kernel when the backend's kernel does not declare them."""
    monkeypatch.setattr(kernels, "_triton_runs_on", lambda device: True)  # as under TRITON_INTERPRET=1
    with kernels.use_backend("triton"):
        with kernels.backend_options("triton", streaming_score_changes=("softcap",)):
            assert kernels._streaming_module(torch.device("cpu"), torch.float32, None, None).__name__.endswith("triton_streaming")
            assert kernels._streaming_module(torch.device("cpu"), torch.float32, 2.0, None).__name__.endswith("triton_streaming")
            assert kernels._streaming_module(torch.device("cpu"), torch.float32, None, torch.zeros(2)) is kernels.reference


def test_a_registered_backend_is_chosen_by_name_and_its_margin_used(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    mine = Backend("cpu-eager", retrieval="sdpa", streaming="torch", devices=("cpu",), split_margin={"cpu": 7})
    try:
        kernels.register_backend(mine)
        assert "cpu-eager" in kernels.backend_names() and "cpu-eager" in kernels.available_backends("cpu")
        with kernels.use_backend("cpu-eager"):
            assert kernels.resolve(torch.device("cpu")) == (mine, True)
            assert kernels.split_margin(torch.device("cpu")) == 7
            q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
            assert torch.allclose(
                kernels.retrieval_attention(q, k, k, None, 0.3), kernels.reference.retrieval_attention(q, k, k, None, 0.3)
            )
        with kernels.use_backend("cpu-eager"), pytest.raises(RuntimeError, match="'cpu-eager' is not available.*runs on cpu"):
            kernels.resolve(torch.device("cuda"))
    finally:
        del REGISTRY["cpu-eager"]
    with pytest.raises(ValueError, match="unknown duohead backend 'cpu-eager'"):
        kernels.set_backend("cpu-eager")


def test_backend_options_change_a_backend_for_a_block_only():
    before = REGISTRY["torch"]
    with kernels.backend_options("torch", split_margin={"cpu": 3}, lambda_band=16) as changed:
        assert REGISTRY["torch"] is changed and changed.lambda_band == 16
        assert kernels.split_margin(torch.device("cpu")) == 3
    assert REGISTRY["torch"] is before


def test_sticky_failures_are_reported_and_can_be_reset():
    assert kernels.backend_report() == {"flashinfer_failure": None}
    STICKY.flashinfer_failure = "RuntimeError: no nvcc"
    try:
        assert kernels.backend_report() == {"flashinfer_failure": "RuntimeError: no nvcc"}
        with kernels.use_backend("auto"):  # "auto" on CUDA skips a backend that failed in this process
            assert kernels.resolve(torch.device("cuda"))[0].name != "flashinfer"
    finally:
        kernels.reset_sticky_state()
    assert kernels.backend_report() == {"flashinfer_failure": None}
