"""RULER's synthetic task families (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), generated offline from duohead's own text: no download, no network.

    niah_single_{1,2,3}  one needle; noise / essay haystack; number / number / UUID value
    niah_single_words    one needle, essay haystack, a word as the value (RULER's value type "words")
    niah_multikey_1      essay haystack, the needle and three distractor needles with other keys
    niah_multikey_{2,3}  every line of the haystack is a needle (word keys + numbers / UUID keys + UUIDs)
    niah_multivalue      four values under one key, all asked for
    niah_multiquery      four keys asked for at once
    vt                   variable tracking: a chain of four assignments and one distractor chain in noise
    cwe                  common-words extraction: the ten most common words of a numbered list
    fwe                  frequent-words extraction: the three most frequent coded words (Zipf, alpha 2)

Templates and scoring follow RULER's (`scripts/data/synthetic/constants.py`): the prompt ends with the answer
prefix, and a row's score is the fraction of its reference strings found in the output, case-insensitive
(RULER's `string_match_all`). Each prompt is the longest one of its family that fits in `length` tokens (a
search over the haystack size, as RULER does). Every sample is a deterministic function of its arguments.
docs/evaluation.md lists where the generators differ from RULER's and why the QA families are left out.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from functools import partial

from duohead.prompts import ESSAYS, PASSKEY_FILLER, Sample

ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
              "mellow", "noble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upper", "vivid", "witty", "young",
              "zesty", "bitter", "clever", "dim", "early", "fuzzy", "grand", "hasty", "idle", "jumpy", "kind", "lame",
              "mighty", "nervous", "open", "proud")  # fmt: skip
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
         "ladder", "meadow", "needle", "orchard", "parrot", "quarry", "river", "saddle", "tunnel", "umbrella", "valley",
         "wagon", "yacht", "zebra", "basket", "castle", "desert", "forest", "glacier", "hammer", "igloo", "jungle",
         "kitten", "lantern", "mirror", "nugget", "oyster", "pillow", "rocket")  # fmt: skip
NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER = "The special magic {kind} for {query} mentioned in the provided text are"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are assigned "
    "the value {value}, they are:"
)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"
NOISE_SENTENCES = tuple(s.strip() + "." for s in PASSKEY_FILLER.split(".") if s.strip())
KINDS = {"numbers": "numbers", "words": "words", "uuids": "UUIDs"}  # value type -> how the prompt names it


def _count(tokenizer, text: str) -> int:
    """Tokens of `text` as `duohead eval` feeds it (special tokens included)."""
    return len(tokenizer(text).input_ids)


def fit(tokenizer, length: int, task: str, build: Callable[[int], str], most: int | None = None) -> str:
    """The prompt `build(n)` for the largest haystack size n (at most `most`, default `length`: every unit is at
    least one token) whose prompt has at most `length` tokens. `build` must grow with n. Raises ValueError stating
    the family's minimum when even n = 0 does not fit, or its maximum when n = `most` still falls short."""
    least = _count(tokenizer, build(0))
    if least > length:
        raise ValueError(f"a {task} prompt needs at least {least} tokens with this tokenizer; got --lengths {length}")
    most = length if most is None else most
    low, high = 0, 1
    while _count(tokenizer, build(high)) <= length:
        if high >= most:
            raise ValueError(
                f"a {task} prompt holds at most {_count(tokenizer, build(most))} tokens with this tokenizer (its word "
                f"list runs out); got --lengths {length}"
            )
        low, high = high, min(2 * high, most)
    while high - low > 1:  # build(low) fits, build(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if _count(tokenizer, build(mid)) <= length else (low, mid)
    return build(low)


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}{rng.choice(NOUNS)}"  # "words": one made-up compound, unlike any key


def _keys(rng: random.Random, kind: str, count: int) -> list[str]:
    """`count` distinct keys: adjective-noun pairs ("words") or UUIDs; word keys repeat only past 1,600."""
    if kind == "uuids":
        return [_value(rng, "uuids") for _ in range(count)]
    pairs = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
    picked = rng.sample(pairs, min(count, len(pairs)))
    return picked + [rng.choice(pairs) for _ in range(count - len(picked))]


def essay_words(seed: int, count: int, text: str | None = None) -> list[str]:
    """`count` words of essay prose: the built-in essays (`duohead.prompts.ESSAYS`) in a seeded order, or `text` (a
    user's haystack) from a seeded word on, repeated as often as needed."""
    rng = random.Random(seed)
    if text is not None:
        source = text.split()
        if not source:
            raise ValueError("the haystack text holds no words")
        start = rng.randrange(len(source))
        return [source[(start + i) % len(source)] for i in range(count)]
    words: list[str] = []
    while len(words) < count:
        order = list(ESSAYS)
        rng.shuffle(order)
        words += " ".join(order).split()
    return words[:count]


