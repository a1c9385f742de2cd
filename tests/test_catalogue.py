"""The catalogue: shipped patterns as package data, `duohead patterns [NAME]`, `auto`, the tie structure of a cut,
the default cut a pattern carries, model-identity validation, and pattern folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from transformers import LlamaConfig, MistralConfig

import duohead
from duohead import HeadPattern
from duohead.catalogue import auto_pattern, model_key, shipped_patterns
from duohead.commands.patterns import main as patterns_main
from duohead.commands.support import load_pattern_for_cli
from duohead.pattern import find_pattern, shipped_names, tie_structure

SHIPPED = [
    "llama-2-7b-32k-instruct",
    "llama-3-8b-instruct-gradient-1048k",
    "llama-3-8b-instruct-gradient-4194k",
    "llama-3.1-8b-instruct",
    "mistral-7b-instruct-v0.2",
    "mistral-7b-instruct-v0.3",
    "smollm2-135m-instruct",
]
PACKAGE = Path(duohead.__file__).resolve().parent


def real_config(cls=LlamaConfig, layers=32, kv_heads=8, head_dim=128, name=""):
    """A config with a real model's attention shape (hidden and MLP sizes are irrelevant here)."""
    config = cls(
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=64,
        intermediate_size=64,
        vocab_size=97,
    )
    config._name_or_path = name
    return config


def test_seven_shipped_patterns_are_package_data():
    assert shipped_names() == SHIPPED
    for name in SHIPPED:
        path = Path(str(find_pattern(name)))
        assert path.is_relative_to(PACKAGE / "patterns")  # inside the package, not a path relative to the repository
    for name in SHIPPED[:-1]:
        assert (PACKAGE / "patterns" / name / "LICENSE").read_text().startswith("MIT License")


def test_patterns_command_lists_seven(capsys):
    assert patterns_main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 8 and out[0].split()[:2] == ["name", "model"]
    assert [line.split()[0] for line in out[1:]] == SHIPPED
    assert "meta-llama/Llama-3.1-8B-Instruct" in out[4] and "32 x 8 x 128" in out[4] and "128/256" in out[4]
    assert "DuoAttention authors, 2000 steps, ctx 1000-128000" in out[4]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out[7] and "30 x 3 x 64" in out[7]


def test_patterns_command_shows_one(capsys):
    assert patterns_main(["mistral-7b-instruct-v0.2"]) == 0
    out = capsys.readouterr().out
    assert "gate histogram:" in out and "[0.9, 1.0]" in out
    # many gates are exactly 1.0 (and bf16-rounded below it): both cuts fall inside a tie, and the output says so
    assert "cut at 0.5: 128 of 256 KV heads stream; the cut falls inside a tie: 20 heads share gate 0.996094 and 2 of them" in out
    assert "cut at 0.75: 192 of 256 KV heads stream; the cut falls inside a tie: 110 heads share gate 1 and 46 of them" in out
    assert "picked by (layer, head) order" in out
    assert "KV cache at 131,072 tokens, 2 bytes per value, batch 1, cut 0.5: 8.02 GiB (full attention 16.00 GiB)" in out
    assert "source: https://github.com/mit-han-lab/duo-attention" in out and "clipped on import: 5 gates" in out


def test_patterns_command_unknown_name(capsys):
    assert patterns_main(["no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no shipped pattern 'no-such-model'" in err and "llama-3.1-8b-instruct" in err


def test_tie_structure_counts_equals_at_the_cut_and_binarize_picks_by_layer_head_order():
    gates = torch.tensor([[0.2, 1.0, 1.0], [1.0, 0.1, 1.0]])
    ties = tie_structure(gates, 0.5)  # 3 stream: 0.1, 0.2 and one of the four 1.0s
    assert ties == {"streaming": 3, "cut_gate": 1.0, "tied": 4, "tied_streaming": 1, "inside_tie": True}
    layout = HeadPattern(gates).binarize(sparsity=0.5)
    assert layout.tolist() == [[False, False, True], [True, False, True]]  # the first 1.0 in (layer, head) order streams
    below = {"streaming": 2, "cut_gate": pytest.approx(0.2), "tied": 1, "tied_streaming": 1, "inside_tie": False}
    assert tie_structure(gates, 2 / 6) == below
    assert tie_structure(gates, 0.0)["cut_gate"] is None
    # A tie that ends exactly at the cut: both 0.2s stream, the next gate up differs, so order decides nothing.
    ends = tie_structure(torch.tensor([[0.1, 0.2], [0.2, 0.9]]), 0.75)
    assert ends == {"streaming": 3, "cut_gate": pytest.approx(0.2), "tied": 2, "tied_streaming": 2, "inside_tie": False}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),  # the model's former id
        ("/models/Meta-Llama-3.1-8B-Instruct/", "llama-3.1-8b-instruct"),  # a local folder named after it
        ("/hub/models--gradientai--Llama-3-8B-Instruct-Gradient-1048k/snapshots/0123", "llama-3-8b-instruct-gradient-1048k"),
        ("gradientai/Llama-3-8B-Instruct-Gradient-4194k", "llama-3-8b-instruct-gradient-4194k"),
    ],
)
def test_auto_picks_by_name_and_shape(name, expected):
    assert auto_pattern(real_config(name=name), None)[0] == expected


