"""What a model is, as far as duohead cares: the table of supported families, KV-head counts and per-layer layouts.

A leaf module (it imports nothing, torch included, so the CLIs read it before torch loads): pattern, cache,
attention, hook, sharding, calibration and the planner all read these facts from here, and nothing here reaches
back into them. Adding a family whose attention is Llama's (q/k/v/o projections, RoPE or not, any scaling, per-head
q/k norms, biases) is one `FAMILIES` entry plus its tests: everything that happens inside the attention module
before the attention function (RoPE, partial or LongRoPE, skipped RoPE layers, per-head norms, the module's `scaling`) is
the same for every head and commutes with the head reorder; biases are reordered with their rows whenever present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    """One model family's attention, in the traits that change what duohead does (README: "Supported model families").

    model_type: transformers' `config.model_type` (a GGUF's `general.architecture` through `gguf_model_type`).
    layers: dotted path from the causal LM to its decoder layers, each with a `self_attn`.
    fused_qkv: name of a fused [q; k; v] row projection (Phi-3's `qkv_proj`), None for separate q/k/v_proj.
    wide_qk_norm: q_norm / k_norm weights span every head ([Hq*D] / [Hkv*D], OLMo 2), so they follow the reorder.
    tensor_parallel: None where duohead follows transformers' tp_plan, else why it cannot.
    vllm: whether duohead's vLLM plugin (duohead.vllm) runs the family.
    local_layers: layers that `config.layer_types` marks "sliding_attention" already keep a sliding window of
        `config.sliding_window` tokens: duohead runs them as that window (every KV head streaming with sink 0, the
        same attention and a constant cache) and a head pattern covers only the other, global layers (`pattern_layers`).
    learned_sinks: name of an attention parameter [Hq] holding a softmax logit per query head (GPT-OSS's `sinks`),
        reordered with the heads; the stock module hands it to the attention function as `s_aux`.
    Attention-logit soft-capping needs no entry: a module that caps (Gemma 2) passes `softcap` to the attention.
    """

    model_type: str
    layers: str = "model.layers"
    fused_qkv: str | None = None
    wide_qk_norm: bool = False
    tensor_parallel: str | None = None
    vllm: bool = False
    local_layers: bool = False
    learned_sinks: str | None = None


_GATHERED = "transformers' tp_plan gathers the q/k/v outputs on every rank (colwise_gather_output), so heads are not rank-local"
FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", vllm=True),
        Family("mistral", vllm=True),  # sliding window: retrieval heads see the whole context (enable warns)
        Family("qwen2", vllm=True),  # q/k/v biases: reordered with their rows
        Family("qwen3", vllm=True),  # per-head q/k RMSNorm: one weight for every head
        Family("mixtral"),  # experts and router: untouched, as everything outside self_attn
        Family("qwen2_moe"),
        Family("qwen3_moe"),
        Family("phi3", fused_qkv="qkv_proj", tensor_parallel=_GATHERED),  # Phi-3 and Phi-4; LongRoPE is outside self_attn
        Family("smollm3"),  # layers without RoPE: the same for every head
        Family("olmo2", wide_qk_norm=True, tensor_parallel=_GATHERED),
        Family("granite"),  # attention_multiplier: the module's `scaling`, passed to the attention function
        Family("glm4"),  # partial RoPE and q/k/v biases
        Family("gemma2", local_layers=True),  # logit soft-capping; query_pre_attn_scalar is the module's `scaling`
        Family("gemma3_text", local_layers=True),  # per-head q/k RMSNorm; local layers have their own RoPE base
        Family(
            "gemma3", layers="model.language_model.layers", local_layers=True
        ),  # the text decoder of Gemma 3 (image input not run)
        Family("gpt_oss", local_layers=True, learned_sinks="sinks"),  # experts and router untouched, as Mixtral's
        Family("olmo3", wide_qk_norm=True, tensor_parallel=_GATHERED, local_layers=True),  # OLMo 2's attention
    )
}

# Families duohead refuses, and what their attention needs that duohead's does not have yet.
UNSUPPORTED = {
    "llama4": "chunked local attention layers and no-RoPE global layers with attention temperature tuning",
    "llama4_text": "chunked local attention layers and no-RoPE global layers with attention temperature tuning",
    "deepseek_v3": "multi-head latent attention (one compressed KV per token, no KV heads to split)",
}


# llama.cpp's `general.architecture` where it differs from transformers' model_type (as transformers maps it on load)
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def gguf_model_type(architecture: str) -> str:
    """transformers' `model_type` of a GGUF file's `general.architecture`."""
    return _GGUF_MODEL_TYPES.get(architecture, architecture)


def family(model_type: str | None, what: str = "duohead") -> Family:
    """The `Family` of a config's `model_type`; ValueError naming what is missing unless it is supported."""
    check_architecture(model_type, what)
    return FAMILIES[model_type]


def check_architecture(model_type: str | None, what: str = "duohead", *, vllm: bool = False) -> None:
    """Raise ValueError unless `model_type` is supported (with `vllm`, by duohead's vLLM plugin)."""
    supported = sorted(name for name, f in FAMILIES.items() if f.vllm or not vllm)
    if model_type in supported:
        return
    if vllm and model_type in FAMILIES:
        reason = " (duohead supports it in transformers, not yet in vLLM)"
    elif model_type in UNSUPPORTED:
        reason = f" (its attention needs {UNSUPPORTED[model_type]}, which duohead does not implement)"
    else:
        reason = ""
    raise ValueError(f"{what} does not support architecture {model_type!r}{reason}; supported: {', '.join(supported)}")


def check_tensor_parallel(model_type: str | None, what: str = "duohead") -> None:
    """Raise ValueError where duohead cannot follow the family's tensor-parallel plan, naming why."""
    reason = family(model_type, what).tensor_parallel
    if reason is not None:
        raise ValueError(f"{what} cannot run {model_type!r} tensor-parallel: {reason}; run it on one device per model")


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
    `num_retrieval_heads` places are retrieval heads, the rest stream with `sink` + `window` tokens. `local`: the
    model's own local sliding-window layer (every head streaming, sink 0, its window), which the stock model also
    keeps at `window` tokens."""

    num_retrieval_heads: int
    sink: int
    window: int
    kv_order: tuple[int, ...]
    local: bool = False

    def full_tokens(self, tokens: int) -> int:
        """Tokens the stock model keeps per head of this layer after `tokens` tokens."""
        return min(tokens, self.window) if self.local else tokens

    @classmethod
    def from_retrieval(cls, retrieval: list[bool], sink: int, window: int) -> LayerLayout:
        """The layout that puts the retrieval heads (True in `retrieval`, one per KV head) first, order kept."""
        order = [h for h, r in enumerate(retrieval) if r] + [h for h, r in enumerate(retrieval) if not r]
        return cls(sum(retrieval), sink, window, tuple(order))


def local_window(config: Any, layer: int) -> int | None:
    """The sliding window (tokens) of layer `layer` if it is a local layer duohead keeps as it is (`Family.local_layers`:
    `config.layer_types[layer]` is "sliding_attention" and `config.sliding_window` is set), else None."""
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not FAMILIES[model_type].local_layers:
        return None
    types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    return window if window and layer < len(types) and types[layer] == "sliding_attention" else None


def pattern_layers(config: Any) -> list[int]:
    """Indices of the layers a head pattern covers: every layer, except a family's local sliding-window layers."""
    return [i for i in range(text_config(config).num_hidden_layers) if local_window(config, i) is None]


def model_layouts(config: Any, retrieval: list[list[bool]], sink: int, window: int) -> list[LayerLayout]:
    """The `LayerLayout` of every layer: the pattern's rows (`retrieval` [len(pattern_layers)][Hkv], True = retrieval
    head) on the layers it covers, and on a local layer of window W every KV head streaming with sink 0 and window W
    (the Λ rule then is the model's own sliding window: j <= i and i - j < W)."""
    covered = pattern_layers(config)
    if len(retrieval) != len(covered):
        raise ValueError(f"the layout has {len(retrieval)} rows; this model has {len(covered)} layers a pattern covers")
    rows = dict(zip(covered, retrieval))
    kv_heads = num_kv_heads(config)
    return [
        LayerLayout.from_retrieval(rows[i], sink, window)
        if i in rows
        else LayerLayout(0, 0, local_window(config, i), tuple(range(kv_heads)), local=True)
        for i in range(text_config(config).num_hidden_layers)
    ]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model
    for name in family(getattr(model.config, "model_type", None)).layers.split("."):
        layers = getattr(layers, name)
    return [layer.self_attn for layer in layers]


def layer_layouts(model: torch.nn.Module) -> list[LayerLayout]:
    """The `LayerLayout` of every layer of a model prepared with `duohead.enable`."""
    layouts = [getattr(module, "duohead_layout", None) for module in attention_modules(model)]
    if any(layout is None for layout in layouts):
        raise ValueError("this model is not duohead-enabled; call duohead.enable(model, pattern) first")
    return layouts
