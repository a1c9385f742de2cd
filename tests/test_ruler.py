"""RULER's task families (`duohead.ruler`): deterministic, solvable by a plain parser, scored as RULER scores, and
as long as asked for, on two tokenizers (SmolLM2's byte-level BPE and a whitespace word-level one)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from duohead import ruler


@pytest.fixture(scope="module")
def smollm2_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)  # the tiny CLI model carries SmolLM2's tokenizer


@pytest.fixture(scope="module")
def word_tokenizer():
    """Every word and every punctuation mark one token (all of them unknown: only the count matters)."""
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(params=["smollm2", "words"])
def tokenizer(request, smollm2_tokenizer, word_tokenizer):
    return smollm2_tokenizer if request.param == "smollm2" else word_tokenizer


NEEDLE = re.compile(r"One of the special magic (?:numbers|words|UUIDs) for (\S+) is: (\S+)\.")


def solve(task: str, prompt: str) -> list[str]:
    """The answers read off the prompt by plain parsing, without `duohead.ruler`'s help."""
    if task.startswith("niah"):
        question = re.search(r"What are all the special magic \w+ for (.+) mentioned in the provided text\?", prompt)
        asked = re.split(r", and |, ", question[1])
        return [value for key, value in NEEDLE.findall(prompt) if key in asked]
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", prompt)[1]
        held = set(re.findall(rf"VAR (\w+) = {value}\.", prompt))
        for _ in range(10):
            held |= {b for b, a in re.findall(r"VAR (\w+) = VAR (\w+)\.", prompt) if a in held}
        return sorted(held)
    if task == "cwe":
        counts = Counter(re.findall(r"\d+\. (\w+)", prompt.split("Here is the list:")[1])).most_common()
        assert counts[9][1] > counts[10][1]  # the ten are unambiguous
        return sorted(w for w, _ in counts[:10])
    words = prompt.split("\n")[0].split()[len(ruler.FWE_INTRO.split()) :]
    counts = Counter(w for w in words if w != "....").most_common()
    assert counts[2][1] > counts[3][1]
    return sorted(w for w, _ in counts[:3])


@pytest.mark.parametrize("task", sorted(ruler.TASKS))
def test_generator_is_deterministic_and_its_answer_recoverable(task, smollm2_tokenizer):
    sample = ruler.TASKS[task](smollm2_tokenizer, 1024, 5)
    assert sample == ruler.TASKS[task](smollm2_tokenizer, 1024, 5)  # byte for byte
    assert sample.prompt != ruler.TASKS[task](smollm2_tokenizer, 1024, 6).prompt
    assert sorted(solve(task, sample.prompt)) == sorted(sample.answers)
    assert (sample.task, sample.length, sample.depth) == (task, 1024, None)