def test_auto_picks_mistral_and_mha_shapes():
    mistral = real_config(MistralConfig, name="mistralai/Mistral-7B-Instruct-v0.3")
    assert auto_pattern(mistral, None)[0] == "mistral-7b-instruct-v0.3"
    llama2 = real_config(kv_heads=32, name="togethercomputer/Llama-2-7B-32K-Instruct")
    assert auto_pattern(llama2, None)[0] == "llama-2-7b-32k-instruct"


def test_auto_refuses_an_unknown_model_with_the_list_and_the_calibrate_command():
    with pytest.raises(ValueError) as e:
        auto_pattern(real_config(name="someone/My-Llama-8B"), None)
    message = str(e.value)
    assert "no shipped pattern is made for someone/My-Llama-8B (llama, 32 layers x 8 KV heads x head dim 128)" in message
    assert "llama-3.1-8b-instruct (meta-llama/Llama-3.1-8B-Instruct, 32 x 8 x 128)" in message
    assert "duohead calibrate --model someone/My-Llama-8B" in message


def test_auto_names_the_shipped_pattern_of_a_renamed_copy_but_does_not_pick_it():
    with pytest.raises(ValueError) as e:
        auto_pattern(real_config(kv_heads=32, name="/models/my-copy"), None)
    message = str(e.value)
    assert "its shape matches llama-2-7b-32k-instruct (togethercomputer/Llama-2-7B-32K-Instruct, 32 x 32 x 128): if " in message
    assert "that model (a renamed copy), pass the pattern by name, e.g. --pattern llama-2-7b-32k-instruct" in message
    with pytest.raises(ValueError, match="if it is one of those models") as e:  # the 8B Llama shape: three patterns
        auto_pattern(real_config(name="/models/my-llama"), None)
    assert "llama-3-8b-instruct-gradient-1048k" in str(e.value) and "llama-3.1-8b-instruct (" in str(e.value)


@pytest.mark.parametrize(
    "config",
    [
        real_config(MistralConfig, name="meta-llama/Llama-3.1-8B-Instruct"),  # right name, wrong architecture
        real_config(layers=16, name="meta-llama/Llama-3.1-8B-Instruct"),  # right name, wrong depth
        real_config(head_dim=64, name="meta-llama/Llama-3.1-8B-Instruct"),  # right name, wrong head dim
    ],
)
def test_auto_refuses_a_named_model_whose_config_does_not_fit(config):
    with pytest.raises(ValueError, match="llama-3.1-8b-instruct is named for it but does not fit its config"):
        auto_pattern(config, None)


def test_model_key():
    assert model_key("meta-llama/Llama-3.1-8B-Instruct") == "llama-3.1-8b-instruct"
    assert model_key("/x/models--org--Name/snapshots/abc/") == "name"


def test_validate_checks_head_dim_and_architecture():
    llama31 = HeadPattern.load("llama-3.1-8b-instruct")
    llama31.validate(real_config())
    message = "32 layers x 8 KV heads x head dim 128; this model \\(llama\\) has 32 layers x 8 KV heads x head dim 64"
    with pytest.raises(ValueError, match=message):
        llama31.validate(real_config(head_dim=64))
    with pytest.raises(ValueError, match="a 'llama' model; this model is 'mistral'"):
        llama31.validate(real_config(MistralConfig))


