"""Calibration: passkey data, the gated student, the training loop, `duohead calibrate` and `duohead inspect`.

Everything runs on tiny random models built here, with a word-level tokenizer built from the haystack's
own vocabulary (no download, no real model).
"""

from __future__ import annotations

import json

import pytest
import torch
from calibration_rules_compared import target_lambda  # also registers the lagrange and instant rules
from calibration_testbed import carrier_model, layout_mse, word_tokenizer
from tiny_models import masked_attention
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from duohead.calibrate import gates as gates_module
from duohead.calibrate.convergence import convergence_report, late_side_changes
from duohead.calibrate.data import FileHaystack, PasskeyDataset, PasskeySpec
from duohead.calibrate.gates import GatedModel, blocked_streaming_attention, streaming_attention
from duohead.calibrate.settings import CHECKPOINT, TrainConfig, checkpoint_settings
from duohead.calibrate.train import Calibrator, lr_factor
from duohead.commands.calibrate import main as calibrate_main
from duohead.commands.inspect_pattern import main as inspect_main
from duohead.gate_summary import gate_report
from duohead.kernels.reference import lambda_visible
from duohead.pattern import HeadPattern

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def tiny_model(arch: str, vocab_size: int, max_positions: int = 2048) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](**kwargs), attn_implementation="sdpa")
    if arch == "qwen2":  # random biases, so a wrong bias order would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.eval()


def small_spec(ctx_min: int = 120, ctx_max: int = 200) -> PasskeySpec:
    return PasskeySpec(ctx_min, ctx_max, num_passkeys=3, passkey_words=4)


def train_config(**overrides) -> TrainConfig:
    values = dict(
        steps=6,
        lr=0.1,
        reg=0.05,
        target_sparsity=0.5,
        sink=4,
        window=16,
        ctx_min=120,
        ctx_max=200,
        num_passkeys=3,
        passkey_words=4,
        seed=0,
        rule="evidence",
    )
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------------- data


def test_samples_have_exact_lengths_tail_labels_and_spread_depths(tokenizer):
    spec = small_spec()
    dataset = PasskeyDataset(tokenizer, spec, seed=3)
    lengths = set()
    for i in range(8):
        sample = dataset[i]
        length = sample.input_ids.numel()
        lengths.add(length)
        assert spec.ctx_min <= length <= spec.ctx_max and sample.supervised.numel() == length
        tail = sample.supervised.nonzero().flatten()
        assert tail[-1] == length - 1 and tail.numel() == tail[-1] - tail[0] + 1  # one contiguous block at the end
        tail_text = tokenizer.decode(sample.input_ids[sample.supervised])
        assert tail_text.count("Question") == spec.num_passkeys and "Remember" not in tail_text
        assert sample.depths[0] == pytest.approx(0.05) and sample.depths[-1] == pytest.approx(0.95)
        context = sample.input_ids[~sample.supervised].tolist()
        number_id = tokenizer.convert_tokens_to_ids("passphrase")
        positions = [j for j, t in enumerate(context) if t == number_id]
        assert len(positions) == spec.num_passkeys
        assert positions[0] < 0.3 * len(context) and positions[-1] > 0.7 * len(context)
        for phrase in sample.passkeys:
            assert tail_text.count(phrase) == 1
    assert len(lengths) > 1


def test_samples_are_deterministic_by_seed_and_index(tokenizer):
    a, b = PasskeyDataset(tokenizer, small_spec(), seed=1), PasskeyDataset(tokenizer, small_spec(), seed=1)
    assert torch.equal(a[5].input_ids, b[5].input_ids) and torch.equal(a[5].supervised, b[5].supervised)
    assert not torch.equal(a[5].input_ids[:100], a[6].input_ids[:100])
    c = PasskeyDataset(tokenizer, small_spec(), seed=2)
    assert not torch.equal(a[5].input_ids[:100], c[5].input_ids[:100])


def test_context_too_short_for_passkeys_is_refused(tokenizer):
    with pytest.raises(ValueError, match="--ctx-min"):
        PasskeyDataset(tokenizer, PasskeySpec(40, 60, num_passkeys=3, passkey_words=4))


def test_file_haystack_is_used_and_too_short_file_is_refused(tokenizer, tmp_path):
    text = tmp_path / "hay.txt"
    text.write_text("\n\n".join(f"Ada walked to the mill number {i} ." for i in range(60)), encoding="utf-8")
    dataset = PasskeyDataset(tokenizer, small_spec(), haystack=FileHaystack(tokenizer, [text]), seed=0)
    assert tokenizer.convert_tokens_to_ids("mill") in dataset[0].input_ids.tolist()
    short = tmp_path / "short.txt"
    short.write_text("Ada walked to the mill.", encoding="utf-8")
    with pytest.raises(ValueError, match="hold .* tokens"):
        PasskeyDataset(tokenizer, small_spec(), haystack=FileHaystack(tokenizer, [short]), seed=0)[0]


