"""What a model is, as far as duohead cares: supported architectures, KV-head counts and per-layer head layouts.

A leaf module (it imports nothing, torch included, so the CLIs read it before torch loads): pattern, cache,
attention, hook and calibration all read these facts from here, and nothing here reaches back into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# model_type -> where the decoder layers live. Biases (Qwen2) and per-head-dim q/k norms (Qwen3) need no
# entry: biases are reordered with their rows whenever present, and q/k norms are shared by all heads.
SUPPORTED_ARCHITECTURES = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers"}


def check_architecture(model_type: str | None, what: str = "duohead") -> None:
    """Raise ValueError unless `model_type` (a config's `model_type`, a GGUF's architecture) is supported."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{what} does not support architecture {model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it; plain causal-LM configs are it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_kv_heads(config: Any) -> int:
    """KV heads per layer: `num_key_value_heads`, or `num_attention_heads` for models without GQA."""
    config = text_config(config)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: Any) -> int:
    """Dimension D of one attention head: `head_dim`, or hidden_size / num_attention_heads where it is unset."""
    config = text_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


DEFAULT_SINK, DEFAULT_WINDOW = 64, 256  # tokens a streaming head keeps when neither pattern nor user says (one definition)


def check_sink_window(sink: Any, window: Any, where: str = "") -> None:
    """Raise ValueError unless sink is an integer >= 0 and window an integer >= 1 (tokens). `where` prefixes errors."""
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"{where}'sink' must be an integer >= 0 (tokens); got {sink!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{where}'window' must be an integer >= 1 (tokens); got {window!r}")


@dataclass(frozen=True)
class LayerLayout:
    """One layer's head layout. kv_order[i] = original index of the KV head now in place i; the first
    `num_retrieval_heads` places are retrieval heads, the rest stream with `sink` + `window` tokens."""

    num_retrieval_heads: int
    sink: int
    window: int
    kv_order: tuple[int, ...]

    @classmethod
    def from_retrieval(cls, retrieval: list[bool], sink: int, window: int) -> LayerLayout:
        """The layout that puts the retrieval heads (True in `retrieval`, one per KV head) first, order kept."""
        order = [h for h, r in enumerate(retrieval) if r] + [h for h, r in enumerate(retrieval) if not r]
        return cls(sum(retrieval), sink, window, tuple(order))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    check_architecture(getattr(model.config, "model_type", None))
    layers = model
    for name in SUPPORTED_ARCHITECTURES[model.config.model_type].split("."):
        layers = getattr(layers, name)
    return [layer.self_attn for layer in layers]


def layer_layouts(model: torch.nn.Module) -> list[LayerLayout]:
    """The `LayerLayout` of every layer of a model prepared with `duohead.enable`."""
    layouts = [getattr(module, "duohead_layout", None) for module in attention_modules(model)]
    if any(layout is None for layout in layouts):
        raise ValueError("this model is not duohead-enabled; call duohead.enable(model, pattern) first")
    return layouts
