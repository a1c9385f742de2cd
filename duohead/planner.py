"""`duohead plan`: what a deployment needs per GPU, from the model's config alone (no weights are read).

    duohead plan --pattern llama-3.1-8b-instruct --context 128K --gpu-memory 80GiB
    duohead plan --model ./Llama-3.1-70B --pattern my-70b.json --sparsity 0.5 --context 128K --tp 8

Per GPU (per tensor-parallel rank): weight bytes, KV bytes with full attention and with duohead at the given
context, their ratio, and the longest context that fits `--gpu-memory` either way. KV bytes come from
`duohead.accounting.kv_bytes`, the formula `DuoCache.memory()` uses, applied to each rank's slice of the layout
(`duohead.sharding.rank_layouts`), so a rank holding more retrieval heads than the others shows it. Weight bytes
count the parameters of the model built on the meta device (nothing allocated), each divided as transformers'
tensor-parallel plan shards it. Not counted: activations, the CUDA context, allocator slack; leave headroom.
Token counts are read and printed with K = 1,024 tokens and M = 1,024K (so 128K = 131,072).
A shipped pattern that ships its model's config (`model-config.json` beside its `pattern.json`) needs no --model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duohead.accounting import kv_bytes
from duohead.files import MiB, read_regular_text

if TYPE_CHECKING:  # torch and transformers load only once the arguments are checked (a bad one is answered at once)
    import torch

MODEL_CONFIG = "model-config.json"  # a shipped pattern's model config, beside its pattern.json
CONFIG_LIMIT = 16 * MiB  # bytes read at most from a config.json
MAX_COUNT = 4096  # layers and heads a config may declare (bounds the plan's work: 1,000,000 layers took minutes)
_TOKEN_UNITS = {"": 1, "K": 2**10, "M": 2**20}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
# tensor-parallel styles that split a parameter, and the dimension they split, from the end: a Linear weight is
# [out, in], stacked experts [E, out, in] (biases of colwise styles split, the others stay whole)
_SHARD_DIM = {"colwise": -2, "colwise_gather_output": -2, "colwise_rep": -2, "packed_colwise": -2, "rowwise": -1,
              "rowwise_rep": -1, "rowwise_split_input": -1, "embedding_rowwise": -2, "embedding_colwise": -1}  # fmt: skip


@dataclass
class RankPlan:
    """One GPU of the deployment: its weights and its KV cache (bytes) at the planned context."""

    rank: int
    weight_bytes: int
    full_kv_bytes: int
    duohead_kv_bytes: int
    retrieval_bytes_per_token: int  # how duohead's KV grows with the context (its streaming part is constant)
    streaming_bytes: int
    full_bytes_per_token: int
    max_context_full: int | None  # None: unbounded by KV (never for full attention)
    max_context_duohead: int | None


@dataclass
class Plan:
    """A deployment: shapes, settings and one `RankPlan` per GPU."""

    model_type: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    tp: int
    batch: int
    context: int
    sink: int
    window: int
    streaming_heads: int
    local_layers: int
    local_window: int | None
    gpu_memory: int | None
    max_position_embeddings: int | None
    ranks: list[RankPlan]

    def fullest(self) -> RankPlan:
        """The GPU that needs the most memory at the planned context (the one that decides what fits)."""
        return max(self.ranks, key=lambda r: r.weight_bytes + r.duohead_kv_bytes)


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '80 GiB', '1e9' -> bytes. Raises ValueError naming the accepted units."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 80GiB or 141GB (units: B, KB .. TB, KiB .. TiB)")
    try:
        value = float(match.group(1)) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 80GiB or 141GB") from None
    if not 0 < value < math.inf:
        raise ValueError(f"memory size must be a positive, finite number; got {text!r}")
    return int(value)


def parse_tokens(text: str) -> int:
    """'131072', '128K', '1M', '1.5M' -> tokens (K = 1,024, M = 1,048,576). Raises ValueError naming the forms."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]?)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _TOKEN_UNITS:
        raise ValueError(f"cannot read {text!r} as a token count; write e.g. 131072, 128K or 1M (K = 1,024 tokens)")
    value = float(match.group(1)) * _TOKEN_UNITS[unit]
    if value < 1 or value != int(value):
        raise ValueError(f"a token count must be a whole number >= 1; {text!r} is {value:g} tokens")
    return int(value)


