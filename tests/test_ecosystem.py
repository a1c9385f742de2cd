"""Real models' shapes and the ecosystem's ordinary paths: every shipped pattern on a random model with the real
attention shape (hidden and MLP sizes reduced), pipelines, streamers, bf16 on CPU, the refused cache and quantized
models, and Hugging Face ids resolved offline from a Hugging Face cache layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import oracle_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, TextStreamer, pipeline

import duohead
from duohead import HeadPattern
from duohead.architecture import layer_layouts
from duohead.catalogue import layout_kv_bytes, shipped_patterns

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig}
SHIPPED = shipped_patterns()
ROOT = Path(__file__).resolve().parents[1]


def real_shape_model(pattern: HeadPattern, q_heads: int):
    """A seeded random model with the pattern's model identity: architecture, layers x KV heads x head dim, and
    name; hidden 2 x query heads, MLP 64, vocabulary 97 so it runs on a CPU in seconds."""
    m = pattern.model
    torch.manual_seed(0)
    extra = {"sliding_window": None} if m["architecture"] == "mistral" else {}
    config = CONFIGS[m["architecture"]](
        vocab_size=97,
        hidden_size=2 * q_heads,
        intermediate_size=64,
        num_hidden_layers=pattern.num_layers,
        num_attention_heads=q_heads,
        num_key_value_heads=pattern.num_kv_heads,
        head_dim=m["head_dim"],
        max_position_embeddings=1024,
        **extra,
    )
    config._name_or_path = m["hf_id"]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


Q_HEADS = {"smollm2-135m-instruct": 9}  # the others have 32 query heads
SINK, WINDOW = 4, 8  # the mixed run overrides the pattern's 128/256 (64/256) so a 40-token prompt streams on a CPU


# one pattern per (architecture, layers x KV heads x head dim) that the shipped patterns have
ONE_PER_SHAPE = ["llama-3.1-8b-instruct", "mistral-7b-instruct-v0.2", "llama-2-7b-32k-instruct", "smollm2-135m-instruct"]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_auto_enables_every_shipped_pattern_on_its_model(name):
    """Every shipped pattern: "auto" finds it from the model's name and shape and applies its default cut (no forward
    here; the next test runs one pattern of each shape)."""
    pattern = SHIPPED[name]
    model = duohead.enable(real_shape_model(pattern, Q_HEADS.get(name, 32)), "auto")
    assert model._duohead.pattern.to_dict() == pattern.to_dict()
    assert torch.equal(model._duohead.layout, pattern.binarize(sparsity=pattern.default_sparsity))
    assert [lay.num_retrieval_heads for lay in layer_layouts(model)] == model._duohead.layout.sum(1).tolist()


@pytest.mark.parametrize("name", ONE_PER_SHAPE)
def test_every_shipped_shape_prefills_and_decodes(name):
    pattern = SHIPPED[name]
    model = real_shape_model(pattern, Q_HEADS.get(name, 32))
    short = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(short).logits
        stock_tokens = model.generate(short, max_new_tokens=3, do_sample=False)

    # all retrieval = stock transformers
    duohead.enable(model, pattern, sparsity=0.0)
    with torch.no_grad():
        err = (model(short).logits - stock).abs().max() / stock.abs().max()
        assert err < 1e-4
        assert torch.equal(model.generate(short, max_new_tokens=3, do_sample=False), stock_tokens)

    # "auto" finds this pattern from the model's name and shape; its default cut streams half the heads
    duohead.enable(model, "auto", sink=SINK, window=WINDOW)
    state = model._duohead
    assert state.pattern.model["hf_id"] == pattern.model["hf_id"] and state.sparsity == 0.5
    assert torch.equal(state.layout, pattern.binarize(sparsity=0.5))
    long = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(long, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    tokens = out.sequences
    # prefill and decode follow the Λ mask: the oracle (explicit masks, original head order) picks the same tokens
    oracle = oracle_model(duohead.disable(model), state.layout, SINK, WINDOW)
    with torch.no_grad():
        oracle_next = oracle(tokens[:, :-1]).logits[0, -3:].argmax(-1)
    assert torch.equal(oracle_next, tokens[0, -3:])
    # the cache holds what the byte formula says
    seen = tokens.shape[1] - 1
    expected = layout_kv_bytes(state.layout, pattern.model["head_dim"], SINK, WINDOW, seen, itemsize=4)
    assert out.past_key_values.memory() == {**expected, "reserved_bytes": out.past_key_values.memory()["reserved_bytes"]}
    assert expected["retrieval_bytes"] == 2 * 4 * pattern.model["head_dim"] * int(state.layout.sum()) * seen  # by hand


# ---------------------------------------------------------------- ecosystem paths (tiny Llama + SmolLM2 tokenizer)

PROMPT = "The lighthouse keeper wrote in the log every night."


def test_pipeline_accepts_an_enabled_model(tiny_model_dir, tiny_pattern_file, capfd):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = duohead.from_pretrained(tiny_model_dir, tiny_pattern_file)
    capfd.readouterr()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(PROMPT, max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert "not supported" not in capfd.readouterr().err
    assert type(model).__name__ == "LlamaForCausalLM" and duohead.is_enabled(model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert text == tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True)


def test_text_streamer_prints_the_generated_text(tiny_model_dir, tiny_pattern_file, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = duohead.from_pretrained(tiny_model_dir, tiny_pattern_file)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    capsys.readouterr()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_bfloat16_on_cpu(tiny_model_dir, tiny_pattern_file):
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT, return_tensors="pt").input_ids
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    all_retrieval = HeadPattern(torch.ones(2, 2), sink=4, window=16)
    model = duohead.from_pretrained(tiny_model_dir, all_retrieval, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        expected = stock.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
        mixed = duohead.enable(model, tiny_pattern_file)
        out = mixed.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.layers[0].dtype == torch.bfloat16


def test_from_pretrained_loads_float32_on_a_cpu_machine_unless_told(tiny_model_dir, tiny_pattern_file, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert duohead.from_pretrained(tmp_path / "bf16", tiny_pattern_file).dtype == (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    assert duohead.from_pretrained(tmp_path / "bf16", tiny_pattern_file, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_other_cache_implementations_are_refused_with_the_reason(tiny_model_dir, tiny_pattern_file):
    """ "static" gives a static DuoCache (tests/test_compile.py); any other implementation is refused."""
    model = duohead.from_pretrained(tiny_model_dir, tiny_pattern_file)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match=r"cache_implementation='offloaded'\) is not supported: an enabled model keeps its own"):
        model.generate(ids, max_new_tokens=2, cache_implementation="offloaded")


@pytest.mark.parametrize("as_dict", [True, False])
def test_quantized_model_is_refused_with_the_reason(tiny_model_dir, tiny_pattern_file, as_dict):
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True)
    model.config.quantization_config = quant.to_dict() if as_dict else quant
    message = "does not support quantized models \\(quantization_config: bitsandbytes\\).*plain weight"
    with pytest.raises(ValueError, match=message):
        duohead.enable(model, tiny_pattern_file)
    assert not duohead.is_enabled(model)
    model.config.quantization_config = {"quant_method": "gguf"}  # a GGUF checkpoint is dequantised on load: plain weights
    assert duohead.is_enabled(duohead.enable(model, tiny_pattern_file))


# ---------------------------------------------------------------- Hugging Face ids, offline, from the cache

OFFLINE_SCRIPT = """
import sys, duohead
from duohead.commands import main as cli
model = duohead.from_pretrained("tiny-org/tiny-llama", sys.argv[1])
print("enabled", duohead.is_enabled(model), model.config._name_or_path)
rc = cli.main(["generate", "--model", "tiny-org/tiny-llama", "--pattern", sys.argv[1], "--prompt-file", sys.argv[2],
               "--max-new-tokens", "3", "--device", "cpu"])
