"""Hostile inputs and faults (issue 28): interrupts inside a calibration step, concurrent runs on one folder, files in
the way, unwritable outputs, unbounded reads, and a table of bad arguments for every CLI (one line, exit 2).

The calibration runs use a tiny random Llama with a word-level tokenizer (calibration_testbed); the signal tests run
`duohead calibrate` in a real subprocess and send it SIGINT or SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from calibration_testbed import word_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from duohead.calibrate import gates as gates_module
from duohead.calibrate import train as train_module
from duohead.calibrate.rules import RULE_CLASSES, EvidenceRule, RelaxedRule
from duohead.calibrate.settings import CHECKPOINT, LOG
from duohead.calibrate.train import Calibrator
from duohead.commands.calibrate import main as calibrate_main
from duohead.commands.main import main as cli_main
from duohead.files import LOCK_FILE, folder_lock
from duohead.pattern import HeadPattern

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--ctx-min", "120", "--ctx-max", "200", "--num-passkeys", "3", "--passkey-words", "4", "--sink", "4", "--window", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _sigint_as_a_terminal_gives_it() -> None:
    """A child process gets SIGINT's default disposition, so Python turns it into KeyboardInterrupt as for a user's
    Ctrl-C (a job started in the background by a non-interactive shell inherits SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    """(steps, rule) -> the folder of an uninterrupted run (made once)."""
    runs: dict[tuple[int, str], Path] = {}

    def run(steps: int, rule: str = "relaxed") -> Path:
        if (steps, rule) not in runs:
            out = tmp_path_factory.mktemp(f"straight-{steps}-{rule}")
            assert calibrate_main([*_args(model_dir, out, steps), "--rule", rule]) == 0
            runs[steps, rule] = out
        return runs[steps, rule]

    return run


def _same_run(out: Path, reference: Path) -> None:
    """Bit for bit: the pattern's gates, every checkpoint tensor (gates, evidence, relaxed layout, AdamW moments)
    and the log's steps."""
    assert torch.equal(HeadPattern.load(out / "pattern.json").gates, HeadPattern.load(reference / "pattern.json").gates)
    mine, theirs = load_file(out / CHECKPOINT), load_file(reference / CHECKPOINT)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    records = lambda folder: [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (folder / LOG).read_text().splitlines()
    ]
    assert records(out) == records(reference)  # every step's loss, gates summary and layout
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no lock, no half-written temporary file


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
    "after the relaxed layout's AdamW step": (RelaxedRule, "sample_evidence"),
    "after the gates' signed step": (EvidenceRule, "signed_step"),
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
    else:  # the first periodic checkpoint (step 5) is cut after its temporary file is written, before the rename
        _interrupt_after(train_module, "save_file", monkeypatch, lambda: True)
    out = tmp_path / "out"
    assert calibrate_main(_args(model_dir, out, 8)) == 130
    monkeypatch.undo()
    assert calibrate_main(["--out", str(out), "--resume"]) == 0
    _same_run(out, straight(8))


@pytest.mark.parametrize("rule", ["evidence"])
def test_ctrl_c_after_the_update_of_every_rule_resumes_to_the_uninterrupted_result(
    rule, model_dir, straight, tmp_path, monkeypatch
):
    """The other rule a user can choose (--rule; the relaxed rule is the default, above): interrupted after step 3's
    update, before the step counts as done."""
    owner, name = RULE_CLASSES[rule], "update"
    calls = []
    original = getattr(owner, name)

    def interrupted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupted)
    out = tmp_path / "out"
    assert calibrate_main([*_args(model_dir, out, 8), "--rule", rule]) == 130
    monkeypatch.undo()
    assert calibrate_main(["--out", str(out), "--resume"]) == 0
    _same_run(out, straight(8, rule))


