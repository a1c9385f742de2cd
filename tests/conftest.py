"""Test setup: one CPU thread per process unless OMP_NUM_THREADS says otherwise (on a busy 2-core CPU the suite took
46 min with torch's default threads and 5 min with one, as measured in issue 27); Triton runs in interpreter mode
where there is no GPU (set before anything imports triton); tiny models split their caches at sink + window (below);
and the fixtures the CLI tests share (the tiny model folder and its pattern, built once per session; see
cli_model.py)."""

import contextlib
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
def tiny_scale_cpu_backend(request):
    """Tiny-model tests run the torch backend at a tiny scale, through its public options (`kernels.backend_options`):
    every dynamic cache splits at S + W, as on the GPU (the split path is what every long prompt runs, and tiny
    prompts would otherwise all fit in the CPU's one-call margin, `kernels.split_margin`), and the banded Λ prefill
    (`reference.unpadded_lambda_attention`) takes bands of 8 rows, so tiny prompts cross band edges. Real-model (slow)
    tests and those marked `default_split_margin` keep the defaults (margin 1,536, bands of 128)."""
    if any(request.node.get_closest_marker(name) for name in ("slow", "default_split_margin")):
        yield
        return
    from duohead import kernels

    with kernels.backend_options("torch", split_margin={}, lambda_band=8):
        yield


@pytest.fixture
def cpu_split_margin():
    """`cpu_split_margin(tokens)` sets the torch backend's CPU split margin for the rest of the test."""
    from duohead import kernels

    with contextlib.ExitStack() as stack:
        yield lambda tokens: stack.enter_context(kernels.backend_options("torch", split_margin={"cpu": tokens}))
