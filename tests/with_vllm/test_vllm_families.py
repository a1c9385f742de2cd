"""Under vLLM, a `duohead` key on a family that duohead runs only in transformers is refused at engine start in one
line (vLLM's own class would otherwise run the model with full attention and ignore the key). `make test-vllm`."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment: make test-vllm")

import torch  # noqa: E402
from vllm_models import save_tiny_checkpoint  # noqa: E402

from duohead import HeadPattern  # noqa: E402


@pytest.mark.parametrize("arch", ["mixtral", "phi3"])
def test_a_family_the_plugin_does_not_run_is_refused_at_engine_start(arch, tmp_path):
    from vllm import LLM

    save_tiny_checkpoint(tmp_path / arch, arch)
    HeadPattern(torch.ones(4, 4), sink=8, window=32).save(tmp_path / "pattern.json")
    settings = {"duohead": {"pattern": str(tmp_path / "pattern.json")}}
    with pytest.raises(ValueError) as error:
        LLM(model=str(tmp_path / arch), skip_tokenizer_init=True, hf_overrides=settings)
    (line,) = [line for line in str(error.value).splitlines() if "duohead's vLLM plugin" in line]
    assert f"does not support architecture {arch!r} (duohead supports it in transformers, not yet in vLLM)" in line