def test_sigint_in_a_real_process_inside_the_student_pass_resumes_bit_for_bit(model_dir, straight, tmp_path):
    out = tmp_path / "out"
    helper = [sys.executable, str(ROOT / "tests" / "sigint_calibrate.py"), "2", *_args(model_dir, out, 8)]
    done = subprocess.run(helper, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_sigint_as_a_terminal_gives_it)
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
    out, steps = tmp_path / "out", 120
    process = subprocess.Popen(
        [sys.executable, "-m", "duohead", "calibrate", *_args(model_dir, out, steps)],
        env=ENV,
        preexec_fn=_sigint_as_a_terminal_gives_it,
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


# ---------------------------------------------------------------------------------------------------- every CLI


class ModelLoaded(BaseException):
    """Raised if a bad-argument case gets as far as loading weights (a BaseException: no CLI turns it into a line)."""


@pytest.fixture
def hostile(tmp_path, tiny_model_dir, tiny_pattern_file) -> SimpleNamespace:
    """The paths the bad-argument table points at: a folder, a FIFO, /dev/zero, an existing file, a file used as a
    folder, an unwritable folder, damaged pattern files and model configs."""
    f = SimpleNamespace(model=str(tiny_model_dir), pattern=str(tiny_pattern_file), tmp=tmp_path, zero="/dev/zero")
    f.dir = str(tmp_path)
    f.fifo = str(tmp_path / "fifo")
    os.mkfifo(f.fifo)
    f.existing = str(tmp_path / "existing.json")
    Path(f.existing).write_text("{}\n")
    f.under_file = str(tmp_path / "existing.json" / "x.json")
    f.unwritable = "/sys"  # refuses new files, even to root
    data = json.loads(Path(f.pattern).read_text())
    for name, change in {
        "list_model": {"model": ["tiny"]},
        "list_provenance": {"provenance": [1, 2]},
        "string_head_dim": {"model": {"head_dim": "16"}},
    }.items():
        setattr(f, name, str(tmp_path / f"{name}.json"))
        Path(getattr(f, name)).write_text(json.dumps({**data, **change}))
    f.nested = str(tmp_path / "nested.json")
    Path(f.nested).write_text("[" * 100_000 + "]" * 100_000)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for name, change in {"million_layers": {"num_hidden_layers": 1_000_000}, "no_heads": {"num_attention_heads": 0},
                         "negative_layers": {"num_hidden_layers": -2}}.items():  # fmt: skip
        setattr(f, name, str(tmp_path / f"{name}.json"))
        Path(getattr(f, name)).write_text(json.dumps({**config, **change}))
    f.list_config = str(tmp_path / "list_config.json")
    Path(f.list_config).write_text("[1, 2]")
    f.run = tmp_path / "run"
    f.run.mkdir()
    (f.run / LOG).write_text('{"step": 1}\n')
    f.fifo_run = tmp_path / "fifo-run"
    f.fifo_run.mkdir()
    os.mkfifo(f.fifo_run / CHECKPOINT)
    f.gguf = str(tmp_path / "model.gguf")
    return f


CALIBRATE = ["calibrate", "--steps", "1", *RUN]
GENERATE = ["generate", "--max-new-tokens", "1"]
BAD_ARGUMENTS = {  # case -> (argv from the `hostile` paths, a phrase the one line must hold)
    "no command": (lambda f: [], "no command given"),
    "unknown command": (lambda f: ["serve"], "unknown command 'serve'"),
    "generate: --threshold nan": (lambda f: [*GENERATE, "--threshold", "nan"], "--threshold must be a finite number"),
    "generate: --sink -1": (lambda f: [*GENERATE, "--sink", "-1"], "--sink must be >= 0"),
    "generate: --window 0": (lambda f: [*GENERATE, "--window", "0"], "--window must be >= 1"),
    "generate: --max-new-tokens abc": (lambda f: [*GENERATE, "--max-new-tokens", "abc"], "invalid int value: 'abc'"),
    "generate: --prompt-file DIR": (lambda f: [*GENERATE, "--prompt-file", f.dir], "is a folder; pass a file"),
    "generate: --prompt-file FIFO": (lambda f: [*GENERATE, "--prompt-file", f.fifo], "not a regular file"),
    "generate: --prompt-file /dev/zero": (lambda f: [*GENERATE, "--prompt-file", f.zero], "not a regular file"),
    "generate: --report-json existing": (lambda f: [*GENERATE, "--report-json", f.existing], "pass --force"),
    "generate: --report-json DIR": (lambda f: [*GENERATE, "--report-json", f.dir], "is a folder; name a file"),
    "generate: --report-json under a file": (lambda f: [*GENERATE, "--report-json", f.under_file], "is a file, not a folder"),
    "generate: --report-json unwritable": (lambda f: [*GENERATE, "--report-json", f"{f.unwritable}/r.json"], "cannot write"),
    "generate: --force without --report-json": (lambda f: [*GENERATE, "--force"], "--force replaces"),
    "generate: X.gguf and --gguf-file": (lambda f: [*GENERATE, "--model", f.gguf, "--gguf-file", "b.gguf"], "names another"),
    "generate: --device bogus": (
        lambda f: [*GENERATE, "--model", f.model, "--pattern", f.pattern, "--device", "bogus"],
        "not a device",
    ),  # noqa: E501
    "generate: pattern FIFO": (lambda f: [*GENERATE, "--model", f.model, "--pattern", f.fifo], "not a regular file"),
    "generate: pattern /dev/zero": (lambda f: [*GENERATE, "--model", f.model, "--pattern", f.zero], "not a regular file"),
    "generate: --sink past the positions": (
        lambda f: [*GENERATE, "--model", f.model, "--pattern", f.pattern, "--sink", "100000", "--prompt-file", f.existing],
        "exceed the model's 600 positions",
    ),
    "inspect: missing pattern": (lambda f: ["inspect", str(f.tmp / "none.json")], "neither a file nor a shipped"),
    "inspect: --sparsity nan": (lambda f: ["inspect", f.pattern, "--sparsity", "nan"], "--sparsity must be in [0, 1]"),
    "inspect: --png existing": (lambda f: ["inspect", f.pattern, "--png", f.existing], "pass --force"),
    "inspect: --png DIR": (lambda f: ["inspect", f.pattern, "--png", f.dir], "is a folder"),
    "inspect: 100,000 nested brackets": (lambda f: ["inspect", f.nested], "nested too deeply"),
    "inspect: model is a list": (lambda f: ["inspect", f.list_model], "field 'model' must be a JSON object"),
    "inspect: provenance is a list": (lambda f: ["inspect", f.list_provenance], "field 'provenance' must be a JSON object"),
    "inspect: head_dim '16'": (lambda f: ["inspect", f.string_head_dim], "'model.head_dim' must be an integer >= 1; got '16'"),
    "inspect: pattern FIFO": (lambda f: ["inspect", f.fifo], "not a regular file"),
    "plan: --gpu-memory 1e400GB": (
        lambda f: ["plan", "--model", f.model, "--sparsity", "0.5", "--context", "1K", "--gpu-memory", "1e400GB"],
        "positive, finite",
    ),
    "plan: 1,000,000 layers": (
        lambda f: ["plan", "--model", f.million_layers, "--sparsity", "0.5", "--context", "1K"],
        "[1, 4,096]",
    ),
    "plan: 0 heads": (lambda f: ["plan", "--model", f.no_heads, "--sparsity", "0.5", "--context", "1K"], "num_attention_heads"),
    "plan: negative layers": (lambda f: ["plan", "--model", f.negative_layers, "--sparsity", "0.5", "--context", "1K"], "got -2"),
    "plan: config.json is a list": (
        lambda f: ["plan", "--model", f.list_config, "--sparsity", "0.5", "--context", "1K"],
        "model_type",
    ),
    "plan: config /dev/zero": (
        lambda f: ["plan", "--model", f.zero, "--sparsity", "0.5", "--context", "1K"],
        "not a regular file",
    ),
    "patterns: unknown name": (lambda f: ["patterns", "nonesuch"], "no shipped pattern 'nonesuch'"),
    "patterns: --tokens abc": (lambda f: ["patterns", "--tokens", "abc"], "invalid int value"),
    "calibrate: --checkpoint-every 0": (
        lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--checkpoint-every", "0"],
        "must be >= 1",
    ),
    "calibrate: --checkpoint-every -1": (lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--checkpoint-every", "-1"], "got -1"),
    "calibrate: --reg nan": (lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--reg", "nan"], "--reg must be a finite number"),
    "calibrate: --lr inf": (lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--lr", "inf"], "--lr must be a finite number"),
    "calibrate: --device bogus": (
        lambda f: [*CALIBRATE, "--model", f.model, "--out", str(f.tmp / "o"), "--device", "bogus"],
        "not a device",
    ),
    "calibrate: --haystack DIR": (lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--haystack", f.dir], "is a folder"),
    "calibrate: --haystack /dev/zero": (lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--haystack", f.zero], "not a regular"),
    "calibrate: --out a file": (lambda f: [*CALIBRATE, "--out", f.existing], "is a file; name a folder"),
    "calibrate: --out under a file": (lambda f: [*CALIBRATE, "--out", f.under_file], "is a file, not a folder"),
    "calibrate: --out unwritable": (lambda f: [*CALIBRATE, "--out", f"{f.unwritable}/run"], "cannot write"),
    "calibrate: --resume, checkpoint a FIFO": (
        lambda f: ["calibrate", "--out", str(f.fifo_run), "--resume"],
        "not a regular file",
    ),
    "calibrate: --out holding a log": (
        lambda f: [*CALIBRATE, "--out", str(f.run)],
        "train_log.jsonl already exists; pass --force",
    ),
    "calibrate: --window past --ctx-max": (
        lambda f: [*CALIBRATE, "--out", str(f.tmp / "o"), "--window", "1000"],
        "exceed --ctx-max",
    ),
    "calibrate: --window past the positions": (
        lambda f: ["calibrate", "--model", f.model, "--out", str(f.tmp / "o"), "--window", "100000"],
        "exceed the model's 600 positions",
    ),
}
if not torch.cuda.is_available():
    BAD_ARGUMENTS["generate: --device cuda without CUDA"] = (
        lambda f: [*GENERATE, "--model", f.model, "--pattern", f.pattern, "--device", "cuda"],
        "CUDA is not available",
    )
    BAD_ARGUMENTS["calibrate: --device cuda without CUDA"] = (
        lambda f: [*CALIBRATE, "--model", f.model, "--out", str(f.tmp / "o"), "--device", "cuda"],
        "CUDA is not available",
    )


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_every_cli_answers_a_bad_argument_with_one_line_and_exit_2_before_loading_a_model(case, hostile, capsys, monkeypatch):
    def loaded(*args, **kwargs):
        raise ModelLoaded(case)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)
    argv, phrase = BAD_ARGUMENTS[case]
    capsys.readouterr()
    try:
        rc = cli_main(argv(hostile))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "error: " in err and phrase in err, err


# ---------------------------------------------------------------------------------------------------- item 5


def _no_space(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_at_the_final_save_keeps_the_checkpoint_and_resume_writes_the_pattern(
    model_dir, straight, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setattr(HeadPattern, "save", lambda self, path, **kwargs: _no_space(path))
    assert calibrate_main(_args(model_dir, out, 8)) == 2
    printed, err = capsys.readouterr()
    assert "gate report:" in printed  # the results are shown although the pattern could not be written
    line = err.strip().splitlines()[-1]
    assert f"could not write ({out / 'pattern.json'}: No space left on device)" in line
    assert f"the checkpoint of step 8 in {out / CHECKPOINT} is kept" in line and line.endswith(f"--out {out} --resume")
    monkeypatch.undo()
    assert calibrate_main(["--out", str(out), "--resume"]) == 0  # no step left: writes the pattern
    _same_run(out, straight(8))


def test_an_unwritable_checkpoint_stops_the_run_saying_nothing_was_saved(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "atomic_write", _no_space)
    assert calibrate_main(_args(model_dir, tmp_path / "out", 8)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("no checkpoint could be saved")


def test_generate_prints_its_report_when_the_report_file_cannot_be_written(
    tiny_model_dir, tiny_pattern_file, tmp_path, monkeypatch, capsys
):
    from duohead.commands import generate

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The lighthouse stands on the northern cape. " * 4)
    monkeypatch.setattr(generate, "atomic_write_text", _no_space)
    argv = ["--model", str(tiny_model_dir), "--pattern", str(tiny_pattern_file), "--prompt-file", str(prompt)]
    assert generate.main([*argv, "--max-new-tokens", "2", "--report-json", str(tmp_path / "r.json")]) == 2
    printed, err = capsys.readouterr()
    assert "KV cache held" in printed  # the run's results are shown
    errors = [line for line in err.splitlines() if "error" in line]
    report = tmp_path / "r.json"
    assert errors == [
        f"duohead generate: error: --report-json {report}: not written (No space left on device); the report is above"
    ]


# ---------------------------------------------------------------------------------------------------- item 7, 8: the API


def test_python_api_mistakes_raise_specific_exceptions(tmp_path):
    from tiny_models import tiny_model

    import duohead
    from duohead.loading import load_model, resolve_model_path

    pattern = HeadPattern(torch.tensor([[0.9, 0.1]] * 3), sink=4, window=8)
    with pytest.raises(TypeError, match="takes a transformers causal LM.*got Linear"):
        duohead.enable(torch.nn.Linear(2, 2), pattern)
    model = tiny_model()
    for bad in (None, 12345):
        with pytest.raises(TypeError, match="pattern must be a HeadPattern, a pattern file"):
            duohead.enable(model, bad)
    with pytest.raises(ValueError, match="window 100000 exceed the model's 1024 positions"):
        duohead.enable(model, pattern, window=100_000)
    with pytest.raises(ValueError, match="sink 5000 / window 8 exceed"):
        duohead.enable(model, HeadPattern(pattern.gates, sink=5000, window=8))
    assert not duohead.is_enabled(model)
    with pytest.raises(ValueError, match="'model.head_dim' must be an integer >= 1; got '16'"):
        HeadPattern(pattern.gates, model={"head_dim": "16"})
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file"):
        HeadPattern.load(tmp_path / "fifo")  # refused without opening it: nothing blocks
    with pytest.raises(ValueError, match="not a regular file"):
        HeadPattern.load("/dev/zero")
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "full_attention_heads.tsv").write_text("1.0\t0.0\n")
    (reference / "config.json").write_text("[64, 256]")
    with pytest.raises(ValueError, match="must be a JSON object with sink_size, recent_size; got list"):
        HeadPattern.from_duo_attention(reference)
    with pytest.raises(ValueError, match="is a GGUF file and gguf_file='b.gguf' names another"):
        resolve_model_path(tmp_path / "a.gguf", "b.gguf")
    evil = tmp_path / "evil"
    model.config.save_pretrained(evil)
    torch.save({**model.state_dict(), "payload": _Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled objects besides tensors"):
        load_model(evil)


class _Payload:
    """A pickle that would run code when loaded without weights_only (it is never loaded)."""

    def __reduce__(self):
        return (print, ("this must never print",))