def format_tokens(n: int) -> str:
    """A token count in the planner's unit: '532,827 (520.3K)', '1,065,271 (1.02M)' (K = 1,024, M = 1,024K)."""
    short = f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n / 2**10:.1f}K" if n >= 2**10 else str(n)
    return f"{n:,} ({short})" if n >= 2**10 else f"{n:,}"


def load_config(model: str) -> Any:
    """A transformers config from a config.json file, a model folder, or a Hugging Face model id (transformers resolves
    it: its local cache, or the hub when online). A config.json is checked before transformers loads."""
    from duohead.architecture import check_architecture

    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        try:
            data = json.loads(read_regular_text(path, "model config", CONFIG_LIMIT))
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not a JSON model config ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"{path}: no 'model_type' field; expected a transformers config.json")
        check_architecture(data["model_type"], "duohead plan")
        check_config_sizes(data.get("text_config") or data)
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(**data)
        except (ValueError, TypeError, ArithmeticError) as e:
            raise ValueError(f"{path}: transformers cannot read it as a {data['model_type']} config ({e})") from None
    if path.suffix == ".json" or model.startswith((".", "/")):
        raise FileNotFoundError(f"model config {model} does not exist (pass a config.json, a model folder or a model id)")
    from duohead.loading import model_config

    return model_config(model)


def check_config_sizes(config: Any) -> None:
    """Raise ValueError unless the layer and head counts of `config` (a config, or its config.json as a dict) are whole
    numbers in [1, `MAX_COUNT`] (the plan's work grows with them; the largest models have ~130 layers, 128 heads)."""
    for field in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size"):
        value = config.get(field) if isinstance(config, dict) else getattr(config, field, None)
        if field == "num_key_value_heads" and value is None:
            continue  # absent: as many as attention heads
        limit = MAX_COUNT if field != "hidden_size" else MAX_COUNT * 256
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"the model config's {field} must be a whole number in [1, {limit:,}]; got {value!r}")


def shipped_model_config(name: str) -> Any | None:
    """The config of the model a shipped pattern was made for, where the pattern ships it (None otherwise)."""
    from transformers import AutoConfig

    from duohead.pattern import shipped_names, shipped_root

    if name not in shipped_names():
        return None
    file = shipped_root() / name / MODEL_CONFIG
    return AutoConfig.for_model(**json.loads(file.read_text(encoding="utf-8"))) if file.is_file() else None


def _check_tp(kv_heads: int, tp: int) -> None:
    if tp < 1 or kv_heads % tp:
        raise ValueError(f"{kv_heads} KV heads do not split evenly over --tp {tp}; use a number of GPUs that divides {kv_heads}")


def spread_layout(layers: int, kv_heads: int, tp: int, sparsity: float) -> torch.Tensor:
    """A layout [L, Hkv] (True = retrieval) with round(sparsity * L * Hkv) streaming heads spread as evenly as
    possible over the ranks, then the layers: what to plan with when no calibrated pattern is given."""
    import torch

    _check_tp(kv_heads, tp)
    per_rank = kv_heads // tp
    places = [(layer, rank * per_rank + h) for h in range(per_rank) for layer in range(layers) for rank in range(tp)]
    layout = torch.ones(layers, kv_heads, dtype=torch.bool)
    for layer, head in places[: round(sparsity * layers * kv_heads)]:
        layout[layer, head] = False
    return layout


