"""`duohead eval` on a tiny random Llama (results schema, shared prompts, baselines) and the built-in prompts."""

from __future__ import annotations

import argparse
import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from cli_model import KV_HEADS, LAYERS
from transformers import AutoTokenizer

from duohead import prompts, runner
from duohead.calibrate import haystack as calibration_haystack
from duohead.commands import eval_report, evaluate
from duohead.plots import have_matplotlib

ROW_KEYS = {"task", "length", "depth", "sample", "prompt_tokens", "answer", "answers", "output", "score", "prefill_seconds",
            "kv_bytes"}  # fmt: skip


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, tiny_pattern_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    argv = [
        "--model",
        str(tiny_model_dir),
        "--pattern",
        str(tiny_pattern_file),
        "--lengths",
        "128,256",
        "--depths",
        "0.25,0.75",
        "--sparsities",
        "0.5",
        "--limit",
        "3",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    ]
    assert evaluate.main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def test_results_schema_and_summaries(eval_run):
    report, out = eval_run
    assert (report["format"], report["version"]) == ("duohead-eval", 1)
    assert [m["name"] for m in report["methods"]] == ["full", "pattern@0.5", "streaming", "random@0.5"]
    assert [m["sparsity"] for m in report["methods"]] == [0.0, 0.5, 1.0, 0.5]
    for method in report["methods"]:
        rows = method["results"]
        assert len(rows) == 3 * len(report["tasks"])  # --limit 3 per task
        for row in rows:
            assert set(row) == ROW_KEYS
            assert row["score"] == float(row["answer"].lower() in row["output"].lower())
        summary = method["summary"]
        assert summary["mean"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))
        for task, per_task in summary["tasks"].items():
            grid = per_task["grid"]
            assert len(grid) == len(report["depths"]) and all(len(row) == len(report["lengths"]) for row in grid)
            ran = {(r["depth"], r["length"]) for r in rows if r["task"] == task}
            for i, depth in enumerate(report["depths"]):
                for j, length in enumerate(report["lengths"]):
                    assert (grid[i][j] is None) == ((depth, length) not in ran)
        if have_matplotlib():
            assert (out / f"heatmap_{method['name'].replace('@', '_')}.png").stat().st_size > 0


def test_every_method_sees_the_same_prompts(eval_run):
    report, _ = eval_run
    key = lambda r: (r["task"], r["length"], r["depth"], r["prompt_tokens"], r["answer"])  # noqa: E731
    first = [key(r) for r in report["methods"][0]["results"]]
    assert all([key(r) for r in m["results"]] == first for m in report["methods"][1:])
    for r in report["methods"][0]["results"]:
        assert r["length"] - 100 <= r["prompt_tokens"] <= r["length"]


