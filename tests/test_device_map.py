"""Device maps: duohead under accelerate's `device_map` (layers placed by hooks), offload refused, and every
per-forward object on the layer's device."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import duohead
from duohead import HeadPattern, kernels
from duohead.architecture import LayerLayout
from duohead.attention import duohead_attention, duohead_mask
from duohead.cache import DynamicDuoLayer, PendingKV

SINK, WINDOW = 3, 6
# mixed layers whose retrieval head is not first, so enable must move heads (offloaded weights would undo the move:
# measured 0.18 max logit difference on this model when the refusal is bypassed)
PATTERN = HeadPattern(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.9]]), sink=SINK, window=WINDOW)


def _device_map(folder_layers: dict[str, str]) -> dict[str, str]:
    base = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return {**base, **{f"model.layers.{i}": "cpu" for i in range(3)}, **folder_layers}


def _padded_batch():
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    ids[0, :11] = 0
    return ids, mask


def _greedy(model):
    ids, mask = _padded_batch()
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, prefill_chunk_size=9)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device-map")
    tiny_model("llama").save_pretrained(folder)
    return folder


def _load(folder, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def test_device_map_gives_the_tokens_of_a_plain_model(saved):
    plain = duohead.enable(_load(saved), PATTERN)
    # one device here, so make accelerate place every layer through its hooks as it does across GPUs
    mapped = dispatch_model(_load(saved), device_map=_device_map({}), main_device="cpu", force_hooks=True)
    assert hasattr(mapped.model.layers[1], "_hf_hook")
    duohead.enable(mapped, PATTERN)
    assert torch.equal(_greedy(mapped), _greedy(plain))


def _assert_refused_unchanged(model, message: str) -> None:
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=message):
        duohead.enable(model, PATTERN)
    assert not duohead.is_enabled(model) and model.config._attn_implementation == impl
    assert all(not hasattr(layer.self_attn, "duohead_layout") for layer in model.model.layers)


def test_disk_offloaded_attention_weights_are_refused_before_any_forward(saved, tmp_path):
    model = _load(saved, device_map=_device_map({"model.layers.1": "disk"}), offload_folder=str(tmp_path / "offload"))
    where = r"model\.layers\.1\.self_attn.* of layer 1 is not in device memory \(device_map: 'model\.layers\.1' -> 'disk'\)"
    _assert_refused_unchanged(model, "offloaded: " + where)


def test_cpu_offloaded_weights_are_refused_before_any_forward(saved):
    model = cpu_offload(_load(saved), execution_device=torch.device("cpu"))  # weights restored by hooks at each forward
    _assert_refused_unchanged(model, r"offloaded: model\.layers\.0\.self_attn.* of layer 0 is not in device memory\.")


def test_padding_and_cache_follow_the_layers_device(monkeypatch):
    """Placement only, on a fake second device ("meta": shapes, no data): the padding built once per forward on
    the first layer's device (CPU) must reach the kernels on the layer's device, beside its cache."""
    seen: list[tuple[str, torch.device]] = []

    def record(name):
        def kernel(*args, out=None, **kwargs):
            seen.extend((name, a.device) for a in args if isinstance(a, torch.Tensor))
            return args[0] if out is None else out

        return kernel

    monkeypatch.setattr(kernels, "retrieval_attention", record("retrieval"))
    monkeypatch.setattr(kernels, "streaming_attention_and_append", record("streaming"))  # attend, then store
    module = torch.nn.Module()
    module.duohead_layout = LayerLayout.from_retrieval([True, False], SINK, WINDOW)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    padding = duohead_mask(2, 10, 10, attention_mask=mask)  # on the CPU, where the mask was made
    assert padding.query_is_real.device.type == "cpu"
    query = torch.empty(2, 4, 10, 16, device="meta")
    keys = torch.empty(2, 2, 10, 16, device="meta")
    layer = DynamicDuoLayer(module.duohead_layout)
    layer.lazy_initialization(keys, keys)
    duohead_attention(module, query, PendingKV(layer, keys, keys), PendingKV(layer, keys, keys), padding)
    assert {name for name, _ in seen} == {"retrieval", "streaming"}
    assert all(device.type == "meta" for _, device in seen), seen