# ---------------------------------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    "length,sink,window", [(37, 4, 8), (100, 0, 16), (5, 8, 16), (64, 3, 1), (50, 60, 7), (300, 5, 20), (400, 2, 150)]
)
def test_streaming_branch_follows_the_lambda_rule(length, sink, window):
    torch.manual_seed(length)
    q, k, v = torch.randn(2, 6, length, 16), torch.randn(2, 2, length, 16), torch.randn(2, 2, length, 16)
    pos = torch.arange(length)[None].expand(2, length)
    oracle = masked_attention(q, k, v, lambda_visible(pos[:, :, None], pos[:, None, :], sink, window), 0.25)
    torch.testing.assert_close(streaming_attention(q, k, v, sink, window, 0.25), oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocked_streaming_attention(q, k, v, sink, window, 0.25), oracle, atol=1e-5, rtol=1e-5)


def test_streaming_branch_never_builds_a_t_by_t_mask(monkeypatch):
    """The Λ masks the calibration student builds stay O(T * (S + 2N)) at every length (here T = 2,048)."""
    sizes = []

    def recording(q_pos, k_pos, sink, window):
        visible = lambda_visible(q_pos, k_pos, sink, window)
        sizes.append(visible.numel())
        return visible

    monkeypatch.setattr(gates_module, "lambda_visible", recording)
    length, sink, window = 2048, 8, 64
    q = torch.randn(1, 2, length, 16, requires_grad=True)
    k, v = torch.randn(1, 1, length, 16), torch.randn(1, 1, length, 16)
    streaming_attention(q, k, v, sink, window, 0.25).sum().backward()
    block = gates_module.MIN_BLOCK
    assert sizes and max(sizes) <= length * (sink + 2 * block) < length * length // 4


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_all_gates_one_is_the_teacher(arch, tokenizer):
    model = tiny_model(arch, len(tokenizer))
    gated = GatedModel(model, sink=4, window=16)
    sample = PasskeyDataset(tokenizer, small_spec(), seed=0)[0]
    ids = sample.input_ids[None]
    target = gated.teacher_states(ids, sample.supervised)
    assert gated.distill_backward(ids, sample.supervised, target) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        gated.gates.fill_(0.0)
    gated.gates.grad = None
    assert gated.distill_backward(ids, sample.supervised, target) > 1e-6  # streaming everywhere differs
    assert gated.gates.grad.abs().sum() > 0


def test_bfloat16_student_gives_finite_gate_gradients(tokenizer):
    model = tiny_model("qwen2", len(tokenizer)).to(torch.bfloat16)
    gated = GatedModel(model, sink=4, window=16)
    calibrator = Calibrator(gated, PasskeyDataset(tokenizer, small_spec(), seed=0), train_config())
    record = calibrator.step()
    evidence = calibrator.rule.evidence
    assert record["distill"] > 0 and torch.isfinite(evidence).all() and evidence.abs().sum() > 0
    assert gated.gates.dtype == torch.float32 and len(record["streaming"]) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_the_gates_learn(arch, tokenizer):
    model = tiny_model(arch, len(tokenizer))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    gated = GatedModel(model, sink=4, window=16)
    calibrator = Calibrator(gated, PasskeyDataset(tokenizer, small_spec(), seed=0), train_config())
    for _ in range(3):
        calibrator.step()
    assert not torch.equal(calibrator.gates, torch.ones_like(calibrator.gates))
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_distillation_loss_decreases(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    gated = GatedModel(model, sink=2, window=8, gradient_checkpointing=False)
    dataset = PasskeyDataset(tokenizer, small_spec(), seed=0)
    probe = dataset[100]

    def probe_loss() -> float:
        target = gated.teacher_states(probe.input_ids[None], probe.supervised)
        loss = gated.distill_backward(probe.input_ids[None], probe.supervised, target)
        gated.gates.grad = None
        return loss

    with torch.no_grad():
        gated.gates.fill_(0.0)
    start = probe_loss()
    calibrator = Calibrator(gated, dataset, train_config(steps=8, reg=0.0, target_sparsity=None, sink=2, window=8))
    for _ in range(8):
        calibrator.step()
    assert probe_loss() < 0.5 * start


def test_target_lambda_pushes_exactly_that_many_gates_down():
    grad = -torch.tensor([[0.3, 0.1, 0.0], [0.5, 0.2, 0.05]])
    for k in range(7):
        lam = target_lambda(grad, k)
        assert int(((grad + lam / grad.numel()) > 0).sum()) == k


def test_schedule_warms_up_and_decays():
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[50] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(factors[:20], factors[1:21])) and all(a >= b for a, b in zip(factors[80:], factors[81:]))


