"""Run under `torchrun --nproc-per-node N` by tests/test_sharding.py: one rank of a tensor-parallel duohead model.

    torchrun --nproc-per-node 2 tests/tp_worker.py CASES.json OUT_DIR

CASES.json lists {"name", "model", "pattern", "save", "plan"}. For each case the rank loads the model folder with
`tp_plan=plan` (default "auto"), enables the pattern, runs `tp_greedy` and writes OUT_DIR/<name>-rank<R>.json:
the tokens, its `DuoCache.memory()`, its layouts, its parameter bytes, whether `disable` restored its local shards
exactly (with "save", `save_pretrained` of the enabled model writes OUT_DIR/<name>-saved). A case whose enable
raises ValueError writes the message instead. Keep it free of pytest: it is a plain script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")  # transformers' deprecation notes on tp_plan=, one per rank

import duohead  # noqa: E402
from duohead import DuoCache, HeadPattern  # noqa: E402
from duohead.architecture import attention_modules, layer_layouts  # noqa: E402
from duohead.cache import cache_argument  # noqa: E402
from duohead.sharding import local_shard  # noqa: E402

PROMPT_LENGTHS = (23, 37)  # a left-padded batch: one row padded, one not
NEW_TOKENS = 10
PREFILL_CHUNK = 7


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [2, 37], left-padded with token 0; the same on every rank and in the test."""
    gen = torch.Generator().manual_seed(11)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        ids[row, width - n :] = torch.randint(1, 97, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@torch.no_grad()
def tp_greedy(model) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy tokens of `padded_batch()` (chunked prefill, then decode) and the `DuoCache.memory()` it ends with."""
    ids, mask = padded_batch()
    cache = DuoCache.from_model(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        prefill_chunk_size=PREFILL_CHUNK,
        **{cache_argument(model): cache},
    )
    return out[:, ids.shape[1] :].tolist(), cache.memory()


def _local_state(model) -> dict[str, torch.Tensor]:
    return {name: local_shard(p).detach().clone() for name, p in model.named_parameters()}


def run_case(case: dict, out_dir: Path, rank: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case["model"], tp_plan=case.get("plan", "auto"), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    before = _local_state(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in before.values())
    try:
        duohead.enable(model, HeadPattern.load(case["pattern"]))
    except ValueError as e:
        return {"error": str(e)}
    tokens, memory = tp_greedy(model)
    layouts = [[lay.num_retrieval_heads, list(lay.kv_order)] for lay in layer_layouts(model)]
    q_rows = [local_shard(attn.q_proj.weight).shape[0] for attn in attention_modules(model)]
    if case.get("save"):
        model.save_pretrained(out_dir / f"{case['name']}-saved")  # every rank takes part in the gather
    duohead.disable(model)
    after = _local_state(model)
    restored = all(torch.equal(before[k], after[k]) for k in before)
    return {
        "tokens": tokens,
        "memory": memory,
        "layouts": layouts,
        "q_rows": q_rows,
        "restored": restored,
        "weight_bytes": weight_bytes,
    }


def main() -> int:
    cases, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch_backend = duohead.kernels.backends.REGISTRY["torch"]  # split at S + W, like the process it is compared with
    duohead.kernels.register_backend(dataclasses.replace(torch_backend, split_margin={}))  # (tests/conftest.py)
    rank = int(os.environ["RANK"])
    for case in cases:
        result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), **run_case(case, out_dir, rank)}
        (out_dir / f"{case['name']}-rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
