"""Head patterns: one gate per (layer, KV head), the sink/window sizes, and where they came from.

A gate near 1 means the KV head retrieves (keeps the full KV cache); near 0 means it streams
(keeps `sink` + `window` tokens). `binarize` turns gates into a layout for inference.

File format (JSON, one file, human-readable)::

    {"format": "duohead-pattern", "version": 2, "sink": 64, "window": 256,
     "default_sparsity": 0.5,                  # optional: the cut `enable` uses when given none
     "model": {"name": ..., "hf_id": ..., "architecture": ..., "num_layers": 30, "num_kv_heads": 3, "head_dim": 64},
     "provenance": {...free-form: how the gates were made...},
     "gates": [[1.0, 0.02, 0.9], ...],          # num_layers rows of num_kv_heads floats
     "ranking": [[0.9, 0.1, 0.7], ...]}         # optional (version 2): the order heads stream in at any sparsity

A *ranking* is one score per head, meaningful at every sparsity: at sparsity s the round(s * L * Hkv) lowest scores
stream, so the layouts are nested (a head streaming at 50% also streams at 75%). A calibration whose gates converge
to 0/1 (rules relaxed and evidence) records one, which reproduces its calibrated layout at `default_sparsity`; graded
gates (the published patterns, the AdamW rules) are their own ranking. Files without a ranking are written as
version 1, which older duohead reads.

Gates are float32 and written exactly (the shortest decimal that reads back to the same float32).
Shipped patterns live in the package (`duohead/patterns/<name>/pattern.json`), read through `importlib.resources`.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duohead.architecture import (
    DEFAULT_SINK,
    DEFAULT_WINDOW,
    check_sink_window,
    head_dim,
    num_kv_heads,
    pattern_layers,
    text_config,
)
from duohead.files import atomic_write_text, read_regular_text, refuse_overwrite

FORMAT_NAME = "duohead-pattern"
FORMAT_VERSION = 2  # version 2 adds the optional "ranking"; version 1 files read unchanged
READABLE_VERSIONS = (1, 2)
DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
PATTERN_FILE = "pattern.json"  # the pattern inside a pattern folder (shipped or user-made)
CLIP_TOLERANCE = 0.01  # reference gates this far outside [0, 1] are clipped on import (the reference clips on load)
PATTERN_LIMIT = 64 << 20  # bytes read at most from a pattern file (1,000 layers x 1,000 KV heads is ~10 MB)
MODEL_INTEGERS = ("num_layers", "num_kv_heads", "head_dim")  # fields of `model` that must be integers where present


def shipped_root() -> Traversable:
    """The folder of shipped patterns inside the installed package (package data)."""
    return resources.files("duohead") / "patterns"


def shipped_names() -> list[str]:
    """Names of the shipped patterns (folders of `duohead/patterns` that hold a pattern.json)."""
    root = shipped_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / PATTERN_FILE).is_file()) if root.is_dir() else []


def find_pattern(name_or_path: str | os.PathLike) -> Path | Traversable:
    """A pattern file, a folder holding a `pattern.json` or the reference's files, or a shipped pattern name
    (e.g. "llama-3.1-8b-instruct")."""
    path = Path(name_or_path)
    if path.is_dir() and (path / PATTERN_FILE).is_file():
        return path / PATTERN_FILE
    if path.exists():
        return path
    if path.name == str(name_or_path) and str(name_or_path) in shipped_names():
        return shipped_root() / str(name_or_path) / PATTERN_FILE
    raise FileNotFoundError(
        f"pattern {name_or_path} is neither a file nor a shipped pattern name (shipped: {', '.join(shipped_names()) or 'none'})"
    )


def _read_json(path: Path | Traversable, what: str) -> Any:
    """The JSON in `path` (a regular file of at most `PATTERN_LIMIT` bytes, or a shipped resource)."""
    text = read_regular_text(path, what, PATTERN_LIMIT) if isinstance(path, Path) else path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file may be truncated") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be a duohead file") from None


def check_positions(sink: int, window: int, config: Any, where: str = "") -> None:
    """Raise ValueError if `sink` or `window` exceeds the model's positions (its config's `max_position_embeddings`):
    a streaming head would then be allocated more tokens than the model can ever see."""
    positions = getattr(text_config(config), "max_position_embeddings", None)
    if isinstance(positions, int) and max(sink, window) > positions:
        raise ValueError(
            f"{where}sink {sink} / window {window} exceed the model's {positions} positions; use at most {positions} each"
        )


def stream_order(scores: torch.Tensor) -> torch.Tensor:
    """Flat indices of scores [L, Hkv] (any shape) in the order heads stream: ascending score, ties by flat
    (layer, head) index (earlier layers, then lower KV heads, stream first). With `streaming_count`, the one
    definition of "the cut at a sparsity": the first streaming_count(s, N) heads of this order stream."""
    return torch.sort(scores.detach().flatten().cpu(), stable=True).indices


def streaming_count(sparsity: float, heads: int) -> int:
    """How many of `heads` KV heads stream at `sparsity` (fraction of KV heads that stream): round(sparsity * heads)."""
    return round(sparsity * heads)


def cut(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The layout bool [L, Hkv] (True = retrieval) at `sparsity`: the first `streaming_count` heads of
    `stream_order(scores)` stream."""
    retrieval = torch.ones(scores.numel(), dtype=torch.bool)
    retrieval[stream_order(scores)[: streaming_count(sparsity, scores.numel())]] = False
    return retrieval.view(scores.shape).to(scores.device)