def insert_needles(units: list[str], needles: list[str], depths: list[float], sentence_ends: bool) -> list[str]:
    """`units` with needles[i] inserted at fraction depths[i] of the units, in depth order. `sentence_ends`: units
    are words; a needle goes after the next word that ends a sentence (never inside one)."""
    spots = []
    for depth in depths:
        at = round(depth * len(units))
        if sentence_ends:
            while 0 < at < len(units) and not units[at - 1].endswith("."):
                at += 1
        spots.append(at)
    out = list(units)
    for at, needle in sorted(zip(spots, needles, strict=True), key=lambda p: p[0], reverse=True):
        out.insert(at, needle)
    return out


def niah(tokenizer, length: int, seed: int, *, task: str, haystack: str, key_kind: str, value_kind: str,
         keys: int = 1, values: int = 1, queries: int = 1, text: str | None = None) -> Sample:  # fmt: skip
    """A needle-in-a-haystack prompt of RULER's NIAH family. haystack: "noise" (repeated filler sentences), "essay"
    (the built-in essays) or "needle" (every line a needle with another key). `keys` needles with distinct keys,
    of which the first `queries` are asked for; the asked keys hold `values` values each. `text`: the essay
    haystack's prose instead of the built-in essays."""
    rng = random.Random(f"{task}/{seed}")
    kind = KINDS[value_kind]
    all_keys = _keys(rng, key_kind, keys)
    needles = [(k, _value(rng, value_kind)) for k in all_keys[:queries] for _ in range(values)]
    needles += [(k, _value(rng, value_kind)) for k in all_keys[queries:]]
    lines = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, v in needles]
    depths = [rng.random() for _ in lines]
    answers = tuple(v for k, v in needles[: queries * values])
    asked = all_keys[:queries]
    query = asked[0] if queries == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    if haystack == "noise":
        units, ends = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(length)], False
    elif haystack == "essay":
        units, ends = essay_words(rng.randrange(2**31), length, text), True
    else:  # every line a needle under a key not asked for
        fillers = [k for k in _keys(rng, key_kind, length + keys) if k not in all_keys][:length]
        units, ends = [NIAH_NEEDLE.format(kind=kind, key=k, value=_value(rng, value_kind)) for k in fillers], False
    head = NIAH_INTRO.format(kind=kind)
    tail = f"{NIAH_QUESTION.format(kind=kind, query=query)} {NIAH_ANSWER.format(kind=kind, query=query)}"
    sep = "\n" if haystack == "needle" else " "

    def build(n: int) -> str:
        return f"{head}\n{sep.join(insert_needles(units[:n], lines, depths, ends))}\n{tail}"

    return Sample(task, length, None, fit(tokenizer, length, task, build, most=len(units)), answers)


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def vt(tokenizer, length: int, seed: int, task: str = "vt", chains: int = 2, hops: int = 4) -> Sample:
    """Variable tracking: `chains` chains of `hops` assignments (VAR B = VAR A ...) from distinct 5-digit values, in
    noise; the question asks for every variable of the first chain (the others are distractors)."""
    rng = random.Random(f"{task}/{seed}")
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        name = variable_name(rng)
        names += [name] if name not in names else []
    values = rng.sample(range(10000, 100000), chains)
    statements, depths = [], []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        statements += lines
        depths += sorted(rng.random() for _ in lines)  # a chain's assignments in order
    units = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(length)]
    tail = f"{VT_QUESTION.format(value=values[0])} {VT_ANSWER.format(count=hops + 1, value=values[0])}"

    def build(n: int) -> str:
        return f"{VT_INTRO}\n\n{' '.join(insert_needles(units[:n], statements, depths, False))}\n{tail}"

    return Sample(task, length, None, fit(tokenizer, length, task, build), tuple(names[: hops + 1]))


def word_vocabulary() -> list[str]:
    """Distinct lowercase words of four letters or more from the built-in essays, sorted."""
    return sorted({w for w in re.findall(r"[a-z]+", " ".join(ESSAYS).lower()) if len(w) >= 4})


