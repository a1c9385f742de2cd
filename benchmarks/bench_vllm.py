"""duohead inside vLLM, in vLLM's own terms: KV blocks per request, requests that fit, throughput; stock vs duohead.

    .venv-vllm/bin/python benchmarks/bench_vllm.py --out benchmarks/bench_vllm.json     # all three parts (~15 min, 2 CPUs)
    .venv-vllm/bin/python benchmarks/bench_vllm.py --parts capacity --lengths 4096,16384

Every engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), fp32, one fixed KV budget
(VLLM_CPU_KVCACHE_SPACE, GiB). Methods: stock vLLM, duohead at 50% and at 75% of KV heads streaming (the shipped
SmolLM2 pattern, sink 64 / window 256).

1. capacity: for each max_model_len, the engine's KV pool (blocks, groups) and vLLM's own "maximum concurrency"
   (the pool over the blocks one request may hold: what admission reserves), beside duohead's byte formula
   (`duohead.accounting`: budget / KV bytes of one request at that length, no block rounding, no chunk in flight).
2. admission: N requests of L tokens submitted at once, each decoding M tokens, with its own KV budget: the
   most requests running at the same time (the pool decides it), and the KV blocks one request really held at its
   peak, per group kind (retrieval / streaming).
   Parts 1 and 2 use a "KV twin" of SmolLM2: random weights with its KV shape (30 layers x 3 KV heads x 64) and a
   tiny MLP, so that hundreds of thousands of prompt tokens prefill in minutes; the allocator sees only the KV shape.
3. throughput: the real SmolLM2-135M-Instruct, a batch of long prompts, stock and duohead at 50% alternating
   (rounds x methods, fresh engine each), wall time of `LLM.generate` and output tokens per second.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # the KV twin is planned past its 8K positions

import torch  # noqa: E402

PATTERN = "smollm2-135m-instruct"
METHODS = {"stock": None, "duohead-0.5": 0.5, "duohead-0.75": 0.75}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def kv_twin(folder: Path) -> Path:
    """Save a random model with SmolLM2's KV shape (30 x 3 x 64, GQA 3:1 -> here 3 query heads) and a tiny MLP."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=192, intermediate_size=64, num_hidden_layers=30, num_attention_heads=3,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def engine(path, method: str, max_model_len: int, **kwargs):
    from vllm import LLM

    sparsity = METHODS[method]
    overrides = {} if sparsity is None else {"duohead": {"pattern": PATTERN, "sparsity": sparsity}}
    return LLM(model=str(path), dtype="float32", max_model_len=max_model_len, hf_overrides=overrides, **kwargs)


def close() -> None:
    """Tear down the engine whose every reference the caller has deleted (a live reference would shut down the
    distributed state of the next engine when it is collected)."""
    from vllm.distributed import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _group_kind(spec) -> str:
    return "streaming" if type(spec).__name__ == "SinkWindowSpec" else "retrieval"


def _block_bytes(config) -> int:
    """Bytes one block id costs: a page in each of the group size's layer tensors (vLLM pads every group to it)."""
    size = max(len(group.layer_names) for group in config.kv_cache_groups)
    return config.kv_cache_groups[0].kv_cache_spec.page_size_bytes * size


def formula_requests(budget_bytes: int, sparsity: float | None, tokens: int) -> float:
    """Requests of `tokens` tokens that fit `budget_bytes` by duohead's byte formula (fp32, sink + window per
    streaming head)."""
    from duohead.catalogue import layout_kv_bytes
    from duohead.pattern import HeadPattern, find_pattern

    pattern = HeadPattern.load(find_pattern(PATTERN))
    layout = pattern.binarize(sparsity=sparsity or 0.0)
    per_request = layout_kv_bytes(layout, 64, pattern.sink, pattern.window, tokens, itemsize=4)["total_bytes"]
    return budget_bytes / per_request


