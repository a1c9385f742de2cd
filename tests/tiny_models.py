"""Tiny random-initialised causal LMs of every supported family, and an independent Λ oracle."""

from __future__ import annotations

import copy

import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM

from duohead.architecture import FAMILIES as SUPPORTED
from duohead.architecture import attention_modules, pattern_layers

IN_VOCABULARY = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # where a family's defaults exceed 97 tokens
# family -> (transformers config class, the fields that make its special layers appear in a tiny model)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {}),
    "mixtral": ("MixtralConfig", {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"use_sliding_window": False, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 48},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "phi3": ("Phi3Config", IN_VOCABULARY),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2, **IN_VOCABULARY}),  # layer 1 (of 0-2) has no RoPE
    "olmo2": ("Olmo2Config", IN_VOCABULARY),
    "granite": ("GraniteConfig", {"attention_multiplier": 0.4, "embedding_multiplier": 2.0, "residual_multiplier": 0.5}),
    "glm4": ("Glm4Config", {"attention_bias": True, **IN_VOCABULARY}),
    # local sliding-window layers (tiny_model puts one before each global layer); a soft cap low enough to matter
    "gemma2": ("Gemma2Config", {"attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 24, **IN_VOCABULARY}),
    "gemma3_text": ("Gemma3TextConfig", {"query_pre_attn_scalar": 24, **IN_VOCABULARY}),
    "gemma3": ("Gemma3Config", {"query_pre_attn_scalar": 24, **IN_VOCABULARY}),  # its text decoder; tiny vision tower
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "attention_bias": True, **IN_VOCABULARY}),
    "olmo3": ("Olmo3Config", IN_VOCABULARY),
}  # fmt: skip
LOCAL_WINDOW = 6  # tokens of the tiny models' local layers
EAGER = ("gemma2", "gpt_oss")  # stock attention is eager (transformers' SDPA path has no soft cap / sinks)
ARCHITECTURES = tuple(arch for arch in FAMILIES if SUPPORTED[arch].vllm)  # the families duohead's vLLM plugin runs


def tiny_model(
    arch: str = "llama", *, layers: int = 3, heads: int = 4, kv_heads: int = 2, vocab: int = 97, seed: int = 0, **config
):
    """A seeded random model (fp32, eval, sdpa; eager where transformers' SDPA lacks the family's score changes) small
    enough to run hundreds of forwards in seconds. `config` overrides the config's other fields (hidden_size 64,
    head_dim 16, ...). Biases, learned sinks and q/k norm weights are random (not zeros / ones), so a reorder that forgot
    them would change the output. In a family with local sliding-window layers `layers` counts the global ones (those
    a pattern covers), each preceded by a local layer of `LOCAL_WINDOW` tokens: 2 * layers in all."""
    torch.manual_seed(seed)
    fields = {"hidden_size": 64, "intermediate_size": 96, "head_dim": 16, "max_position_embeddings": 1024}
    if SUPPORTED[arch].local_layers:
        fields.update(sliding_window=LOCAL_WINDOW, layer_types=["sliding_attention", "full_attention"] * layers)
        layers *= 2
    fields = dict(
        vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        **{**fields, **FAMILIES[arch][1], **config},
    )  # fmt: skip
    config_class = getattr(transformers, FAMILIES[arch][0])
    if arch == "gemma3":  # a multimodal config: the decoder's fields go to its text config
        vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}  # fmt: skip
        config = config_class(text_config=fields, vision_config=vision, mm_tokens_per_image=4, image_token_index=96)
    else:
        config = config_class(**fields)
    implementation = "eager" if arch in EAGER else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                param.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def lambda_oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over the whole sequence with an explicit per-head mask: retrieval KV heads causal,
    streaming KV heads Λ (j <= i and (j < sink or i - j < window)); a local layer (sliding_window set) every head
    j <= i and i - j < sliding window, as the stock model. Soft cap (`softcap`) and learned sinks (`s_aux`) as the
    stock eager attention applies them. Heads in their original order. Expects no cache and no padding. Independent
    of duohead's own code paths."""
    retrieval, sink, window = module.oracle_layout  # retrieval: list[bool] per KV head
    t = query.shape[2]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    causal = j <= i
    streaming = causal & ((j < sink) | (i - j < window))
    group = query.shape[1] // key.shape[1]
    masks = torch.stack([causal if retrieval[h // group] else streaming for h in range(query.shape[1])])
    if kwargs.get("sliding_window"):
        masks = (causal & (i - j < kwargs["sliding_window"])).expand(query.shape[1], t, t)
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    if kwargs.get("softcap") is not None:
        scores = kwargs["softcap"] * torch.tanh(scores / kwargs["softcap"])
    scores = scores.masked_fill(~masks[None], float("-inf"))
    if kwargs.get("s_aux") is not None:  # one extra logit per query head, its value dropped
        scores = torch.cat([scores, kwargs["s_aux"][None, :, None, None].expand(*scores.shape[:3], 1)], dim=-1)
    out = torch.softmax(scores.float(), dim=-1)[..., :t].to(query.dtype) @ v
    return out.transpose(1, 2), None


AttentionInterface.register("lambda_oracle", lambda_oracle_attention)


def oracle_model(model, layout: torch.Tensor, sink: int, window: int):
    """A copy of an unmodified `model` that applies the explicit Λ mask of `layout` ([L, Hkv] bool, True = retrieval;
    one row per layer a pattern covers: local layers keep their sliding window)."""
    oracle = copy.deepcopy(model)
    modules = attention_modules(oracle)
    for index, retrieval in zip(pattern_layers(oracle.config), layout.tolist(), strict=True):
        modules[index].oracle_layout = (retrieval, sink, window)
    for module in modules:
        if not hasattr(module, "oracle_layout"):  # a local layer: every head sees its sliding window
            module.oracle_layout = ([False] * module.config.num_key_value_heads, 0, module.sliding_window)
    oracle.set_attn_implementation("lambda_oracle")
    return oracle


def mixed_gates(layers: int, kv_heads: int, seed: int = 0) -> torch.Tensor:
    """Gates [L, Hkv] with a pure-retrieval first layer and a pure-streaming last layer (when L > 1); every layer in
    between has a streaming head 0 and a retrieval last head (threshold 0.5), so enabling it reorders heads there."""
    g = torch.Generator().manual_seed(seed)
    gates = torch.rand(layers, kv_heads, generator=g)
    gates[:, 0] *= 0.5  # < 0.5: streaming
    gates[:, -1] = 0.5 + 0.5 * gates[:, -1]  # >= 0.5: retrieval
    gates[0] = 1.0
    if layers > 1:
        gates[-1] = 0.0
    return gates


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention with an explicit mask; a query that sees no key outputs zeros.

    q [B, Hq, Q, D]; k, v [B, Hkv, K, D]; visible [B, Q, K] bool (shared by all heads). -> [B, Hq, Q, D].
    Computed in float32.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q.float().reshape(batch, num_kv_heads, group * q_len, head_dim)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*Q, K]
    scores = scores.view(batch, num_kv_heads, group, q_len, -1)
    mask = visible[:, None, None]  # [B, 1, 1, Q, K]
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)  # exp(-inf) = 0 for hidden keys
    denom = probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.matmul((probs / denom).view(batch, num_kv_heads, group * q_len, -1), v.float())
    return out.view(batch, num_q_heads, q_len, head_dim).to(q.dtype)
