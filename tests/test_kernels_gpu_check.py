"""The one-call GPU check's CPU rehearsal: its logic runs end to end at tiny shapes and reports what it should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from duohead import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.skipif(kernels.interpreter_problem() is not None, reason=str(kernels.interpreter_problem()))
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["ok"] for c in report["checks"] if c.get("ok") is not None), report["checks"]
    assert {"triton streaming", "triton streaming append", "sdpa retrieval decode", "sdpa retrieval chunked prefill", "auto dispatch retrieval decode",
            "model all-retrieval (triton) vs stock", "model 50% streaming (triton) vs torch"} <= set(checks)
    assert checks["flashinfer retrieval"]["skipped"] == "no CUDA device"
    grid = {(r["context"], r["streaming_fraction"]) for r in report["decode"]}
    assert grid == {(c, f) for c in report["shapes"]["contexts"] for f in report["shapes"]["fractions"]}
    assert len(report["prefill"]) == len(grid) and "errors" not in report
    for row in report["decode"]:
        assert row["duo_bytes"] <= row["full_bytes"] and row["duo_ms"] > 0
    assert proc.stdout.rstrip().splitlines()[-1].startswith("total")  # the table comes last
