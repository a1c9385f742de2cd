"""duohead inside vLLM (CPU), against duohead's transformers path and an independent Λ oracle.

Runs in its own environment (vllm-cpu pins its own transformers): `make test-vllm`. Every engine runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), fp32, eager, 32-token KV blocks and 64-token prefill chunks, so a
prompt of hundreds of tokens crosses many blocks and chunks and the streaming manager frees blocks as it goes.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment: make test-vllm")

import torch  # noqa: E402
from tiny_models import ARCHITECTURES, oracle_model  # noqa: E402
from vllm_models import prompts, save_tiny_checkpoint  # noqa: E402

import duohead  # noqa: E402
from duohead import HeadPattern  # noqa: E402

SINK, WINDOW = 8, 32
LENGTHS = (600, 230, 45, 6)  # past S + W by far, a little, within S + W, within S
NEW_TOKENS = 24
# Per-layer head counts differ: 4, 3, 1 and 0 retrieval KV heads of 4.
MIXED = torch.tensor([[1.0, 0.9, 0.8, 0.7], [0.9, 0.1, 0.8, 0.7], [0.2, 0.3, 0.9, 0.1], [0.0, 0.2, 0.1, 0.3]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-tiny")
    return {arch: (root / arch, save_tiny_checkpoint(root / arch, arch)) for arch in ARCHITECTURES}


def _pattern_file(tmp_path, gates: torch.Tensor, arch: str):
    path = tmp_path / f"pattern-{arch}.json"
    HeadPattern(gates, sink=SINK, window=WINDOW, model={"architecture": arch}).save(path, overwrite=True)
    return path


def run_vllm(
    path, token_prompts, duohead_settings=None, chunk: int = 64, block_size: int = 32, new_tokens: int = NEW_TOKENS, eager=True
):
    """Greedy tokens and the prompt tokens' logprobs (positions 1..n-1) of every prompt, from a fresh engine."""
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    overrides = {} if duohead_settings is None else {"duohead": duohead_settings}
    llm = LLM(
        model=str(path),
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=eager,
        max_model_len=4096,
        max_num_batched_tokens=chunk,
        max_num_seqs=4,
        block_size=block_size,
        enable_prefix_caching=False,
        hf_overrides=overrides,
    )
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [
            torch.tensor([step[token].logprob for step, token in zip(o.prompt_logprobs[1:], p[1:])])
            for o, p in zip(outputs, token_prompts)
        ]
        return tokens, logprobs
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def oracle_logprobs(model, layout: torch.Tensor, token_prompts) -> list[torch.Tensor]:
    """Each prompt's token logprobs (positions 1..n-1) under the independent Λ oracle (tests/tiny_models.py)."""
    oracle = oracle_model(model, layout, SINK, WINDOW)
    result = []
    with torch.no_grad():
        for p in token_prompts:
            logits = oracle(torch.tensor([p])).logits[0, :-1].float().log_softmax(-1)
            result.append(logits.gather(-1, torch.tensor(p[1:])[:, None])[:, 0])
    return result


