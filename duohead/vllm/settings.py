"""The `duohead` key of a vLLM model config: what the user asked for, checked, and the layout it gives.

A user enables duohead in vLLM by naming a pattern in the model's config overrides:

    LLM(model=path, hf_overrides={"duohead": {"pattern": "auto", "sparsity": 0.5}})

The keys are `duohead.enable`'s arguments: `pattern` (required: a shipped name, "auto", a file or a folder),
`sparsity` / `threshold` / `sink` / `window` (optional, defaulting as in `enable`). This module imports nothing
of vLLM, so the rules are tested with the rest of duohead.
"""

from __future__ import annotations

from typing import Any

from duohead.architecture import LayerLayout, check_architecture, num_kv_heads, text_config
from duohead.deployment import Deployment, deploy
from duohead.sharding import HeadShard, rank_layouts

CONFIG_KEY = "duohead"
SETTINGS = ("pattern", "sparsity", "threshold", "sink", "window")


def requested(config: Any) -> dict[str, Any] | None:
    """The `duohead` settings of a transformers config, or None when the model runs without duohead."""
    settings = getattr(text_config(config), CONFIG_KEY, None)
    if settings is None:
        settings = getattr(config, CONFIG_KEY, None)
    return settings


def deployment_for(config: Any) -> Deployment:
    """The checked deployment that the `duohead` settings of `config` ask for.

    Raises ValueError with one line naming the setting and what was expected."""
    settings = requested(config)
    where = "vLLM hf_overrides['duohead']"
    if not isinstance(settings, dict):
        raise ValueError(f"{where} must be a dict such as {{'pattern': 'auto', 'sparsity': 0.5}}; got {settings!r}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(SETTINGS)}")
    if "pattern" not in settings:
        raise ValueError(f"{where} needs 'pattern': a shipped pattern name, 'auto', a pattern file or folder")
    check_architecture(getattr(text_config(config), "model_type", None), what="duohead's vLLM plugin")
    options = {key: settings.get(key) for key in SETTINGS[1:]}
    try:
        return deploy(settings["pattern"], text_config(config), **options)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{where}: {e}") from None


def rank_layer_layouts(deployment: Deployment, config: Any, tp_rank: int, tp_size: int) -> list[LayerLayout]:
    """Each layer's layout on tensor-parallel rank `tp_rank` of `tp_size`: vLLM gives rank r the KV heads
    [r * Hkv / N, (r + 1) * Hkv / N), as transformers' plan does, so `duohead.sharding` slices it; indices are local."""
    total = num_kv_heads(config)
    if total % tp_size:
        raise ValueError(f"duohead: {total} KV heads do not split evenly over {tp_size} tensor-parallel ranks")
    per_rank = total // tp_size
    shard = HeadShard(tp_rank, tp_size, total, tp_rank * per_rank, (tp_rank + 1) * per_rank)
    layouts = [LayerLayout.from_retrieval(row, deployment.sink, deployment.window) for row in deployment.layout.tolist()]
    return rank_layouts(layouts, shard)


def global_kv_order(deployment: Deployment, config: Any, tp_size: int) -> list[list[int]]:
    """Per layer, the order of all Hkv KV heads in the reordered weights: every rank's heads stay in its own slice,
    retrieval heads first within it. Weight loading permutes the checkpoint's heads by it before vLLM shards them."""
    per_rank = num_kv_heads(config) // tp_size
    orders: list[list[int]] = [[] for _ in range(deployment.layout.shape[0])]
    for rank in range(tp_size):
        for layer, layout in enumerate(rank_layer_layouts(deployment, config, rank, tp_size)):
            orders[layer] += [rank * per_rank + head for head in layout.kv_order]
    return orders
