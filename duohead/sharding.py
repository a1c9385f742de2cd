"""Tensor parallelism: which KV heads a rank holds under transformers' `tp_plan`, and the head reorder inside them.

transformers' plan for most supported families (`tp_plan="auto"`) shards q/k/v_proj "colwise" (rows, weights
and biases `Shard(0)`) and o_proj "rowwise" (columns, `Shard(1)`) over a 1-D mesh of N ranks: rank r holds KV heads
[r * Hkv / N, (r + 1) * Hkv / N) and their query heads, and runs attention on them alone. duohead follows that
slice: a rank's layout is its slice of the pattern, the retrieval-first reorder moves heads only inside the rank's
local shard (never across ranks), and a `DuoCache` built on the rank holds only its heads. The attention and the
cache never see ranks: each rank simply has fewer heads. Plans duohead cannot follow are refused with the reason,
families whose plan gathers q/k/v on every rank (Phi-3, OLMo 2: `architecture.Family.tensor_parallel`) first.

Shape letters: Hq query heads, Hkv KV heads (both global unless said per rank), D head dim, N ranks.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from duohead.architecture import Family, LayerLayout, attention_modules, check_tensor_parallel, family, num_kv_heads

# The attention entries of a tp_plan duohead can follow: style per module under `self_attn.`.
KNOWN_ATTENTION_STYLES = {
    "q_proj": ("colwise",),
    "k_proj": ("colwise",),
    "v_proj": ("colwise",),
    "o_proj": ("rowwise",),
    "q_norm": ("replicated_with_grad_allreduce", "replicate"),  # per-head-dim norms shared by every head
    "k_norm": ("replicated_with_grad_allreduce", "replicate"),
}
_ROW_PARAMS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")


@dataclass(frozen=True)
class HeadShard:
    """The KV heads of every layer that one tensor-parallel rank holds: [start, stop) of `total`, as in every layer."""

    rank: int
    world_size: int
    total: int
    start: int
    stop: int


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (same storage), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _is_distributed(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and hasattr(tensor, "placements") and hasattr(tensor, "device_mesh")


def _refuse(reason: str) -> ValueError:
    return ValueError(f"duohead cannot follow this tensor-parallel plan: {reason}")


def _check_plan(plan: dict[str, str]) -> None:
    """Raise ValueError unless every attention entry of `plan` is one duohead knows (and q/k/v/o are all there)."""
    found = {}
    for key, style in plan.items():
        match = re.search(r"self_attn\.(.+)$", key)
        if match is None:
            continue
        name = match.group(1)
        if name not in KNOWN_ATTENTION_STYLES or style not in KNOWN_ATTENTION_STYLES[name]:
            raise _refuse(
                f"{key!r} is {style!r}; duohead follows colwise q/k/v_proj and rowwise o_proj "
                "(transformers' tp_plan='auto' for the families duohead runs tensor-parallel)"
            )
        found[name] = style
    missing = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if name not in found]
    if missing:
        raise _refuse(f"the plan shards attention but not {', '.join(missing)} (colwise q/k/v and rowwise o_proj go together)")


def _check_placements(index: int, attn: torch.nn.Module, mesh) -> None:
    """Raise ValueError unless q/k/v rows are `Shard(0)` and o_proj's columns `Shard(1)` on `mesh` (1-D)."""
    from torch.distributed.tensor import Shard

    params = dict(attn.named_parameters())
    expected = {name: Shard(0) for name in _ROW_PARAMS if name in params}
    expected["o_proj.weight"] = Shard(1)
    for name, placement in expected.items():
        param = params[name]
        if not _is_distributed(param) or param.device_mesh != mesh:
            raise _refuse(f"layer {index} {name} is not sharded like the other attention weights")
        if tuple(param.placements) != (placement,):
            raise _refuse(f"layer {index} {name} is placed {param.placements!r}; expected ({placement!r},)")


def head_shard(model: torch.nn.Module) -> HeadShard | None:
    """The KV heads this rank holds, or None for a model that is not tensor-parallel.

    Raises ValueError, naming the reason, for a sharding duohead cannot follow: an attention plan other than
    colwise q/k/v + rowwise o_proj, a mesh of more than one dimension, or KV heads that do not split evenly
    over the ranks (a rank would hold part of a head)."""
    modules = attention_modules(model)
    if not any(_is_distributed(p) for attn in modules for p in attn.parameters()):
        return None
    check_tensor_parallel(model.config.model_type)
    _check_plan(getattr(model, "tp_plan", None) or {})
    mesh = modules[0].k_proj.weight.device_mesh
    if mesh.ndim != 1:
        raise _refuse(f"the attention weights are sharded over a {mesh.ndim}-D mesh; duohead follows a 1-D tensor-parallel mesh")
    world, rank = mesh.size(), mesh.get_local_rank()
    total = num_kv_heads(model.config)
    if total % world:
        raise _refuse(
            f"{total} KV heads do not split evenly over {world} ranks (a rank would hold part of a head); "
            f"use a number of ranks that divides {total}"
        )
    for index, attn in enumerate(modules):
        _check_placements(index, attn, mesh)
    per_rank = total // world
    shard = HeadShard(rank, world, total, rank * per_rank, (rank + 1) * per_rank)
    rows = local_shard(modules[0].k_proj.weight).shape[0]
    if rows != per_rank * modules[0].head_dim:
        raise _refuse(f"rank {rank} holds {rows} k_proj rows; expected {per_rank} KV heads x {modules[0].head_dim}")
    return shard


