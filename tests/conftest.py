"""Test setup: one CPU thread per process unless OMP_NUM_THREADS says otherwise (on a busy 2-core CPU the suite took
46 min with torch's default threads and 5 min with one, as measured in issue 27); Triton runs in interpreter mode
where there is no GPU (set before anything imports triton); tiny models split their caches at sink + window (below);
and the fixtures the CLI tests share (the tiny model folder and its pattern, built once per session; see
cli_model.py)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest, and a busy CPU is not made busier

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with the tiny CLI Llama (cli_model.save_tiny_model) and a tokenizer."""
    from cli_model import save_tiny_model  # imported here: transformers only after TRITON_INTERPRET is set

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_pattern_file(tmp_path_factory):
    """A pattern file for the tiny model: one retrieval and one streaming KV head per layer (threshold 0.5)."""
    from cli_model import save_tiny_pattern

    return save_tiny_pattern(tmp_path_factory.mktemp("pattern") / "tiny.json")


@pytest.fixture(autouse=True)
def split_at_sink_plus_window(request, monkeypatch):
    """Tiny-model tests split every layer's cache at S + W, as on the GPU: the split path is what every long prompt
    runs, and the tiny prompts would otherwise all fit in the CPU's one-call margin (`kernels.split_margin`). Tests of
    that margin set `kernels.CPU_SPLIT_MARGIN` themselves; real-model (slow) tests and those marked
    `default_split_margin` (compared with a CLI in another process) keep the default."""
    if not any(request.node.get_closest_marker(name) for name in ("slow", "default_split_margin")):
        from duohead import kernels

        monkeypatch.setattr(kernels, "CPU_SPLIT_MARGIN", 0)


@pytest.fixture(autouse=True)
def small_lambda_bands(request, monkeypatch):
    """Tiny prompts span several bands of `reference.unpadded_lambda_attention` (its band height is a speed knob,
    not a semantic one), so every test of a streaming prefill also checks the band edges. Real-model tests keep 128."""
    if not request.node.get_closest_marker("slow"):
        from duohead.kernels import reference

        monkeypatch.setattr(reference, "LAMBDA_BAND", 8)
