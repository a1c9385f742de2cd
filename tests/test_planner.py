"""`duohead plan`: its bytes against real `DuoCache`s and real parameters, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import mixed_gates, tiny_model
from transformers import AutoModelForCausalLM

import duohead
from duohead import DuoCache, HeadPattern
from duohead.architecture import LayerLayout
from duohead.cache import cache_argument
from duohead.commands.plan import main
from duohead.planner import format_tokens, load_config, parse_bytes, parse_tokens, plan_deployment, spread_layout
from duohead.sharding import HeadShard, rank_layouts

DATA = Path(__file__).parent / "data"
LLAMA_8B = DATA / "llama-3.1-8b-instruct-config.json"


@pytest.mark.parametrize("arch, batch", [("llama", 1), ("qwen2", 2)])
def test_plan_matches_a_real_duocache_and_the_real_parameters(arch, batch):
    model = tiny_model(arch)
    pattern = HeadPattern(mixed_gates(3, 2, seed=1), sink=4, window=8)
    layout = pattern.binarize(sparsity=0.5)
    duohead.enable(model, pattern, sparsity=0.5)
    tokens = 40
    cache = DuoCache.from_model(model)
    with torch.no_grad():
        model(torch.randint(1, 97, (batch, tokens)), **{cache_argument(model): cache})
    held = cache.memory()
    plan = plan_deployment(model.config, layout, sink=4, window=8, context=tokens, dtype="float32", batch=batch)
    (rank,) = plan.ranks
    assert rank.full_kv_bytes == held["full_bytes"]
    assert rank.duohead_kv_bytes == held["total_bytes"]
    assert rank.streaming_bytes == held["streaming_bytes"]
    assert rank.weight_bytes == sum(p.numel() * 4 for p in model.parameters())


def _installed_tp_plan(config) -> dict[str, str]:
    """The tensor-parallel plan the installed transformers gives this config (it differs between versions)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).tp_plan or {}


