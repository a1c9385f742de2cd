"""A static DuoCache makes the decode step compile-ready: one graph, no break, no recompile per step, same numbers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import mixed_gates, tiny_model
from torch._dynamo.testing import CompileCounter
from transformers import CompileConfig

import duohead
from duohead import DuoCache, HeadPattern
from duohead.cache import cache_argument
from duohead.runner import run_prompt

SINK, WINDOW = 4, 8


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


def left_padded(lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, max(lengths)], each row's prompt at the right end."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, 97, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_decode_step_compiles_to_one_graph_and_equals_eager():
    """Tiny Llama, mixed pattern, batch 2 with left padding, a prompt past S + W (the ring wraps while decoding):
    fullgraph=True compiles the decode step once, and its logits equal eager on a static and on a dynamic cache."""
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2, seed=3), sink=SINK, window=WINDOW))
    ids, mask = left_padded((17, 30), seed=1)
    name = cache_argument(model)
    counter = CompileCounter()
    compiled = torch.compile(model.forward, backend=counter, fullgraph=True, dynamic=False)
    caches = {
        "compiled": DuoCache.from_model(model, max_length=48, static=True),
        "static": DuoCache.from_model(model, max_length=48, static=True),
        "dynamic": DuoCache.from_model(model),
    }
    steps = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for cache in caches.values():
            model(ids, attention_mask=mask, **{name: cache})  # prefill: eager
        real = mask.sum(dim=1)
        for t in range(steps.shape[1]):
            token, positions = steps[:, t : t + 1], (real + t)[:, None]
            full_mask = torch.cat([mask, torch.ones(2, t + 1, dtype=torch.long)], dim=1)
            got = compiled(
                input_ids=token,
                attention_mask=torch.ones(2, 1, dtype=torch.long),
                position_ids=positions,
                **{name: caches["compiled"]},
            ).logits
            static = model(token, attention_mask=full_mask, position_ids=positions, **{name: caches["static"]}).logits
            dynamic = model(token, attention_mask=full_mask, position_ids=positions, **{name: caches["dynamic"]}).logits
            assert_close(got, static)
            assert_close(got, dynamic)
    assert counter.frame_count == 1  # one graph for all 12 steps: no break, no recompile per step
    assert caches["compiled"].layers[-1].streaming is not None and int(caches["compiled"].get_seq_length()) == 42


@pytest.mark.parametrize("rollback", [0, 3])
def test_append_one_by_index_equals_the_slice_copies(rollback):
    """The traceable one-token append (compiled steps, accelerators) stores what the CPU's slice copies store:
    rows in the sink phase, rows wrapping the ring and padding rows, step after step."""
    from duohead.kernels import StreamingView, reference

    batch, heads, dim = 3, 2, 8
    gen = torch.Generator().manual_seed(11)
    parts = [
        torch.zeros(batch, heads, SINK, dim),
        torch.zeros(batch, heads, SINK, dim),
        torch.full((batch, SINK), -1),
        torch.zeros(batch, heads, WINDOW + rollback, dim),
        torch.zeros(batch, heads, WINDOW + rollback, dim),
        torch.full((batch, WINDOW + rollback), -1),
    ]
    by_slices, by_index = [t.clone() for t in parts], [t.clone() for t in parts]
    real = torch.tensor([0, 2, 9])  # real tokens seen per row
    for step in range(40):
        keys, values = torch.randn(batch, heads, 1, dim, generator=gen), torch.randn(batch, heads, 1, dim, generator=gen)
        is_real = torch.tensor([step % 5 != 4, True, step % 3 != 0])  # some padding tokens in rows 0 and 2
        pos = torch.where(is_real, real, -1)[:, None]
        reference.streaming_append(keys, values, pos, StreamingView(*by_slices, SINK, WINDOW))  # eager on the CPU: slice copies
        reference.append_one(keys, values, pos, StreamingView(*by_index, SINK, WINDOW))
        real += is_real.long()
        for got, expected in zip(by_index, by_slices, strict=True):
            assert torch.equal(got, expected)
    assert (by_index[5] >= 0).all() and by_index[5].max() == real.max() - 1  # every ring slot was used and wrapped


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_generate_equals_eager(padded):
    """transformers' way: cache_implementation="static" + compile_config gives a static DuoCache, and generate()
    compiles the decode step (fullgraph); the tokens equal eager generate() with the default dynamic DuoCache."""
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2, seed=5), sink=SINK, window=WINDOW))
    ids, mask = left_padded((13, 25) if padded else (25, 25), seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
        config._compile_all_devices = True  # transformers compiles on CUDA by itself; on the CPU only when asked
        torch._dynamo.utils.counters.clear()
        compiled = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    cache = compiled.cache if hasattr(compiled, "cache") else compiled.past_key_values
    assert isinstance(cache, DuoCache) and cache.is_compileable
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the decode step, compiled once
    assert torch.equal(compiled.sequences, eager.sequences)


def test_static_cache_needs_max_length():
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    with pytest.raises(ValueError, match="max_length"):
        DuoCache.from_model(model, static=True)


@pytest.mark.parametrize("enabled", [True, False])
def test_run_prompt_compiled_decode_gives_the_eager_tokens(enabled):
    """`duohead generate --compile`'s path: eager prefill, decode steps through torch.compile (inductor) on a static
    cache (a static DuoCache, or transformers' StaticCache for full attention): the tokens of eager decoding."""
    model = tiny_model("llama")
    if enabled:
        duohead.enable(model, HeadPattern(mixed_gates(3, 2, seed=7), sink=SINK, window=WINDOW))
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(8))
    eager = run_prompt(model, ids, 12)
    compiled = run_prompt(model, ids, 12, compile=True)
    assert compiled.tokens == eager.tokens
    assert compiled.compiled and compiled.decode_tokens_per_second > 0


def test_compiled_decode_refuses_prompt_lookup():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prompt lookup"):
        run_prompt(model, torch.randint(1, 97, (1, 10)), 4, compile=True, lookup=2)