def test_late_side_changes_counts_heads_that_flipped_in_the_last_fifth():
    layouts = [[0, 1]] * 8 + [[0, 2], [0, 1]]  # 10 steps: the last 2 (plus the one before) are the window
    assert late_side_changes(layouts, 4) == 2  # heads 1 and 2 changed side; 0 and 3 did not
    assert late_side_changes([[0, 2], [0, 1]] + [[0, 1]] * 8, 4) == 0
    assert late_side_changes([[3]], 4) == 0


def test_convergence_report_names_each_failed_condition():
    settled = convergence_report(torch.tensor([[0.0, 1.0], [1.0, 0.02]]), 0.5, [[0, 3]] * 5)
    assert settled["converged"] and settled["decided"] == 1.0 and settled["margin"] == pytest.approx(0.98)
    loose = convergence_report(torch.tensor([[0.45, 0.5], [0.9, 0.4]]), 0.5, [[0, 1], [0, 3]])
    assert not loose["converged"]
    assert [r.split()[0] for r in loose["reasons"]] == ["cut", "0%", "2"]  # margin, decided, late side changes
    off_target = convergence_report(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), 0.5, [[0, 1]])
    assert off_target["reasons"] == ["3 gates below 0.5, target 2", "cut margin 0.0 < 0.1"]


TESTBED_CARRIERS = [0, 3, 5, 6, 9, 10, 12, 15]  # 4 layers x 4 KV heads; these carry the context


def calibrate_testbed(tokenizer, rule: str, seed: int, steps: int = 40) -> tuple[dict, list[int], float, float]:
    """Calibrate the testbed at 50%: (convergence report, streaming heads, their held-out MSE, the designed layout's)."""
    gated = GatedModel(carrier_model(len(tokenizer), TESTBED_CARRIERS), sink=4, window=16, gradient_checkpointing=False)
    dataset = PasskeyDataset(tokenizer, small_spec(), seed=seed)
    calibrator = Calibrator(gated, dataset, train_config(steps=steps, seed=seed, rule=rule))
    layouts = [calibrator.step()["streaming"] for _ in range(steps)]
    report = convergence_report(calibrator.gates, 0.5, layouts)
    held_out = range(1000, 1006)
    designed = [i for i in range(16) if i not in TESTBED_CARRIERS]
    found = layout_mse(gated, dataset, layouts[-1], held_out)
    return report, sorted(layouts[-1]), found, layout_mse(gated, dataset, designed, held_out)


def test_testbed_heads_demonstrably_carry_the_context(tokenizer):
    gated = GatedModel(carrier_model(len(tokenizer), TESTBED_CARRIERS), sink=4, window=16, gradient_checkpointing=False)
    dataset = PasskeyDataset(tokenizer, small_spec(), seed=0)
    others = [i for i in range(16) if i not in TESTBED_CARRIERS]
    assert layout_mse(gated, dataset, TESTBED_CARRIERS, range(4)) > 5 * layout_mse(gated, dataset, others, range(4))


@pytest.fixture(scope="module")
def instant_on_testbed(tokenizer) -> tuple[dict, float, float]:
    report, _, mse, designed_mse = calibrate_testbed(tokenizer, "instant", seed=0)
    return report, mse, designed_mse


@pytest.mark.parametrize("rule, min_overlap", [("relaxed", 6), ("evidence", 7)])
def test_signed_rules_reach_the_target_where_the_instant_rule_does_not(rule, min_overlap, tokenizer, instant_on_testbed):
    instant, instant_mse, designed_mse = instant_on_testbed
    assert not instant["converged"]
    report, streaming, mse, _ = calibrate_testbed(tokenizer, rule, seed=0)
    assert report["converged"], report.get("reasons")
    assert report["below_half"] == 8 and report["margin"] >= 0.9 and report["decided"] == 1.0
    assert mse <= 1.1 * designed_mse < instant_mse  # as good a layout as the designed one
    other, other_seed, other_mse, _ = calibrate_testbed(tokenizer, rule, seed=1)
    assert other["converged"] and other_mse <= 1.1 * designed_mse  # another seed (other samples): as good a layout
    assert len(set(streaming) & set(other_seed)) >= min_overlap


