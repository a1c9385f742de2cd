"""The shipped head patterns: which model each one fits, `auto` (the pattern for a given model), the tie
structure of a cut, and the KV bytes a pattern's layout needs at a context length.

Each shipped pattern records its model's identity: `hf_id` (plus `aliases` and `name`), `architecture`
(model_type), layers x KV heads and head dim. `auto_pattern` picks the one pattern whose identity matches a
model's name_or_path and whose shape fits its config; it never guesses between several.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Any

import torch

from duohead.accounting import kv_bytes
from duohead.architecture import head_dim, num_kv_heads, pattern_layers, text_config
from duohead.pattern import HeadPattern, shipped_names

CALIBRATE_HINT = "duohead calibrate --model {model} --target-sparsity 0.5 --out DIR, then pass --pattern DIR"


def shipped_patterns() -> dict[str, HeadPattern]:
    """Every shipped pattern by name, read from the package data."""
    return {name: HeadPattern.load(name) for name in shipped_names()}


def model_key(name_or_path: str | os.PathLike) -> str:
    """How a model is compared by name: the last part of a Hugging Face id or path, lower case. A path inside the
    Hugging Face cache (`models--ORG--NAME/snapshots/HASH`) gives NAME."""
    parts = PurePath(str(name_or_path).rstrip("/")).parts
    for part in parts:
        if part.startswith("models--"):
            return part.split("--")[-1].lower()
    return parts[-1].lower() if parts else ""


def identity_keys(pattern: HeadPattern) -> set[str]:
    """The names a pattern's model goes by (its Hugging Face id, aliases and name), as `model_key`s."""
    names = [pattern.model.get("hf_id"), pattern.model.get("name"), *pattern.model.get("aliases", [])]
    return {model_key(n) for n in names if n}


def fits(pattern: HeadPattern, config: Any) -> bool:
    """Whether `pattern.validate(config)` passes (shape, head dim and architecture)."""
    try:
        pattern.validate(config)
    except ValueError:
        return False
    return True


def describe(name: str, pattern: HeadPattern) -> str:
    """One line: name, model id, shape, sink/window."""
    m = pattern.model
    dim = f" x {m['head_dim']}" if m.get("head_dim") else ""
    return f"{name} ({m.get('hf_id') or m.get('name', '?')}, {pattern.num_layers} x {pattern.num_kv_heads}{dim})"


def auto_pattern(config: Any, name_or_path: str | os.PathLike | None) -> tuple[str, HeadPattern]:
    """(name, pattern) of the shipped pattern made for this model: its identity matches `name_or_path` and it fits
    `config`. Raises ValueError naming what is shipped and the calibrate command otherwise."""
    key = model_key(name_or_path or getattr(config, "_name_or_path", "") or "")
    patterns = shipped_patterns()
    found = [(name, p) for name, p in patterns.items() if key and key in identity_keys(p) and fits(p, config)]
    if len(found) == 1:
        return found[0]
    shipped = "; ".join(describe(name, p) for name, p in patterns.items())
    model = name_or_path or getattr(config, "_name_or_path", None) or "MODEL"
    named = [name for name, p in patterns.items() if key and key in identity_keys(p)]
    why = (
        f"shipped pattern {named[0]} is named for it but does not fit its config ({_shape(config)})"
        if named
        else f"no shipped pattern is made for {model} ({_shape(config)})"
    )
    same_shape = [name for name, p in patterns.items() if fits(p, config)]
    if not named and same_shape:  # a renamed copy of a shipped pattern's model, or another model of its shape
        matches = ", ".join(describe(name, patterns[name]) for name in same_shape)
        which = "that model" if len(same_shape) == 1 else "one of those models"
        why += (
            f"; its shape matches {matches}: if it is {which} (a renamed copy), pass the pattern by name, e.g. "
            f"--pattern {same_shape[0]} (Python: enable(model, {same_shape[0]!r}))"
        )
    raise ValueError(f"pattern 'auto': {why}. Shipped: {shipped}. Make one with: {CALIBRATE_HINT.format(model=model)}")


def _shape(config: Any) -> str:
    text = text_config(config)
    layers, kv_heads, dim = text.num_hidden_layers, num_kv_heads(text), head_dim(text)
    covered = len(pattern_layers(text))
    layers = f"{layers} layers" if covered == layers else f"{covered} global layers (of {layers}; a pattern covers those)"
    return f"{getattr(text, 'model_type', '?')}, {layers} x {kv_heads} KV heads x head dim {dim}"


def resolve_pattern(pattern: HeadPattern | str | os.PathLike, config: Any) -> HeadPattern:
    """A `HeadPattern` as given, "auto" (the shipped pattern for the model of `config`), or a file/folder/shipped name."""
    if isinstance(pattern, HeadPattern):
        return pattern
    if not isinstance(pattern, (str, os.PathLike)):
        raise TypeError(
            f"pattern must be a HeadPattern, a pattern file or folder, a shipped pattern name or 'auto'; got {pattern!r}"
        )
    if str(pattern) == "auto":
        return auto_pattern(config, getattr(config, "_name_or_path", None))[1]
    return HeadPattern.load(pattern)


def layout_kv_bytes(
    layout: torch.Tensor, head_dim: int, sink: int, window: int, tokens: int, itemsize: int, batch: int = 1, rollback: int = 0
) -> dict[str, int]:
    """KV-cache bytes for `tokens` tokens with layout [L, Hkv] (True = retrieval), summed over layers with the one
    formula (`duohead.accounting.kv_bytes`): retrieval heads keep every token, streaming heads S + W + rollback.
    Keys as `DuoCache.memory()`: retrieval_bytes, streaming_bytes, full_bytes, total_bytes."""
    totals = {"retrieval_bytes": 0, "streaming_bytes": 0, "full_bytes": 0}
    for row in layout:
        retrieval = int(row.sum())
        layer = kv_bytes(retrieval, row.numel() - retrieval, tokens, sink + window + rollback, head_dim, itemsize, batch)
        for key, value in layer.items():
            totals[key] += value
    return {**totals, "total_bytes": totals["retrieval_bytes"] + totals["streaming_bytes"]}
