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
def test_gpu_check_dry_run(gpu_check, tmp_path):
    """`bash benchmarks/gpu_check.sh --dry-run` (what the device call runs, on the CPU): the preflight table comes
    first and is saved; FlashInfer's warm-up subprocess crashes (SIGABRT, on purpose) and only FlashInfer's rows are
    lost; every other row the GPU run will report is there, with the keys the table reads."""
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
    assert report["flashinfer"].startswith("warm-up failed: the warm-up subprocess died of SIGABRT")
    assert checks["flashinfer rows"]["skipped"] == report["flashinfer"]
    preflight = {row["name"]: row for row in report["preflight"]["rows"]}
    prebuilt = gpu_check.NEEDED_MODULE in report["preflight"]["prebuilt_flashinfer"]  # where .whl/aot was built
    assert report["flashinfer_modules"] == ("prebuilt" if prebuilt else "JIT")
    assert {"python", "pip", "gcc", "g++", "Python.h", "nvcc", "ninja", "$HOME", "wheels", "gpu"} <= set(preflight)
    assert report["preflight"]["gates"]["triton"] is None
    assert proc.stdout.startswith("preflight\n")  # before anything else
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
    (million,) = report["million"]
    assert million["duo_ms"] > 0 and million["context"] == 1024  # 1M on a GPU; the plan is Llama-3.1-8B's at 1M
    assert million["plan"]["full_kv_bytes"] == 128 * 2**30 and million["plan"]["duo_kv_bytes"] < 65 * 2**30
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


@pytest.mark.skipif(kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem()))
def test_one_failure_loses_one_row(gpu_check, monkeypatch, tmp_path):
    """A failing copy-bandwidth probe, a retrieval call that fails at one context and a section that raises cost
    their own rows only; every row is on disk as soon as it is measured."""
    real = gpu_check.kernels.retrieval_attention
    on_disk = []

    def fails_at_160(q, k, v, *args):
        if k.shape[2] == 160:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(q, k, v, *args)

    def save_spy(path, text):
        on_disk.append(json.loads(text))
        path.write_text(text)

    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda *a: (_ for _ in ()).throw(RuntimeError("copy failed")))
    monkeypatch.setattr(gpu_check.kernels, "retrieval_attention", fails_at_160)
    monkeypatch.setattr(gpu_check, "correctness", lambda *a: a[-1]({"name": "stub", "ok": True}))
    monkeypatch.setattr(gpu_check, "model_decode_bench", lambda *a: (_ for _ in ()).throw(RuntimeError("model")))
    monkeypatch.setattr(gpu_check, "warm_up_in_subprocess", lambda dry: "stubbed")
    monkeypatch.setattr(gpu_check, "atomic_write_text", save_spy)
    monkeypatch.setattr(gpu_check, "TINY", gpu_check.Shapes(2, 4, 2, 16, 4, 16, (96, 160), (0.0, 0.5), gpu_check.torch.float32))
    monkeypatch.chdir(tmp_path)
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert report["copy_bandwidth_GBps"] is None and report["errors"][:2] == [
        "copy_bandwidth: RuntimeError: copy failed",
        "model_decode: RuntimeError: model",
    ]
    for section in ("decode", "prefill"):
        rows = {(r["context"], r["streaming_fraction"]): r for r in report[section]}
        assert set(rows) == {(96, 0.0), (96, 0.5), (160, 0.0), (160, 0.5)}
        assert all("error" not in rows[96, f] and rows[96, f]["duo_ms"] > 0 for f in (0.0, 0.5)), report[section]
        assert all("simulated" in rows[160, f]["error"] for f in (0.0, 0.5))
        assert rows[96, 0.0]["full_ms"] > 0
    assert report["million"][0]["duo_ms"] > 0  # the section after the failed one ran
    first_decode = next(i for i, r in enumerate(on_disk) if r["decode"])
    assert len(on_disk[first_decode]["decode"]) == 1  # written after its first row, not at the section's end
    assert "ERROR copy_bandwidth: RuntimeError: copy failed" in gpu_check.table(report)


def test_preflight_turns_rows_off_with_the_reason(monkeypatch, tmp_path):
    """No compiler and no FlashInfer on PATH / sys.path: Triton's and FlashInfer's rows are off, each with its reason;
    nothing raises."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_preflight
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(gpu_preflight.importlib.util, "find_spec", lambda name: None)
    result = gpu_preflight.collect(dry_run=False)
    rows = {row["name"]: row for row in result["rows"]}
    assert not rows["gcc"]["ok"] and not rows["nvcc"]["ok"] and not rows["ninja"]["ok"] and not rows["gpu"]["ok"]
    assert result["gates"]["triton"].startswith("no C compiler")
    assert result["gates"]["flashinfer"].startswith("flashinfer not installed")
    text = gpu_preflight.table(result)
    assert "NO  gcc" in text and "=> triton rows: off: no C compiler" in text


def test_the_warm_up_subprocess_reports_its_error_exit_and_timeout(gpu_check, monkeypatch):
    """What the parent says when the child exits 1 (FlashInfer's last error line) or runs past its time."""
    seen = []

    def exits_1(command, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(command, 1, "", "compiling...\nRuntimeError: Ninja build failed\n\n")

    monkeypatch.setattr(gpu_check.subprocess, "run", exits_1)
    assert gpu_check.warm_up_in_subprocess(dry=False) == "RuntimeError: Ninja build failed"
    assert "--warm-up-only" in seen[0] and "--dry-run" not in seen[0]
    assert seen[0][seen[0].index("--prefill-backend") + 1] == gpu_check.flashinfer_retrieval.PREFILL_BACKEND

    def too_slow(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(gpu_check.subprocess, "run", too_slow)
    assert (
        gpu_check.warm_up_in_subprocess(dry=False, timeout=7) == "the warm-up subprocess ran past 7 s (FlashInfer's JIT compile?)"
    )