def _hooks(module: torch.nn.Module) -> list:
    """accelerate's hooks on a module (a `SequentialHook` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def check_weights_in_place(model: torch.nn.Module) -> None:
    """Raise ValueError if any attention weight is offloaded (accelerate `device_map` with "cpu"/"disk" offload, or
    weights left on the meta device): accelerate puts the stored weights back at every forward, which would undo
    the head reorder of `duohead.enable`, so duohead refuses before any forward rather than run wrong heads."""
    names = {id(module): name for name, module in model.named_modules()}
    device_map = getattr(model, "hf_device_map", None) or {}
    for index, attn in enumerate(attention_modules(model)):
        for module in attn.modules():
            offloaded = any(getattr(hook, "offload", False) for hook in _hooks(module))
            if not offloaded and all(p.device.type != "meta" for p in module.parameters(recurse=False)):
                continue
            name = names[id(module)]
            keys = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
            place = f" (device_map: {max(keys, key=len)!r} -> {device_map[max(keys, key=len)]!r})" if keys else ""
            raise ValueError(
                f"duohead cannot enable a model whose attention weights are offloaded: {name} of layer {index} is not "
                f"in device memory{place}. accelerate restores offloaded weights at every forward, which would undo "
                "duohead's head reorder. Load every layer onto a device (a device_map without 'cpu'/'disk' offload)"
            )


def rank_layouts(layouts: list[LayerLayout], shard: HeadShard | None) -> list[LayerLayout]:
    """Each layer's layout restricted to the rank's KV heads (indices local to the rank), or `layouts` without a shard."""
    if shard is None:
        return layouts
    sliced = []
    for layout in layouts:
        retrieval = [False] * len(layout.kv_order)
        for place, head in enumerate(layout.kv_order):
            retrieval[head] = place < layout.num_retrieval_heads
        rank_layout = LayerLayout.from_retrieval(retrieval[shard.start : shard.stop], layout.sink, layout.window)
        sliced.append(dataclasses.replace(rank_layout, local=layout.local))
    return sliced


def _head_rows(kv_order: list[int], heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """Row indices of a [num_kv_heads * heads_per_kv * head_dim, ...] projection, KV heads in `kv_order`."""
    rows = [(kv * heads_per_kv + g) * head_dim + d for kv in kv_order for g in range(heads_per_kv) for d in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


def _row_permutations(attn: torch.nn.Module, kind: Family, kv_order: list[int]) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(module, row order) for every module whose weight rows (and bias) are per head: q/k/v projections, fused or
    not, and q/k norms whose weights span every head."""
    group, head_dim = attn.num_key_value_groups, attn.head_dim
    q_rows, kv_rows = _head_rows(kv_order, group, head_dim), _head_rows(kv_order, 1, head_dim)
    if kind.fused_qkv is not None:  # rows [q (Hq*D); k (Hkv*D); v (Hkv*D)]
        q_size, kv_size = len(q_rows), len(kv_rows)
        fused = torch.cat([q_rows, kv_rows + q_size, kv_rows + q_size + kv_size])
        return [(getattr(attn, kind.fused_qkv), fused)]
    found = [(attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)]
    if kind.wide_qk_norm:
        found += [(attn.q_norm, q_rows), (attn.k_norm, kv_rows)]
    return found


@torch.no_grad()
def permute_heads(attn: torch.nn.Module, kv_order: list[int]) -> None:
    """Reorder the heads of one attention module in place so that KV head kv_order[i] moves to place i.

    On a tensor-parallel rank, `kv_order` indexes the rank's own heads and only its local shards change."""
    for module, rows in _row_permutations(attn, family(attn.config.model_type), kv_order):
        for param in (module.weight, getattr(module, "bias", None)):
            if param is not None:
                local = local_shard(param)
                local.copy_(local.index_select(0, rows.to(local.device)))
    local = local_shard(attn.o_proj.weight)
    local.copy_(local.index_select(1, _head_rows(kv_order, attn.num_key_value_groups, attn.head_dim).to(local.device)))
    sinks = family(attn.config.model_type).learned_sinks
    if sinks is not None:  # one logit per query head: the query heads of KV head kv_order[i] move to place i
        local = local_shard(getattr(attn, sinks))
        local.copy_(local.index_select(0, _head_rows(kv_order, attn.num_key_value_groups, 1).to(local.device)))
