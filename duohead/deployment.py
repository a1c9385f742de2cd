"""From a head pattern and the user's choices to the layout a model runs: one place for both engines.

`duohead.enable` (transformers) and the vLLM plugin (`duohead.vllm`) take the same arguments (a pattern, and
`sparsity` / `threshold` / `sink` / `window`, each optional) and must turn them into the same layout; `deploy`
is that rule, written once. Shape letters: L layers, Hkv KV heads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from duohead.architecture import check_sink_window
from duohead.catalogue import resolve_pattern
from duohead.pattern import HeadPattern, check_positions, tie_structure

logger = logging.getLogger("duohead")


@dataclass(frozen=True)
class Deployment:
    """What a model runs: the pattern, its layout [L, Hkv] (bool, True = retrieval), sink and window (tokens)."""

    pattern: HeadPattern
    layout: torch.Tensor
    sink: int
    window: int

    @property
    def sparsity(self) -> float:
        """Fraction of KV heads that stream."""
        return HeadPattern.sparsity_of(self.layout)

    def describe(self) -> str:
        streaming = int((~self.layout).sum())
        return (
            f"{streaming} of {self.layout.numel()} KV heads stream (sparsity {self.sparsity:.3f}), "
            f"sink {self.sink}, window {self.window}"
        )


def deploy(
    pattern: HeadPattern | str | os.PathLike,
    config: Any,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    window: int | None = None,
) -> Deployment:
    """The layout a model of transformers config `config` runs with `pattern`.

    `pattern` is a `HeadPattern`, a file or folder, a shipped name, or "auto" (the shipped pattern made for this
    model). `sparsity` (fraction of KV heads that stream) or `threshold` picks the layout; with neither, the
    pattern's calibrated cut (`default_sparsity`), else threshold 0.5. `sink` / `window` override the pattern's.
    Raises ValueError (or FileNotFoundError) naming the problem when the pattern does not fit the model.
    """
    pattern = resolve_pattern(pattern, config)
    pattern.validate(config)
    if sparsity is None and threshold is None:
        sparsity = pattern.default_sparsity
    sink = pattern.sink if sink is None else sink
    window = pattern.window if window is None else window
    check_sink_window(sink, window)
    check_positions(sink, window, config)
    layout = pattern.binarize(sparsity=sparsity, threshold=threshold)
    if threshold is None and sparsity is not None:
        _warn_if_cut_in_tie(pattern, sparsity)
    return Deployment(pattern, layout, sink, window)


def _warn_if_cut_in_tie(pattern: HeadPattern, sparsity: float) -> None:
    """Warn when the cut at `sparsity` falls among equal scores of the pattern's order (its ranking, else its gates):
    then (layer, head) order, not calibration, picks which of them stream (a converged calibration without a ranking
    leaves 0/1 gates: a layout for its own target only). At the pattern's own calibrated cut (`default_sparsity`) a
    tie is the pattern's business: logged at info level."""
    tie = tie_structure(pattern.order_scores, sparsity)
    if not tie["inside_tie"]:
        return
    score = "ranking score" if pattern.ranking is not None else "gate"
    where = (
        f"the cut at sparsity {sparsity:g} falls inside a tie: {tie['tied']} heads share {score} {tie['cut_gate']:.6g} "
        f"and {tie['tied_streaming']} of them stream, chosen by (layer, head) order"
    )
    if sparsity == pattern.default_sparsity:
        logger.info("duohead: %s", where)
        return
    calibrated = f"this pattern was calibrated for sparsity {pattern.default_sparsity:g}; " if pattern.default_sparsity else ""
    logger.warning(
        "duohead: %s, not by calibration (%scalibrate one for this sparsity: duohead calibrate --target-sparsity %g)",
        where, calibrated, sparsity,
    )  # fmt: skip