def tie_structure(scores: torch.Tensor, sparsity: float) -> dict[str, Any]:
    """How the cut at `sparsity` falls among equal scores [L, Hkv] (gates, or a ranking).

    streaming: how many heads stream; cut_gate: the highest streaming score; tied: how many heads share it;
    tied_streaming: how many of those stream. A cut inside a tie (tied_streaming < tied, and the next score up
    equal) is decided by (layer, head) order (`stream_order`), not by the scores.
    """
    flat = scores.detach().flatten().float().cpu()
    ordered = flat[stream_order(flat)]
    k = streaming_count(sparsity, flat.numel())
    if k == 0 or k == flat.numel():
        return {"streaming": k, "cut_gate": None, "tied": 0, "tied_streaming": 0, "inside_tie": False}
    value = ordered[k - 1].item()
    return {
        "streaming": k,
        "cut_gate": value,
        "tied": int((flat == value).sum()),
        "tied_streaming": k - int((flat < value).sum()),
        "inside_tie": ordered[k].item() == value,
    }


def _rows(table: torch.Tensor) -> str:
    """A [L, Hkv] table as JSON rows, one line per layer, each float32 written exactly."""
    return ",\n    ".join("[" + ", ".join(_float32_text(g) for g in row) + "]" for row in table.tolist())