def capacity(twin: Path, lengths: list[int], budget_gib: int) -> list[dict]:
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    rows = []
    for length in lengths:
        for method, sparsity in METHODS.items():
            try:
                llm = engine(twin, method, length, skip_tokenizer_init=True, enforce_eager=True)
            except ValueError as e:  # vLLM refuses a length of which not even one request fits the budget
                rows.append({"max_model_len": length, "method": method, "refused": str(e).strip().splitlines()[-1][:300]})
                print(json.dumps(rows[-1]), flush=True)
                close()
                continue
            scheduler = _scheduler(llm)
            config = scheduler.kv_cache_manager.kv_cache_config
            vllm_config = llm.llm_engine.vllm_config
            per_request = {"retrieval": 0, "streaming": 0}
            for group in config.kv_cache_groups:
                spec = group.kv_cache_spec
                blocks = -(-spec.max_memory_usage_bytes(vllm_config) // spec.page_size_bytes)
                per_request[_group_kind(spec)] += blocks
            rows.append(
                {
                    "max_model_len": length,
                    "method": method,
                    "groups": len(config.kv_cache_groups),
                    "pool_blocks": config.num_blocks,
                    "page_bytes": config.kv_cache_groups[0].kv_cache_spec.page_size_bytes,
                    "block_bytes": _block_bytes(config),
                    "reserved_blocks_per_request": per_request,
                    "vllm_max_concurrency": get_max_concurrency_for_kv_cache_config(vllm_config, config),
                    "formula_requests": formula_requests(int(budget_gib * 2**30), sparsity, length),
                    "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del llm, scheduler, config, vllm_config
            close()
    return rows


def admission(twin: Path, length: int, requests: int, new_tokens: int, budget_gib: int) -> list[dict]:
    """Requests stay running for `new_tokens` decode steps while later ones prefill, so the running set grows until
    the KV pool (`budget_gib`) admits no more."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(budget_gib)
    rows = []
    for method in METHODS:
        llm = engine(twin, method, length + new_tokens, skip_tokenizer_init=True, enforce_eager=True)
        core, scheduler = llm.llm_engine, _scheduler(llm)
        coordinator = scheduler.kv_cache_manager.coordinator
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        g = torch.Generator().manual_seed(0)
        for i in range(requests):
            ids = torch.randint(1, 256, (length,), generator=g).tolist()
            core.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids), params)
        peak_running, peak_blocks, start = 0, {"retrieval": 0, "streaming": 0}, time.perf_counter()
        while core.has_unfinished_requests():
            core.step()
            peak_running = max(peak_running, len(scheduler.running))
            held = {"retrieval": {}, "streaming": {}}
            for manager in coordinator.single_type_managers:
                kind = _group_kind(manager.kv_cache_spec)
                for request, blocks in manager.req_to_blocks.items():
                    held[kind][request] = held[kind].get(request, 0) + sum(not b.is_null for b in blocks)
            for kind, per in held.items():
                peak_blocks[kind] = max([peak_blocks[kind], *per.values()])
        block_bytes = _block_bytes(scheduler.kv_cache_manager.kv_cache_config)
        rows.append(
            {
                "method": method,
                "prompt_tokens": length,
                "new_tokens": new_tokens,
                "budget_gib": budget_gib,
                "requests": requests,
                "peak_running": peak_running,
                "peak_blocks_one_request": peak_blocks,
                "peak_kv_mib_one_request": round(sum(peak_blocks.values()) * block_bytes / 2**20, 1),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del llm, core, scheduler, coordinator
        close()
    return rows


def throughput(prompt_tokens: int, batch: int, new_tokens: int, rounds: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from duohead.loading import resolve_model_path

    folder = resolve_model_path(None)
    g = torch.Generator().manual_seed(0)
    token_prompts = [torch.randint(100, 40000, (prompt_tokens,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {"stock": [], "duohead-0.5": []}
    for r in range(rounds):
        for method in list(times) if r % 2 == 0 else list(times)[::-1]:
            llm = engine(folder, method, prompt_tokens + new_tokens + 16, skip_tokenizer_init=True)
            start = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], params, use_tqdm=False)
            times[method].append(time.perf_counter() - start)
            print(f"round {r} {method}: {times[method][-1]:.1f} s", flush=True)
            del llm
            close()
    rows = []
    for method, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "method": method,
                "batch": batch,
                "prompt_tokens": prompt_tokens,
                "new_tokens": new_tokens,
                "seconds": seconds,
                "median_seconds": median,
                "output_tokens_per_second": batch * new_tokens / median,
            }
        )
    rows.append({"ratio_stock_over_duohead": rows[0]["median_seconds"] / rows[1]["median_seconds"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="capacity,admission,throughput")
    p.add_argument("--lengths", default="4096,16384,32768", help="max_model_len of the capacity part")
    p.add_argument("--budget-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB) of capacity and throughput")
    p.add_argument("--admission", default="14x4096+48@1", help="REQUESTSxPROMPT+NEW@GIB of the admission part (whole GiB)")
    p.add_argument("--throughput", default="4x3072+64", help="BATCHxPROMPT+NEW of the throughput part")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.budget_gib)
    parts = args.parts.split(",")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "budget_gib": args.budget_gib,
    }
    with tempfile.TemporaryDirectory() as tmp:
        twin = kv_twin(Path(tmp) / "smollm2-kv-twin") if {"capacity", "admission"} & set(parts) else None
        if "capacity" in parts:
            report["capacity"] = capacity(twin, [int(x) for x in args.lengths.split(",")], args.budget_gib)
        if "admission" in parts:
            shape, budget = args.admission.split("@")
            requests, rest = shape.split("x")
            prompt, new = rest.split("+")
            report["admission"] = admission(twin, int(prompt), int(requests), int(new), int(budget))
    if "throughput" in parts:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.budget_gib)
        batch, rest = args.throughput.split("x")
        prompt, new = rest.split("+")
        report["throughput"] = throughput(int(prompt), int(batch), int(new), args.rounds)
    print(json.dumps(report, indent=1))
    if args.out:
        from duohead.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
