"""The model-loading hook: `enable` makes a transformers causal LM use a head pattern, `disable` undoes it.

`enable` is the one place that changes a model, and every change is reversible:
1. reorders the rows of q/k/v_proj (weights and biases) and the columns of o_proj so that in each
   layer the retrieval KV heads (and their query heads) come first; the product is unchanged;
2. attaches a `LayerLayout` to every attention module;
3. switches the attention implementation to "duohead";
4. gives the model a subclass whose `generate()` creates a `DuoCache` when none is passed, and whose
   `save_pretrained()` writes the original model (a saved checkpoint never carries reordered heads).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from duohead.attention import ATTENTION_NAME
from duohead.cache import DuoCache, cache_argument
from duohead.pattern import HeadPattern

logger = logging.getLogger("duohead")

# model_type -> where the decoder layers live. Biases (Qwen2) and per-head-dim q/k norms (Qwen3) need no
# entry: biases are reordered with their rows whenever present, and q/k norms are shared by all heads.
SUPPORTED_ARCHITECTURES = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers"}


@dataclass(frozen=True)
class LayerLayout:
    """One layer's head layout. kv_order[i] = original index of the KV head now in place i."""

    num_retrieval_heads: int
    sink: int
    window: int
    kv_order: tuple[int, ...]


@dataclass
class _EnabledState:
    attn_implementation: str
    model_class: type
    pattern: HeadPattern
    layout: torch.Tensor  # [L, Hkv] bool, True = retrieval
    sparsity: float


def _check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"duohead does not support architecture {model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    _check_architecture(model.config)
    layers = model
    for name in SUPPORTED_ARCHITECTURES[model.config.model_type].split("."):
        layers = getattr(layers, name)
    return [layer.self_attn for layer in layers]


def layer_layouts(model: torch.nn.Module) -> list[LayerLayout]:
    """The `LayerLayout` of every layer of an enabled model."""
    if not is_enabled(model):
        raise ValueError("this model is not duohead-enabled; call duohead.enable(model, pattern) first")
    return [module.duohead_layout for module in attention_modules(model)]


def is_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, "_duohead", None) is not None