def test_all_retrieval_pattern_scores_like_full(tiny_model_dir, tiny_pattern_file, tmp_path, capsys):
    argv = [
        "--model",
        str(tiny_model_dir),
        "--pattern",
        str(tiny_pattern_file),
        "--methods",
        "full,pattern",
        "--sparsities",
        "0",
        "--lengths",
        "200",
        "--depths",
        "0.5",
        "--tasks",
        "needle",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path),
    ]
    assert evaluate.main(argv) == 0
    full, pattern = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert [r["output"] for r in full["results"]] == [r["output"] for r in pattern["results"]]
    # one progress bar over every (method, prompt), with elapsed<remaining time, and a line per prompt above it
    err = capsys.readouterr().err
    assert re.search(r"eval: 100%\|[^|]*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert len(re.findall(r" needle +len +200 depth 0\.50  score 0", err)) == 2


def test_a_correct_answer_scores_one(tiny_model_dir, tmp_path, monkeypatch):
    """eval's scoring path (decode, compare, summarise, results.json) with a stand-in for the model run that
    answers passkeys (read from the prompt) and gets needles wrong. The tiny random model never answers;
    the real SmolLM2 does in test_smollm2.py."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def answer_passkeys(model, input_ids, max_new_tokens, **kwargs):
        key = re.search(r"The pass key is (\d{5})\.", tokenizer.decode(input_ids[0]))
        reply = f" {key[1]}. Remember it." if key else " I do not know."
        return SimpleNamespace(
            tokens=tokenizer(reply).input_ids[:max_new_tokens],
            prompt_tokens=input_ids.shape[1],
            prefill_seconds=0.0,
            memory={"total_bytes": 1000 * input_ids.shape[1]},
        )

    monkeypatch.setattr(runner, "run_prompt", answer_passkeys)
    argv = [
        "--model",
        str(tiny_model_dir),
        "--methods",
        "full",
        "--lengths",
        "200,300",
        "--depths",
        "0.2,0.8",
        "--max-new-tokens",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert evaluate.main(argv) == 0
    method = json.loads((tmp_path / "results.json").read_text())["methods"][0]
    rows = method["results"]
    assert len(rows) == 8 and {(r["task"], r["score"]) for r in rows} == {("passkey", 1.0), ("needle", 0.0)}
    assert all(r["output"].strip().startswith(r["answer"]) for r in rows if r["task"] == "passkey")
    summary = method["summary"]
    assert (summary["mean"], summary["tasks"]["passkey"]["mean"], summary["tasks"]["needle"]["mean"]) == (0.5, 1.0, 0.0)
    assert summary["tasks"]["passkey"]["grid"] == [[1.0, 1.0], [1.0, 1.0]]
    assert summary["kv_bytes"] == max(1000 * r["prompt_tokens"] for r in rows if r["length"] == 300)
    assert summary["ci95"] == pytest.approx(list(eval_report.wilson(0.5, 8)))


def test_wilson_interval():
    """Known values of the 95% Wilson interval; it stays inside [0, 1] at the ends."""
    low, high = eval_report.wilson(0.5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert eval_report.wilson(0.0, 5)[0] == 0.0 and eval_report.wilson(0.0, 5)[1] == pytest.approx(0.4345, abs=1e-4)
    assert eval_report.wilson(1.0, 5)[1] == 1.0


def _args(**kw) -> argparse.Namespace:
    base = dict(methods=["random", "streaming"], sparsities=[0.25, 0.75], seed=0, sink=None, window=None)
    return argparse.Namespace(**{**base, **kw})


def test_random_baseline_is_seeded_and_hits_the_sparsity(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    methods = evaluate.build_methods(_args(), None, config)
    assert [m.name for m in methods] == ["random@0.25", "random@0.75", "streaming"]
    for m in methods:
        layout = m.pattern.binarize(sparsity=m.sparsity)
        assert int((~layout).sum()) == round(m.sparsity * LAYERS * KV_HEADS)
        assert (m.pattern.sink, m.pattern.window) == (64, 256)
    again = evaluate.build_methods(_args(), None, config)[0].pattern.gates
    other = evaluate.build_methods(_args(seed=1), None, config)[0].pattern.gates
    assert torch.equal(methods[0].pattern.gates, again) and not torch.equal(methods[0].pattern.gates, other)


def test_limit_spreads_over_the_grid():
    cells = list(range(10))
    assert evaluate.select_cells(cells, None) == cells
    assert evaluate.select_cells(cells, 3) == [0, 4, 9] or evaluate.select_cells(cells, 3) == [0, 5, 9]
    assert evaluate.select_cells(cells, 1) == [5]
    assert len(set(evaluate.select_cells(cells, 7))) == 7


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("task", sorted(prompts.SAMPLERS))
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_samples_hide_the_answer_once_at_its_depth(tokenizer, task, depth):
    sample = prompts.SAMPLERS[task](tokenizer, 1000, depth, seed=7)
    assert sample == prompts.SAMPLERS[task](tokenizer, 1000, depth, seed=7)  # deterministic
    assert sample.prompt.count(sample.answer) == (2 if task == "passkey" else 1)  # the passkey line says it twice
    where = sample.prompt.index(sample.answer) / len(sample.prompt)
    assert abs(where - depth) < 0.15
    assert 900 <= len(tokenizer(sample.prompt).input_ids) <= 1000


@pytest.mark.parametrize("task", sorted(prompts.SAMPLERS))
def test_a_length_shorter_than_the_prompts_frame_is_refused(tokenizer, task):
    assert len(tokenizer(prompts.SAMPLERS[task](tokenizer, evaluate.MIN_LENGTH[task], 0.5, 1).prompt).input_ids) <= 96
    with pytest.raises(ValueError, match=rf"a {task} prompt needs at least \d+ tokens with this tokenizer; got --lengths 20"):
        prompts.SAMPLERS[task](tokenizer, 20, 0.5, 1)


def test_passkeys_differ_by_seed(tokenizer):
    keys = {prompts.passkey_sample(tokenizer, 300, 0.5, seed).answer for seed in range(20)}
    assert len(keys) > 15 and all(re.fullmatch(r"\d{5}", k) for k in keys)


def test_eval_haystack_is_not_the_calibration_haystack():
    """No run of eight words of the evaluation prose occurs in the calibration haystack."""
    calibration = " ".join(calibration_haystack.generate(random.Random(seed), 3000) for seed in range(5)).lower()
    calibration = re.sub(r"[^a-z' ]+", " ", calibration)
    calibration = " ".join(calibration.split())
    for essay in prompts.ESSAYS:
        words = re.sub(r"[^a-z' ]+", " ", essay.lower()).split()
        for i in range(len(words) - 7):
            assert " ".join(words[i : i + 8]) not in calibration
    assert not re.search(r"\d", " ".join(prompts.ESSAYS))  # no digits to compete with a passkey


BAD_INPUTS = {
    "sparsity above 1": (["--sparsities", "0.5,1.5"], "[0, 1]"),
    "unknown method": (["--methods", "full,oracle"], "unknown method"),
    "no method": (["--methods", ""], "argument --methods: expected comma-separated names, got ''"),
    "unknown task": (["--tasks", "quiz"], "unknown task"),
    "no task": (["--tasks", ","], "argument --tasks: expected comma-separated names"),
    "unknown suite": (["--suite", "longbench"], "argument --suite: invalid choice"),
    "suite and tasks": (["--suite", "ruler", "--tasks", "vt"], "--suite and --tasks both choose the tasks"),
    "depth outside [0, 1]": (["--depths", "1.2"], "--depths"),
    "longer than the positions": (
        ["--lengths", "300,2000"],
        "--lengths 2000 plus --max-new-tokens 8 exceeds this model's 600 positions; pass --lengths of at most 592",
    ),
    "far longer than the positions": (["--lengths", "100000"], "exceeds this model's 600 positions"),
    "shorter than a prompt": (["--lengths", "5"], "--lengths 5 is too short for a passkey prompt: it needs at least 96"),
    "shorter than a RULER prompt": (["--suite", "ruler", "--lengths", "200,500"], "too short for a niah_multikey_3"),
    "not integers": (["--lengths", "1k"], "argument --lengths: expected comma-separated integers"),
    "no samples": (["--samples", "0"], "--samples must be >= 1"),
    "no new tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "limit 0": (["--limit", "0"], "--limit must be >= 1"),
    "negative prefill chunk": (["--prefill-chunk", "-1"], "--prefill-chunk must be >= 0"),
    "no threads": (["--threads", "0"], "--threads must be >= 1"),
    "resume and force": (["--resume", "--force"], "--resume and --force contradict each other"),
    "resume nothing": (["--resume"], "--resume: no results.json in"),
    "out under a file": (["--out", "{tmp}/file/out"], "is a file, not a folder"),
    "out is a file": (["--out", "{tmp}/file"], "--out {tmp}/file is a file; name a folder"),
    "missing pattern": (["--pattern", "/nonexistent/p.json"], "neither a file"),
    "haystack without an essay task": (["--tasks", "vt", "--haystack", "{tmp}/file"], "--tasks has none of them"),
    "missing haystack": (["--tasks", "niah_single_2", "--haystack", "{tmp}/nope.txt"], "does not exist"),
    "haystack folder": (["--tasks", "niah_single_2", "--haystack", "{tmp}"], "is a folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error_before_the_model_loads(
    case, tiny_model_dir, tiny_pattern_file, tmp_path, capsys, monkeypatch
):
    """Every bad argument: one line on stderr, exit 2, no traceback, answered before the model loads, nothing written."""
    extra, needle = BAD_INPUTS[case]
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setattr(evaluate, "load_model_for_cli", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = [
        "--model",
        str(tiny_model_dir),
        "--pattern",
        str(tiny_pattern_file),
        "--lengths",
        "300",
        "--out",
        str(tmp_path / "out"),
    ]
    try:
        code = evaluate.main([*argv, *(e.format(tmp=tmp_path) for e in extra)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("duohead eval: error:") and needle.format(tmp=tmp_path) in err[0], err[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_failed_save_still_prints_the_table_and_says_nothing_was_saved(
    tiny_model_dir, tiny_pattern_file, tmp_path, capsys, monkeypatch
):
    """A disk that fills up after the start: every prompt still runs, the table is printed, exit 1 with where
    nothing could be saved."""

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "atomic_write_text", full_disk)
    assert evaluate.main(_grid_argv(tiny_model_dir, tiny_pattern_file, tmp_path)) == 1
    captured = capsys.readouterr()
    assert "overall" in captured.out and "pattern@0.5" in captured.out
    assert captured.err.count("cannot save") == 1  # said once, when it first happens
    assert f"error: nothing was saved to {tmp_path} (No space left on device)" in captured.err
    assert re.search(r"eval: 100%\|[^|]*\| 8/8", captured.err)  # 4 prompts x 2 methods


def test_missing_model(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path / "nope"), "--methods", "full"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- keeping the work


def _grid_argv(model_dir, pattern_file, out) -> list[str]:
    return ["--model", str(model_dir), "--pattern", str(pattern_file), "--methods", "full,pattern", "--sparsities", "0.5",
            "--lengths", "128,200", "--depths", "0.5", "--max-new-tokens", "2", "--out", str(out)]  # fmt: skip


def _without_timings(report: dict) -> list:
    return [[{k: v for k, v in r.items() if k != "prefill_seconds"} for r in m["results"]] for m in report["methods"]]


def test_killed_eval_resumes_from_out_alone_to_the_same_results(tiny_model_dir, tiny_pattern_file, tmp_path, monkeypatch):
    """Ctrl-C after 5 of 8 prompts keeps those 5 in results.json; `--out DIR --resume` (from another folder) runs only
    the other 3 and ends with the results of an uninterrupted run."""
    assert evaluate.main(_grid_argv(tiny_model_dir, tiny_pattern_file, tmp_path / "straight")) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    run_prompt, calls = runner.run_prompt, []

    def killed_at_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return run_prompt(*args, **kwargs)

    monkeypatch.setattr(runner, "run_prompt", killed_at_sixth)
    out = tmp_path / "killed"
    assert evaluate.main(_grid_argv(tiny_model_dir, tiny_pattern_file, out)) == 130
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and [len(m["results"]) for m in partial["methods"]] == [4, 1]
    calls.clear()
    monkeypatch.setattr(runner, "run_prompt", lambda *a, **k: (calls.append(1), run_prompt(*a, **k))[1])
    monkeypatch.chdir(tmp_path / "straight")
    assert evaluate.main(["--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert len(calls) == 3 and resumed["complete"] is True
    assert _without_timings(resumed) == _without_timings(straight)
    assert [m["summary"] for m in resumed["methods"]] == [m["summary"] for m in straight["methods"]]


def test_a_used_out_folder_is_refused_without_force_and_force_clears_stale_heatmaps(
    tiny_model_dir, tiny_pattern_file, tmp_path, capsys
):
    argv = _grid_argv(tiny_model_dir, tiny_pattern_file, tmp_path)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "heatmap_random_0.75.png").write_bytes(b"from an earlier run")
    capsys.readouterr()
    assert evaluate.main(argv) == 2
    assert "holds the results of an earlier eval; pass --resume to continue it, --force" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"
    assert evaluate.main([*argv, "--force"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True
    assert not (tmp_path / "heatmap_random_0.75.png").exists()
    capsys.readouterr()
    assert evaluate.main(["--out", str(tmp_path), "--resume", "--seed", "3", "--lengths", "128,200"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--seed 3 (the run has 0): drop that option (or start a new run with another --out or --force)")


def test_a_haystack_file_feeds_the_essay_tasks_and_is_recorded(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "hay.txt").write_text("Otters hold hands while they sleep so that the current does not part them. ")
    seen = []
    run_prompt = runner.run_prompt
    monkeypatch.setattr(runner, "run_prompt", lambda model, ids, *a, **k: (seen.append(ids), run_prompt(model, ids, *a, **k))[1])
    argv = ["--model", str(tiny_model_dir), "--methods", "full", "--tasks", "niah_single_2,vt", "--lengths", "300",
            "--max-new-tokens", "1", "--haystack", str(tmp_path / "hay.txt"), "--out", str(tmp_path / "out")]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(argv) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    essay, vt = (tokenizer.decode(ids[0]) for ids in seen)
    assert "Otters hold hands" in essay and "Otters" not in vt  # variable tracking keeps its noise haystack
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["settings"]["haystack"] == str(tmp_path / "hay.txt")


def test_a_full_disk_is_found_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The 64 KiB probe in --out fails as a full disk would; the model is never loaded."""
    monkeypatch.setattr(evaluate, "load_model_for_cli", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(evaluate.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    argv = ["--model", str(tiny_model_dir), "--methods", "full", "--lengths", "300", "--out", str(tmp_path / "out")]
    assert evaluate.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"duohead eval: error: --out {tmp_path / 'out'}: cannot write there (No space left on device); pass a writable folder"
    )
