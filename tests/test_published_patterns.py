"""The six published DuoAttention patterns: read exactly by duohead's own reader (tiny optimiser overshoots clipped,
as the reference clips on load), shipped as package data equal to the conversion, and written back to the reference
format with the same gates."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from duohead import HeadPattern
from duohead.pattern import CLIP_TOLERANCE, DUO_TSV

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "tests" / "data" / "published-patterns"
FOLDERS = sorted(p.name for p in PUBLISHED.iterdir() if (p / DUO_TSV).is_file())


def import_script():
    spec = importlib.util.spec_from_file_location("import_published_patterns", ROOT / "patterns" / "import_published.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def original(folder: str) -> np.ndarray:
    """The published gates [L, Hkv] as numpy reads them (float64 of the file's %.18e text)."""
    return np.loadtxt(PUBLISHED / folder / DUO_TSV, delimiter="\t", ndmin=2)


def test_six_published_folders_are_there():
    assert len(FOLDERS) == 6
    assert (PUBLISHED / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("folder", FOLDERS)
def test_published_file_loads_with_clipping_within_tolerance(folder):
    raw = original(folder)
    pattern = HeadPattern.from_duo_attention(PUBLISHED / folder)
    assert torch.equal(pattern.gates, torch.tensor(np.clip(raw, 0, 1), dtype=torch.float32))
    assert np.array_equal(raw.astype(np.float32).astype(np.float64), raw)  # the file's values are float32: no rounding
    outside = int(((raw < 0) | (raw > 1)).sum())
    assert pattern.provenance.get("clipped", {}).get("gates", 0) == outside
    assert (pattern.sink, pattern.window) == (128, 256)


def test_llama2_file_needed_clipping():
    """The issue's example: Llama-2-7B-32K has layer 0, KV head 1 at -0.000534 and was refused before."""
    raw = original("Llama-2-7B-32K-Instruct")
    assert (raw < 0).sum() > 0 and raw.min() > -CLIP_TOLERANCE
    assert HeadPattern.from_duo_attention(PUBLISHED / "Llama-2-7B-32K-Instruct").gates.min().item() == 0.0


@pytest.mark.parametrize("folder", FOLDERS)
def test_round_trip_to_reference_format_gives_identical_gates(folder, tmp_path):
    raw = original(folder)
    pattern = HeadPattern.from_duo_attention(PUBLISHED / folder)
    pattern.save(tmp_path / "p.json")
    HeadPattern.load(tmp_path / "p.json").to_duo_attention(tmp_path / "ref")
    written = np.loadtxt(tmp_path / "ref" / DUO_TSV, delimiter="\t", ndmin=2)
    assert np.array_equal(written, np.clip(raw, 0, 1))
    # every gate that was not clipped comes back byte for byte (the reference's %.18e notation)
    cells = lambda path: [row.split("\t") for row in path.read_text().splitlines()]  # noqa: E731
    source, back = cells(PUBLISHED / folder / DUO_TSV), cells(tmp_path / "ref" / DUO_TSV)
    kept = [(i, j) for i, j in np.argwhere((raw >= 0) & (raw <= 1)).tolist()]
    assert len(kept) > raw.size // 2 and all(source[i][j] == back[i][j] for i, j in kept)
    assert json.loads((tmp_path / "ref" / "config.json").read_text()) == {"sink_size": 128, "recent_size": 256}


def test_shipped_published_patterns_equal_the_conversion():
    script = import_script()
    assert sorted(f for f, *_ in script.PUBLISHED.values()) == FOLDERS
    for name, (folder, hf_id, _, model_type, head_dim) in script.PUBLISHED.items():
        shipped = HeadPattern.load(name)
        converted = script.convert(name, PUBLISHED)
        assert shipped.to_dict() == converted.to_dict(), name
        assert torch.equal(shipped.gates, torch.tensor(np.clip(original(folder), 0, 1), dtype=torch.float32))
        assert shipped.model["hf_id"] == hf_id and shipped.model["architecture"] == model_type
        assert shipped.model["head_dim"] == head_dim and shipped.default_sparsity == 0.5
        prov = shipped.provenance
        assert prov["source_commit"] == "fe93c314" and "MIT" in prov["license"]
        assert prov["calibration"]["num_steps"] == 2000 and prov["calibration"]["sink_size"] == 128
        config = json.loads((PUBLISHED / folder / "config.json").read_text())
        assert prov["calibration"]["context_length_max"] == config["context_length_max"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("1.0\tnan\n", "non-finite"),
        ("1.0\t-0.02\n", r"layer 0, KV head 1 is -0.02"),  # past the tolerance: not an optimiser overshoot
        ("1.5\t0.5\n", r"layer 0, KV head 0 is 1.5"),
        ("1.0\t0.5\n0.5\n", "rows have different lengths"),
    ],
)
def test_reader_refuses_what_clipping_must_not_hide(tmp_path, text, message):
    (tmp_path / DUO_TSV).write_text(text)
    with pytest.raises(ValueError, match=message):
        HeadPattern.from_duo_attention(tmp_path)


def test_reader_clips_within_tolerance_and_says_so(tmp_path):
    (tmp_path / DUO_TSV).write_text("1.004\t-0.009\n0.5\t0.25\n")
    pattern = HeadPattern.from_duo_attention(tmp_path)
    assert pattern.gates.tolist() == [[1.0, 0.0], [0.5, 0.25]]
    assert not math.copysign(1.0, pattern.gates[0, 1].item()) < 0  # no negative zero written back
    assert pattern.provenance["clipped"]["gates"] == 2
    assert pattern.provenance["clipped"]["largest_distance"] == pytest.approx(0.009)
