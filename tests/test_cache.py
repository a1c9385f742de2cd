"""DuoCache as a user meets it: what it refuses (a model it was not made for, a batch it does not hold, a static
cache's capacity), and that each storage regime stores its own tokens."""

from __future__ import annotations

import pytest
import torch
from tiny_models import mixed_gates, tiny_model

import duohead
from duohead import DuoCache, HeadPattern
from duohead.cache import DynamicDuoLayer, StaticDuoLayer, cache_argument

SINK, WINDOW = 4, 8


def enabled_model(gates=None):
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2) if gates is None else gates, sink=SINK, window=WINDOW))
    return model


def test_each_regime_is_its_own_layer_class():
    model = enabled_model()
    assert all(type(layer) is DynamicDuoLayer for layer in DuoCache.from_model(model).layers)
    assert all(type(layer) is StaticDuoLayer for layer in DuoCache.from_model(model, max_length=32, static=True).layers)


@torch.no_grad()
def test_the_layer_stores_and_counts_the_tokens_it_is_given():
    model = enabled_model(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]]))  # layer 0: one head of each kind
    cache = DuoCache.from_model(model)
    ids = torch.randint(1, 97, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: 25 real tokens in row 1
    model(ids, attention_mask=mask, **{cache_argument(model): cache})
    layer = cache.layers[0]
    assert layer.seen == 30 and layer.real_seen.tolist() == [30, 25]
    assert layer.retrieval.length == 30  # the retrieval head keeps every slot
    assert sorted(layer.streaming.ring_pos[1].tolist())[-1] == 24  # the streaming ring holds row 1's newest real token


@torch.no_grad()
def test_a_cache_kept_across_a_new_pattern_is_refused():
    model = enabled_model()
    ids = torch.randint(1, 97, (1, 20))
    cache = DuoCache.from_model(model)
    model(ids, **{cache_argument(model): cache})
    duohead.enable(model, HeadPattern(torch.ones(3, 2), sink=SINK, window=WINDOW))  # another layout
    with pytest.raises(ValueError, match="made for another head layout.*DuoCache.from_model"):
        model(ids[:, :1], **{cache_argument(model): cache})


@torch.no_grad()
def test_a_cache_built_from_layouts_is_refused_by_a_model_with_other_layouts():
    model = enabled_model()
    cache = DuoCache([layer.layout for layer in DuoCache.from_model(model).layers])
    duohead.enable(model, HeadPattern(torch.ones(3, 2), sink=SINK, window=WINDOW))
    with pytest.raises(ValueError, match="made for another head layout"):
        model(torch.randint(1, 97, (1, 20)), **{cache_argument(model): cache})


@torch.no_grad()
def test_a_cache_kept_after_disable_is_refused():
    model = enabled_model()
    ids = torch.randint(1, 97, (1, 20))
    cache = DuoCache.from_model(model)
    model(ids, **{cache_argument(model): cache})
    duohead.disable(model)
    with pytest.raises(ValueError, match="no longer enabled"):
        model(ids[:, :1], **{cache_argument(model): cache})


@torch.no_grad()
def test_a_new_batch_size_is_refused():
    model = enabled_model()
    cache = DuoCache.from_model(model)
    model(torch.randint(1, 97, (2, 20)), **{cache_argument(model): cache})
    with pytest.raises(ValueError, match="holds a batch of 2 rows; the forward gave 3"):
        model(torch.randint(1, 97, (3, 1)), **{cache_argument(model): cache})


@torch.no_grad()
def test_a_static_cache_says_its_capacity_when_full():
    model = enabled_model()
    cache = DuoCache.from_model(model, max_length=10, static=True)
    assert cache.layers[0].capacity == 64
    model(torch.randint(1, 97, (1, 60)), **{cache_argument(model): cache})
    with pytest.raises(ValueError, match=r"holds 64 tokens \(max_length=10, rounded up to 64\).*to 65"):
        model(torch.randint(1, 97, (1, 5)), **{cache_argument(model): cache})


def test_a_static_cache_outside_no_grad_says_so():
    model = enabled_model()
    cache = DuoCache.from_model(model, max_length=32, static=True)
    with pytest.raises(ValueError, match=r"torch.no_grad\(\)"):
        model(torch.randint(1, 97, (1, 8)), **{cache_argument(model): cache})


@pytest.mark.parametrize("kwargs, message", [({"max_length": -5}, "max_length"), ({"rollback": -1}, "rollback")])
def test_bad_sizes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DuoCache.from_model(enabled_model(), **kwargs)


def test_a_static_cache_needs_max_length():
    with pytest.raises(ValueError, match="needs max_length"):
        DuoCache.from_model(enabled_model(), static=True)


def test_the_old_constructor_points_at_from_model():
    with pytest.raises(TypeError, match=r"DuoCache.from_model\(model\)"):
        DuoCache(enabled_model())


@pytest.mark.parametrize("implementation", [None, "dynamic", "static"])
def test_generate_takes_the_cache_implementations_duohead_names(implementation):
    model = enabled_model()
    ids = torch.randint(1, 97, (1, 12))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation=implementation)
    reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, reference)


@torch.no_grad()
def test_split_margin_is_set_per_cache():
    """One cache splits at S + W, another keeps every head's KV in one buffer 16 tokens longer: same logits."""
    model = enabled_model(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]]))
    ids = torch.randint(1, 97, (1, SINK + WINDOW + 10))
    early, late = DuoCache.from_model(model, split_margin=0), DuoCache.from_model(model, split_margin=16)
    a, b = model(ids, **{cache_argument(model): early}).logits, model(ids, **{cache_argument(model): late}).logits
    assert early.layers[0].unsplit is None and late.layers[0].unsplit is not None
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="split_margin"):
        DuoCache.from_model(model, split_margin=-1)


@torch.no_grad()
def test_each_cache_owns_the_flashinfer_plans_of_its_layers(monkeypatch):
    """FlashInfer's plans belong to the cache whose steps they serve (no module-global owner between two caches)."""
    from duohead import kernels

    model = enabled_model(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]]))
    first, second = DuoCache.from_model(model), DuoCache.from_model(model)
    assert first.plans is not second.plans and all(layer.plans is first.plans for layer in first.layers)
    seen = []
    retrieval = kernels.retrieval_attention
    monkeypatch.setattr(kernels, "retrieval_attention", lambda *args: (seen.append(args[5]), retrieval(*args))[1])
    ids = torch.randint(1, 97, (1, SINK + WINDOW + 3))
    model(ids, **{cache_argument(model): first})
    model(ids, **{cache_argument(model): second})
    model(ids)  # no cache: None, the module's default owner (flashinfer_retrieval.DEFAULT_PLANS)
    assert {id(p) for p in seen} == {id(first.plans), id(second.plans), id(None)}
