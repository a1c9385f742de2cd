"""Run one prompt through a causal LM: chunked prefill, greedy decode, and the measurements around them.

Shared by `duohead generate`, `duohead eval` and the benchmarks. Works for a duohead-enabled model
(the cache is a `DuoCache`) and for an unmodified one (a transformers `DynamicCache`, i.e. stock full
attention), so both sides of a comparison go through the same code.

Shape letters: B batch (always 1 here), T prompt tokens, Q tokens per forward, V vocabulary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from duohead.cache import DuoCache, cache_argument
from duohead.hook import is_enabled

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# ------------------------------------------------------------------ memory


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory interval: CUDA's max-allocated counter, or (Linux) the process's RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        try:
            _PROC_CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass  # not permitted: the peak then covers the whole process lifetime


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since `reset_peak_memory`: bytes allocated by torch on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # non-Linux fallback: lifetime peak (kilobytes on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """The process's resident set size now (0 where /proc is missing)."""
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def kv_memory(cache) -> dict[str, int]:
    """KV bytes held by a cache. A `DuoCache` reports its own `memory()`; for a transformers cache (full
    attention) every stored key/value tensor is counted and reported as both `full_bytes` and `total_bytes`."""
    if isinstance(cache, DuoCache):
        return cache.memory()
    held = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                held += tensor.numel() * tensor.element_size()
    return {"retrieval_bytes": held, "streaming_bytes": 0, "full_bytes": held, "reserved_bytes": held, "total_bytes": held}


# ------------------------------------------------------------------ prefill and decode


def new_cache(model: torch.nn.Module, max_length: int | None = None, rollback: int = 0, static: bool = False):
    """An empty cache for `model`: a `DuoCache` (retrieval buffers sized for `max_length` tokens when given; `crop`
    can take back `rollback` tokens) if duohead is enabled, else a `DynamicCache` (stock full attention).
    `static` (needs `max_length`): fixed-shape caches for a compiled decode step, a static `DuoCache` or
    transformers' `StaticCache`."""
    if is_enabled(model):
        return DuoCache.from_model(model, max_length=max_length, rollback=rollback, static=static)
    if static:
        return StaticCache(config=model.config, max_cache_len=max_length)
    return DynamicCache(config=model.config)


def compiled_forward(model: torch.nn.Module) -> Callable:
    """`model.forward` compiled whole (fullgraph) for fixed shapes: a decode step on a static cache compiles once."""
    return torch.compile(model.forward, fullgraph=True, dynamic=False)


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, cache, forward: Callable | None = None, **kwargs):
    """One forward with a cache, under the cache argument's name in this transformers release (`forward`: a
    compiled `model.forward`, or None for the model itself)."""
    return (forward or model)(input_ids=input_ids, use_cache=True, **{cache_argument(model): cache}, **kwargs)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache,
    *,
    chunk: int | None = None,
    progress: bool = False,
    label: str = "prefill",
) -> torch.Tensor:
    """Feed the prompt input_ids [1, T] into `cache`, `chunk` tokens per forward (None or 0: all at once).

    Returns the logits of the last prompt token, [1, V]. `progress` shows a tqdm bar (stderr) over tokens, named `label`.
    """
    total = input_ids.shape[1]
    step = total if not chunk else chunk
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tok", desc=label, file=sys.stderr, leave=False)
    logits = None
    for start in range(0, total, step):
        piece = input_ids[:, start : start + step]
        logits = _forward(model, piece, cache, logits_to_keep=1).logits[:, -1]
        if bar is not None:
            bar.update(piece.shape[1])
    if bar is not None:
        bar.close()
    return logits