# ---------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("rule", ["relaxed", "evidence", "lagrange"])
def test_resume_gives_the_same_gates_as_an_uninterrupted_run(rule, tokenizer, tmp_path):
    def calibrator() -> Calibrator:
        gated = GatedModel(tiny_model("qwen3", len(tokenizer)), sink=4, window=16)
        return Calibrator(gated, PasskeyDataset(tokenizer, small_spec(), seed=0), train_config(rule=rule))

    straight = calibrator()
    records = [straight.step() for _ in range(6)]
    first = calibrator()
    for _ in range(2):
        first.step()
    first.save(tmp_path / CHECKPOINT)
    resumed = calibrator()
    resumed.load(tmp_path / CHECKPOINT)
    resumed_records = [resumed.step() for _ in range(4)]
    assert torch.equal(resumed.gates, straight.gates)
    assert [r["distill"] for r in resumed_records] == [r["distill"] for r in records[2:]]
    mine, theirs = resumed.rule.tensors(), straight.rule.tensors()  # evidence, relaxed layout, AdamW moments
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert resumed.rule.metadata() == straight.rule.metadata()  # the multiplier
    other = Calibrator(resumed.gated, resumed.dataset, train_config(lr=0.2, rule=rule))
    with pytest.raises(ValueError, match="lr 0.1"):
        other.load(tmp_path / CHECKPOINT)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tokenizer), max_positions=512).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CLI_ARGS = [
    "--steps",
    "4",
    "--ctx-min",
    "120",
    "--ctx-max",
    "200",
    "--num-passkeys",
    "3",
    "--passkey-words",
    "4",
    "--sink",
    "4",
    "--window",
    "16",
    "--checkpoint-every",
    "2",
]


def test_cli_end_to_end_writes_pattern_log_heatmap_and_refuses_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert calibrate_main(["--model", str(model_dir), "--out", str(out), *CLI_ARGS]) == 0
    pattern = HeadPattern.load(out / "pattern.json")
    assert pattern.gates.shape == (2, 2) and (pattern.sink, pattern.window) == (4, 16)
    assert pattern.provenance["steps"] == 4 and pattern.model["architecture"] == "llama"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and {"distill", "decided", "margin", "streaming"} <= set(log[0])
    assert all(len(r["streaming"]) == 2 for r in log)  # the cut at the target: 2 of 4 heads stream
    assert pattern.provenance["mode"] == "relaxed" and "converged" in pattern.provenance["gate_report"]
    assert (out / "gates.png").stat().st_size > 0
    capsys.readouterr()
    assert calibrate_main(["--model", str(model_dir), "--out", str(out), *CLI_ARGS]) == 2
    assert "--force" in capsys.readouterr().err
    assert calibrate_main(["--model", str(model_dir), "--out", str(out), *CLI_ARGS, "--force"]) == 0
    assert torch.equal(HeadPattern.load(out / "pattern.json").gates, pattern.gates)  # deterministic


