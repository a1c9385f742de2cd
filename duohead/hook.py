"""The model-loading hook: `enable` makes a transformers causal LM use a head pattern, `disable` undoes it.

`enable` is the one place that changes a model, and every change is reversible:
1. reorders the rows of q/k/v_proj (weights and biases) and the columns of o_proj so that in each
   layer the retrieval KV heads (and their query heads) come first; the product is unchanged;
2. attaches a `LayerLayout` to every attention module;
3. switches the attention implementation to "duohead";
4. gives the model a subclass (same class name, so pipelines accept it) whose `generate()` creates a `DuoCache`
   when none is passed (and refuses other cache implementations), and whose `save_pretrained()` writes the
   original model (a saved checkpoint never carries reordered heads).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import torch

from duohead.architecture import LayerLayout, attention_modules, check_architecture, family, layer_layouts, model_layouts
from duohead.attention import ATTENTION_NAME, register
from duohead.cache import DuoCache, cache_argument
from duohead.catalogue import resolve_pattern
from duohead.deployment import deploy
from duohead.pattern import HeadPattern
from duohead.sharding import check_weights_in_place, head_shard, permute_heads, rank_layouts

logger = logging.getLogger("duohead")


@dataclass
class _EnabledState:
    attn_implementation: str
    model_class: type
    pattern: HeadPattern
    layout: torch.Tensor  # [L, Hkv] bool, True = retrieval
    sparsity: float


def is_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, "_duohead", None) is not None


class _DuoGenerationMixin:
    """Mixed into an enabled model's class: `generate()` gets a `DuoCache` unless the caller passed a cache;
    `cache_implementation="static"` gives a static one, whose decode steps generate() compiles where
    `generation_config.compile_config` allows it (transformers' own rule)."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        name = cache_argument(self)
        implementation = generation_config.cache_implementation
        if model_kwargs.get(name) is None and implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"duohead: generate(cache_implementation={implementation!r}) is not supported: an enabled model keeps its "
                "own per-head cache (DuoCache: full KV for retrieval heads, sink + window for streaming heads); use "
                "None / 'dynamic', or 'static' (a static DuoCache, for compiled decoding), or call duohead.disable(model) first"
            )
        wanted = generation_config.use_cache is not False and implementation in (None, "dynamic", "static")
        if model_kwargs.get(name) is None and wanted:
            prepare = super()._prepare_cache_for_generation
            bound = inspect.signature(prepare).bind(generation_config, model_kwargs, *args, **kwargs).arguments
            max_length = bound.get("max_cache_length")
            if implementation == "static":
                max_length = max(max_length, getattr(generation_config, "max_cache_len", None) or 0)
                model_kwargs[name] = DuoCache.from_model(self, max_length=max_length, static=True)
            else:
                model_kwargs[name] = DuoCache.from_model(self, max_length=max_length)
            if implementation is not None:
                return None  # transformers would refuse a cache together with cache_implementation
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Where the model's own step drops the cache to recompute the whole sequence (Phi-3 with LongRoPE, once it
        passes `original_max_position_embeddings`: every position is encoded again with the long factors), the same
        `DuoCache` is emptied and passed on, instead of the DynamicCache the model would create."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        name = cache_argument(self)
        cache = kwargs.get(name)
        if isinstance(cache, DuoCache) and inputs.get(name) is None and inputs.get("use_cache") is not False:
            cache.reset()
            inputs[name] = cache
        return inputs

    def create_masks_for_generate(self, *args, attention_mask=None, inputs_embeds=None, **kwargs):
        """generate() asks for a prepared mask when the cache is compileable (a static DuoCache): the new tokens'
        columns of the 2-D mask, so the compiled step sees the same shape every step (the cache keeps the rest)."""
        if attention_mask is None or attention_mask.ndim != 2:
            return attention_mask
        return attention_mask[:, -inputs_embeds.shape[1] :].contiguous()  # a view's stride would change every step

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
    """The enabled class keeps the model class's name and module, so transformers' pipelines accept it."""
    names = {"__module__": model_class.__module__, "__qualname__": model_class.__qualname__}
    return type(model_class.__name__, (_DuoGenerationMixin, model_class), names)


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

    `pattern` is a `HeadPattern`, a pattern file or folder, a shipped pattern name, or "auto" (the shipped pattern
    made for this model). `sparsity` (fraction of KV heads that stream) or `threshold` picks the layout; with
    neither, the pattern's calibrated cut (`default_sparsity`), else threshold 0.5. `sink`/`window` override
    the pattern's. Returns the same model object, changed in place; `disable(model)` restores it exactly.
    Quantized models are refused (their weights are not plain tensors that the head reordering can permute).
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"duohead.enable takes a transformers causal LM (a model with a .config); got {type(model).__name__}")
    check_architecture(getattr(model.config, "model_type", None))
    _check_not_quantized(model)
    chosen = deploy(pattern, model.config, sparsity=sparsity, threshold=threshold, sink=sink, window=window)
    sliding = getattr(model.config, "sliding_window", None)
    local = family(model.config.model_type).local_layers  # its sliding layers keep their window; the others have none
    if sliding is not None and getattr(model.config, "use_sliding_window", True) and not local:
        logger.warning("duohead: retrieval heads attend to the whole context, ignoring the model's sliding window of %d", sliding)
    check_weights_in_place(model)  # offloaded weights would be restored at each forward, undoing the reorder
    shard = head_shard(model)  # tensor parallel: this rank's KV heads (refuses a plan duohead cannot follow)
    if is_enabled(model):
        disable(model)

    layouts = rank_layouts(model_layouts(model.config, chosen.layout.tolist(), chosen.sink, chosen.window), shard)
    state = _EnabledState(model.config._attn_implementation, type(model), chosen.pattern, chosen.layout, chosen.sparsity)
    _attach(model, layouts, state)
    logger.info("duohead: %s", chosen.describe())
    return model


