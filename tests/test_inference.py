"""End-to-end behaviour of an enabled model on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, mixed_gates, oracle_model, tiny_model
from transformers import AutoModelForCausalLM

import duohead
from duohead import DuoCache, HeadPattern, kernels
from duohead.cache import DuoCacheLayer, cache_argument
from duohead.kernels.backends import DEFAULT_CPU_SPLIT_MARGIN
from duohead.runner import draft_from_context, run_prompt

SINK, WINDOW = 4, 8


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


def greedy(model, ids, steps=16, **kwargs):
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
        )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_all_retrieval_equals_stock_transformers(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock_prefill = model(ids).logits
    stock_tokens, stock_logits = greedy(model, ids)

    duohead.enable(model, HeadPattern(torch.ones(3, 2), sink=SINK, window=WINDOW))
    with torch.no_grad():
        assert_close(model(ids).logits, stock_prefill)
    tokens, logits = greedy(model, ids)
    assert torch.equal(tokens, stock_tokens)
    assert_close(logits, stock_logits)


# The CPU split margin: 0 splits at S + W (the GPU's way); 4 * WINDOW keeps the cache unsplit up to S + 5W = 44 slots (the
# CPU's way at a tiny scale: decode one call with a per-head Λ mask, prefill a dense Λ mask up to 3 (S + W) = 36 slots
# and the blocked reference past that), so prefills and decodes land on every path and both sides of the split.
MARGINS = [0, 4 * WINDOW]


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("kind", ["mixed", "all_streaming"])
@pytest.mark.parametrize("margin", MARGINS)
def test_streaming_heads_follow_the_lambda_mask(arch, kind, margin, cpu_split_margin):
    cpu_split_margin(margin)
    model = tiny_model(arch)
    gates = mixed_gates(3, 2) if kind == "mixed" else torch.zeros(3, 2)
    pattern = HeadPattern(gates, sink=SINK, window=WINDOW)
    layout = pattern.binarize()
    oracle = oracle_model(model, layout, SINK, WINDOW)
    ids = torch.randint(1, 97, (2, 6 * (SINK + WINDOW)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model(ids).logits
    duohead.enable(model, pattern)
    with torch.no_grad():
        expected = oracle(ids).logits
        assert (expected - stock).abs().max() > 20 * 1e-4 * expected.abs().max()  # the Λ mask changes the output
        assert_close(model(ids).logits, expected)  # no cache
        # with a cache: prefill part of the sequence, then decode the rest token by token
        cache = DuoCache.from_model(model)
        split = SINK + WINDOW + 3
        got = [model(ids[:, :split], **{cache_argument(model): cache}).logits]
        for t in range(split, ids.shape[1]):
            got.append(model(ids[:, t : t + 1], **{cache_argument(model): cache}).logits)
    assert_close(torch.cat(got, dim=1), expected)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_lambda_mask_across_gqa_ratios(heads, kv_heads):
    model = tiny_model("llama", heads=heads, kv_heads=kv_heads)
    gates = torch.rand(3, kv_heads, generator=torch.Generator().manual_seed(heads))
    pattern = HeadPattern(gates, sink=SINK, window=WINDOW)
    oracle = oracle_model(model, pattern.binarize(sparsity=0.5), SINK, WINDOW)
    ids = torch.randint(1, 97, (1, 50), generator=torch.Generator().manual_seed(9))
    duohead.enable(model, pattern, sparsity=0.5)
    with torch.no_grad():
        assert_close(model(ids).logits, oracle(ids).logits)


# Every chunk size on Llama, one on each family (the chunking is the cache's, the same for every family): fewer runs
# for `make test-triton`, which runs this file with the Triton kernels in the CPU interpreter.
CHUNKED = [("llama", 1), ("llama", WINDOW + 5)] + [(arch, WINDOW - 3) for arch in FAMILIES]


@pytest.mark.parametrize("arch, chunk", CHUNKED)
@pytest.mark.parametrize("margin", MARGINS)
def test_chunked_prefill_equals_one_shot(arch, chunk, margin, cpu_split_margin):
    cpu_split_margin(margin)
    model = tiny_model(arch)
    duohead.enable(model, HeadPattern(mixed_gates(3, 2, seed=3), sink=SINK, window=WINDOW))
    ids = torch.randint(1, 97, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        one_shot_cache = DuoCache.from_model(model)
        one_shot = model(ids, **{cache_argument(model): one_shot_cache}).logits
        cache = DuoCache.from_model(model)
        chunked = torch.cat(
            [model(ids[:, s : s + chunk], **{cache_argument(model): cache}).logits for s in range(0, ids.shape[1], chunk)], dim=1
        )
        assert_close(chunked, one_shot)
        step = torch.randint(1, 97, (2, 1), generator=torch.Generator().manual_seed(5))
        assert_close(
            model(step, **{cache_argument(model): cache}).logits, model(step, **{cache_argument(model): one_shot_cache}).logits
        )


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("margin", MARGINS)  # the padded 40-token prefill stays unsplit (blocked), decoding splits
def test_left_padded_batch_equals_each_prompt_alone(arch, margin, cpu_split_margin):
    cpu_split_margin(margin)
    model = tiny_model(arch)
    duohead.enable(model, HeadPattern(mixed_gates(3, 2, seed=6), sink=SINK, window=WINDOW))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 97, (n,), generator=gen) for n in (9, 40, 21)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    batch_tokens, batch_logits = greedy(model, ids, steps=12, attention_mask=mask)
    for row, p in enumerate(prompts):
        tokens, logits = greedy(model, p[None], steps=12)
        assert torch.equal(batch_tokens[row, width:], tokens[0, len(p) :])
        assert_close(batch_logits[row], logits[0], rel=1e-4)


def test_generate_with_transformers_chunked_prefill_and_a_foreign_cache():
    from transformers import DynamicCache

    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2, seed=3), sink=SINK, window=WINDOW))
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(8))
    one_shot, _ = greedy(model, ids, steps=8)
    chunked, _ = greedy(model, ids, steps=8, prefill_chunk_size=7)
    assert torch.equal(one_shot, chunked)
    with pytest.raises(ValueError, match="DuoCache"):
        greedy(model, ids, steps=2, **{cache_argument(model): DynamicCache()})


def test_padding_with_holes_is_rejected():
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    ids = torch.randint(1, 97, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 4] = 0
    with pytest.raises(ValueError, match="left or right padding"):
        model(ids, attention_mask=mask)


def test_kv_memory_streaming_constant_retrieval_linear():
    model = tiny_model("llama", layers=2)
    duohead.enable(model, HeadPattern(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), sink=SINK, window=WINDOW))
    cache = DuoCache.from_model(model)
    seen, samples = 0, {}
    with torch.no_grad():
        for target in [SINK + WINDOW * k for k in (1, 2, 4, 8)] + [8 * (SINK + WINDOW)]:
            ids = torch.randint(1, 97, (1, target - seen))
            model(ids, **{cache_argument(model): cache})
            seen = target
            samples[target] = cache.memory()
    per_token = 2 * 1 * 16 * 4  # keys + values, batch 1, head_dim 16, fp32
    short = samples.pop(SINK + WINDOW)  # streaming heads still see every token: held as with full attention, no ring yet
    assert short["retrieval_bytes"] == short["full_bytes"] == 4 * per_token * (SINK + WINDOW)
    assert short["streaming_bytes"] == 0
    for t, mem in samples.items():
        assert mem["retrieval_bytes"] == 2 * per_token * t  # one retrieval KV head in each of 2 layers
        assert mem["streaming_bytes"] == 2 * per_token * (SINK + WINDOW)
        assert mem["full_bytes"] == 4 * per_token * t
    assert cache.get_seq_length() == seen


def test_kv_memory_within_the_cpu_margin_is_full_attentions_then_the_split(cpu_split_margin):
    """Within the CPU's margin every head holds its T tokens (what full attention holds); one slot past
    S + W + margin the layer splits and streaming heads hold S + W."""
    cpu_split_margin(2 * WINDOW)
    model = tiny_model("llama", layers=2)
    duohead.enable(model, HeadPattern(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), sink=SINK, window=WINDOW))
    cache = DuoCache.from_model(model)
    per_token = 2 * 1 * 16 * 4  # keys + values, batch 1, head_dim 16, fp32
    seen = 0
    with torch.no_grad(), kernels.use_backend("torch"):  # the margin holds where streaming heads run the reference
        for target in (SINK + 2 * WINDOW, SINK + 3 * WINDOW, SINK + 3 * WINDOW + 1):
            model(torch.randint(1, 97, (1, target - seen)), **{cache_argument(model): cache})
            seen = target
            mem = cache.memory()
            if target <= SINK + 3 * WINDOW:
                assert cache.layers[0].unsplit is not None
                assert mem["retrieval_bytes"] == mem["full_bytes"] == 4 * per_token * target
                assert mem["streaming_bytes"] == 0
            else:
                assert cache.layers[0].unsplit is None
                assert mem["retrieval_bytes"] == 2 * per_token * target
                assert mem["streaming_bytes"] == 2 * per_token * (SINK + WINDOW)


@pytest.mark.default_split_margin  # the autouse fixture's margin 0 would let a split_margin that returns 0 pass
def test_split_margin_only_where_streaming_heads_run_the_torch_reference_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    with kernels.use_backend("auto"):
        assert kernels.split_margin(cpu) == DEFAULT_CPU_SPLIT_MARGIN > 0
        assert kernels.split_margin(cuda) == 0
    with kernels.use_backend("torch"):
        assert kernels.split_margin(cpu) == DEFAULT_CPU_SPLIT_MARGIN
    with kernels.use_backend("triton"):
        assert kernels.split_margin(cpu) == 0


def test_retrieval_cache_grows_by_a_quarter_not_per_token():
    """300 tokens decoded one at a time into a cache without max_length: the retrieval buffer is allocated twice,
    256 slots then 320 (a quarter more, rounded to 64), never per token. Every buffer seen is kept alive, so a
    reallocation cannot hide behind the allocator handing out a freed address again."""
    model = tiny_model("llama", layers=1)
    duohead.enable(model, HeadPattern(torch.tensor([[1.0, 0.0]]), sink=SINK, window=WINDOW))
    cache = DuoCache.from_model(model)
    buffers = {}  # storage address -> (storage, kept alive; capacity in tokens)
    with torch.no_grad():
        for _ in range(300):
            model(torch.randint(1, 97, (1, 1)), **{cache_argument(model): cache})
            if cache.layers[0].retrieval is not None:  # up to S + W tokens all heads share one unsplit buffer
                keys = cache.layers[0].retrieval.keys
                buffers.setdefault(keys.untyped_storage().data_ptr(), (keys.untyped_storage(), keys.shape[2]))
    assert [capacity for _, capacity in buffers.values()] == [256, 320]


def test_generate_sizes_the_cache_once():
    model = tiny_model("llama", layers=1)
    duohead.enable(model, HeadPattern(torch.tensor([[1.0, 0.0]]), sink=SINK, window=WINDOW))
    with torch.no_grad():
        out = model.generate(torch.randint(1, 97, (1, 300)), max_new_tokens=70, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.layers[0].retrieval.keys.shape[2] == 384  # 370 tokens rounded up to 64; no regrowth, no slack


def test_disable_restores_the_model_exactly():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls, impl = type(model), model.config._attn_implementation
    duohead.enable(model, HeadPattern(torch.tensor([[0.0, 1.0], [0.2, 0.9], [1.0, 0.0]]), sink=SINK, window=WINDOW))
    assert duohead.is_enabled(model) and type(model) is not cls
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # heads were reordered
    duohead.disable(model)
    assert type(model) is cls and model.config._attn_implementation == impl and not duohead.is_enabled(model)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_save_pretrained_writes_the_original_model_and_stays_enabled(tmp_path):
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 97, (1, 40))
    duohead.enable(model, HeadPattern(torch.tensor([[0.0, 1.0], [0.2, 0.9], [1.0, 0.0]]), sink=SINK, window=WINDOW))
    with torch.no_grad():
        duo_logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert duohead.is_enabled(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, duo_logits)  # still the same duohead model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # stock transformers, no duohead
    assert reloaded.config._attn_implementation != duohead.ATTENTION_NAME
    for k, v in reloaded.state_dict().items():
        assert torch.equal(before[k], v), k  # original head order on disk


def test_enable_twice_replaces_the_pattern():
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 40))
    with torch.no_grad():
        stock = model(ids).logits
        duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
        duohead.enable(model, HeadPattern(torch.ones(3, 2), sink=SINK, window=WINDOW))
        assert_close(model(ids).logits, stock)


def test_sparsity_picks_the_lowest_gates():
    model = tiny_model("llama")
    gates = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    duohead.enable(model, HeadPattern(gates, sink=SINK, window=WINDOW), sparsity=0.5)
    layouts = [m.duohead_layout for m in duohead.hook.attention_modules(model)]
    assert [lay.num_retrieval_heads for lay in layouts] == [1, 1, 1]
    assert [lay.kv_order for lay in layouts] == [(0, 1), (1, 0), (1, 0)]
    assert model._duohead.sparsity == 0.5


def test_a_cut_inside_a_tie_warns_that_order_not_calibration_decides(caplog):
    model = tiny_model("llama")
    tied = HeadPattern(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]), sink=SINK, window=WINDOW, default_sparsity=0.25)
    with caplog.at_level("WARNING", logger="duohead"):
        duohead.enable(model, tied, sparsity=0.5)  # the third-lowest gate, 0.5, ties with the fourth
    assert "falls inside a tie: 2 heads share gate 0.5 and 1 of them stream" in caplog.text
    assert "calibrated for sparsity 0.25" in caplog.text and "--target-sparsity 0.5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="duohead"):
        duohead.enable(model, tied, sparsity=1 / 3)  # cut between 0.2 and 0.5
        duohead.enable(model, HeadPattern(tied.gates, sink=SINK, window=WINDOW, default_sparsity=0.5))  # its own cut
    assert "tie" not in caplog.text


def test_attn_implementation_duohead_without_pattern_says_what_to_do():
    model = tiny_model("llama")
    model.set_attn_implementation("duohead")
    with pytest.raises(ValueError, match="duohead.enable"):
        model(torch.randint(1, 97, (1, 5)))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(
        ValueError,
        match="gpt2.*gemma2, gemma3, gemma3_text, glm4, gpt_oss, granite, llama, mistral, mixtral, olmo2, olmo3, phi3, qwen2",
    ):
        duohead.enable(model, HeadPattern(torch.ones(2, 2)))


def test_pattern_for_another_model_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"4 layers x 2 KV heads.*3 layers x 2 KV heads"):
        duohead.enable(model, HeadPattern(torch.ones(4, 2), model={"name": "other"}))


@pytest.mark.parametrize("kwargs, message", [({"sink": -1}, "sink"), ({"window": 0}, "window"), ({"sparsity": 1.5}, "sparsity")])
def test_bad_enable_arguments(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        duohead.enable(model, HeadPattern(torch.ones(3, 2)), **kwargs)
    assert not duohead.is_enabled(model)


def test_from_pretrained_and_attn_implementation_name(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("mistral").save_pretrained(tmp_path / "model")
    pattern_path = HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW).save(tmp_path / "pattern.json")
    ids = torch.randint(1, 97, (1, 30))
    loaded = duohead.from_pretrained(tmp_path / "model", pattern_path)
    by_name = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="duohead")
    assert by_name.config._attn_implementation == "duohead"
    duohead.enable(by_name, pattern_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, by_name(ids).logits)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        duohead.from_pretrained(tmp_path / "missing", pattern_path)


def test_crop_takes_tokens_back_exactly():
    """Decode 5 tokens, take 3 back, decode another: the same logits as a cache that never saw those 3."""
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(4))  # far past sink + window
    new = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    rolled, fresh = DuoCache.from_model(model, rollback=3), DuoCache.from_model(model)
    name = cache_argument(model)
    with torch.no_grad():
        model(ids, **{name: rolled})
        model(new[:, :5], **{name: rolled})  # 5 tokens at once: the ring wraps past the ones to keep
        rolled.crop(-3)
        assert rolled.get_seq_length() == 42
        model(torch.cat([ids, new[:, :2]], dim=1), **{name: fresh})
        assert_close(model(new[:, 5:], **{name: rolled}).logits, model(new[:, 5:], **{name: fresh}).logits)
    assert rolled.memory()["streaming_bytes"] == fresh.memory()["streaming_bytes"] * (SINK + WINDOW + 3) // (SINK + WINDOW)
    with pytest.raises(ValueError, match="at most 3 tokens.*rollback=4"):
        rolled.crop(-4)


def test_crop_without_rollback_slots_is_refused():
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    cache = DuoCache.from_model(model)
    assert not cache.is_croppable
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 20)), **{cache_argument(model): cache})
    with pytest.raises(ValueError, match="at most 0 tokens"):
        cache.crop(-1)
    cache.activate_past_recording()  # what generate() does before speculative decoding: the ring grows in place
    assert cache.is_croppable
    cache.crop(-1)
    assert cache.get_seq_length() == 19
    for layer in cache.layers:  # transformers >= 5.25's Cache hands each layer the draft length
        layer.activate_past_recording(recurrent_states_to_keep=100)
    assert all(layer.rollback == 100 for layer in cache.layers)


@pytest.mark.parametrize("draft", ["prompt_lookup", "assistant_model"])
def test_speculative_decoding_generates_what_greedy_generates(draft, monkeypatch):
    """transformers' prompt-lookup and assisted decoding verify draft tokens and crop the rejected ones."""
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    phrase = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    ids = torch.cat(
        [phrase.repeat(1, 5), torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(7)), phrase[:, :3]], dim=1
    )
    expected, _ = greedy(model, ids, steps=24)
    crops = []
    crop = DuoCacheLayer.crop
    monkeypatch.setattr(DuoCacheLayer, "crop", lambda layer, n: (crops.append(n), crop(layer, n))[1])
    kwargs = {"prompt_lookup_num_tokens": 4} if draft == "prompt_lookup" else {"assistant_model": tiny_model("llama", seed=1)}
    got, _ = greedy(model, ids, steps=24, **kwargs)
    assert torch.equal(got, expected)
    assert any(n < 0 for n in crops)  # draft tokens were rejected and taken back


