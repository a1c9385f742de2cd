"""The gated student for calibration: per KV head, alpha * full attention + (1 - alpha) * streaming attention.

Shape letters: B batch, Hq query heads, Hkv KV heads (Hq = G * Hkv), T tokens, D head dim, S sink, W window,
L layers.

The blend is an attention function registered with transformers under `GATED_ATTENTION`; it reads the gates
from a `Gating` object passed as the keyword `duohead_gating` to the model's forward (transformers hands forward
keywords down to the attention function), so no module is changed. The teacher is the same model run with its
own attention implementation, without gradients. Model weights stay frozen: only the gates learn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duohead.architecture import check_architecture, check_sink_window, local_window, num_kv_heads, pattern_layers
from duohead.kernels.oracle import lambda_visible
from duohead.kernels.reference import masked_attention

GATED_ATTENTION = "duohead-calibrate"
GATING_KWARG = "duohead_gating"
MIN_BLOCK = 128  # query rows per block of the streaming branch, at least the window (fewer, larger matmuls)


@dataclass
class Gating:
    """gates [L', Hkv] (the learnable alphas; 1 = full attention), one row per layer a pattern covers
    (`architecture.pattern_layers`: rows[layer index] = its row), and the streaming heads' sink/window."""

    gates: torch.Tensor
    sink: int
    window: int
    rows: dict[int, int]


def streaming_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, scaling: float
) -> torch.Tensor:
    """Λ-masked attention over a whole sequence (positions 0..T-1), differentiable; memory O(T * (S + 2W)).

    q [B, Hq, T, D]; k, v [B, Hkv, T, D] -> [B, Hq, T, D]. No [T, T] mask at any length: see
    `blocked_streaming_attention`.
    """
    return blocked_streaming_attention(q, k, v, sink, window, scaling)