def _meta_cache(layouts: list[LayerLayout], kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> DuoCache:
    """A real DuoCache whose layers hold `tokens` tokens of [1, kv_heads, ., head_dim] KV on the meta device
    (shapes only: 128K tokens of an 8B model allocate nothing)."""
    cache = DuoCache(layouts, max_length=tokens)
    for layer in cache.layers:
        states = torch.empty(1, kv_heads, tokens, head_dim, dtype=dtype, device="meta")  # past S + W: split at once
        layer.lazy_initialization(states, states)
        layer.seen = tokens  # what the attention leaves after `tokens` tokens
    return cache


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_3_1_8b_at_128k_half_streaming_matches_duocache(tp):
    config = load_config(str(LLAMA_8B))
    pattern = HeadPattern(torch.rand(32, 8, generator=torch.Generator().manual_seed(0)), sink=128, window=256)
    layout = pattern.binarize(sparsity=0.5)
    context = 131072
    plan = plan_deployment(config, layout, sink=128, window=256, context=context, tp=tp, dtype="bfloat16")
    layouts = [LayerLayout.from_retrieval(row, 128, 256) for row in layout.tolist()]
    for rank in plan.ranks:
        shard = HeadShard(rank.rank, tp, 8, rank.rank * 8 // tp, (rank.rank + 1) * 8 // tp)
        held = _meta_cache(rank_layouts(layouts, shard), 8 // tp, context, 128, torch.bfloat16).memory()
        assert (rank.full_kv_bytes, rank.duohead_kv_bytes) == (held["full_bytes"], held["total_bytes"])
    # the known sizes: 8,030,261,248 parameters; full attention 2 x 32 layers x 8 heads x 128 x 2 bytes per token
    assert sum(r.full_kv_bytes for r in plan.ranks) == 16 * 2**30
    total_weights = 8_030_261_248 * 2
    replicated = (2 * 32 + 1) * 4096 * 2  # the RMSNorm weights live whole on every rank
    if "model.embed_tokens" not in _installed_tp_plan(config):  # transformers < 5.24 keeps the embedding whole
        replicated += 128256 * 4096 * 2
    assert sum(r.weight_bytes for r in plan.ranks) == total_weights + (tp - 1) * replicated
    duo = sum(r.duohead_kv_bytes for r in plan.ranks)
    assert duo == 128 * (131072 + 128 + 256) * 2 * 128 * 2  # 128 retrieval heads x 128K + 128 streaming x (S + W)


def test_plan_cli_json_and_table(tmp_path, capsys):
    gates = torch.rand(32, 8, generator=torch.Generator().manual_seed(0))
    HeadPattern(gates, sink=128, window=256).save(tmp_path / "p.json")
    args = ["--model", str(LLAMA_8B), "--pattern", str(tmp_path / "p.json"), "--sparsity", "0.5", "--context", "131072"]
    assert main([*args, "--json", "--tp", "2", "--gpu-memory", "80GiB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    expected = plan_deployment(
        load_config(str(LLAMA_8B)), HeadPattern.load(tmp_path / "p.json").binarize(sparsity=0.5),
        sink=128, window=256, context=131072, tp=2, gpu_memory=80 * 2**30,
    )  # fmt: skip
    assert [r["duohead_kv_bytes"] for r in plan["ranks"]] == [r.duohead_kv_bytes for r in expected.ranks]
    for r in plan["ranks"]:  # the longest context fills the GPU, one more token would not fit
        fixed = r["weight_bytes"] + r["streaming_bytes"]
        assert fixed + r["max_context_duohead"] * r["retrieval_bytes_per_token"] <= 80 * 2**30
        assert fixed + (r["max_context_duohead"] + 1) * r["retrieval_bytes_per_token"] > 80 * 2**30
        assert r["weight_bytes"] + r["max_context_full"] * r["full_bytes_per_token"] <= 80 * 2**30
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "16.00 GiB" in table and "14.96 GiB" in table  # full-attention KV and bf16 weights of the 8B model


def test_spread_layout_balances_ranks_and_layers():
    layout = spread_layout(layers=4, kv_heads=8, tp=2, sparsity=0.5)
    assert int((~layout).sum()) == 16
    assert (~layout[:, :4]).sum() == (~layout[:, 4:]).sum() == 8  # each rank streams as many heads
    assert all(int((~row).sum()) == 4 for row in layout)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tp", "3", "--sparsity", "0.5"], "do not split evenly over --tp 3"),
        (["--gpu-memory", "80 parsecs", "--sparsity", "0.5"], "cannot read '80 parsecs'"),
        ([], "without --pattern pass --sparsity"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1]"),
    ],
)
def test_plan_cli_errors(argv, message, capsys):
    assert main(["--model", str(LLAMA_8B), "--context", "1024", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_reads_only_configs_it_can_use(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["--model", str(tmp_path), "--context", "8", "--sparsity", "0.5"]) == 2
    assert "no 'model_type' field" in capsys.readouterr().err
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses connections: fail at once, no retries
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["--model", "no-such-org/no-such-model", "--context", "8", "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "nor in the Hugging Face cache, and the hub (127.0.0.1) cannot be reached" in err


def test_plan_from_a_shipped_pattern_alone_in_any_folder(tmp_path, capsys, monkeypatch):
    """The README's plan needs no file of the repository: the shipped pattern ships its model's config."""
    monkeypatch.chdir(tmp_path)
    assert main(["--pattern", "llama-3.1-8b-instruct", "--context", "128K", "--gpu-memory", "80GiB", "--json"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert main(["--model", str(LLAMA_8B), "--pattern", "llama-3.1-8b-instruct", "--context", "131072",
                 "--gpu-memory", "80GiB", "--json"]) == 0  # fmt: skip
    assert shipped == json.loads(capsys.readouterr().out) and shipped["context"] == 131072
    assert main(["--pattern", "mistral-7b-instruct-v0.2", "--context", "1M"]) == 2
    assert "ships no model config: pass --model" in capsys.readouterr().err


def test_token_counts_read_and_print_in_one_unit():
    assert [parse_tokens(t) for t in ("131072", "128K", "128k", "1M", "1.5M")] == [131072, 131072, 131072, 2**20, 3 * 2**19]
    for bad in ("0", "12Q", "1.0001K", "-5"):
        with pytest.raises(ValueError, match="token count"):
            parse_tokens(bad)
    assert format_tokens(532_827) == "532,827 (520.3K)" and format_tokens(1_065_271) == "1,065,271 (1.02M)"
    assert format_tokens(1000) == "1,000"


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141 GB") == 141 * 10**9
    with pytest.raises(ValueError, match="positive"):
        parse_bytes("0GB")
