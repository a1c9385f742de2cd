"""Every supported family, beyond the inference equivalences of tests/test_inference.py (parametrised over the same
families): exact restore with the rest of the model untouched, calibration, `duohead plan`, pattern validation, and
the refusals (unsupported families, the vLLM plugin, tensor parallelism where the plan gathers q/k/v)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from calibration_testbed import word_tokenizer
from tiny_models import FAMILIES, mixed_gates, oracle_model, tiny_model

import duohead
from duohead import DuoCache, HeadPattern
from duohead.architecture import FAMILIES as SUPPORTED
from duohead.architecture import UNSUPPORTED, attention_modules, check_architecture, layer_layouts, pattern_layers
from duohead.cache import cache_argument
from duohead.calibrate.data import PasskeyDataset, PasskeySpec
from duohead.calibrate.gates import GatedModel
from duohead.commands.calibrate import main as calibrate_main
from duohead.commands.plan import main as plan_main
from duohead.planner import plan_deployment
from duohead.vllm.settings import deployment_for


def per_head_parameters(kind) -> list[str]:
    """Names (under self_attn) of the parameters a swap of two KV heads must change."""
    return [f"{kind.fused_qkv or 'q_proj'}.weight"] + ([f"{kind.learned_sinks}"] if kind.learned_sinks else [])


NEW = [arch for arch in FAMILIES if not SUPPORTED[arch].vllm]  # the families the vLLM plugin does not run


def test_the_tests_cover_every_supported_family():
    assert sorted(FAMILIES) == sorted(SUPPORTED)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_enable_changes_only_attention_and_disable_restores_every_parameter(arch):
    model = tiny_model(arch)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    implementation, cls = model.config._attn_implementation, type(model)
    gates = torch.tensor([[0.1, 0.9]] * 3)  # every layer swaps its two KV heads (retrieval first)
    duohead.enable(model, HeadPattern(gates, sink=4, window=8), sparsity=0.5)
    changed = {name for name, p in model.state_dict().items() if not torch.equal(p, before[name])}
    assert changed and all(".self_attn." in name for name in changed)  # MLP, experts, router, norms untouched
    kind, names = SUPPORTED[arch], {module: name for name, module in model.named_modules()}
    modules = attention_modules(model)
    swapped = {f"{names[modules[i]]}.{name}" for i in pattern_layers(model.config) for name in per_head_parameters(kind)}
    assert swapped <= changed  # every global layer's per-head parameters (the learned sinks too), local layers none
    assert len(pattern_layers(model.config)) == 3
    duohead.disable(model)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    assert (model.config._attn_implementation, type(model)) == (implementation, cls)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "phi3", "smollm3", "granite", "gemma3", "gpt_oss"])
def test_plan_kv_bytes_equal_a_real_duocache(arch):
    model = tiny_model(arch)
    pattern = HeadPattern(mixed_gates(3, 2, seed=1), sink=4, window=8)
    duohead.enable(model, pattern, sparsity=0.5)
    cache = DuoCache.from_model(model)
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 40)), **{cache_argument(model): cache})
    held = cache.memory()
    plan = plan_deployment(model.config, pattern.binarize(sparsity=0.5), sink=4, window=8, context=40, dtype="float32")
    (rank,) = plan.ranks
    assert (rank.full_kv_bytes, rank.duohead_kv_bytes) == (held["full_bytes"], held["total_bytes"])
    assert rank.weight_bytes == sum(p.numel() * 4 for p in model.parameters())  # experts included


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_plan_from_the_family_config(arch, tmp_path, capsys):
    config = tiny_model(arch, heads=8, kv_heads=4).config
    config.save_pretrained(tmp_path)
    text = config.get_text_config()
    common = ["--model", str(tmp_path), "--sparsity", "0.5", "--context", "4K"]
    assert plan_main(common) == 0
    out = capsys.readouterr().out
    assert f"model: {text.model_type}, {text.num_hidden_layers} layers x 4 KV heads" in out
    assert "6 of 12 KV heads stream" in out  # the 3 layers a pattern covers
    assert ("3 local sliding-window layers keep their own window (of 6 tokens) in both" in out) == SUPPORTED[arch].local_layers
    if SUPPORTED[arch].tensor_parallel is not None:
        assert plan_main([*common, "--tp", "2"]) == 2
        assert f"cannot run {arch!r} tensor-parallel: transformers' tp_plan gathers" in capsys.readouterr().err


@pytest.mark.parametrize("arch", NEW)
def test_a_pattern_for_another_family_is_refused_naming_both(arch):
    model = tiny_model(arch)
    pattern = HeadPattern(torch.ones(3, 2), model={"name": "tiny-llama", "architecture": "llama"})
    text_type = model.config.get_text_config().model_type
    with pytest.raises(ValueError, match=f"a 'llama' model; this model is {text_type!r}"):
        duohead.enable(model, pattern)
    with pytest.raises(ValueError, match=rf"this model \({text_type}\) has 3 (global )?layers.* x 2 KV heads"):
        duohead.enable(model, HeadPattern(torch.ones(2, 2)))


@pytest.mark.parametrize("config_class, model_type", [("Llama4TextConfig", "llama4_text"), ("DeepseekV3Config", "deepseek_v3")])
def test_families_with_new_attention_math_are_refused_with_what_is_missing(config_class, model_type):
    model = torch.nn.Module()  # refused on its config, before any weight is read
    model.config = getattr(transformers, config_class)()
    with pytest.raises(ValueError) as refused:
        duohead.enable(model, HeadPattern(torch.ones(2, 2)))
    message = str(refused.value)
    assert f"does not support architecture {model_type!r} (its attention needs {UNSUPPORTED[model_type]}" in message
    assert message.endswith(f"supported: {', '.join(sorted(SUPPORTED))}")


def test_an_unknown_family_is_refused_with_the_supported_list():
    with pytest.raises(
        ValueError, match=r"architecture 'bert'; supported: gemma2, gemma3, gemma3_text, glm4, gpt_oss, granite, llama, mistral"
    ):
        check_architecture("bert")


@pytest.mark.parametrize("arch", NEW)
def test_the_vllm_plugin_refuses_a_family_it_does_not_run(arch):
    config = tiny_model(arch).config
    config.duohead = {"pattern": "auto"}
    decoder = config.get_text_config().model_type  # Gemma 3: its "gemma3_text" decoder is what is refused
    with pytest.raises(ValueError, match=rf"vLLM plugin does not support architecture {decoder!r} \(duohead supports it in "):
        deployment_for(config)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.mark.parametrize("arch", NEW)
def test_all_gates_one_is_the_teacher(arch, tokenizer):
    gated = GatedModel(tiny_model(arch, layers=2, vocab=len(tokenizer)), sink=4, window=16)
    sample = PasskeyDataset(tokenizer, PasskeySpec(120, 200, num_passkeys=3, passkey_words=4), seed=0)[0]
    ids = sample.input_ids[None]
    target = gated.teacher_states(ids, sample.supervised)
    assert gated.distill_backward(ids, sample.supervised, target) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        gated.gates.fill_(0.0)
    assert gated.distill_backward(ids, sample.supervised, target) > 1e-6


CALIBRATE = ["--steps", "2", "--ctx-min", "120", "--ctx-max", "200", "--num-passkeys", "3", "--passkey-words", "4",
             "--sink", "4", "--window", "16", "--target-sparsity", "0.5"]  # fmt: skip


@pytest.mark.parametrize("arch", NEW)
def test_calibrate_writes_a_pattern_the_family_enables(arch, tokenizer, tmp_path, capsys):
    model = tiny_model(arch, layers=2, vocab=len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert calibrate_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *CALIBRATE]) == 0
    capsys.readouterr()
    pattern = HeadPattern.load(tmp_path / "out" / "pattern.json")
    assert pattern.gates.shape == (2, 2) and pattern.model["architecture"] == arch
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(len(record["streaming"]) == 2 for record in log)
    duohead.enable(model, pattern)
    assert model._duohead.sparsity == 0.5


@pytest.mark.parametrize(
    "architecture, refused", [("qwen2moe", None), ("qwen3moe", None), ("phi3", None), ("gemma2", None), ("llama4", "chunked")]
)
def test_a_gguf_file_is_checked_by_the_family_transformers_loads_it_as(architecture, refused, tmp_path):
    import gguf

    from duohead.loading import check_gguf

    path = tmp_path / f"{architecture}.gguf"
    writer = gguf.GGUFWriter(path, arch=architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if refused is None:
        check_gguf(path)
    else:
        with pytest.raises(ValueError, match=f"architecture {architecture!r} \\(its attention needs .*{refused}"):
            check_gguf(path)


def test_phi3_longrope_switch_recomputes_into_the_same_duocache():
    """Phi-3's generate() drops the cache once the sequence passes original_max_position_embeddings and encodes every
    position again with LongRoPE's long factors: duohead empties its DuoCache and refills it, as stock refills a new
    DynamicCache (stock raised here before: the model made a DynamicCache that duohead's attention refuses)."""
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1 + 0.1 * i for i in range(8)],
            "long_factor": [2 + 0.3 * i for i in range(8)], "original_max_position_embeddings": 32}  # fmt: skip
    model = tiny_model("phi3", rope_parameters=rope, max_position_embeddings=128, original_max_position_embeddings=32)
    ids = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(1))

    def generate():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    stock_tokens, stock_logits = generate()
    duohead.enable(model, HeadPattern(torch.ones(3, 2), sink=4, window=8))
    tokens, logits = generate()
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)
    duohead.disable(model)
    with torch.no_grad():
        stock_full = model(stock_tokens[:, :-1]).logits
    if not torch.allclose(stock_logits[0, 13:], stock_full[0, 32:], atol=1e-5):
        pytest.skip(f"transformers {transformers.__version__}: stock Phi-3 generate() loses the context at the switch")
    pattern = HeadPattern(mixed_gates(3, 2), sink=4, window=8)
    oracle = oracle_model(model, pattern.binarize(), 4, 8)
    duohead.enable(model, pattern)
    tokens, logits = generate()
    with torch.no_grad():
        expected = oracle(tokens[:, :-1]).logits  # 49 tokens: long factors at every position
    # step k sees 20 + k tokens; from 33 tokens on (k >= 13) every position was encoded with the long factors
    torch.testing.assert_close(logits[0, 13:], expected[0, 32:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_duoheads_own_chunked_loop_equals_generate(arch):
    """`duohead generate` / `eval` run their own loop (runner.run_prompt: chunked prefill, then greedy decode)."""
    from duohead.runner import run_prompt

    model = duohead.enable(tiny_model(arch), HeadPattern(mixed_gates(3, 2), sink=4, window=8))
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=10, do_sample=False)[0, 40:].tolist()
    assert run_prompt(model, ids, 10, chunk=7).tokens == expected


@pytest.mark.parametrize("arch", [arch for arch in FAMILIES if SUPPORTED[arch].local_layers])
def test_local_layers_keep_a_constant_cache_and_a_static_cache_generates_the_same(arch):
    """A local layer holds its W-token ring whatever the length (stock holds as much), and a static DuoCache
    (compiled decoding's) generates the dynamic one's tokens."""
    model = duohead.enable(tiny_model(arch), HeadPattern(mixed_gates(3, 2), sink=4, window=8))
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = DuoCache.from_model(model, split_margin=0)
    with torch.no_grad():
        model(ids, **{cache_argument(model): cache})
        dynamic = model.generate(ids, max_new_tokens=12, do_sample=False)
        static = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    local = [layer for layer, lay in zip(cache.layers, layer_layouts(model)) if lay.local]
    assert len(local) == 3 and all(layer.memory()["streaming_bytes"] == 2 * 2 * 2 * 6 * 16 * 4 for layer in local)
    assert all(layer.memory()["full_bytes"] == layer.memory()["streaming_bytes"] for layer in local)  # stock's window