def weight_bytes_per_rank(config: Any, tp: int, itemsize: int) -> list[int]:
    """Parameter bytes on each of `tp` ranks: the model built on the meta device, each parameter split as its
    tensor-parallel style splits it (torch.chunk sizes along the style's dimension), the rest replicated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = {re.compile(re.escape(key).replace(r"\*", r"\d+") + r"$"): style for key, style in (model.tp_plan or {}).items()}
    totals = [0] * tp
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        styles = [s for key in (name, module) for pattern, s in plan.items() if pattern.match(key)]  # experts: by name
        dim = _SHARD_DIM.get(styles[0]) if styles and tp > 1 else None
        if kind == "bias":
            dim = -1 if dim == -2 else None  # a rowwise bias is added once, after the all-reduce: every rank keeps it whole
        for rank in range(tp):
            if dim is None or param.ndim < -dim:
                totals[rank] += param.numel() * itemsize
            else:
                size = param.shape[dim]
                chunk = -(-size // tp)
                local = max(0, min(chunk, size - rank * chunk))
                totals[rank] += param.numel() // size * local * itemsize
    return totals


def _max_context(budget: int | None, fixed: int, per_token: int) -> int | None:
    """Largest T with fixed + T * per_token <= budget (0 if not even T = 0 fits; None: no budget, or T unbounded)."""
    if budget is None:
        return None
    if budget < fixed:
        return 0
    return None if per_token == 0 else (budget - fixed) // per_token


def plan_deployment(
    config: Any,
    layout: torch.Tensor,
    *,
    sink: int,
    window: int,
    context: int,
    tp: int = 1,
    dtype: str = "bfloat16",
    batch: int = 1,
    gpu_memory: int | None = None,
) -> Plan:
    """Plan `config` with `layout` ([L, Hkv] bool, True = retrieval) at `context` tokens on `tp` GPUs.

    Raises ValueError where the KV heads do not split evenly over `tp` ranks (as duohead refuses at enable)."""
    from duohead.architecture import (
        check_architecture,
        check_sink_window,
        check_tensor_parallel,
        model_layouts,
        num_kv_heads,
        pattern_layers,
        text_config,
    )
    from duohead.architecture import head_dim as head_dim_of
    from duohead.sharding import HeadShard, rank_layouts

    whole, config = config, text_config(config)
    check_architecture(getattr(config, "model_type", None), "duohead plan")
    if tp > 1:
        check_tensor_parallel(config.model_type, "duohead plan")
    check_sink_window(sink, window)
    layers, kv_heads = config.num_hidden_layers, num_kv_heads(config)
    head_dim = head_dim_of(config)
    covered = len(pattern_layers(config))
    if tuple(layout.shape) != (covered, kv_heads):
        local = f" global layers (and {layers - covered} local sliding-window ones)" if covered < layers else " layers"
        raise ValueError(f"the layout is {tuple(layout.shape)}; this model has {covered}{local} x {kv_heads} KV heads")
    _check_tp(kv_heads, tp)
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1; got context {context}, batch {batch}")
    import torch

    itemsize = getattr(torch, dtype).itemsize  # dtype: a torch dtype's name ("bfloat16", ...)
    weights = weight_bytes_per_rank(whole, tp, itemsize)  # a multimodal model's other towers too
    layouts = model_layouts(config, layout.tolist(), sink, window)
    per_rank = kv_heads // tp
    ranks = []
    for rank in range(tp):
        shard = HeadShard(rank, tp, kv_heads, rank * per_rank, (rank + 1) * per_rank)
        sizes = {"retrieval_bytes": 0, "streaming_bytes": 0, "full_bytes": 0}
        per_token = {"retrieval_bytes": 0, "full_bytes": 0}
        for lay in rank_layouts(layouts, shard):
            hr, hs = lay.num_retrieval_heads, len(lay.kv_order) - lay.num_retrieval_heads
            slots, full_tokens = lay.sink + lay.window, lay.full_tokens(context)
            for key, value in kv_bytes(hr, hs, context, slots, head_dim, itemsize, batch, full_tokens).items():
                sizes[key] += value
            one = kv_bytes(hr, hs, 1, 0, head_dim, itemsize, batch, 0 if lay.local else None)
            per_token = {key: per_token[key] + one[key] for key in per_token}
        budget = None if gpu_memory is None else gpu_memory - weights[rank]
        ranks.append(RankPlan(
            rank=rank,
            weight_bytes=weights[rank],
            full_kv_bytes=sizes["full_bytes"],
            duohead_kv_bytes=sizes["retrieval_bytes"] + sizes["streaming_bytes"],
            retrieval_bytes_per_token=per_token["retrieval_bytes"],
            streaming_bytes=sizes["streaming_bytes"],
            full_bytes_per_token=per_token["full_bytes"],
            max_context_full=_max_context(budget, 0, per_token["full_bytes"]),
            max_context_duohead=_max_context(budget, sizes["streaming_bytes"], per_token["retrieval_bytes"]),
        ))  # fmt: skip
    return Plan(
        model_type=config.model_type, layers=layers, query_heads=config.num_attention_heads, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype, tp=tp, batch=batch, context=context, sink=sink, window=window,
        streaming_heads=int((~layout).sum()), local_layers=layers - covered,
        local_window=getattr(config, "sliding_window", None) if covered < layers else None, gpu_memory=gpu_memory,
        max_position_embeddings=getattr(config, "max_position_embeddings", None), ranks=ranks,
    )  # fmt: skip