def blocked_streaming_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, scaling: float
) -> torch.Tensor:
    """Λ-masked attention over a whole sequence (positions 0..T-1), differentiable, O(T * (S + 2W)).

    q [B, Hq, T, D]; k, v [B, Hkv, T, D] -> [B, Hq, T, D]. Queries go in blocks of N = max(W, 128) rows
    (at most T); block b sees the sink keys plus key blocks b-1 and b, which hold every key within the window
    (N >= W); `lambda_visible` masks the rest (a bool mask [T, S + 2N] per group of G query heads).

    Not the torch backend's banded prefill (`kernels.reference.unpadded_lambda_attention`): calibration differentiates
    through q, k and v, and this layout (two key blocks per query block, one mask per forward) keeps the saved
    activations of the backward at O(T (S + 2N)) as measured in `benchmarks/bench_calibration_memory.py`; the
    inference bands write into a preallocated output and build per-band key copies, which the backward would keep.
    Both are checked against the same Λ rule (`duohead.kernels.oracle`; tests/test_calibrate.py, test_oracle.py).
    """
    batch, num_q_heads, length, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    block = max(1, min(max(window, MIN_BLOCK), length))
    num_blocks = -(-length // block)
    pad = num_blocks * block - length
    dev = q.device

    qb = F.pad(q, (0, 0, 0, pad)).view(batch, num_kv_heads, group, num_blocks, block, head_dim)
    kb = F.pad(k, (0, 0, block, pad)).unfold(2, 2 * block, block).transpose(-1, -2)  # [B, Hkv, nb, 2*blk, D]
    vb = F.pad(v, (0, 0, block, pad)).unfold(2, 2 * block, block).transpose(-1, -2)
    n_sink = min(sink, length)
    sink_k, sink_v = k[:, :, :n_sink], v[:, :, :n_sink]  # [B, Hkv, S', D]

    starts = torch.arange(num_blocks, device=dev)[:, None] * block
    q_pos = starts + torch.arange(block, device=dev)  # [nb, blk]
    q_pos = torch.where(q_pos < length, q_pos, torch.full_like(q_pos, length - 1))  # padding rows: any finite row
    local_pos = starts - block + torch.arange(2 * block, device=dev)  # [nb, 2*blk]
    local_pos = torch.where((local_pos >= n_sink) & (local_pos < length), local_pos, torch.full_like(local_pos, -1))
    k_pos = torch.cat([torch.arange(n_sink, device=dev).expand(num_blocks, n_sink), local_pos], dim=1)
    visible = lambda_visible(q_pos[:, :, None], k_pos[:, None, :], sink, window)  # [nb, blk, S' + 2*blk]

    # Blocks as a batch dimension: queries [B, Hkv, nb, G*blk, D] against keys [B, Hkv, nb, S' + 2*blk, D],
    # one fused SDPA call (no explicit score tensor is kept for the backward).
    qf = qb.permute(0, 1, 3, 2, 4, 5).reshape(batch, num_kv_heads, num_blocks, group * block, head_dim)
    keys = torch.cat([sink_k[:, :, None].expand(-1, -1, num_blocks, -1, -1), kb], dim=3)
    values = torch.cat([sink_v[:, :, None].expand(-1, -1, num_blocks, -1, -1), vb], dim=3)
    mask = visible[:, None].expand(-1, group, -1, -1).reshape(num_blocks, group * block, -1)  # [nb, G*blk, S' + 2*blk]
    flat = batch * num_kv_heads, num_blocks  # 4-D for SDPA's fused kernels: [B*Hkv, nb, rows, D]
    out = F.scaled_dot_product_attention(
        qf.reshape(*flat, group * block, head_dim),
        keys.reshape(*flat, -1, head_dim),
        values.reshape(*flat, -1, head_dim),
        attn_mask=mask,
        scale=scaling,
    )
    out = out.view(batch, num_kv_heads, num_blocks, group, block, head_dim).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(batch, num_q_heads, num_blocks * block, head_dim)[:, :, :length]


def gated_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers: per KV head, alpha * causal attention + (1 - alpha) * Λ attention.

    query [B, Hq, T, D]; key, value [B, Hkv, T, D] (a whole sequence, no cache); the gates come from the
    `duohead_gating` keyword (a `Gating`), the row of layer `module.layer_idx`. A local sliding-window layer has no
    gates: it runs its own window (the Λ rule with sink 0), as at inference. Returns ([B, T, Hq, D], None).
    With a soft cap or learned sinks (`softcap`, `s_aux`) both branches run an explicit softmax over a [T, T] mask
    (`explicit_branches`), as the stock modules of those families do: memory O(T^2) per layer.
    """
    gating = kwargs.get(GATING_KWARG)
    if not isinstance(gating, Gating):
        raise ValueError(
            f"attention {GATED_ATTENTION!r} needs the gates: call the model with {GATING_KWARG}=Gating(...) "
            "(see duohead.calibrate.gates.GatedModel)"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    group = query.shape[1] // key.shape[1]
    changes = {"softcap": kwargs.get("softcap"), "sinks": kwargs.get("s_aux")}
    local = local_window(module.config, module.layer_idx)
    if changes["softcap"] is not None or changes["sinks"] is not None:
        sink, window = (0, local) if local is not None else (gating.sink, gating.window)
        full, stream = explicit_branches(query, key, value, sink, window, scaling, **changes)
        if local is not None:
            return stream.transpose(1, 2), None
    elif local is not None:
        return streaming_attention(query, key, value, 0, local, scaling).transpose(1, 2), None
    else:
        full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=group > 1)
        stream = streaming_attention(query, key, value, gating.sink, gating.window, scaling)
    row = gating.gates[gating.rows[module.layer_idx]]
    alpha = row.repeat_interleave(group).to(query.dtype)[None, :, None, None]  # [1, Hq, 1, 1]
    out = alpha * full + (1 - alpha) * stream
    return out.transpose(1, 2), None


def explicit_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, Λ) attention over a whole sequence with a soft cap and/or learned sinks [Hq] (the torch kernel's
    explicit softmax, differentiable): q [B, Hq, T, D]; k, v [B, Hkv, T, D] -> two [B, Hq, T, D]."""
    pos = torch.arange(q.shape[2], device=q.device)
    causal = lambda_visible(pos[:, None], pos[None, :], q.shape[2], 1)[None]  # sink >= T: every earlier key
    streaming = lambda_visible(pos[:, None], pos[None, :], sink, window)[None]
    changes = {"softcap": softcap, "sinks": sinks}
    return (
        masked_attention(q, k, v, causal, scaling, padded=False, **changes),
        masked_attention(q, k, v, streaming, scaling, padded=False, **changes),
    )


def gated_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """Mask function for `GATED_ATTENTION`: causality and the Λ rule are built in; padding is not supported."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("calibration takes unpadded sequences (batch 1, no attention_mask with zeros)")
    return None


def register() -> None:
    """Register the gated attention and its mask function under `GATED_ATTENTION` (idempotent)."""
    AttentionInterface.register(GATED_ATTENTION, gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, gated_mask)


@contextmanager
def _attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class GatedModel:
    """A frozen causal LM with one learnable gate per (layer, KV head).

    `teacher_states` runs the model as loaded (no gradients): the final hidden states (after the final norm)
    at the supervised positions, [P, hidden] for input_ids [1, T] and supervised [T] bool (P = its count).
    `distill_backward` runs the gated blend (gradient checkpointing per decoder layer) against them.
    """

    def __init__(self, model: torch.nn.Module, *, sink: int, window: int, gradient_checkpointing: bool = True) -> None:
        config = model.config
        check_architecture(config.model_type, "calibration")
        check_sink_window(sink, window)
        register()
        model.requires_grad_(False)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.sink, self.window = sink, window
        device = next(model.parameters()).device
        covered = pattern_layers(config)
        self.rows = {layer: row for row, layer in enumerate(covered)}  # layer index -> its row of gates
        self.gates = torch.nn.Parameter(torch.ones(len(covered), num_kv_heads(config), device=device))

    @torch.no_grad()
    def teacher_states(self, input_ids: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0, supervised]

    def distill_backward(self, input_ids: torch.Tensor, supervised: torch.Tensor, target: torch.Tensor) -> float:
        """Student forward and backward: accumulates d(MSE)/d(gates) into `self.gates.grad`; returns the MSE.

        target [P, hidden] = `teacher_states(input_ids, supervised)`. The backward runs inside the same
        attention/training state as the forward, because gradient checkpointing recomputes layers there.
        """
        self.model.train()  # gradient checkpointing runs in training mode only; these models have no dropout
        try:
            with _attention(self.model, GATED_ATTENTION):
                gating = Gating(self.gates, self.sink, self.window, self.rows)
                out = self.model.base_model(input_ids=input_ids, use_cache=False, **{GATING_KWARG: gating})
                loss = F.mse_loss(out.last_hidden_state[0, supervised].float(), target.float())
                loss.backward()
        finally:
            self.model.eval()
        return loss.item()