def draft_from_context(context: torch.Tensor, max_draft: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: up to `max_draft` tokens that followed the latest earlier occurrence of the context's last
    n tokens (n = max_ngram, then shorter); [] if there is none. context [T] token ids."""
    for n in range(min(max_ngram, context.numel() - 1), 0, -1):
        earlier = context.unfold(0, n, 1)[:-1]  # every n-gram that has a successor
        starts = (earlier == context[-n:]).all(dim=1).nonzero()
        if starts.numel():
            first = int(starts[-1]) + n
            return context[first : first + max_draft].tolist()
    return []


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    *,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    prompt_ids: torch.Tensor | None = None,
    lookup: int = 0,
    forward: Callable | None = None,
) -> tuple[list[int], list[float], int]:
    """Greedy decoding from the prompt's last logits [1, V]; stops after `max_new_tokens` or at a stop id.

    With `lookup` > 0, each forward also checks up to `lookup` draft tokens copied from the prompt_ids [1, T] and
    the text so far (`draft_from_context`); the drafts the model agrees with are kept, the rest are cropped from
    the cache (it must allow `crop` of `lookup` tokens). The tokens are exactly those of plain greedy decoding.
    Returns (new token ids, seconds of each forward, draft tokens accepted). The first token comes from
    `first_logits`; every later one from a timed forward, through `forward` (e.g. `compiled_forward(model)`) if given.
    """
    device = first_logits.device
    context = prompt_ids[0].cpu() if prompt_ids is not None else torch.empty(0, dtype=torch.long)
    tokens: list[int] = []
    step_seconds: list[float] = []
    accepted = 0

    def emit(token: int) -> bool:
        """Append a token; True when decoding must stop."""
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        return token in stop_ids or len(tokens) == max_new_tokens

    logits = first_logits  # [1, V]: the next token's logits
    while not emit(token := int(logits.argmax(dim=-1).item())):
        draft = []
        if lookup:
            draft = draft_from_context(torch.cat([context, torch.tensor(tokens)]), min(lookup, max_new_tokens - len(tokens)))
        _sync(device)
        start = time.perf_counter()
        step_logits = _forward(model, torch.tensor([[token, *draft]], device=device), cache, forward).logits[0]  # [1 + k, V]
        _sync(device)
        step_seconds.append(time.perf_counter() - start)
        predicted = step_logits.argmax(dim=-1).tolist()
        agreed = 0
        while agreed < len(draft) and predicted[agreed] == draft[agreed]:
            agreed += 1
        if agreed < len(draft):
            cache.crop(agreed - len(draft))  # forget the rejected drafts
        accepted += agreed
        if any(emit(t) for t in draft[:agreed]):
            break
        logits = step_logits[agreed : agreed + 1]
    return tokens, step_seconds, accepted


@dataclass
class RunResult:
    """One prompt's run: what was generated and what it cost."""

    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_step_seconds: list[float]
    accepted_draft_tokens: int  # prompt lookup: tokens that came from drafts (0 without it)
    memory: dict[str, int]  # kv_memory() after the run
    peak_memory_bytes: int
    peak_memory_kind: str  # "rss" (CPU) or "cuda_allocated"
    compiled: bool = False  # decode steps ran compiled; the first of them includes the compilation

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens per second of decode forwards: every token but the first (which the prefill gives) came from
        one of them (None without a timed step). A compiled run leaves out its first step (the compilation)."""
        skip = 1 if self.compiled else 0
        total = sum(self.decode_step_seconds[skip:])
        return (len(self.tokens) - 1 - skip) / total if total > 0 else None

    def report(self) -> dict:
        """A JSON-ready summary (the closing report of `duohead generate`)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "prefill_seconds": self.prefill_seconds,
            "decode_steps": len(self.decode_step_seconds),
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "kv_memory": dict(self.memory),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "compiled": self.compiled,
            "first_decode_step_seconds": self.decode_step_seconds[0] if self.decode_step_seconds else None,
        }


def run_prompt(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    chunk: int | None = None,
    progress: bool = False,
    label: str = "prefill",
    stop_ids: set[int] | frozenset[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    cache=None,
    lookup: int = 0,
    compile: bool = False,
) -> RunResult:
    """Prefill input_ids [1, T] (chunked), decode greedily, and measure time, KV bytes and peak memory.

    `lookup` > 0 drafts that many tokens per step from the prompt (see `decode`). `cache` defaults to
    `new_cache(model)` sized for the prompt and the new tokens; pass one to inspect it afterwards.
    `compile`: a static cache and a compiled decode step (`compiled_forward`); the prefill stays eager.
    `label` names the prefill's progress bar.
    """
    if compile and lookup:
        raise ValueError("compiled decoding takes one token per step; it cannot be combined with prompt lookup")
    device = _device_of(model)
    input_ids = input_ids.to(device)
    if cache is None:
        cache = new_cache(model, input_ids.shape[1] + max_new_tokens, rollback=lookup, static=compile)
    reset_peak_memory(device)
    _sync(device)
    start = time.perf_counter()
    logits = prefill(model, input_ids, cache, chunk=chunk, progress=progress, label=label)
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    tokens, steps, accepted = decode(
        model,
        cache,
        logits,
        max_new_tokens,
        stop_ids=stop_ids,
        on_token=on_token,
        prompt_ids=input_ids,
        lookup=lookup,
        forward=compiled_forward(model) if compile else None,
    )
    return RunResult(
        tokens=tokens,
        prompt_tokens=input_ids.shape[1],
        prefill_seconds=prefill_seconds,
        decode_step_seconds=steps,
        accepted_draft_tokens=accepted,
        memory=kv_memory(cache),
        peak_memory_bytes=peak_memory_bytes(device),
        peak_memory_kind="cuda_allocated" if device.type == "cuda" else "rss",
        compiled=compile,
    )