def _head_rows(kv_order: list[int], heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """Row indices of a [num_kv_heads * heads_per_kv * head_dim, ...] projection, KV heads in `kv_order`."""
    rows = [(kv * heads_per_kv + g) * head_dim + d for kv in kv_order for g in range(heads_per_kv) for d in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _permute_heads(attn: torch.nn.Module, kv_order: list[int]) -> None:
    """Reorder the heads of one attention module so that KV head kv_order[i] moves to place i."""
    group, head_dim = attn.num_key_value_groups, attn.head_dim
    q_rows = _head_rows(kv_order, group, head_dim).to(attn.q_proj.weight.device)
    kv_rows = _head_rows(kv_order, 1, head_dim).to(attn.k_proj.weight.device)
    for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
        proj.weight.data = proj.weight.data.index_select(0, rows)
        if proj.bias is not None:
            proj.bias.data = proj.bias.data.index_select(0, rows)
    attn.o_proj.weight.data = attn.o_proj.weight.data.index_select(1, q_rows)


class _DuoGenerationMixin:
    """Mixed into an enabled model's class: `generate()` gets a `DuoCache` unless the caller passed a cache."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        name = cache_argument(self)
        wants_default = generation_config.use_cache is not False and generation_config.cache_implementation in (None, "dynamic")
        if model_kwargs.get(name) is None and wants_default:
            prepare = super()._prepare_cache_for_generation
            bound = inspect.signature(prepare).bind(generation_config, model_kwargs, *args, **kwargs).arguments
            model_kwargs[name] = DuoCache(self, max_length=bound.get("max_cache_length"))
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Save the model as it was before `duohead.enable` (original head order and attention implementation),
        so the files load anywhere, with or without duohead; the model stays enabled. (Save the head pattern
        itself with `HeadPattern.save`.)"""
        state, layouts = self._duohead, layer_layouts(self)
        disable(self)
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            _attach(self, layouts, state)


def _generation_class(model_class: type) -> type:
    return type(f"DuoHead{model_class.__name__}", (_DuoGenerationMixin, model_class), {"_duohead_base": model_class})


def enable(
    model: torch.nn.Module,
    pattern: HeadPattern | str | os.PathLike,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    window: int | None = None,
) -> torch.nn.Module:
    """Make `model` use `pattern`: retrieval heads keep the full KV cache, streaming heads sink + window.

    `pattern` is a `HeadPattern` or a path to a pattern file. `sparsity` (fraction of KV heads that stream)
    or `threshold` picks the layout (default: threshold 0.5); `sink`/`window` override the pattern's.
    Returns the same model object, changed in place; `disable(model)` restores it exactly.
    """
    _check_architecture(model.config)
    if not isinstance(pattern, HeadPattern):
        pattern = HeadPattern.load(Path(pattern))
    pattern.validate(model.config)
    sink = pattern.sink if sink is None else sink
    window = pattern.window if window is None else window
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an integer >= 0; got {sink!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1; got {window!r}")
    layout = pattern.binarize(sparsity=sparsity, threshold=threshold)
    sliding = getattr(model.config, "sliding_window", None)
    if sliding is not None and getattr(model.config, "use_sliding_window", True):
        logger.warning("duohead: retrieval heads attend to the whole context, ignoring the model's sliding window of %d", sliding)
    if is_enabled(model):
        disable(model)

    layouts = []
    for retrieval in layout.tolist():
        kv_order = [h for h, r in enumerate(retrieval) if r] + [h for h, r in enumerate(retrieval) if not r]
        layouts.append(LayerLayout(sum(retrieval), sink, window, tuple(kv_order)))
    state = _EnabledState(model.config._attn_implementation, type(model), pattern, layout, HeadPattern.sparsity_of(layout))
    _attach(model, layouts, state)
    logger.info(
        "duohead: %d of %d KV heads stream (sparsity %.3f), sink %d, window %d",
        int((~layout).sum()), layout.numel(), state.sparsity, sink, window,
    )
    return model


def _attach(model: torch.nn.Module, layouts: list[LayerLayout], state: _EnabledState) -> None:
    """What `disable` undoes: reorder every layer's heads, attach its layout, switch attention and class."""
    for attn, layout in zip(attention_modules(model), layouts):
        _permute_heads(attn, list(layout.kv_order))
        attn.duohead_layout = layout
    model.set_attn_implementation(ATTENTION_NAME)
    model.__class__ = _generation_class(state.model_class)
    model._duohead = state


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable`: original head order, attention implementation and class. Returns the model."""
    state = getattr(model, "_duohead", None)
    if state is None:
        raise ValueError("this model is not duohead-enabled; nothing to disable")
    for attn in attention_modules(model):
        order = attn.duohead_layout.kv_order
        _permute_heads(attn, sorted(range(len(order)), key=order.__getitem__))  # the inverse permutation
        del attn.duohead_layout
    model.__class__ = state.model_class
    model.set_attn_implementation(state.attn_implementation)
    model._duohead = None
    del model._duohead
    return model


def from_pretrained(
    path: str | os.PathLike,
    pattern: HeadPattern | str | os.PathLike,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    window: int | None = None,
    **hf_kwargs,
) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)` followed by `enable(model, pattern, ...)`.

    `path` is a local folder (add `gguf_file=` for a GGUF checkpoint).
    """
    from transformers import AutoModelForCausalLM

    if not Path(path).exists():
        raise FileNotFoundError(f"model folder {path} does not exist (duohead loads local models only)")
    if not isinstance(pattern, HeadPattern):
        pattern = HeadPattern.load(Path(pattern))  # fail on a bad pattern before the slow model load
    model = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)
    return enable(model, pattern, sparsity=sparsity, threshold=threshold, sink=sink, window=window)