def test_cli_ctrl_c_saves_and_resume_from_out_alone_matches(model_dir, tmp_path, monkeypatch, capsys):
    """Interrupted, then resumed with nothing but --out (from another folder): the same gates and log as a run that
    was never interrupted, with every setting taken from the checkpoint."""
    straight = tmp_path / "straight"
    assert calibrate_main(["--model", str(model_dir), "--out", str(straight), *CLI_ARGS]) == 0
    step = Calibrator.step

    def interrupt_at_third(self):
        if self.step_index == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Calibrator, "step", interrupt_at_third)
    out = tmp_path / "resumed"
    assert calibrate_main(["--model", str(model_dir), "--out", str(out), *CLI_ARGS]) == 130
    assert f"continue with: duohead calibrate --out {out} --resume\n" in capsys.readouterr().err
    assert not (out / "pattern.json").exists()
    assert checkpoint_settings(out / CHECKPOINT)[1]["model"] == str(model_dir.resolve())
    monkeypatch.setattr(Calibrator, "step", step)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert calibrate_main(["--out", str(out), "--resume"]) == 0
    resumed = HeadPattern.load(out / "pattern.json")
    assert torch.equal(resumed.gates, HeadPattern.load(straight / "pattern.json").gates)
    assert (resumed.sink, resumed.window, resumed.provenance["ctx_min"], resumed.provenance["steps"]) == (4, 16, 120, 4)
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_cli_resume_refuses_only_an_explicit_conflicting_option(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    step = Calibrator.step

    def interrupt_at_second(self):
        if self.step_index == 1:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Calibrator, "step", interrupt_at_second)
    assert calibrate_main(["--model", str(model_dir), "--out", str(out), *CLI_ARGS]) == 130
    monkeypatch.setattr(Calibrator, "step", step)
    capsys.readouterr()
    assert calibrate_main(["--out", str(out), "--resume", "--ctx-min", "100", "--lr", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--ctx-min 100 (the run has 120); --lr 0.2 (the run has 0.1): drop those options" in err
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]  # untouched
    assert calibrate_main(["--out", str(out), "--resume", "--ctx-min", "120", "--model", str(model_dir)]) == 0  # agreeing


def test_cli_warns_when_unconverged_and_resume_with_more_steps_continues_a_finished_run(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert calibrate_main(["--model", str(model_dir), "--out", str(out), *CLI_ARGS]) == 0
    printed, err = capsys.readouterr()
    assert "\n  converged: no (" in printed and "{" not in printed  # the gate report in words, not JSON
    assert "warning: the gates have not converged" in err  # 4 steps cannot settle
    assert err.rstrip().endswith(f"continue this run with: duohead calibrate --out {out} --resume --steps 8")
    first = HeadPattern.load(out / "pattern.json")
    assert first.provenance["gate_report"]["converged"] is False
    more = ["--steps", "8"]
    assert calibrate_main(["--out", str(out), *more, "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, 9))
    longer = HeadPattern.load(out / "pattern.json")
    assert longer.provenance["steps"] == 8 and not torch.equal(longer.gates, first.gates)
    capsys.readouterr()
    assert calibrate_main(["--out", str(out), "--resume"]) == 2
    assert "at step 8 already; pass --steps larger than 8" in capsys.readouterr().err


def test_cli_gradient_checkpointing_is_off_on_cpu_unless_asked(model_dir, tmp_path, monkeypatch):
    seen = []

    def recording(model, **kwargs):
        seen.append(kwargs["gradient_checkpointing"])
        return GatedModel(model, **kwargs)

    monkeypatch.setattr(gates_module, "GatedModel", recording)  # the CLI imports it when it runs
    args = ["--model", str(model_dir), "--steps", "1", *CLI_ARGS[2:]]
    assert calibrate_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert calibrate_main([*args, "--out", str(tmp_path / "b"), "--gradient-checkpointing"]) == 0
    assert seen == [False, True]


def test_cli_user_errors_are_one_line(model_dir, tokenizer, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    short = tmp_path / "short.txt"
    short.write_text("Ada walked to the mill.", encoding="utf-8")
    cases = [
        (["--model", str(gpt2)], "architecture 'gpt2'"),
        (["--model", str(model_dir), "--ctx-max", "4096"], "longer than the model allows"),
        (["--model", str(model_dir), "--haystack", str(short)], "hold"),
        (["--model", str(tmp_path / "missing")], "does not exist"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        args = [*CLI_ARGS, "--out", str(tmp_path / "out"), *extra]
        assert calibrate_main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.strip().splitlines()[-1]
        assert sum("error" in line for line in err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- inspect


def test_gate_report_margin_and_ties():
    report = gate_report(torch.tensor([[0.0, 0.2, 0.9], [1.0, 1.0, 0.1]]), sparsity=0.5)
    assert report["saturated_at_1"] == 2 and report["saturated_at_0"] == 1
    assert (
        report["highest_streaming_gate"] == 0.2
        and report["lowest_retrieval_gate"] == 0.9
        and report["margin"] == pytest.approx(0.7)
    )
    tied = gate_report(torch.ones(2, 3), sparsity=0.5)
    assert tied["margin"] == 0.0 and tied["ties_at_cut"] == 6


def test_inspect_prints_summary_and_draws_heatmap(tmp_path, capsys):
    path = HeadPattern(torch.tensor([[0.0, 0.6], [1.0, 0.3]]), sink=8, window=32, model={"name": "tiny"}).save(
        tmp_path / "p.json"
    )
    assert inspect_main([str(path), "--sparsity", "0.5", "--png", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert "2 layers x 2 KV heads" in printed and "margin 0.3" in printed and "sink 8, window 32" in printed
    assert "model:\n  name: tiny\n" in printed and "provenance: (none recorded)" in printed  # lines, not raw JSON
    assert (tmp_path / "g.png").stat().st_size > 0
    assert inspect_main([str(tmp_path / "nope.json")]) == 2
