"""HeadPattern: layouts, files (own format and the reference's), and every bad-input error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from duohead import HeadPattern


def sample_pattern() -> HeadPattern:
    gates = torch.tensor([[1.0, 0.25, 0.0], [0.5, 0.5, 0.75], [0.125, 1.0, 0.5]])
    return HeadPattern(gates, sink=16, window=64, model={"name": "tiny", "architecture": "llama"}, provenance={"method": "test"})


def test_binarize_by_sparsity_streams_the_lowest_gates_with_deterministic_ties():
    pattern = sample_pattern()
    layout = pattern.binarize(sparsity=4 / 9)
    # the four lowest: 0.0, 0.125, 0.25, then the first 0.5 in (layer, head) order, i.e. layer 1 head 0
    expected = torch.tensor([[True, False, False], [False, True, True], [False, True, True]])
    assert torch.equal(layout, expected)
    assert HeadPattern.sparsity_of(layout) == pytest.approx(4 / 9)
    assert torch.equal(pattern.binarize(sparsity=4 / 9), layout)  # same call, same cut
    assert pattern.binarize(sparsity=0.0).all() and not pattern.binarize(sparsity=1.0).any()


def test_binarize_by_threshold():
    layout = sample_pattern().binarize(threshold=0.5)
    assert torch.equal(layout, sample_pattern().gates >= 0.5)
    assert torch.equal(sample_pattern().binarize(), layout)  # default threshold 0.5


def test_save_load_round_trip_is_human_readable(tmp_path):
    path = sample_pattern().save(tmp_path / "p.json")
    text = path.read_text()
    assert '"format": "duohead-pattern"' in text and "[1.0, 0.25, 0.0]" in text
    loaded = HeadPattern.load(path)
    assert torch.equal(loaded.gates, sample_pattern().gates)
    assert (loaded.sink, loaded.window) == (16, 64)
    assert loaded.model["name"] == "tiny" and loaded.model["num_layers"] == 3
    assert loaded.provenance == {"method": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind
    assert path.stat().st_mode & 0o044  # readable by others, like any file the user writes (umask permitting)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        sample_pattern().save(path)
    assert path.read_text() == "mine"
    sample_pattern().save(path, overwrite=True)
    assert HeadPattern.load(path).sink == 16


def test_duo_attention_format_round_trip(tmp_path):
    sample_pattern().to_duo_attention(tmp_path)
    # np.savetxt's %.18e, as the reference writes
    first_row = "1.000000000000000000e+00\t2.500000000000000000e-01\t0.000000000000000000e+00"
    assert (tmp_path / "full_attention_heads.tsv").read_text().splitlines()[0] == first_row
    assert json.loads((tmp_path / "config.json").read_text()) == {"sink_size": 16, "recent_size": 64}
    loaded = HeadPattern.from_duo_attention(tmp_path)
    assert torch.equal(loaded.gates, sample_pattern().gates) and (loaded.sink, loaded.window) == (16, 64)
    assert torch.equal(HeadPattern.load(tmp_path).gates, loaded.gates)  # load() accepts the folder too
    with pytest.raises(FileExistsError):
        sample_pattern().to_duo_attention(tmp_path)


PUBLISHED = Path(__file__).parent / "data" / "published-patterns" / "Meta-Llama-3.1-8B-Instruct"  # MIT, see its README


def test_reads_a_published_reference_pattern():
    """A file the reference wrote (np.savetxt, `%.18e`), not duohead's own writer: every gate exact, sink/window
    from its config, and it fits Llama-3.1-8B (32 layers x 8 KV heads)."""
    lines = (PUBLISHED / "full_attention_heads.tsv").read_text().splitlines()
    assert re.fullmatch(r"\d\.\d{18}e[+-]\d\d(\t\d\.\d{18}e[+-]\d\d)*", lines[0])  # the reference's notation
    expected = torch.tensor([[float(x) for x in line.split("\t")] for line in lines])
    assert expected.shape == (32, 8) and bool(((expected >= 0) & (expected <= 1)).all())
    pattern = HeadPattern.from_duo_attention(PUBLISHED)
    assert torch.equal(pattern.gates, expected)
    assert (pattern.sink, pattern.window) == (128, 256)
    assert int((pattern.gates == 1).sum()) == 57 and int((pattern.gates == 0).sum()) == 7
    pattern.validate(LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096))
    assert int((~pattern.binarize(sparsity=0.5)).sum()) == 128


def test_validate_against_model_config():
    sample_pattern().validate(LlamaConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3))
    with pytest.raises(ValueError, match=r"made for tiny with 3 layers x 3 KV heads.*4 layers x 3 KV heads"):
        sample_pattern().validate(LlamaConfig(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=3))


@pytest.mark.parametrize(
    "gates, message",
    [
        ([[0.5, float("nan")]], "non-finite value nan at layer 0, KV head 1"),
        ([[0.5], [float("inf")]], "non-finite value inf at layer 1, KV head 0"),
        ([[0.5, 1.5]], r"must lie in \[0, 1\]; layer 0, KV head 1 is 1.5"),
        ([[-0.1]], r"must lie in \[0, 1\]"),
        ([[0.5, 0.5], [0.5]], "equal-length rows"),
        ([0.5, 0.5], "2-D table"),
    ],
)
def test_bad_gates(gates, message):
    with pytest.raises(ValueError, match=message):
        HeadPattern(gates)


@pytest.mark.parametrize(
    "kwargs, message", [({"sink": -1}, "'sink' must be an integer >= 0"), ({"window": 0}, "'window' must be an integer >= 1")]
)
def test_bad_sink_window(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadPattern([[1.0]], **kwargs)


@pytest.mark.parametrize("sparsity", [-0.1, 1.01, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\]"):
        sample_pattern().binarize(sparsity=sparsity)


def test_sparsity_and_threshold_together_is_an_error():
    with pytest.raises(ValueError, match="not both"):
        sample_pattern().binarize(sparsity=0.5, threshold=0.5)


def edit_saved(tmp_path, change) -> str:
    path = tmp_path / "p.json"
    data = json.loads(sample_pattern().save(path).read_text())
    change(data)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(version=99), r"'version' is 99; this duohead reads versions 1, 2"),
        (lambda d: d.update(format="other"), "'format' must be 'duohead-pattern'"),
        (lambda d: d.pop("window"), "missing field 'window'"),
        (lambda d: d.update(window=0), "'window' must be an integer >= 1"),
        (lambda d: d["gates"][1].__setitem__(0, 7.0), r"p.json: field 'gates' must lie in \[0, 1\]"),
        (lambda d: d["gates"].pop(), "field 'gates' is 2 x 3 but field 'model' declares 3 layers x 3 KV heads"),
    ],
)
def test_bad_files_name_file_and_field(tmp_path, change, message):
    path = edit_saved(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        HeadPattern.load(path)


def test_truncated_file(tmp_path):
    path = sample_pattern().save(tmp_path / "p.json")
    path.write_text(path.read_text()[:-30])
    with pytest.raises(ValueError, match="p.json: not valid JSON.*truncated"):
        HeadPattern.load(path)


def test_missing_file_and_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped pattern name"):
        HeadPattern.load("no-such-pattern")


def test_bad_duo_attention_tsv(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("1.0\t0.5\n0.5\tx\n")
    with pytest.raises(ValueError, match="line 2 must be tab-separated numbers"):
        HeadPattern.from_duo_attention(tmp_path)
