"""vLLM model classes that run a duohead pattern: every layer's attention becomes one vLLM attention per KV head.

For each supported architecture, the class registered under vLLM's own architecture name is a subclass of vLLM's
class. Without a `duohead` key in the model config it *is* vLLM's model: same modules, same weights, same code path.
With one, after vLLM builds the model, each layer's `Attention` is replaced by a `SplitAttention` over the same
q/k/v: each KV head (with its query heads) attends through its own module, a stock vLLM `Attention` (full KV,
vLLM's own backend) for a retrieval head, a `StreamingAttention` (a `SinkWindowSpec`, duohead's streaming backend)
for a streaming head. Weights are loaded unchanged (no head reorder is needed when every head is its own module).
Everything else (projections, rotary embeddings, q/k norms, MLP, sampling) is vLLM's.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index

from duohead.vllm.backend import StreamingBackend
from duohead.vllm.engine import check_engine
from duohead.vllm.kv_spec import SinkWindowSpec
from duohead.vllm.settings import deployment_for, requested

logger = init_logger(__name__)

# vLLM architecture name -> "module:class" of vLLM's own model class
STOCK_CLASSES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "vllm.model_executor.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM",
}


class StreamingAttention(Attention):
    """A vLLM `Attention` over streaming heads: its KV spec keeps S + W tokens per request, duohead's backend attends."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, sink: int, window: int, prefix: str):
        self.sink = sink
        cache_config = get_current_vllm_config().cache_config
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads=num_kv_heads,
            cache_config=cache_config,
            per_layer_sliding_window=window,
            prefix=prefix,
            attn_backend=StreamingBackend,
        )

    def get_kv_cache_spec(self, vllm_config) -> SinkWindowSpec:
        return SinkWindowSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size_v,
            dtype=self.kv_cache_torch_dtype,
            sliding_window=self.sliding_window,
            sink=self.sink,
        )


class SplitAttention(nn.Module):
    """One layer's attention, one vLLM attention module per KV head: q [N, Hq * D], k, v [N, Hkv * D] -> [N, Hq * D].

    KV head h and its G query heads go to `heads[h]`: a stock vLLM `Attention` (full KV) for a retrieval head, a
    `StreamingAttention` (sink + window) for a streaming head. One KV head per module gives every module of the model
    one of two KV specs (full, or sink + window, of one head each), so vLLM's allocator forms two kinds of KV-cache
    groups with one page size: the pattern's per-layer head counts cost no padding (only very unequal totals of the
    two kinds do, as at 75% streaming; docs/serving.md)."""

    def __init__(self, stock: Attention, retrieval: list[bool], sink: int, window: int) -> None:
        super().__init__()
        group = stock.num_heads // stock.num_kv_heads
        self.q_width, self.kv_width = group * stock.head_size, stock.head_size
        cache_config = get_current_vllm_config().cache_config
        heads = []
        for head, keeps_all in enumerate(retrieval):
            args = (group, stock.head_size, stock.impl.scale)
            if keeps_all:
                heads.append(Attention(*args, num_kv_heads=1, cache_config=cache_config, prefix=f"{stock.layer_name}.kv{head}"))
            else:
                heads.append(StreamingAttention(*args, 1, sink, window, prefix=f"{stock.layer_name}.kv{head}"))
        self.heads = nn.ModuleList(heads)
        del get_current_vllm_config().compilation_config.static_forward_context[stock.layer_name]  # holds no KV now

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outputs = []
        for h, head in enumerate(self.heads):
            kv = slice(h * self.kv_width, (h + 1) * self.kv_width)
            outputs.append(head(q[:, h * self.q_width : (h + 1) * self.q_width], k[:, kv], v[:, kv]))
        return torch.cat(outputs, dim=-1)


def _duohead_class(stock: type) -> type:
    """`stock` (a vLLM causal-LM class) that runs the model config's `duohead` pattern when it has one."""

    class DuoheadModel(stock):
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            config = vllm_config.model_config.hf_config
            if requested(config) is None:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
                return
            check_engine(vllm_config)  # as EngineCheck did in the engine's first process
            deployment = deployment_for(config)
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            layout = deployment.layout.tolist()
            for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
                attn = layer.self_attn
                index = extract_layer_index(attn.attn.layer_name)
                attn.attn = SplitAttention(attn.attn, layout[index], deployment.sink, deployment.window)
            logger.info("duohead: %s", deployment.describe())

    DuoheadModel.__name__ = DuoheadModel.__qualname__ = stock.__name__
    return DuoheadModel


def _stock(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


LlamaForCausalLM = _duohead_class(_stock(STOCK_CLASSES["LlamaForCausalLM"]))
MistralForCausalLM = _duohead_class(_stock(STOCK_CLASSES["MistralForCausalLM"]))
Qwen2ForCausalLM = _duohead_class(_stock(STOCK_CLASSES["Qwen2ForCausalLM"]))
Qwen3ForCausalLM = _duohead_class(_stock(STOCK_CLASSES["Qwen3ForCausalLM"]))