def test_draft_from_context_copies_what_followed_the_latest_match():
    context = torch.tensor([5, 1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 2, 3])
    assert draft_from_context(context, 2) == [7, 6]  # "2 3" last seen before the end at 7-8: followed by 7 6
    assert draft_from_context(torch.tensor([1, 2, 3, 4]), 3) == []  # nothing repeats
    assert draft_from_context(torch.tensor([4, 4]), 5) == [4]


@pytest.mark.parametrize("enabled", [True, False])
def test_prompt_lookup_decoding_keeps_greedy_tokens_with_fewer_forwards(enabled):
    model = tiny_model("llama")
    if enabled:
        duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    phrase = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    ids = torch.cat(
        [phrase.repeat(1, 5), torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(7)), phrase[:, :3]], dim=1
    )
    plain = run_prompt(model, ids, 30)
    lookup = run_prompt(model, ids, 30, lookup=4)
    assert lookup.tokens == plain.tokens
    assert lookup.accepted_draft_tokens > 0
    assert len(lookup.decode_step_seconds) + lookup.accepted_draft_tokens == len(plain.decode_step_seconds)


def test_beam_search_all_retrieval_equals_stock():
    model = tiny_model("qwen2")
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(8))
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)
        duohead.enable(model, HeadPattern(torch.ones(3, 2), sink=SINK, window=WINDOW))
        assert torch.equal(model.generate(ids, **kwargs), stock)


def test_beam_search_keeps_each_beam_history():
    """Every returned beam's per-token log-probabilities equal those of a cache-free forward over that beam's
    own tokens: the cache followed the beams through every reorder."""
    model = tiny_model("llama")
    duohead.enable(model, HeadPattern(mixed_gates(3, 2), sink=SINK, window=WINDOW))
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model.generate(
            ids,
            num_beams=4,
            num_return_sequences=4,
            max_new_tokens=12,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        assert len({tuple(s.tolist()) for s in out.sequences}) == 4
        for sequence, got in zip(out.sequences, steps):
            logits = model(sequence[None]).logits[0, ids.shape[1] - 1 : -1]  # no cache: the Λ rule on the whole text
            expected = torch.log_softmax(logits.float(), dim=-1).gather(1, sequence[ids.shape[1] :, None])[:, 0]
            assert_close(got, expected)