print("generate rc", rc)
missing = ["generate", "--model", "tiny-org/not-there", "--pattern", sys.argv[1], "--prompt-file", sys.argv[2]]
print("missing rc", cli.main(missing))
"""


def test_hugging_face_id_resolves_offline_from_the_cache(tmp_path, tiny_model_dir, tiny_pattern_file):
    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(tiny_pattern_file), str(prompt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "enabled True tiny-org/tiny-llama" in result.stdout
    assert "generate rc 0" in result.stdout and "missing rc 2" in result.stdout
    assert "tiny-org/not-there does not exist locally, and transformers could not resolve it" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr


def test_cli_pattern_auto(tiny_model_dir, capsys):
    """--pattern auto: the default model gets its shipped pattern; a model nothing is shipped for gets the list and
    the calibrate command, as one line and exit code 2, before any weights load."""
    from duohead.commands import generate
    from duohead.commands.support import load_pattern_for_cli

    assert load_pattern_for_cli("auto", None).to_dict() == HeadPattern.load("smollm2-135m-instruct").to_dict()
    assert capsys.readouterr().err.startswith("pattern auto: smollm2-135m-instruct")  # it says what it picked
    assert generate.main(["--model", str(tiny_model_dir), "--pattern", "auto", "--prompt-file", __file__]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duohead generate: error: pattern 'auto': no shipped pattern is made for") and err.count("\n") == 1
    assert "duohead calibrate --model" in err and "smollm2-135m-instruct (HuggingFaceTB/SmolLM2-135M-Instruct" in err


NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # as on macOS / Windows, where triton is not a dependency: `import triton` fails
import torch, duohead
from tiny_models import tiny_model
model = duohead.enable(tiny_model("llama"), duohead.HeadPattern(torch.tensor([[0.9, 0.1]] * 3), sink=2, window=4))
out = model.generate(torch.randint(1, 97, (1, 20)), max_new_tokens=3, do_sample=False)
print("ok", out.shape[1], "triton" in sys.modules and sys.modules["triton"] is not None)
"""


def test_cpu_path_runs_without_triton(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "DUOHEAD_BACKEND": "auto"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok 23 False"


def test_triton_is_a_linux_only_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if d.startswith("triton")] == ["triton>=3.4; sys_platform == 'linux'"]
