"""Tensor parallelism: duohead on a model loaded with transformers' `tp_plan="auto"` under `torchrun` (CPU, gloo).

One torchrun launch (2 ranks, tests/tp_worker.py) runs every case; the test compares each rank's output with the
same model and pattern run in this single process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file
from tiny_models import FAMILIES, tiny_model
from tp_worker import padded_batch, tp_greedy
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import duohead
from duohead import HeadPattern
from duohead.architecture import FAMILIES as SUPPORTED
from duohead.architecture import LayerLayout
from duohead.commands.evaluate import main as eval_main
from duohead.commands.generate import main as generate_main
from duohead.loading import resolve_model_path
from duohead.planner import weight_bytes_per_rank
from duohead.sharding import HeadShard, rank_layouts

SINK, WINDOW = 3, 5
WORLD = 2
# [layers, 4 KV heads]: rank 0 holds heads 0-1, rank 1 heads 2-3. "balanced" gives each rank as many retrieval heads
# as the other in every layer (so each rank holds half the KV); "skewed" does not, and moves heads inside rank 1.
GATES = {
    "balanced": [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [0.9, 0.1, 0.2, 0.8]],
    "skewed": [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]],
}
EVEN_VOCAB = 98  # transformers 5.17 shards lm_head's output across ranks: the vocabulary must divide by WORLD
# transformers 5.17's plan leaves Gemma 3's multimodal lm_head input a plain tensor against DTensor weights: stock
# tensor parallelism fails in its own forward there ("mixed torch.Tensor and DTensor"), so that case needs 5.24
STOCK_TP_BROKEN = {"gemma3"} if Version(transformers.__version__) < Version("5.24") else set()
TP_FAMILIES = [  # transformers' plan, followed
    arch for arch in FAMILIES if SUPPORTED[arch].tensor_parallel is None and arch not in STOCK_TP_BROKEN
]
CASES = [(arch, "balanced") for arch in TP_FAMILIES] + [("qwen2", "skewed")]
REPLICATED = ["gpt_oss"]  # transformers' plan shards its experts, not its attention: duohead runs every head on each rank
GATHERED = [arch for arch in FAMILIES if SUPPORTED[arch].tensor_parallel is not None]  # refused: q/k/v gathered


def _torchrun() -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Build the tiny models and patterns, run tests/tp_worker.py under torchrun once; (folder, cases) for the tests."""
    root = tmp_path_factory.mktemp("tp")
    cases = []
    for arch in FAMILIES:
        tiny_model(arch, heads=8, kv_heads=4, vocab=EVEN_VOCAB).save_pretrained(root / arch)
    tiny_model("llama", heads=4, kv_heads=1, vocab=EVEN_VOCAB).save_pretrained(root / "one-kv-head")
    for name, gates in GATES.items():
        HeadPattern(torch.tensor(gates), sink=SINK, window=WINDOW).save(root / f"{name}.json")
    HeadPattern(torch.ones(3, 1), sink=SINK, window=WINDOW).save(root / "one-kv-head.json")
    for arch, pattern in CASES:
        cases.append({"name": f"{arch}-{pattern}", "model": str(root / arch), "pattern": str(root / f"{pattern}.json")})
    cases[0]["save"] = True
    unknown_plan = {"model.layers.*.self_attn.o_proj": "rowwise_rep"}  # o_proj's output replicated, not summed
    llama_balanced = {"model": str(root / "llama"), "pattern": str(root / "balanced.json")}
    cases.append({"name": "unknown-plan", **llama_balanced, "plan": unknown_plan})
    for arch in GATHERED:
        cases.append({"name": f"{arch}-gathered", "model": str(root / arch), "pattern": str(root / "balanced.json")})
    cases.append({"name": "indivisible", "model": str(root / "one-kv-head"), "pattern": str(root / "one-kv-head.json")})
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(duohead.__file__).parent.parent)])}
    command = [*_torchrun(), "--nproc-per-node", str(WORLD), "--standalone", str(Path(__file__).parent / "tp_worker.py"),
               str(root / "cases.json"), str(root)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def _ranks(root: Path, name: str) -> list[dict]:
    return [json.loads((root / f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]


def _single_process(root: Path, arch: str, pattern: str):
    model = AutoModelForCausalLM.from_pretrained(root / arch, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    duohead.enable(model, HeadPattern.load(root / f"{pattern}.json"))
    return model


@pytest.mark.parametrize("arch, pattern", CASES)
def test_tensor_parallel_greedy_tokens_equal_single_process(tp_run, arch, pattern):
    tokens, memory = tp_greedy(_single_process(tp_run, arch, pattern))
    ranks = _ranks(tp_run, f"{arch}-{pattern}")
    ids, mask = padded_batch()
    assert not bool(mask.all())  # the batch is padded
    for rank in ranks:
        assert rank["tokens"] == tokens  # chunked prefill of a padded batch, then decode
        layers = AutoConfig.from_pretrained(tp_run / arch).get_text_config().num_hidden_layers  # local layers too
        heads = 8 if arch in REPLICATED else 4  # each rank computes 4 of the 8 query heads, or all where replicated
        assert rank["q_rows"] == [heads * 16] * layers
        assert rank["restored"]  # disable() put the local shards back exactly
    if arch in REPLICATED:  # every rank holds every head's KV, as stock transformers does for this plan
        assert all(rank["memory"] == memory for rank in ranks)
        return
    for key in memory:  # the ranks' caches hold the heads of the single-process cache between them
        assert sum(rank["memory"][key] for rank in ranks) == memory[key], key
        assert all(rank["memory"][key] < memory[key] for rank in ranks if memory[key]), key
    if pattern == "balanced":
        for rank in ranks:
            assert {k: 2 * v for k, v in rank["memory"].items()} == memory


@pytest.mark.parametrize("arch", TP_FAMILIES)
def test_planner_weight_bytes_per_rank_match_transformers_sharding(tp_run, arch):
    ranks = _ranks(tp_run, f"{arch}-balanced")
    config = AutoConfig.from_pretrained(tp_run / arch)
    assert weight_bytes_per_rank(config, WORLD, itemsize=4) == [rank["weight_bytes"] for rank in ranks]


def test_each_rank_reorders_only_its_own_heads(tp_run):
    ranks = _ranks(tp_run, "qwen2-skewed")
    # global layer 0 [R, R, S, S]: rank 0 both retrieval, rank 1 both streaming; layer 1 [S, S, S, R]: rank 1 swaps
    assert [rank["layouts"] for rank in ranks] == [
        [[2, [0, 1]], [0, [0, 1]], [2, [0, 1]]],
        [[0, [0, 1]], [1, [1, 0]], [2, [0, 1]]],
    ]


def test_tensor_parallel_save_pretrained_writes_the_original_model(tp_run):
    saved = load_file(tp_run / "llama-balanced-saved" / "model.safetensors")
    original = load_file(tp_run / "llama" / "model.safetensors")
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key


def test_indivisible_kv_heads_are_refused_with_the_reason(tp_run):
    for rank in _ranks(tp_run, "indivisible"):
        assert "1 KV heads do not split evenly over 2 ranks" in rank["error"]


@pytest.mark.parametrize("arch", GATHERED)
def test_a_family_whose_plan_gathers_qkv_is_refused_with_the_reason(tp_run, arch):
    for rank in _ranks(tp_run, f"{arch}-gathered"):
        assert f"cannot run {arch!r} tensor-parallel: transformers' tp_plan gathers the q/k/v outputs" in rank["error"]


def test_a_plan_duohead_does_not_know_is_refused_with_the_reason(tp_run):
    for rank in _ranks(tp_run, "unknown-plan"):
        assert "'model.layers.*.self_attn.o_proj' is 'rowwise_rep'" in rank["error"]


def test_rank_layouts_slice_the_pattern():
    layouts = [LayerLayout.from_retrieval([True, False, False, True, True, False], 2, 6)]
    shards = [HeadShard(r, 3, 6, 2 * r, 2 * r + 2) for r in range(3)]
    assert [rank_layouts(layouts, s)[0] for s in shards] == [
        LayerLayout(1, 2, 6, (0, 1)),
        LayerLayout(1, 2, 6, (1, 0)),
        LayerLayout(1, 2, 6, (0, 1)),
    ]
    assert rank_layouts(layouts, None) is layouts


# ------------------------------------------------------------------ the CLI under torchrun


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny Llama with 4 KV heads and the real SmolLM2 tokenizer, a mixed pattern and a prompt file."""
    folder = tmp_path_factory.mktemp("tp-cli")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=600, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    HeadPattern(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]), sink=4, window=16).save(folder / "pattern.json")
    (folder / "prompt.txt").write_text("The quick brown fox jumps over the lazy dog. " * 12)
    return folder


def _run_torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(duohead.__file__).parent.parent)}
    done = subprocess.run([*_torchrun(), "--nproc-per-node", str(WORLD), "--standalone", "-m", "duohead", *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.default_split_margin  # the CLI under torchrun runs with the default; so must the one-process CLI here
def test_generate_under_torchrun_prints_once_with_each_ranks_kv(cli_model, tmp_path, capsys):
    common = ["--model", str(cli_model), "--pattern", str(cli_model / "pattern.json"), "--prompt-file",
              str(cli_model / "prompt.txt"), "--max-new-tokens", "6", "--prefill-chunk", "16"]  # fmt: skip
    done = _run_torchrun(["generate", "--tp", *common, "--report-json", str(tmp_path / "tp.json")])
    assert done.stdout.count("KV cache held") == 1  # rank 0 reports, rank 1 stays quiet
    assert f"on each of {WORLD} ranks" in done.stdout
    assert generate_main([*common, "--report-json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    tp, one = (json.loads((tmp_path / name).read_text()) for name in ("tp.json", "one.json"))
    assert tp["runs"]["duohead"]["tokens"] == one["runs"]["duohead"]["tokens"]
    assert tp["sparsity"] == one["sparsity"] == 3 / 8
    per_rank, single = tp["kv_per_rank"]["duohead"], one["runs"]["duohead"]["kv_memory"]
    for key in ("retrieval_bytes", "streaming_bytes", "full_bytes", "total_bytes"):
        assert sum(m[key] for m in per_rank) == single[key] == tp["runs"]["duohead"]["kv_memory"][key], key
    assert [m["full_bytes"] * WORLD for m in per_rank] == [single["full_bytes"]] * WORLD


def test_eval_under_torchrun_equals_one_process(cli_model, tmp_path, capsys):
    common = ["--model", str(cli_model), "--pattern", str(cli_model / "pattern.json"), "--methods", "pattern",
              "--sparsities", "0.5", "--tasks", "passkey", "--lengths", "200,300", "--depths", "0.5"]  # fmt: skip
    _run_torchrun(["eval", "--tp", *common, "--out", str(tmp_path / "tp")])
    assert eval_main([*common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    tp, one = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("tp", "one"))
    outputs = [[r["output"] for r in report["methods"][0]["results"]] for report in (tp, one)]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def test_tp_outside_torchrun_says_how_to_start_it(cli_model, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert generate_main(["--tp", "--model", str(cli_model), "--pattern", str(cli_model / "pattern.json")]) == 2
    assert "torchrun --nproc-per-node N -m duohead" in capsys.readouterr().err
