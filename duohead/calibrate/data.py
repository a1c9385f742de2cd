"""Synthetic passkey-retrieval samples for calibration, with exact token budgets.

A sample is one token sequence of exactly `ctx_len` tokens (T)::

    [bos] haystack ... passphrase 1 ... haystack ... passphrase N ... haystack | question/answer tail

Each passphrase is `passkey_words` NATO-alphabet words inserted at a depth spread evenly over
[depth_min, depth_max] of the haystack; the tail asks for every passphrase and gives the answer.
Only the tail is supervised (the positions where retrieval heads matter). Sample `i` depends only
on (seed, i), so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from duohead.calibrate import haystack as builtin
from duohead.calibrate.settings import HAYSTACK_LIMIT
from duohead.files import read_regular_text

NATO = (
    "alfa",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliett",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)


@dataclass(frozen=True)
class PasskeySpec:
    """What a sample looks like: context lengths in tokens, passkeys, and where they go."""

    ctx_min: int
    ctx_max: int
    num_passkeys: int = 10
    passkey_words: int = 32
    depth_min: float = 0.05
    depth_max: float = 0.95

    def __post_init__(self) -> None:
        if self.ctx_min < 1 or self.ctx_max < self.ctx_min:
            raise ValueError(f"context range must satisfy 1 <= ctx_min <= ctx_max; got {self.ctx_min}..{self.ctx_max}")
        if self.num_passkeys < 1 or self.passkey_words < 1:
            raise ValueError(
                f"need at least one passkey of one word; got {self.num_passkeys} passkeys of {self.passkey_words} words"
            )
        if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
            raise ValueError(f"depths must satisfy 0 <= depth_min <= depth_max <= 1; got {self.depth_min}, {self.depth_max}")


@dataclass
class Sample:
    """input_ids [T] long; supervised [T] bool (True on the question/answer tail); one depth (fraction of
    the haystack) and one passphrase per passkey."""

    input_ids: torch.Tensor
    supervised: torch.Tensor
    depths: list[float]
    passkeys: list[str]


class Haystack(Protocol):
    def tokens(self, rng: random.Random, count: int) -> list[int]:
        """Exactly `count` haystack token ids."""


class GeneratedHaystack:
    """The built-in haystack: prose generated from the sample's random stream (unbounded)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokens(self, rng: random.Random, count: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < count:
            text = builtin.generate(rng, min_words=max(64, count - len(ids)))
            ids += self.tokenizer("\n\n" + text if ids else text, add_special_tokens=False).input_ids
        return ids[:count]


class FileHaystack:
    """A haystack from the user's text files, read once; samples take a contiguous run from a random
    paragraph start, wrapping around at the end."""

    def __init__(self, tokenizer, paths: list[str | Path]) -> None:
        texts = [read_regular_text(path, "haystack file", HAYSTACK_LIMIT) for path in paths]
        paragraphs = [p.strip() for text in texts for p in text.split("\n\n") if p.strip()]
        if not paragraphs:
            raise ValueError(f"haystack files {', '.join(map(str, paths))} contain no text")
        self.paths = [str(p) for p in paths]
        self.ids: list[int] = []
        self.starts: list[int] = []
        for p in paragraphs:
            self.starts.append(len(self.ids))
            self.ids += tokenizer(p + "\n\n", add_special_tokens=False).input_ids

    def tokens(self, rng: random.Random, count: int) -> list[int]:
        if count > len(self.ids):
            raise ValueError(
                f"haystack files {', '.join(self.paths)} hold {len(self.ids)} tokens; a sample needs {count}. "
                "Add more text or lower --ctx-max"
            )
        start = self.starts[rng.randrange(len(self.starts))]
        return (self.ids[start:] + self.ids[:start])[:count]


class PasskeyDataset:
    """Deterministic passkey samples: `dataset[i]` is the same Sample for the same (seed, i)."""

    def __init__(self, tokenizer, spec: PasskeySpec, *, haystack: Haystack | None = None, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.haystack = haystack if haystack is not None else GeneratedHaystack(tokenizer)
        self.seed = seed
        self.prefix = tokenizer("", add_special_tokens=True).input_ids  # [bos] or []
        worst = self._max_overhead()
        if worst >= spec.ctx_min:
            raise ValueError(
                f"--ctx-min {spec.ctx_min} is too short: {spec.num_passkeys} passkeys of {spec.passkey_words} words "
                f"and their questions take up to {worst} tokens; raise --ctx-min or lower --num-passkeys"
            )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _needle(self, number: int, phrase: str) -> list[int]:
        return self._encode(f"\n\nThe secret passphrase number {number} is: {phrase}. Remember it.\n\n")

    def _question(self, number: int) -> list[int]:
        return self._encode(f"Question: what is the secret passphrase number {number}?\nAnswer:")

    def _answer(self, phrase: str) -> list[int]:
        return self._encode(f" {phrase}.\n")

    def _max_overhead(self) -> int:
        """The most tokens a sample spends outside the haystack (every passkey word the longest one)."""
        word = max(NATO, key=lambda w: len(self._encode(" " + w)))
        phrase = " ".join([word] * self.spec.passkey_words)
        total = len(self.prefix) + len(self._encode("\n\n"))
        for k in range(1, self.spec.num_passkeys + 1):
            total += len(self._needle(k, phrase)) + len(self._question(k)) + len(self._answer(phrase))
        return total

    def __getitem__(self, index: int) -> Sample:
        spec = self.spec
        rng = random.Random(f"duohead-calibrate/{self.seed}/{index}")
        ctx_len = rng.randint(spec.ctx_min, spec.ctx_max)
        phrases = [" ".join(rng.choice(NATO) for _ in range(spec.passkey_words)) for _ in range(spec.num_passkeys)]
        needles = [self._needle(k + 1, p) for k, p in enumerate(phrases)]
        tail = self._encode("\n\n")
        for k in rng.sample(range(spec.num_passkeys), spec.num_passkeys):  # questions in random order
            tail += self._question(k + 1) + self._answer(phrases[k])
        hay_len = ctx_len - len(self.prefix) - sum(map(len, needles)) - len(tail)
        if hay_len < 0:
            raise ValueError(f"context length {ctx_len} is too short for the passkeys; raise --ctx-min")
        hay = self.haystack.tokens(rng, hay_len)
        if spec.num_passkeys == 1:
            depths = [(spec.depth_min + spec.depth_max) / 2]
        else:
            step = (spec.depth_max - spec.depth_min) / (spec.num_passkeys - 1)
            depths = [spec.depth_min + k * step for k in range(spec.num_passkeys)]
        ids = list(self.prefix)
        cursor = 0
        for depth, needle in zip(depths, needles):
            cut = round(depth * hay_len)
            ids += hay[cursor:cut] + needle
            cursor = cut
        ids += hay[cursor:]
        supervised = torch.zeros(ctx_len, dtype=torch.bool)
        supervised[len(ids) :] = True
        ids += tail
        return Sample(torch.tensor(ids, dtype=torch.long), supervised, depths, phrases)
