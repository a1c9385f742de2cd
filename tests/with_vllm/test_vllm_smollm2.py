"""The real SmolLM2-135M-Instruct in vLLM with its shipped pattern, on long passkey prompts (slow).

The model is duohead's safetensors conversion of the PyPI GGUF (`duohead.loading.resolve_model_path`), the folder a
user would give vLLM. vLLM + duohead must give duohead's transformers tokens (fp32), and find the passkey, as stock
vLLM does.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment: make test-vllm")

import torch  # noqa: E402
from test_vllm_plugin import run_vllm  # noqa: E402

import duohead  # noqa: E402
from duohead.loading import load_model, resolve_model_path  # noqa: E402
from duohead.prompts import passkey_sample  # noqa: E402

pytestmark = pytest.mark.slow
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    folder = resolve_model_path(None)  # converts the GGUF once (cached under ~/.cache/duohead)
    model, tokenizer = load_model(folder)
    model.generation_config.eos_token_id = None
    return folder, model, tokenizer


def test_shipped_pattern_in_vllm_gives_duoheads_tokens_and_finds_the_passkey(smollm2):
    folder, model, tokenizer = smollm2
    samples = [passkey_sample(tokenizer, length, depth, seed) for length, depth, seed in ((3000, 0.3, 11), (2200, 0.7, 12))]
    token_prompts = [tokenizer(s.prompt).input_ids for s in samples]
    settings = {"pattern": "smollm2-135m-instruct", "sparsity": 0.5}
    tokens, _ = run_vllm(folder, token_prompts, settings, chunk=512, block_size=32, new_tokens=NEW_TOKENS)
    stock, _ = run_vllm(folder, token_prompts, None, chunk=512, block_size=32, new_tokens=NEW_TOKENS)
    duohead.enable(model, "smollm2-135m-instruct", sparsity=0.5)
    try:
        with torch.no_grad():
            ours = [
                model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist()
                for p in token_prompts
            ]
    finally:
        duohead.disable(model)
    assert tokens == ours
    for sample, got, full in zip(samples, tokens, stock):
        assert sample.answer in tokenizer.decode(got), tokenizer.decode(got)
        assert sample.answer in tokenizer.decode(full), tokenizer.decode(full)