def _float32_text(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (e.g. 0.000431, 1.0, 1e-05)."""
    return str(np.float32(value))


class HeadPattern:
    """Gates [num_layers, num_kv_heads] in [0, 1] plus sink/window sizes and provenance.

    Args:
        gates: [L, Hkv] floats in [0, 1] (tensor or nested lists).
        sink: attention-sink tokens a streaming head keeps (>= 0).
        window: recent tokens a streaming head keeps (>= 1).
        model: what the pattern was made for: name, hf_id, architecture (model_type), num_layers, num_kv_heads,
            head_dim; `validate` checks the recorded ones.
        provenance: free-form record of how the gates were made (method, steps, seed, ...).
        source: the file it was read from, used in error messages.
        default_sparsity: the cut `duohead.enable` uses when given neither sparsity nor threshold; default: the
            provenance's `target_sparsity` (what a `duohead calibrate --target-sparsity` run aimed at), else none.
        ranking: [L, Hkv] finite floats, or None: the order heads stream in at a sparsity (lowest first); None:
            the gates. With `default_sparsity`, its cut there must be the gates' cut.
    """

    def __init__(
        self,
        gates: torch.Tensor | list,
        *,
        sink: int = DEFAULT_SINK,
        window: int = DEFAULT_WINDOW,
        model: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        source: str | None = None,
        default_sparsity: float | None = None,
        ranking: torch.Tensor | list | None = None,
    ):
        self.source = source
        where = f"{source}: " if source else ""
        try:
            gates = torch.as_tensor(gates, dtype=torch.float32).clone()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}field 'gates' must be a list of equal-length rows of numbers ({e})") from None
        if gates.dim() != 2 or gates.numel() == 0:
            raise ValueError(
                f"{where}field 'gates' must be a non-empty 2-D table [num_layers][num_kv_heads]; got shape {list(gates.shape)}"
            )
        if not torch.isfinite(gates).all():
            layer, head = (~torch.isfinite(gates)).nonzero()[0].tolist()
            raise ValueError(
                f"{where}field 'gates' has a non-finite value {gates[layer, head].item()} at layer {layer}, KV head {head}"
            )
        if (gates < 0).any() or (gates > 1).any():
            layer, head = ((gates < 0) | (gates > 1)).nonzero()[0].tolist()
            raise ValueError(
                f"{where}field 'gates' must lie in [0, 1]; layer {layer}, KV head {head} is {gates[layer, head].item()}"
            )
        check_sink_window(sink, window, where=f"{where}field ")
        for field, value in (("model", model), ("provenance", provenance)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{where}field {field!r} must be a JSON object {{...}} or null; got {type(value).__name__}")
        for field in MODEL_INTEGERS:
            value = (model or {}).get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}field 'model.{field}' must be an integer >= 1; got {value!r}")
        provenance = dict(provenance or {})
        if default_sparsity is None and isinstance(provenance.get("target_sparsity"), (int, float)):
            default_sparsity = provenance["target_sparsity"]
        number = isinstance(default_sparsity, (int, float)) and not isinstance(default_sparsity, bool)
        if default_sparsity is not None and not (number and 0.0 <= default_sparsity <= 1.0):
            raise ValueError(f"{where}field 'default_sparsity' must be a number in [0, 1] or null; got {default_sparsity!r}")
        self.default_sparsity = default_sparsity
        self.gates = gates
        self.ranking = None if ranking is None else self._checked_ranking(ranking, where)
        self.sink = sink
        self.window = window
        self.model = dict(model or {})
        self.provenance = provenance

    def _checked_ranking(self, ranking: torch.Tensor | list, where: str) -> torch.Tensor:
        try:
            ranking = torch.as_tensor(ranking, dtype=torch.float32).clone()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}field 'ranking' must be a list of equal-length rows of numbers ({e})") from None
        if ranking.shape != self.gates.shape:
            raise ValueError(
                f"{where}field 'ranking' is {list(ranking.shape)}; it must have the gates' shape {list(self.gates.shape)}"
            )
        if not torch.isfinite(ranking).all():
            raise ValueError(f"{where}field 'ranking' must hold finite numbers")
        if self.default_sparsity is not None:
            by_ranking, by_gates = cut(ranking, self.default_sparsity), cut(self.gates, self.default_sparsity)
            if not torch.equal(by_ranking, by_gates):
                raise ValueError(
                    f"{where}field 'ranking' does not reproduce the gates' layout at the calibrated sparsity "
                    f"{self.default_sparsity:g} ({int((by_ranking != by_gates).sum())} heads differ); the file is damaged"
                )
        return ranking

    @property
    def order_scores(self) -> torch.Tensor:
        """[L, Hkv]: what heads stream by at a sparsity, lowest first: the ranking, else the gates."""
        return self.gates if self.ranking is None else self.ranking

    @property
    def num_layers(self) -> int:
        return self.gates.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.gates.shape[1]

    def __repr__(self) -> str:
        name = self.model.get("name", "?")
        return (
            f"HeadPattern(model={name!r}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
            f"sink={self.sink}, window={self.window})"
        )

    # ------------------------------------------------------------------ layout

    def binarize(self, sparsity: float | None = None, threshold: float | None = None) -> torch.Tensor:
        """The layout: bool [L, Hkv], True = retrieval head.

        `sparsity` = fraction of KV heads that stream: the round(sparsity * L * Hkv) heads lowest in the ranking
        (`order_scores`: the ranking if the pattern has one, else the gates) stream, ties broken by (layer, head)
        order, so the cut is deterministic and the layouts of two sparsities are nested. `threshold`: a head streams
        iff its gate < threshold. With neither, threshold 0.5. See `sparsity_of` for the achieved sparsity.
        """
        if sparsity is not None and threshold is not None:
            raise ValueError("pass either sparsity= or threshold=, not both")
        if sparsity is not None:
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
                raise ValueError(f"sparsity must be a number in [0, 1] (fraction of KV heads that stream); got {sparsity!r}")
            return cut(self.order_scores, sparsity)
        if threshold is None:
            threshold = 0.5
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number; got {threshold!r}")
        return self.gates >= threshold

    @staticmethod
    def sparsity_of(layout: torch.Tensor) -> float:
        """Fraction of KV heads that stream in a layout (bool [L, Hkv], True = retrieval)."""
        return 1.0 - layout.float().mean().item()

    def validate(self, model_config: Any) -> None:
        """Raise ValueError unless this pattern fits a transformers config: layer and KV-head counts, and the
        head dim and architecture (model_type) where the pattern records them."""
        config = text_config(model_config)
        model_type = getattr(config, "model_type", None)
        where = f"pattern {self.source}" if self.source else "pattern"
        made_for = self.model.get("hf_id") or self.model.get("name") or self.model.get("architecture") or "another model"
        mine = (self.num_layers, self.num_kv_heads, self.model.get("head_dim"))
        covered = len(pattern_layers(config))
        theirs = (covered, num_kv_heads(config), head_dim(config))
        if mine[:2] != theirs[:2] or (mine[2] is not None and mine[2] != theirs[2]):
            dim = lambda d: "" if d is None else f" x head dim {d}"
            local = config.num_hidden_layers - covered
            of = (
                f" global layers (its other {local} are local sliding-window layers, which keep their own window)"
                if local
                else " layers"
            )
            raise ValueError(
                f"{where} was made for {made_for} with {mine[0]} layers x {mine[1]} KV heads{dim(mine[2])}; "
                f"this model ({model_type or '?'}) has {theirs[0]}{of} x {theirs[1]} KV heads"
                f"{dim(theirs[2] if mine[2] else None)}"
            )
        check_positions(self.sink, self.window, config, where=f"{where}: ")
        architecture = self.model.get("architecture")
        decoder_types = {model_type, getattr(model_config, "model_type", None)}  # Gemma 3: "gemma3" holds a "gemma3_text"
        if architecture is not None and model_type is not None and architecture not in decoder_types:
            raise ValueError(
                f"{where} was made for {made_for}, a {architecture!r} model; this model is {model_type!r}: "
                "a pattern's gates belong to the model they were calibrated on"
            )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        model = {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, **self.model}
        version = 1 if self.ranking is None else FORMAT_VERSION  # files without a ranking stay readable by older duohead
        data = {"format": FORMAT_NAME, "version": version, "sink": self.sink, "window": self.window}
        if self.default_sparsity is not None:
            data["default_sparsity"] = self.default_sparsity
        data = {**data, "model": model, "provenance": self.provenance, "gates": self.gates.tolist()}
        if self.ranking is not None:
            data["ranking"] = self.ranking.tolist()
        return data

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the pattern as JSON, atomically. Refuses to replace an existing file unless `overwrite`."""
        path = Path(path)
        refuse_overwrite(path, overwrite)
        data = self.to_dict()
        data.pop("gates")
        data.pop("ranking", None)
        tables = [("gates", self.gates)] + ([("ranking", self.ranking)] if self.ranking is not None else [])
        body = ",\n".join(f'  "{name}": [\n    {_rows(table)}\n  ]' for name, table in tables)
        head = json.dumps(data, indent=2).removesuffix("\n}")
        atomic_write_text(path, f"{head},\n{body}\n}}\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadPattern:
        """Read a pattern file written by `save`, a folder holding one (`pattern.json`), a reference DuoAttention
        folder, or a shipped pattern name."""
        path = find_pattern(path)
        if path.is_dir():
            if (path / DUO_TSV).is_file():
                return cls.from_duo_attention(Path(path))
            raise FileNotFoundError(f"{path} is a folder without {PATTERN_FILE} or {DUO_TSV}; expected a duohead pattern")
        data = _read_json(path, "pattern")
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: field 'format' must be {FORMAT_NAME!r}; this is not a duohead pattern file")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: field 'version' is {data.get('version')!r}; this duohead reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade duohead to read newer files)"
            )
        if data.get("version") == 1 and "ranking" in data:
            raise ValueError(f"{path}: field 'ranking' needs version 2; the file says version 1")
        for field in ("gates", "sink", "window"):
            if field not in data:
                raise ValueError(f"{path}: missing field {field!r}")
        pattern = cls(
            data["gates"],
            sink=data["sink"],
            window=data["window"],
            model=data.get("model"),
            provenance=data.get("provenance"),
            source=str(path),
            default_sparsity=data.get("default_sparsity"),
            ranking=data.get("ranking"),
        )
        declared = (pattern.model.get("num_layers"), pattern.model.get("num_kv_heads"))
        if declared != (None, None) and declared != (pattern.num_layers, pattern.num_kv_heads):
            raise ValueError(
                f"{path}: field 'gates' is {pattern.num_layers} x {pattern.num_kv_heads} but field 'model' declares "
                f"{declared[0]} layers x {declared[1]} KV heads; the file is damaged"
            )
        return pattern

    @classmethod
    def from_duo_attention(cls, folder: str | os.PathLike) -> HeadPattern:
        """Import the reference format: `full_attention_heads.tsv` (one row per layer, one float per KV head)
        and `config.json` with `sink_size` and `recent_size`.

        Like the reference, which clips gates to [0, 1] when it loads them, gates at most `CLIP_TOLERANCE` outside
        [0, 1] (the optimiser leaves values such as -0.000534) are clipped; the provenance says how many.
        Anything further out, NaN, or ragged rows is refused."""
        folder = Path(folder)
        tsv, config_path = folder / DUO_TSV, folder / DUO_CONFIG
        if not tsv.exists():
            raise FileNotFoundError(f"{tsv} does not exist (expected the reference's per-head gate table)")
        rows = []
        for n, line in enumerate(read_regular_text(tsv, "gate table", PATTERN_LIMIT).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append([float(x) for x in line.strip().split("\t")])
            except ValueError:
                raise ValueError(f"{tsv}: line {n} must be tab-separated numbers; got {line[:60]!r}") from None
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"{tsv}: rows have different lengths {sorted({len(r) for r in rows})}; expected one float per KV head"
            )
        gates = torch.tensor(rows, dtype=torch.float32)
        outside = (gates < 0) | (gates > 1)
        if (gates < -CLIP_TOLERANCE).any() or (gates > 1 + CLIP_TOLERANCE).any():
            layer, head = ((gates < -CLIP_TOLERANCE) | (gates > 1 + CLIP_TOLERANCE)).nonzero()[0].tolist()
            raise ValueError(
                f"{tsv}: gates must lie in [0, 1] (within {CLIP_TOLERANCE}, which is clipped as the reference does); "
                f"layer {layer}, KV head {head} is {_float32_text(gates[layer, head].item())}"
            )
        provenance: dict[str, Any] = {"imported_from": str(folder)}
        if outside.any():
            provenance["clipped"] = {
                "gates": int(outside.sum()),
                "largest_distance": float(np.float32(torch.maximum(-gates, gates - 1).max().item())),
                "rule": f"gates within {CLIP_TOLERANCE} outside [0, 1] clipped to [0, 1] on import, as the reference does on load",  # noqa: E501
            }
            gates = gates.clamp(0.0, 1.0) + 0.0  # + 0.0: no negative zeros
        sink, window = DEFAULT_SINK, DEFAULT_WINDOW
        if config_path.exists():
            config = _read_json(config_path, "reference config")
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: must be a JSON object with sink_size, recent_size; got {type(config).__name__}")
            sink, window = config.get("sink_size", sink), config.get("recent_size", window)
        return cls(gates, sink=sink, window=window, provenance=provenance, source=str(tsv))

    def to_duo_attention(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the reference format (`full_attention_heads.tsv` + `config.json`) into `folder`."""
        folder = Path(folder)
        for name in (DUO_TSV, DUO_CONFIG):
            refuse_overwrite(folder / name, overwrite)
        rows = ("\t".join(f"{g:.18e}" for g in row) for row in self.gates.tolist())  # the reference's np.savetxt notation
        atomic_write_text(folder / DUO_TSV, "".join(row + "\n" for row in rows))
        atomic_write_text(folder / DUO_CONFIG, json.dumps({"sink_size": self.sink, "recent_size": self.window}, indent=2) + "\n")
        return folder
