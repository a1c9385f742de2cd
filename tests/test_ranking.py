"""Patterns that rank heads: one calibration serves every sparsity with nested layouts, reproduces its calibrated
layout at its target, and old files read unchanged."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from calibration_testbed import carrier_model, word_tokenizer
from tiny_models import tiny_model

import duohead
from duohead.calibrate.data import PasskeyDataset, PasskeySpec
from duohead.calibrate.gates import GatedModel
from duohead.calibrate.settings import TrainConfig
from duohead.calibrate.train import Calibrator
from duohead.commands.calibrate import main as calibrate_main
from duohead.pattern import HeadPattern, cut, find_pattern, shipped_names

SPARSITIES = [i / 16 for i in range(17)]


def streaming_set(pattern: HeadPattern, sparsity: float) -> set[int]:
    return set((~pattern.binarize(sparsity=sparsity)).flatten().nonzero().flatten().tolist())


def binary_pattern_with_ranking(seed: int = 0) -> HeadPattern:
    """4 x 4 heads, 0/1 gates cut at 50%, and a ranking consistent with them."""
    gen = torch.Generator().manual_seed(seed)
    evidence = torch.rand(4, 4, generator=gen)
    gates = cut(evidence, 0.5).float()
    return HeadPattern(gates, sink=4, window=8, default_sparsity=0.5, ranking=(2 * gates + evidence) / 3)


@pytest.fixture(scope="module")
def calibrated():
    """A relaxed-rule calibration of the testbed (4 layers x 4 KV heads) at 50%: (calibrator, its pattern)."""
    tokenizer = word_tokenizer()
    gated = GatedModel(
        carrier_model(len(tokenizer), [0, 3, 5, 6, 9, 10, 12, 15]), sink=4, window=16, gradient_checkpointing=False
    )
    config = TrainConfig(
        steps=10, lr=0.1, reg=0.05, target_sparsity=0.5, sink=4, window=16, ctx_min=120, ctx_max=200,
        num_passkeys=3, passkey_words=4, seed=0, rule="relaxed",
    )  # fmt: skip
    calibrator = Calibrator(gated, PasskeyDataset(tokenizer, PasskeySpec(120, 200, 3, 4), seed=0), config)
    for _ in range(config.steps):
        calibrator.step()
    pattern = HeadPattern(calibrator.gates.cpu(), sink=4, window=16, default_sparsity=0.5, ranking=calibrator.ranking())
    return calibrator, pattern


def test_a_calibration_ranks_every_head_and_its_target_gives_the_calibrated_layout(calibrated):
    calibrator, pattern = calibrated
    assert pattern.ranking is not None and pattern.ranking.unique().numel() > 2  # an order, not two sides
    assert torch.equal(pattern.binarize(sparsity=0.5), cut(calibrator.gates.cpu(), 0.5))


def test_layouts_are_nested_for_every_pair_of_sparsities(calibrated):
    for pattern in (calibrated[1], binary_pattern_with_ranking(), HeadPattern(torch.rand(5, 3))):
        sets = [streaming_set(pattern, s) for s in SPARSITIES]
        for lower, higher in zip(sets, sets[1:], strict=False):
            assert lower <= higher


def test_the_cli_writes_the_ranking_in_a_version_2_file(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", "3", "--ctx-min", "300", "--ctx-max", "400", "--num-passkeys", "2", "--passkey-words", "4"]
    assert calibrate_main(["--model", str(tiny_model_dir), "--out", str(out), "--sink", "4", "--window", "16", *args]) == 0
    data = json.loads((out / "pattern.json").read_text())
    assert data["version"] == 2 and len(data["ranking"]) == len(data["gates"])
    pattern = HeadPattern.load(out / "pattern.json")
    assert torch.equal(pattern.binarize(sparsity=0.5), cut(pattern.gates, 0.5))


def test_files_without_a_ranking_are_read_and_written_unchanged_as_version_1(tmp_path):
    """The shipped files read and write back byte for byte: the published ones (graded gates, no ranking) as version
    1, SmolLM2's (a ranking) as version 2."""
    for name in shipped_names():
        original = find_pattern(name)
        pattern = HeadPattern.load(original)
        saved = pattern.save(tmp_path / f"{name}.json")
        assert saved.read_text() == original.read_text()  # byte for byte
        version = json.loads(original.read_text())["version"]
        assert (pattern.ranking is None) == (version == 1) and (name == "smollm2-135m-instruct") == (version == 2)
    ranked = binary_pattern_with_ranking()
    again = HeadPattern.load(ranked.save(tmp_path / "ranked.json"))
    assert torch.equal(again.ranking, ranked.ranking) and torch.equal(again.gates, ranked.gates)


def test_a_damaged_ranking_is_refused(tmp_path):
    good = binary_pattern_with_ranking()
    with pytest.raises(ValueError, match="does not reproduce the gates' layout at the calibrated sparsity 0.5"):
        HeadPattern(good.gates, default_sparsity=0.5, ranking=1 - good.ranking)
    with pytest.raises(ValueError, match="must have the gates' shape"):
        HeadPattern(good.gates, ranking=torch.zeros(2, 2))
    data = good.to_dict()
    data["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'ranking' needs version 2"):
        HeadPattern.load(tmp_path / "v1.json")


def test_enable_warns_off_target_only_where_the_pattern_carries_no_ranking(caplog):
    ranked = binary_pattern_with_ranking()
    unranked = HeadPattern(ranked.gates, sink=4, window=8, default_sparsity=0.5)
    for pattern, warned in ((ranked, False), (unranked, True)):
        model = tiny_model("llama", layers=4, heads=8, kv_heads=4)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="duohead"):
            duohead.enable(model, pattern, sparsity=0.75)
        assert any("inside a tie" in r.message for r in caplog.records) == warned


def test_ties_in_a_ranking_are_reported(caplog):
    gates = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    ranking = (2 * gates + 0.5) / 3  # every head tied with its side
    model = tiny_model("llama", layers=4, heads=8, kv_heads=4)
    with caplog.at_level(logging.WARNING, logger="duohead"):
        duohead.enable(model, HeadPattern(gates, sink=4, window=8, default_sparsity=0.5, ranking=ranking), sparsity=0.75)
    assert any("share ranking score" in r.message for r in caplog.records)


def test_off_target_cuts_follow_the_ranking_not_the_gates():
    """At 75% the extra streaming heads are the retrieval heads lowest in the ranking, not the first by head order."""
    pattern = binary_pattern_with_ranking(seed=3)
    expected = cut(pattern.ranking, 0.75)
    assert torch.equal(pattern.binarize(sparsity=0.75), expected)
    assert not torch.equal(expected, cut(pattern.gates, 0.75))  # the gates alone would pick other heads