def duohead_tokens(model, pattern_file, token_prompts) -> list[list[int]]:
    """Greedy tokens of duohead's transformers path (DuoCache), one prompt at a time."""
    duohead.enable(model, pattern_file, threshold=0.5)
    try:
        with torch.no_grad():
            return [
                model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist()
                for p in token_prompts
            ]
    finally:
        duohead.disable(model)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_mixed_pattern_matches_the_oracle_and_duoheads_transformers_path(arch, checkpoints, tmp_path):
    path, model = checkpoints[arch]
    pattern = _pattern_file(tmp_path, MIXED, arch)
    token_prompts = prompts(LENGTHS)
    tokens, logprobs = run_vllm(path, token_prompts, {"pattern": str(pattern), "threshold": 0.5})
    layout = MIXED >= 0.5
    for got, want in zip(logprobs, oracle_logprobs(model, layout, token_prompts)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)  # every prompt position, chunked prefill
    assert tokens == duohead_tokens(model, pattern, token_prompts)
    # The streaming heads change the answer: full attention's logprobs differ past S + W.
    full = oracle_logprobs(model, torch.ones_like(layout), token_prompts[:1])[0]
    assert (full - logprobs[0]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_streaming_matches_the_oracle(arch, checkpoints, tmp_path):
    path, model = checkpoints[arch]
    gates = torch.zeros(4, 4)
    token_prompts = prompts(LENGTHS[:2], seed=2)
    tokens, logprobs = run_vllm(path, token_prompts, {"pattern": str(_pattern_file(tmp_path, gates, arch)), "sparsity": 1.0})
    for got, want in zip(logprobs, oracle_logprobs(model, gates > 0.5, token_prompts)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_all_retrieval_equals_stock_vllm(arch, checkpoints, tmp_path):
    path, _ = checkpoints[arch]
    token_prompts = prompts(LENGTHS[:3], seed=3)
    stock = run_vllm(path, token_prompts)
    pattern = _pattern_file(tmp_path, torch.ones(4, 4), arch)
    tokens, logprobs = run_vllm(path, token_prompts, {"pattern": str(pattern), "sparsity": 0.0})
    assert tokens == stock[0]
    for got, want in zip(logprobs, stock[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_chunk_size_does_not_change_the_result(checkpoints, tmp_path):
    path, _ = checkpoints["mistral"]
    settings = {"pattern": str(_pattern_file(tmp_path, MIXED, "mistral")), "threshold": 0.5}
    token_prompts = prompts(LENGTHS[:2], seed=4)
    small = run_vllm(path, token_prompts, settings, chunk=32)
    large = run_vllm(path, token_prompts, settings, chunk=1024)
    assert small[0] == large[0]
    for a, b in zip(small[1], large[1]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_a_bad_pattern_fails_at_engine_start_in_one_line(checkpoints, tmp_path):
    path, _ = checkpoints["llama"]
    wrong_shape = tmp_path / "wrong.json"
    HeadPattern(torch.ones(3, 4), sink=SINK, window=WINDOW).save(wrong_shape)
    for settings, expected in [
        ({"pattern": str(wrong_shape)}, "3 layers x 4 KV heads; this model (llama) has 4 layers x 4 KV heads"),
        ({"pattern": str(tmp_path / "missing.json")}, "neither a file nor a shipped pattern name"),
        ({"pattern": "auto"}, "no shipped pattern"),
        ({"pattern": str(wrong_shape), "sparsty": 0.5}, "unknown key(s) 'sparsty'"),
        ({"sparsity": 0.5}, "needs 'pattern'"),
    ]:
        with pytest.raises(ValueError) as error:
            run_vllm(path, prompts((8,)), settings)
        # vLLM wraps it in its config's validation error; duohead's own message is one line naming the key and the fix
        (line,) = [line for line in str(error.value).splitlines() if "hf_overrides['duohead']" in line]
        assert expected in line, line


def test_unsupported_engine_settings_are_refused_by_name(checkpoints, tmp_path):
    from vllm import LLM

    path, _ = checkpoints["llama"]
    pattern = _pattern_file(tmp_path, MIXED, "llama")
    with pytest.raises(ValueError, match="does not support tensor_parallel_size=2 yet"):
        settings = {"duohead": {"pattern": str(pattern)}}
        LLM(model=str(path), skip_tokenizer_init=True, tensor_parallel_size=2, hf_overrides=settings)


def test_compiled_model_equals_eager(checkpoints, tmp_path):
    """vLLM's default (torch.compile of the model, attention as its opaque op) gives the eager tokens and logprobs."""
    path, _ = checkpoints["qwen3"]
    settings = {"pattern": str(_pattern_file(tmp_path, MIXED, "qwen3")), "threshold": 0.5}
    token_prompts = prompts(LENGTHS[1:3], seed=5)
    eager = run_vllm(path, token_prompts, settings)
    compiled = run_vllm(path, token_prompts, settings, eager=False)
    assert compiled[0] == eager[0]
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_streaming_heads_hold_sink_and_window_blocks_whatever_the_length(checkpoints, tmp_path):
    """vLLM's allocator, stepped by hand: per request, a streaming group never holds more than its sink block and two
    windows of blocks (S = 8, W = 32, 32-token blocks: 1 + 2 x 2), through 64-token chunks of a 900-token prompt and
    decode; a retrieval group holds every token."""
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    path, _ = checkpoints["llama"]
    settings = {"pattern": str(_pattern_file(tmp_path, MIXED, "llama")), "threshold": 0.5}
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_batched_tokens=64, block_size=32, hf_overrides={"duohead": settings})  # fmt: skip
    engine = llm.llm_engine
    kv_cache_manager = engine.engine_core.engine_core.scheduler.kv_cache_manager
    managers, free_at_start = kv_cache_manager.coordinator.single_type_managers, kv_cache_manager.block_pool.get_num_free_blocks()
    kinds = {type(m.kv_cache_spec).__name__ for m in managers}
    assert kinds == {"FullAttentionSpec", "SinkWindowSpec"}  # one KV head per module: two kinds of group
    engine.add_request("long", TokensPrompt(prompt_token_ids=prompts((900,))[0]), SamplingParams(max_tokens=40, ignore_eos=True))
    peak = {"FullAttentionSpec": 0, "SinkWindowSpec": 0}
    while engine.has_unfinished_requests():
        engine.step()
        for manager in managers:
            for blocks in manager.req_to_blocks.values():
                kind = type(manager.kv_cache_spec).__name__
                peak[kind] = max(peak[kind], sum(not b.is_null for b in blocks))
    free_at_end = kv_cache_manager.block_pool.get_num_free_blocks()
    del llm, engine, managers, kv_cache_manager
    gc.collect()
    cleanup_dist_env_and_memory()
    assert peak["SinkWindowSpec"] <= 1 + 2 * 2
    assert peak["FullAttentionSpec"] == -(-(900 + 40 - 1) // 32)
    assert free_at_end == free_at_start  # every block went back to the pool


def test_without_the_key_the_model_is_stock_vllm(checkpoints, tmp_path):
    """With the plugin loaded, a model without the `duohead` key gives exactly what vLLM gives with the plugin not
    loaded at all (VLLM_PLUGINS leaves it out, in a second process)."""
    import json
    import subprocess
    import sys

    path, _ = checkpoints["qwen2"]
    token_prompts = prompts(LENGTHS[1:3], seed=6)
    ours = run_vllm(path, token_prompts)
    script = (
        "import json, sys; sys.path[:0] = sys.argv[3:]; from test_vllm_plugin import run_vllm; "
        "tokens, logprobs = run_vllm(sys.argv[1], json.loads(sys.argv[2])); "
        "print('RESULT', json.dumps([tokens, [l.tolist() for l in logprobs]]))"
    )
    here = str(Path(__file__).parent)
    env = {**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver"}  # any list without duohead
    command = [sys.executable, "-c", script, str(path), json.dumps(token_prompts), here, str(Path(here).parent)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "duohead" not in proc.stderr.lower().replace("/duohead/", "/")  # the plugin did not load there
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    tokens, logprobs = json.loads(line[len("RESULT ") :])
    assert ours[0] == tokens
    assert [lp.tolist() for lp in ours[1]] == logprobs