def _check_not_quantized(model: torch.nn.Module) -> None:
    """Raise ValueError for a model loaded with a quantization_config (bitsandbytes, GPTQ, AWQ, ...). A GGUF
    checkpoint is dequantised on load (plain tensors) and passes, though transformers keeps its GGUF quantizer on
    the model (`hf_quantizer`)."""
    quantizer = getattr(model, "hf_quantizer", None)
    quant = getattr(model.config, "quantization_config", None) or getattr(quantizer, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    if (quant is not None or quantizer is not None) and method != "gguf":
        raise ValueError(
            f"duohead does not support quantized models (quantization_config: {method or quant!s}): enable() reorders "
            "the heads of q/k/v/o_proj, which needs plain weight tensors; load the model without quantization_config"
        )


def _attach(model: torch.nn.Module, layouts: list[LayerLayout], state: _EnabledState) -> None:
    """What `disable` undoes: reorder every layer's heads, attach its layout, switch attention and class."""
    for attn, layout in zip(attention_modules(model), layouts):
        permute_heads(attn, list(layout.kv_order))
        attn.duohead_layout = layout
    register()  # idempotent; `import duohead` alone does not import transformers
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
        permute_heads(attn, sorted(range(len(order)), key=order.__getitem__))  # the inverse permutation
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

    `path` is a local folder or a Hugging Face model id (transformers resolves it: its cache, or the hub when
    online); add `gguf_file=` for a GGUF checkpoint. On a machine without CUDA, and given no `dtype`, `device_map`
    or `tp_plan`, the weights load in float32 (as the CLIs do): a bf16 checkpoint in its own dtype runs slower on
    a CPU (35.5 s vs 25.9 s for SmolLM2 on a 1,100-token prompt, measured in issue 27). A bad pattern, or "auto"
    without a shipped pattern for this model, fails on the config, before the weights load.
    """
    from transformers import AutoModelForCausalLM

    from duohead.loading import model_config

    if not {"dtype", "torch_dtype", "device_map", "tp_plan"} & set(hf_kwargs) and not torch.cuda.is_available():
        hf_kwargs["dtype"] = torch.float32  # the CPU runs fp32 faster than a bf16 checkpoint's own dtype (issue 27)
    config_keys = ("revision", "token", "cache_dir", "gguf_file", "trust_remote_code")
    config_kwargs = {k: v for k, v in hf_kwargs.items() if k in config_keys}
    pattern = resolve_pattern(pattern, model_config(path, **config_kwargs))
    model = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)
    return enable(model, pattern, sparsity=sparsity, threshold=threshold, sink=sink, window=window)
