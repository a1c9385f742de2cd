"""`duohead generate` end to end on a tiny random Llama: tokens, the report's byte counts, and bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from cli_model import KV_HEADS, LAYERS, MAX_POSITIONS, SINK, WINDOW
from transformers import AutoModelForCausalLM, AutoTokenizer

import duohead
from duohead.cache import cache_argument
from duohead.commands import generate

PROMPT = "The lighthouse stood on the cliff for a long time, and every night its lamp turned over the dark water. " * 4
HEAD_DIM, FP32_BYTES = 16, 4


def _run(tmp_path, model_dir, pattern, *extra: str, prompt: str = PROMPT) -> tuple[dict, int]:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt)
    out = tmp_path / "report.json"
    argv = [
        "--model",
        str(model_dir),
        "--pattern",
        str(pattern),
        "--prompt-file",
        str(prompt_file),
        "--max-new-tokens",
        "6",
        "--prefill-chunk",
        "16",
        "--report-json",
        str(out),
        "--force",  # tests call this more than once per folder
        *extra,
    ]
    rc = generate.main(argv)
    return (json.loads(out.read_text()) if rc == 0 else {}), rc


def _full_kv_bytes(tokens: int) -> int:
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * FP32_BYTES * tokens


def test_generate_matches_hf_generate_and_reports_duocache_bytes(tmp_path, tiny_model_dir, tiny_pattern_file, capsys):
    report, rc = _run(tmp_path, tiny_model_dir, tiny_pattern_file)
    assert rc == 0
    run = report["runs"]["duohead"]
    assert report["sparsity"] == 0.5 and (report["sink"], report["window"]) == (4, 16)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert run["prompt_tokens"] == ids.shape[1] > 4 + 16  # well past sink + window
    model = duohead.from_pretrained(tiny_model_dir, pattern=tiny_pattern_file).eval()
    model.generation_config.eos_token_id = None
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    assert run["tokens"] == expected  # chunked prefill + our decode loop = transformers' generate on a DuoCache

    # The cache after the run holds the prompt and every generated token but the last one.
    cache = duohead.DuoCache.from_model(model)
    with torch.no_grad():
        model(torch.cat([ids, torch.tensor([expected[:-1]])], dim=1), **{cache_argument(model): cache}, use_cache=True)
    memory = cache.memory()
    for key in ("retrieval_bytes", "streaming_bytes", "full_bytes", "total_bytes"):
        assert run["kv_memory"][key] == memory[key], key
    assert memory["full_bytes"] == _full_kv_bytes(ids.shape[1] + 5)
    assert run["decode_steps"] == 5 and run["decode_tokens_per_second"] > 0 and run["peak_memory_bytes"] > 0

    out = capsys.readouterr().out
    assert run["text"] in out  # streamed to stdout
    assert f"{run['kv_memory']['total_bytes'] / 1e6:,.1f} MB" in out
    assert f"duohead holds {memory['full_bytes'] / memory['total_bytes']:.2f}x less KV than full attention would" in out


def test_report_compares_kv_in_the_right_direction_for_a_short_prompt(tmp_path, tiny_model_dir, tiny_pattern_file, capsys):
    """A prompt shorter than sink + window: the report's comparison line states the direction and factor of the bytes
    it reports (a streaming ring allocated whole holds more than full attention would; "less" would be wrong)."""
    report, rc = _run(tmp_path, tiny_model_dir, tiny_pattern_file, prompt="The capital of France is")
    assert rc == 0
    memory = report["runs"]["duohead"]["kv_memory"]
    tokens = report["runs"]["duohead"]["prompt_tokens"] + 5  # the last new token is never written to the cache
    assert tokens < SINK + WINDOW and memory["full_bytes"] == _full_kv_bytes(tokens)
    held, full = memory["total_bytes"], memory["full_bytes"]
    expected = f"{full / held:.2f}x less" if held < full else f"{held / full:.2f}x more" if held > full else "as much"
    assert f"duohead holds {expected} KV" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("held", "full", "words"),
    [
        (100, 800, "8.00x less KV than"),
        (1106, 100, "11.06x more KV than"),
        (300, 300, "as much KV as"),
    ],
)
def test_kv_comparison_says_less_or_more(held, full, words):
    line = generate.kv_comparison({"total_bytes": held, "full_bytes": full})
    assert line.startswith(f"duohead holds {words} full attention would")


def test_compare_full_runs_stock_model_side_by_side(tmp_path, tiny_model_dir, tiny_pattern_file, capsys):
    report, rc = _run(tmp_path, tiny_model_dir, tiny_pattern_file, "--compare-full", "--threads", "1")
    assert rc == 0
    assert (report["model"], report["pattern"]) == (str(tiny_model_dir), str(tiny_pattern_file))  # what was chosen
    assert report["cpu_threads"] == 1 and torch.get_num_threads() == 1
    err = capsys.readouterr().err
    assert "prefill, duohead:" in err and "prefill, full attention:" in err  # each run's progress bar says whose
    duo, full = report["runs"]["duohead"], report["runs"]["full attention"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    stock.generation_config.eos_token_id = None
    assert full["tokens"] == stock.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    held = _full_kv_bytes(ids.shape[1] + 5)
    assert full["kv_memory"]["total_bytes"] == held == duo["kv_memory"]["full_bytes"]
    assert duo["kv_memory"]["total_bytes"] < held


def test_all_retrieval_equals_full_attention(tmp_path, tiny_model_dir, tiny_pattern_file):
    report, rc = _run(tmp_path, tiny_model_dir, tiny_pattern_file, "--compare-full", "--sparsity", "0")
    assert rc == 0
    assert report["runs"]["duohead"]["tokens"] == report["runs"]["full attention"]["tokens"]
    assert report["runs"]["duohead"]["kv_memory"]["streaming_bytes"] == 0


def test_chat_prompt_from_stdin(tiny_model_dir, tiny_pattern_file, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where does the lighthouse stand?"))
    out = tmp_path / "report.json"
    argv = [
        "--model",
        str(tiny_model_dir),
        "--pattern",
        str(tiny_pattern_file),
        "--chat",
        "--max-new-tokens",
        "2",
        "--report-json",
        str(out),
    ]
    assert generate.main(argv) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    message = [{"role": "user", "content": "Where does the lighthouse stand?"}]
    chat = tokenizer.apply_chat_template(message, add_generation_prompt=True)
    chat_ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert json.loads(out.read_text())["runs"]["duohead"]["prompt_tokens"] == len(chat_ids)


@pytest.fixture
def wrong_pattern(tmp_path):
    path = tmp_path / "other.json"
    duohead.HeadPattern(torch.ones(3, 2), model={"name": "another-model"}).save(path)
    return path


@pytest.fixture
def gpt2_gguf(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BAD_INPUTS = {
    "missing model": (lambda d, p, t: ["--model", str(t / "nope"), "--pattern", str(p)], "does not exist"),
    "missing pattern": (lambda d, p, t: ["--model", str(d), "--pattern", str(t / "nope.json")], "neither a file"),
    "no pattern for a custom model": (lambda d, p, t: ["--model", str(d)], "pass --pattern"),
    "sparsity above 1": (lambda d, p, t: ["--model", str(d), "--pattern", str(p), "--sparsity", "1.5"], "[0, 1]"),
    "sparsity below 0": (lambda d, p, t: ["--model", str(d), "--pattern", str(p), "--sparsity", "-0.1"], "[0, 1]"),
    "sparsity and threshold": (
        lambda d, p, t: ["--model", str(d), "--pattern", str(p), "--sparsity", "0.5", "--threshold", "0.5"],
        "not both",
    ),
    "missing prompt file": (
        lambda d, p, t: ["--model", str(d), "--pattern", str(p), "--prompt-file", str(t / "none.txt")],
        "prompt file",
    ),
    "negative prompt lookup": (
        lambda d, p, t: ["--model", str(d), "--pattern", str(p), "--prompt-lookup", "-1"],
        "--prompt-lookup must be >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, tiny_model_dir, tiny_pattern_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    make_argv, needle = BAD_INPUTS[case]
    assert generate.main(make_argv(tiny_model_dir, tiny_pattern_file, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("duohead generate: error:") and needle in err


def test_pattern_for_another_model(tmp_path, tiny_model_dir, wrong_pattern, capsys):
    assert _run(tmp_path, tiny_model_dir, wrong_pattern)[1] == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another-model" in err and "3 layers" in err


@pytest.mark.parametrize("prompt", ["", "  \n\t "])
def test_empty_prompt(tmp_path, tiny_model_dir, tiny_pattern_file, capsys, prompt):
    assert _run(tmp_path, tiny_model_dir, tiny_pattern_file, prompt=prompt)[1] == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_prompt_longer_than_positions_is_refused_not_truncated(tmp_path, tiny_model_dir, tiny_pattern_file, capsys):
    assert _run(tmp_path, tiny_model_dir, tiny_pattern_file, prompt=PROMPT * 8)[1] == 2
    captured = capsys.readouterr()
    assert f"{MAX_POSITIONS} positions" in captured.err and "truncate" in captured.err
    assert captured.out == ""  # nothing was generated


def test_unsupported_gguf_from_the_command_line(gpt2_gguf, tiny_pattern_file):
    """The installed `duohead` command: one line on stderr, exit code 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "duohead", "generate", "--model", str(gpt2_gguf), "--pattern", str(tiny_pattern_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "'gpt2'" in proc.stderr and "llama" in proc.stderr


def test_prompt_lookup_gives_the_same_tokens(tmp_path, tiny_model_dir, tiny_pattern_file):
    plain, rc = _run(tmp_path, tiny_model_dir, tiny_pattern_file, "--compare-full")
    lookup, rc_lookup = _run(tmp_path, tiny_model_dir, tiny_pattern_file, "--compare-full", "--prompt-lookup", "4")
    assert rc == rc_lookup == 0
    for name in ("duohead", "full attention"):
        assert lookup["runs"][name]["tokens"] == plain["runs"][name]["tokens"], name
        assert plain["runs"][name]["accepted_draft_tokens"] == 0
        accepted = lookup["runs"][name]["accepted_draft_tokens"]
        assert lookup["runs"][name]["decode_steps"] + accepted == plain["runs"][name]["decode_steps"], name