def test_enable_uses_the_calibrated_cut_by_default():
    """A pattern calibrated for sparsity 0.5 streams half its heads, where threshold 0.5 would stream fewer."""
    gates = torch.tensor([[0.9, 0.6], [0.7, 0.1], [0.8, 0.55]])  # threshold 0.5 streams 1 of 6; sparsity 0.5 streams 3
    for pattern in (HeadPattern(gates, provenance={"target_sparsity": 0.5}), HeadPattern(gates, default_sparsity=0.5)):
        model = duohead.enable(tiny_model("llama"), pattern)
        assert model._duohead.sparsity == 0.5
        assert model._duohead.layout.tolist() == [[True, False], [True, False], [True, False]]
        # an explicit threshold beats the default cut
        assert duohead.enable(model, pattern, threshold=0.5)._duohead.sparsity == pytest.approx(1 / 6)
    # no cut recorded: threshold 0.5
    assert duohead.enable(tiny_model("llama"), HeadPattern(gates))._duohead.sparsity == pytest.approx(1 / 6)


def test_default_sparsity_saved_loaded_and_checked(tmp_path):
    path = HeadPattern(torch.rand(2, 2), default_sparsity=0.25).save(tmp_path / "p.json")
    assert '"default_sparsity": 0.25' in path.read_text()
    assert HeadPattern.load(path).default_sparsity == 0.25
    for bad in (1.5, "half", True):
        with pytest.raises(ValueError, match="'default_sparsity' must be a number in \\[0, 1\\]"):
            HeadPattern(torch.rand(2, 2), default_sparsity=bad)
    assert HeadPattern.load("smollm2-135m-instruct").default_sparsity == 0.5  # its calibration's target


def test_gates_are_written_exactly(tmp_path):
    gates = torch.tensor([[0.000431, 1e-05, 0.3333333432674408], [1.0, 0.0, 0.123456789]])
    HeadPattern(gates).save(tmp_path / "p.json")
    assert torch.equal(HeadPattern.load(tmp_path / "p.json").gates, gates)  # no rounding to 6 decimals
    assert "[0.000431, 1e-05, 0.33333334]" in (tmp_path / "p.json").read_text()


def test_a_folder_holding_pattern_json_is_a_pattern(tmp_path):
    HeadPattern(torch.tensor([[0.9, 0.1]]), sink=4, window=8).save(tmp_path / "pattern.json")
    assert HeadPattern.load(tmp_path).window == 8
    assert load_pattern_for_cli(str(tmp_path), "some-model").window == 8
    assert HeadPattern.load(PACKAGE / "patterns" / "smollm2-135m-instruct").num_layers == 30


def test_cli_pattern_auto_says_which_pattern_it_picked(capsys):
    pattern = load_pattern_for_cli("auto", None)  # the default model, SmolLM2-135M-Instruct
    assert pattern.num_layers == 30
    err = capsys.readouterr().err
    assert "pattern auto: smollm2-135m-instruct (shipped, made for HuggingFaceTB/SmolLM2-135M-Instruct)" in err


def test_cli_pattern_auto_and_missing_pattern_message():
    with pytest.raises(ValueError, match="pass --pattern FILE\\|NAME\\|auto"):
        load_pattern_for_cli(None, "some-model")


def test_wheel_contains_the_shipped_patterns(tmp_path):
    """Build a wheel from a copy of the project (pyproject + README + package) and look inside."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "duohead", src / "duohead", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")]
    subprocess.run([*build, str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("duohead-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"duohead/patterns/{name}/pattern.json" in names
    assert "duohead/patterns/llama-3.1-8b-instruct/LICENSE" in names
    assert len(shipped_patterns()) == 7


def test_plan_uses_the_pattern_cut_and_shipped_names(capsys):
    from duohead.commands.plan import main as plan_main

    config = str(Path(__file__).parent / "data" / "llama-3.1-8b-instruct-config.json")
    assert plan_main(["--model", config, "--pattern", "llama-3.1-8b-instruct", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "duohead: 128 of 256 KV heads stream (sparsity 0.50), sink 128, window 256" in out
    assert "KV cache                      16.00 GiB           8.02 GiB" in out  # as `duohead patterns NAME` says
