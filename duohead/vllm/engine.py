"""Engine-level checks of a duohead model, run where vLLM builds its config (the process that starts the engine).

Light on purpose: `duohead.vllm.register` imports it in every vLLM process, before any model module is loaded.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from duohead.vllm.settings import deployment_for, requested

logger = init_logger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Families duohead runs in transformers only: vLLM's own class runs them, and `EngineCheck` refuses a `duohead` key
# on them in one line (architecture.check_architecture) rather than let vLLM ignore it.
REFUSED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM",
           "Olmo2ForCausalLM", "GraniteForCausalLM", "Glm4ForCausalLM")  # fmt: skip


class EngineCheck(VerifyAndUpdateConfig):
    """Checks a duohead model's engine settings when vLLM builds its config, in the process that starts the engine,
    so that a bad pattern or an unsupported setting fails at `LLM(...)` / `vllm serve` in one line, before any
    worker starts or weights load. Registered by `duohead.vllm.register` for the supported architectures and for
    `REFUSED` (whose `duohead` key it refuses)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if requested(vllm_config.model_config.hf_config) is None:
            return
        check_engine(vllm_config)
        deployment_for(vllm_config.model_config.hf_config)
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("duohead: prefix caching is off (streaming heads report no prefix-cache hit; docs/serving.md)")
            vllm_config.cache_config.enable_prefix_caching = False


def check_engine(vllm_config) -> None:
    """Raise ValueError for engine settings duohead's plugin does not support (yet), naming them."""
    parallel = vllm_config.parallel_config
    unsupported = {
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
    }
    given = [f"{name}={value}" for name, value in unsupported.items() if value > 1]
    if vllm_config.speculative_config is not None:
        given.append("speculative decoding")
    if vllm_config.quant_config is not None or vllm_config.model_config.quantization is not None:
        given.append("quantized checkpoints (duohead permutes attention heads in the weights)")
    if given:
        raise ValueError(f"duohead's vLLM plugin does not support {', '.join(given)} yet; run without the 'duohead' key")
