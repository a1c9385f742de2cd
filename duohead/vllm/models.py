"""vLLM model classes that run a duohead pattern: every decoder layer's attention splits into two vLLM attentions.

For each supported architecture, the class registered under vLLM's own architecture name is a subclass of vLLM's
class. Without a `duohead` key in the model config it *is* vLLM's model: same modules, same weights, same code path.
With one, after vLLM builds the model:
1. each layer's `Attention` is replaced by a `SplitAttention` over the same q/k/v: its first Hr_l KV heads (and
   their query heads) attend through a stock vLLM `Attention` (full KV, vLLM's own backend), the other Hs_l through
   a `StreamingAttention` (a `SinkWindowSpec`, duohead's streaming backend). Head counts vary by layer;
2. weight loading permutes each layer's q/k/v rows (biases too) and o_proj columns so that the retrieval heads come
   first, inside each tensor-parallel rank's slice of heads (vLLM then shards the permuted weights as usual).
Everything else (projections, rotary embeddings, q/k norms, MLP, sampling) is vLLM's.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index

from duohead.architecture import LayerLayout, head_dim, num_kv_heads, text_config
from duohead.sharding import head_rows
from duohead.vllm.backend import StreamingBackend
from duohead.vllm.engine import check_engine
from duohead.vllm.kv_spec import SinkWindowSpec
from duohead.vllm.settings import deployment_for, global_kv_order, rank_layer_layouts, requested

logger = init_logger(__name__)

# vLLM architecture name -> "module:class" of vLLM's own model class
STOCK_CLASSES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "vllm.model_executor.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM",
}

# A checkpoint's attention projections: HF names (q_proj ...) and Mistral's native ones (wq ...).
_PROJECTION = re.compile(r"layers\.(\d+)\.(?:self_attn\.([qkvo])_proj|attention\.w([qkvo]))\.(weight|bias)$")


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
    """One layer's attention, retrieval heads first: q [N, Hq * D], k, v [N, Hkv * D] -> [N, Hq * D].

    The first Hr KV heads (and their Hr * G query heads) go to `retrieval`, a stock vLLM `Attention`; the other Hs
    to `streaming`. A part with no heads is None."""

    def __init__(self, stock: Attention, layout: LayerLayout) -> None:
        super().__init__()
        group = stock.num_heads // stock.num_kv_heads
        head_size, scale = stock.head_size, stock.impl.scale
        self.retrieval_heads, self.streaming_heads = layout.num_retrieval_heads, stock.num_kv_heads - layout.num_retrieval_heads
        self.q_split = self.retrieval_heads * group * head_size
        self.kv_split = self.retrieval_heads * head_size
        config = get_current_vllm_config()
        self.retrieval = self.streaming = None
        if self.retrieval_heads:
            self.retrieval = Attention(
                self.retrieval_heads * group,
                head_size,
                scale,
                num_kv_heads=self.retrieval_heads,
                cache_config=config.cache_config,
                prefix=f"{stock.layer_name}.retrieval",
            )
        if self.streaming_heads:
            self.streaming = StreamingAttention(
                self.streaming_heads * group,
                head_size,
                scale,
                self.streaming_heads,
                layout.sink,
                layout.window,
                prefix=f"{stock.layer_name}.streaming",
            )
        del config.compilation_config.static_forward_context[stock.layer_name]  # the stock layer holds no KV any more

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.streaming is None:
            return self.retrieval(q, k, v)
        if self.retrieval is None:
            return self.streaming(q, k, v)
        retrieval = self.retrieval(q[:, : self.q_split], k[:, : self.kv_split], v[:, : self.kv_split])
        streaming = self.streaming(q[:, self.q_split :], k[:, self.kv_split :], v[:, self.kv_split :])
        return torch.cat([retrieval, streaming], dim=-1)


def _permuted(weights: Iterable[tuple[str, torch.Tensor]], orders: list[list[int]], group: int, head_size: int) -> Iterator:
    """The checkpoint's (name, tensor) pairs with each layer's KV heads in `orders[layer]`: rows of q/k/v (weights and
    biases), columns of o_proj. Other tensors pass unchanged."""
    for name, tensor in weights:
        match = _PROJECTION.search(name)
        if match is not None:
            layer, which = int(match.group(1)), match.group(2) or match.group(3)
            rows = head_rows(orders[layer], group if which in "qo" else 1, head_size).to(tensor.device)
            tensor = tensor.index_select(1 if which == "o" else 0, rows)
        yield name, tensor


def _duohead_class(stock: type) -> type:
    """`stock` (a vLLM causal-LM class) that runs the model config's `duohead` pattern when it has one."""

    class DuoheadModel(stock):
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            config = vllm_config.model_config.hf_config
            self._duohead_orders = None
            if requested(config) is None:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
                return
            check_engine(vllm_config)  # as EngineCheck did in the engine's first process
            deployment = deployment_for(config)
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
            layouts = rank_layer_layouts(deployment, config, tp_rank, tp_size)
            for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
                attn = layer.self_attn
                attn.attn = SplitAttention(attn.attn, layouts[extract_layer_index(attn.attn.layer_name)])
            self._duohead_orders = global_kv_order(deployment, config, tp_size)
            logger.info("duohead: %s", deployment.describe())

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            if self._duohead_orders is not None:
                config = text_config(self.config)
                group = config.num_attention_heads // num_kv_heads(config)
                weights = _permuted(weights, self._duohead_orders, group, head_dim(config))
            return super().load_weights(weights)

    DuoheadModel.__name__ = DuoheadModel.__qualname__ = stock.__name__
    return DuoheadModel


def _stock(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


LlamaForCausalLM = _duohead_class(_stock(STOCK_CLASSES["LlamaForCausalLM"]))
MistralForCausalLM = _duohead_class(_stock(STOCK_CLASSES["MistralForCausalLM"]))
Qwen2ForCausalLM = _duohead_class(_stock(STOCK_CLASSES["Qwen2ForCausalLM"]))
Qwen3ForCausalLM = _duohead_class(_stock(STOCK_CLASSES["Qwen3ForCausalLM"]))