def cwe(tokenizer, length: int, seed: int, task: str = "cwe", common: int = 10, rare_repeats: int = 3) -> Sample:
    """Common-words extraction: `common` words repeated often and rare words repeated `rare_repeats` times, shuffled,
    as a numbered list; the answer is the common words. Common words repeat 30 times from 4K tokens on, fewer
    below (length // 128, at least 4), so that they fit."""
    rng = random.Random(f"{task}/{seed}")
    vocabulary = word_vocabulary()
    rng.shuffle(vocabulary)
    frequent, rare = vocabulary[:common], vocabulary[common:]
    repeats = max(4, min(30, length // 128))
    tail = f"{CWE_QUESTION} {CWE_ANSWER}"

    def build(n: int) -> str:
        words = frequent * repeats + rare[:n] * rare_repeats
        random.Random(f"{task}/{seed}/{n}").shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return f"{CWE_INTRO}\nHere is the list: {listing}\n{tail}"

    return Sample(task, length, None, fit(tokenizer, length, task, build, most=len(rare)), tuple(frequent))


def coded_words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct made-up lowercase words of three to six letters."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        words += [word] if word not in words else []
    return words


def fwe(tokenizer, length: int, seed: int, task: str = "fwe", alpha: float = 2.0, vocabulary: int = 200) -> Sample:
    """Frequent-words extraction: coded words with Zipf frequencies (rank r ~ 1 / r^alpha), the dots '....' as the
    most frequent; the answer is the three most frequent coded words."""
    rng = random.Random(f"{task}/{seed}")
    words = ["...."] + coded_words(rng, vocabulary - 1)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocabulary)]
    total = sum(weights)
    tail = f"{FWE_QUESTION} {FWE_ANSWER}"

    def build(n: int) -> str:
        text = [w for w, p in zip(words, weights) for _ in range(int(n * p / total))]
        random.Random(f"{task}/{seed}/{n}").shuffle(text)
        return f"{FWE_INTRO} {' '.join(text)}\n{tail}"

    prompt = fit(tokenizer, length, task, build)
    return Sample(task, length, None, prompt, tuple(words[1:4]))


def _niah(task: str, haystack: str, key_kind: str, value_kind: str, **counts: int) -> Callable[..., Sample]:
    return partial(niah, task=task, haystack=haystack, key_kind=key_kind, value_kind=value_kind, **counts)


# task -> generator(tokenizer, length, seed) -> Sample; those in ESSAY_TASKS also take text= (a user's haystack)
TASKS: dict[str, Callable[..., Sample]] = {
    "niah_single_1": _niah("niah_single_1", "noise", "words", "numbers"),
    "niah_single_2": _niah("niah_single_2", "essay", "words", "numbers"),
    "niah_single_3": _niah("niah_single_3", "essay", "words", "uuids"),
    "niah_single_words": _niah("niah_single_words", "essay", "words", "words"),
    "niah_multikey_1": _niah("niah_multikey_1", "essay", "words", "numbers", keys=4),
    "niah_multikey_2": _niah("niah_multikey_2", "needle", "words", "numbers"),
    "niah_multikey_3": _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    "niah_multivalue": _niah("niah_multivalue", "essay", "words", "numbers", values=4),
    "niah_multiquery": _niah("niah_multiquery", "essay", "words", "numbers", keys=4, queries=4),
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
}
ESSAY_TASKS = tuple(t for t, f in TASKS.items() if isinstance(f, partial) and f.keywords["haystack"] == "essay")
SUITE = tuple(t for t in TASKS if t != "niah_single_words")  # RULER's 13 tasks less its two QA tasks
# the fewest prompt tokens each family needs (its frame without haystack, rounded up over the tokenizers tried);
# `duohead eval` refuses shorter --lengths before loading a model
MIN_LENGTH = {t: 160 for t in TASKS} | {"niah_multiquery": 256, "niah_multikey_3": 256, "vt": 224, "cwe": 448}


def score(answers: tuple[str, ...] | list[str], output: str) -> float:
    """RULER's `string_match_all`: the fraction of `answers` that occur in `output`, case-insensitive."""
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def family(task: str) -> str:
    """The RULER family a task belongs to: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe."""
    return task.rsplit("_", 1)[0] if task.startswith(("niah_single", "niah_multikey")) else task


# greedy tokens per prompt (RULER generates 128 for NIAH; fewer here, enough for the answers, to fit a CPU budget)
NEW_TOKENS = {t: 24 for t in TASKS} | {"niah_single_3": 48, "niah_multikey_3": 48, "niah_multivalue": 64,
                                      "niah_multiquery": 64, "vt": 40, "cwe": 80, "fwe": 32}  # fmt: skip
