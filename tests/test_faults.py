"""Hostile inputs and faults (issue 28): interrupts inside a calibration step, concurrent runs on one folder, files in
the way, unwritable outputs, unbounded reads, and a table of bad arguments for every CLI (one line, exit 2).

The calibration runs use a tiny random Llama with a word-level tokenizer (calibration_testbed); the signal tests run
`duohead calibrate` in a real subprocess and send it SIGINT or SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from calibration_testbed import word_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from duohead.calibrate import gates as gates_module
from duohead.calibrate import train as train_module
from duohead.calibrate.cli import main as calibrate_main
from duohead.calibrate.settings import CHECKPOINT, LOG
from duohead.calibrate.train import Calibrator
from duohead.files import LOCK_FILE, folder_lock
from duohead.pattern import HeadPattern

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--ctx-min", "120", "--ctx-max", "200", "--num-passkeys", "3", "--passkey-words", "4", "--sink", "4", "--window", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _args(model_dir: Path, out: Path, steps: int, every: int = 5) -> list[str]:
    return ["--model", str(model_dir), "--out", str(out), "--steps", str(steps), "--checkpoint-every", str(every), *RUN]


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory):
    """steps -> the folder of an uninterrupted run of that many steps (made once)."""
    runs: dict[int, Path] = {}

    def run(steps: int) -> Path:
        if steps not in runs:
            out = tmp_path_factory.mktemp(f"straight-{steps}")
            assert calibrate_main(_args(model_dir, out, steps)) == 0
            runs[steps] = out
        return runs[steps]

    return run


def _same_run(out: Path, reference: Path) -> None:
    """Bit for bit: the pattern's gates, every checkpoint tensor (gates, evidence, relaxed layout, AdamW moments)
    and the log's steps."""
    assert torch.equal(HeadPattern.load(out / "pattern.json").gates, HeadPattern.load(reference / "pattern.json").gates)
    mine, theirs = load_file(out / CHECKPOINT), load_file(reference / CHECKPOINT)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    steps = lambda folder: [json.loads(line)["step"] for line in (folder / LOG).read_text().splitlines()]
    assert steps(out) == steps(reference)
    assert not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------- item 1


def _interrupt_after(owner, name: str, monkeypatch, when) -> None:
    """Make `owner.name` raise KeyboardInterrupt right after it ran, the first time `when()` holds."""
    original = getattr(owner, name)
    fired = []

    def interrupted(*args, **kwargs):
        result = original(*args, **kwargs)
        if not fired and when():
            fired.append(True)
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupted)


POINTS = {  # where inside step 3 (0-based 2) the Ctrl-C lands
    "student pass (gates hold the relaxed layout)": (gates_module.GatedModel, "distill_backward"),
    "after the relaxed layout's AdamW step": (Calibrator, "_add_evidence"),
    "after the gates' signed step": (Calibrator, "_signed_step"),
    "after the step, before its log line": (Calibrator, "step"),
}


@pytest.mark.parametrize("point", [*POINTS, "inside a checkpoint write"])
def test_ctrl_c_anywhere_in_a_step_resumes_to_the_uninterrupted_result(point, model_dir, straight, tmp_path, monkeypatch):
    calls = []
    if point in POINTS:
        owner, name = POINTS[point]
        calls_before = lambda: len(calls) == 3
        _interrupt_after(owner, name, monkeypatch, calls_before)
        count = getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(None)
            return count(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    else:  # the first periodic checkpoint (step 5) is cut half-way; the interrupt handler then saves
        _interrupt_after(train_module, "atomic_write", monkeypatch, lambda: True)
    out = tmp_path / "out"
    assert calibrate_main(_args(model_dir, out, 8)) == 130
    monkeypatch.undo()
    assert calibrate_main(["--out", str(out), "--resume"]) == 0
    _same_run(out, straight(8))


def test_sigint_in_a_real_process_inside_the_student_pass_resumes_bit_for_bit(model_dir, straight, tmp_path):
    out = tmp_path / "out"
    helper = [sys.executable, str(ROOT / "tests" / "sigint_calibrate.py"), "2", *_args(model_dir, out, 8)]
    done = subprocess.run(helper, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert f"interrupted: checkpoint at step 2 in {out / CHECKPOINT}" in done.stderr  # two steps done, the third cut
    assert calibrate_main(["--out", str(out), "--resume"]) == 0
    _same_run(out, straight(8))


def _wait_for_steps(out: Path, process: subprocess.Popen, steps: int) -> None:
    deadline = time.monotonic() + 300
    while not ((out / LOG).exists() and len((out / LOG).read_text().splitlines()) >= steps):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_signal_from_outside_at_any_moment_then_resume_matches_and_the_folder_is_locked_meanwhile(
    sig, model_dir, straight, tmp_path, capsys
):
    """A real `duohead calibrate` process: while it runs, a second run on its --out is refused naming its PID; then it
    gets SIGINT or SIGKILL wherever it is, and `--resume` ends at the uninterrupted run's result. SIGKILL leaves the
    lock file behind: the resumed run takes it over."""
    out, steps = tmp_path / "out", 200
    process = subprocess.Popen(
        [sys.executable, "-m", "duohead", "calibrate", *_args(model_dir, out, steps)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_steps(out, process, 7)
        capsys.readouterr()
        assert calibrate_main([*_args(model_dir, out, steps), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another duohead run (PID {process.pid}" in err and len(err.splitlines()) == 1
        process.send_signal(sig)
        process.wait(timeout=120)
    finally:
        process.kill()
    assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert (out / LOCK_FILE).exists() == (sig == signal.SIGKILL)
    assert calibrate_main(["--out", str(out), "--resume"]) == 0
    _same_run(out, straight(steps))


# ---------------------------------------------------------------------------------------------------- item 2


def test_a_held_folder_is_refused_before_anything_is_written(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with folder_lock(out):
        assert calibrate_main(_args(model_dir, out, 2)) == 2
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert f"PID {os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # no log, no checkpoint; the lock is gone with its holder