@pytest.mark.parametrize("task", sorted(ruler.TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_prompts_are_as_long_as_asked_for_on_two_tokenizers(task, length, tokenizer):
    """At most `length` tokens, and short of it by less than one haystack unit: a word or filler sentence, one
    numbered word, or (where every line is a needle) one needle line."""
    tokens = len(tokenizer(ruler.TASKS[task](tokenizer, length, 1).prompt).input_ids)
    slack = 64 if task.startswith("niah_multikey_3") else 32
    assert length - slack <= tokens <= length


@pytest.mark.parametrize("task", sorted(ruler.TASKS))
def test_the_stated_minimum_fits_and_less_is_refused_with_the_real_one(task, tokenizer):
    sample = ruler.TASKS[task](tokenizer, ruler.MIN_LENGTH[task], 0)
    assert len(tokenizer(sample.prompt).input_ids) <= ruler.MIN_LENGTH[task]
    with pytest.raises(ValueError, match=rf"a {task} prompt needs at least \d+ tokens with this tokenizer; got --lengths 40"):
        ruler.TASKS[task](tokenizer, 40, 0)


def test_needles_are_spread_over_the_haystack(smollm2_tokenizer):
    """Over seeds, the single needle lands in every fifth of the prompt (RULER draws depths uniformly)."""
    fifths = set()
    for seed in range(40):
        sample = ruler.TASKS["niah_single_2"](smollm2_tokenizer, 600, seed)
        fifths.add(int(5 * sample.prompt.index(sample.answers[0]) / len(sample.prompt)))
    assert fifths == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    ("answers", "output", "expected"),
    [
        (("4821397",), " 4821397. The sky", 1.0),
        (("Cinnamon",), "cinnamon.", 1.0),  # case-insensitive
        (("4821397",), "482139", 0.0),
        (("a1b2", "c3d4"), "c3d4 and A1B2", 1.0),
        (("a1b2", "c3d4", "e5f6", "g7h8"), "a1b2, e5f6", 0.5),  # all-of with partial credit, as RULER scores
        (("tangerine",), "", 0.0),
    ],
)
def test_score(answers, output, expected):
    assert ruler.score(answers, output) == expected


@pytest.mark.parametrize("task", sorted(ruler.TASKS))
def test_reference_answer_scores_one_and_a_wrong_one_zero(task, smollm2_tokenizer):
    sample = ruler.TASKS[task](smollm2_tokenizer, 800, 2)
    assert ruler.score(sample.answers, " " + ", ".join(sample.answers) + ".") == 1.0
    other = ruler.TASKS[task](smollm2_tokenizer, 800, 3)
    assert not set(other.answers) & set(sample.answers)
    assert ruler.score(sample.answers, ", ".join(other.answers)) == 0.0


def test_families():
    assert {ruler.family(t) for t in ruler.SUITE} == {
        "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"
    }  # fmt: skip
    assert len(ruler.SUITE) == 11 and "niah_single_words" not in ruler.SUITE


def test_a_length_past_the_word_list_is_refused(tokenizer):
    """cwe's rare words come from the essays' vocabulary; a prompt longer than it can fill is refused, not shortened."""
    with pytest.raises(ValueError, match=r"a cwe prompt holds at most \d+ tokens with this tokenizer"):
        ruler.cwe(tokenizer, 30000, 0)


def test_a_users_text_is_the_essay_haystack(smollm2_tokenizer):
    text = "Otters hold hands while they sleep so that the current does not part them. " * 3
    sample = ruler.TASKS["niah_multivalue"](smollm2_tokenizer, 700, 4, text=text)
    assert sample == ruler.TASKS["niah_multivalue"](smollm2_tokenizer, 700, 4, text=text)
    assert "Otters hold hands" in sample.prompt and not any(essay[:40] in sample.prompt for essay in ruler.ESSAYS)
    assert sorted(solve("niah_multivalue", sample.prompt)) == sorted(sample.answers)
    assert 680 <= len(smollm2_tokenizer(sample.prompt).input_ids) <= 700
    with pytest.raises(ValueError, match="the haystack text holds no words"):
        ruler.TASKS["niah_single_2"](smollm2_tokenizer, 700, 4, text=" \n")
    assert set(ruler.ESSAY_TASKS) == {t for t in ruler.TASKS if t.startswith("niah") and t[-1] not in "123"} | {
        "niah_single_2", "niah_single_3", "niah_multikey_1"
    }  # fmt: skip


@pytest.mark.slow
def test_smollm2_solves_single_needles_under_full_attention_and_the_pattern(tmp_path):
    """The generated tasks are solvable by the real model: the 1K single-needle prompts of the recorded grid
    (benchmarks/eval-ruler/1k, seed 0, sample 0), which full attention and the shipped pattern at 50% both answer."""
    from duohead.commands import evaluate

    argv = ["--methods", "full,pattern", "--sparsities", "0.5", "--tasks", "niah_single_1,niah_single_3",
            "--lengths", "1024", "--out", str(tmp_path)]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    for method in report["methods"]:
        assert [r["score"] for r in method["results"]] == [1.0, 1.0], method["results"]
        assert method["summary"]["families"]["niah_single"]["mean"] == 1.0
