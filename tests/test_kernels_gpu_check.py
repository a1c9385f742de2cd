"""The one-call GPU check's CPU rehearsal: its logic runs end to end at tiny shapes and reports what it should."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from duohead import kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.skipif(kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem()))
def test_gpu_check_dry_run(tmp_path):
    """`bash benchmarks/gpu_check.sh --dry-run` (what the device call runs, on the CPU): every row the GPU run
    will report is there, with the keys the table reads."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["ok"] for c in report["checks"] if c.get("ok") is not None), report["checks"]
    assert {
        "triton streaming",
        "triton streaming append",
        "sdpa retrieval decode",
        "sdpa retrieval chunked prefill",
        "auto dispatch retrieval decode",
        "model all-retrieval (triton) vs stock",
        "model 50% streaming (triton) vs torch",
    } <= set(checks)
    assert checks["triton streaming"]["cache_mismatches"] == 0  # attend-then-store left the same cache as the reference
    assert checks["flashinfer retrieval"]["skipped"] == "no CUDA device" == report["flashinfer"]
    assert "nvcc" in report
    grid = {(r["context"], r["streaming_fraction"]) for r in report["decode"]}
    assert grid == {(c, f) for c in report["shapes"]["contexts"] for f in report["shapes"]["fractions"]}
    assert len(report["prefill"]) == len(grid) and "errors" not in report
    for row in report["decode"]:
        assert row["duo_bytes"] <= row["full_bytes"] and row["duo_ms"] > 0
        assert row["full_of_copy_bw"] > 0 and row["duo_graph_of_copy_bw"] is None  # graph replay: CUDA only
    stock, duo = report["model_decode"]
    assert stock["model"].startswith("stock transformers") and duo["model"].startswith("duohead 50% streaming")
    assert stock["context"] == duo["context"] == max(report["shapes"]["contexts"]) and duo["eager_ms"] > 0
    assert duo["bytes"] < stock["bytes"] and "speedup_eager" in duo
    out = proc.stdout.rstrip().splitlines()
    assert any(line.startswith("whole-model decode step") for line in out) and out[-1].startswith("total")  # the table comes last


def test_errors_are_cut_to_one_short_line(gpu_check):
    text = gpu_check.short(RuntimeError("ninja: build stopped\n" + "x" * 5000), limit=80)
    assert "\n" not in text and len(text) == 80 and text.startswith("RuntimeError: ninja: build stopped x")


def test_a_failing_flashinfer_warm_up_is_reported_once_and_short(gpu_check, monkeypatch):
    """The warm-up returns FlashInfer's error (cut short) instead of raising; main() then runs without FlashInfer."""
    calls = []

    def failing(*args):
        calls.append(args)
        raise RuntimeError("Ninja build failed: nvcc not found\n" + "log line\n" * 500)

    monkeypatch.setattr(gpu_check.flashinfer_retrieval, "retrieval_attention", failing)
    monkeypatch.setattr(gpu_check.torch.cuda, "synchronize", lambda device=None: None)
    failure = gpu_check.warm_up_flashinfer(gpu_check.torch.device("cpu"), gpu_check.TINY)
    assert failure.startswith("RuntimeError: Ninja build failed: nvcc not found") and len(failure) <= 300
    assert len(calls) == 1  # stopped at the first failure
