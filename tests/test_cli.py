"""The `duohead` command and the package import: argument errors come before torch and transformers load, and
`import duohead` is lazy while `enable` still registers the attention."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

# Runs one `duohead` command line in a fresh interpreter; prints its exit code and the heavy modules it loaded.
PROBE = f"""
import json, sys
from duohead.commands.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:  # argparse's own usage errors
    rc = e.code
print(json.dumps({{"rc": rc, "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""

ARGUMENT_ERRORS = {
    "no command": [],
    "unknown command": ["serve"],
    "generate: sparsity above 1": ["generate", "--sparsity", "2"],
    "generate: no new tokens": ["generate", "--max-new-tokens", "0"],
    "generate: demo with a model": ["generate", "--demo", "--model", "somewhere"],
    "generate: no threads": ["generate", "--threads", "0"],
    "eval: no threads": ["eval", "--threads", "0"],
    "eval: sparsity above 1": ["eval", "--sparsities", "0.5,2"],
    "eval: lengths not numbers": ["eval", "--lengths", "1k"],
    "eval: unknown method": ["eval", "--methods", "oracle"],
    "calibrate: no --out": ["calibrate"],
    "calibrate: bad target": ["calibrate", "--out", "x", "--target-sparsity", "half"],
    "calibrate: target above 1": ["calibrate", "--out", "x", "--target-sparsity", "1.5"],
    "calibrate: no steps": ["calibrate", "--out", "x", "--steps", "0"],
    "calibrate: unknown rule": ["calibrate", "--out", "x", "--rule", "fastest"],
    "calibrate: window 0": ["calibrate", "--out", "x", "--window", "0"],
    "calibrate: resume without a checkpoint": ["calibrate", "--out", "no-such-run", "--resume"],
    "inspect: no pattern": ["inspect"],
    "plan: context unreadable": ["plan", "--model", "x", "--sparsity", "0.5", "--context", "128Q"],
    "plan: neither model nor pattern": ["plan", "--sparsity", "0.5", "--context", "128K"],
    "plan: sparsity above 1": ["plan", "--model", "x", "--sparsity", "1.5", "--context", "1M"],
    "patterns: tokens 0": ["patterns", "--tokens", "0"],
}


def _probe(argv: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("case", sorted(ARGUMENT_ERRORS))
def test_argument_errors_come_before_torch_loads(case):
    """A bad argument is answered in a fraction of a second: one line, exit code 2, before torch or transformers load
    (argparse's own errors included). More cases, each CLI's: tests/test_faults.py."""
    result, err = _probe(ARGUMENT_ERRORS[case])
    assert result == {"rc": 2, "loaded": []}, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "error: " in err, err


def test_help_loads_neither_torch_nor_transformers():
    for command in ("generate", "eval", "calibrate", "inspect", "plan", "patterns"):
        assert _probe([command, "--help"])[0] == {"rc": 0, "loaded": []}, command
    assert _probe(["--help"])[0] == {"rc": 0, "loaded": []}


def test_version_is_the_installed_distribution_s():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "duohead", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"duohead {version('duohead')}\n"


def test_cpu_threads_are_chosen_deliberately(monkeypatch):
    from duohead.commands.support import cpu_threads

    assert cpu_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(None) == (2, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, threads in ((0.0, 4), (1.4, 2), (3.5, 1), (9.0, 1)):  # the CPUs other processes leave idle, at least 1
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert cpu_threads(None) == (threads, f"4 CPUs, load {load:.1f}")


def test_python_dash_m_duohead_is_the_command():
    proc = subprocess.run(
        [sys.executable, "-m", "duohead", "generate", "--sparsity", "2"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("duohead generate: error: --sparsity must be in [0, 1]")


def test_import_duohead_is_lazy_and_enable_registers_the_attention():
    script = """
import sys
import duohead
assert not any(m in sys.modules for m in ("torch", "transformers")), "import duohead loaded torch or transformers"
assert "DuoCache" in dir(duohead) and set(duohead.__all__) <= set(dir(duohead))
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
assert "duohead" not in ALL_ATTENTION_FUNCTIONS.valid_keys()
config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=16)
model = LlamaForCausalLM(config)
from duohead.hook import enable  # the module itself, not the package attribute: enable() must register on its own
enable(model, duohead.HeadPattern(torch.tensor([[1.0, 0.0]]), sink=2, window=4))
assert duohead.ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS.valid_keys()
assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_unknown_name_is_an_attribute_error():
    import duohead

    with pytest.raises(AttributeError, match="no attribute 'enabel'"):
        duohead.enabel  # noqa: B018
