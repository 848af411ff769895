"""The demo stages (r1train.demo): held-out metrics against hand counts and against the trainer's own
evaluation, rejection sampling's filter and counts, and every stage end to end at toy size (files written,
the reported ratios and differences consistent with the reported numbers)."""

import json
import os

import pytest
import torch

from r1train import pipeline
from r1train.demo import common as C

TOY = ["model_hidden_size=32", "model_num_layers=1", "max_steps=2", "task_eval_size=6", "task_train_size=32",
       "kernel_backend=torch", "disable_tqdm=true", "max_completion_length=24", "logging_steps=0"]

ZH_PLUS = "\u52a0"


def test_text_metrics_by_hand():
    texts = ["<think>1 plus 2 = 3</think><answer>3</answer>",  # right, formatted, English
             f"<think>1 {ZH_PLUS} 2 = 3</think><answer>3</answer>",  # right, mixed (a non-English word)
             "<think>1 plus 2 = 4</think><answer>4</answer>",  # wrong
             "<answer>3</answer>",  # right, unformatted, no words (not mixed)
             "3"]  # no answer tag: wrong
    m = C.text_metrics(texts, ["3"] * 5, [10, 20, 30, 40, 50])
    assert m == {"accuracy": 3 / 5, "format": 3 / 5, "mixing": 1 / 5, "length": 30.0}
    assert C.text_metrics([], [], []) == {"accuracy": 0.0, "format": 0.0, "mixing": 0.0, "length": 0.0}


def test_table_and_plot(tmp_path):
    m = {"greedy/accuracy": 0.5, "sampled/accuracy": 0.25, "sampled/length": 12.34}
    out = C.table("t", [("a model", m), ("b", {})], ["note"])
    lines = out.splitlines()
    assert lines[0] == "== t ==" and lines[-1] == "note"
    assert "50.0%" in lines[2] and "25.0%" in lines[2] and "12.3" in lines[2] and lines[3].split()[1:] == ["-"] * 7
    pytest.importorskip("matplotlib")
    p = C.plot(str(tmp_path / "c.png"), {"p": {"x": [[0, 1.0], [1, 2.0]]}, "empty": {"y": []}})
    assert os.path.getsize(p) > 0
    assert C.plot(str(tmp_path / "none.png"), {"empty": {"y": []}}) is None


def test_rejection_sample_filter_and_counts(monkeypatch):
    """Keeps only correct, well-formed (and with `language`, single-language) samples, distinct, at most
    `keep` per prompt; the counts add up."""
    import torch

    from r1train.config import TrainConfig

    rows = [{"prompt": "a", "answer": "3"}, {"prompt": "b", "answer": "5"}]
    texts = ["<think>1 plus 2 = 3</think><answer>3</answer>",
             "<think>1 plus 2 = 3</think><answer>3</answer>",  # a duplicate
             f"<think>1 {ZH_PLUS} 2 = 3</think><answer>3</answer>",  # correct but mixed
             "<answer>3</answer>",  # correct, unformatted
             "<think>2 plus 2 = 4</think><answer>4</answer>",  # wrong
             "<think>2 plus 3 = 5</think><answer>5</answer>",
             "<think>3 plus 2 = 5</think><answer>5</answer>",
             "<think>4 plus 1 = 5</think><answer>5</answer>"]

    def fake(model, tok, rows, *, num_samples, cfg, seed_key, batch_size):
        assert num_samples == 4
        from types import SimpleNamespace

        yield 0, rows, SimpleNamespace(prompt_texts=[r["prompt"] for r in rows for _ in range(num_samples)]), texts

    monkeypatch.setattr(pipeline, "sample_rows", fake)
    monkeypatch.setattr(pipeline, "setup_distributed", lambda: (0, 1))
    model = torch.nn.Linear(1, 1)
    for language, keep, want in ((None, 1, [texts[0], texts[5]]), (None, 2, [texts[0], texts[2], texts[5], texts[6]]),
                                 ("en", 2, [texts[0], texts[5], texts[6]])):
        stats = {}
        out = pipeline.rejection_sample(TrainConfig(), model, None, rows, num_samples=4, keep=keep,
                                        language=language, stats=stats)
        assert [r["completion"] for r in out] == want
        assert all(r["answer"] == r["completion"][-10] for r in out)  # each row keeps its own prompt's columns
        assert stats == {"samples": 8, "correct": 6, "kept": len(want), "prompts_kept": 2}


def test_evaluate_matches_the_trainer(tmp_path):
    """The demo's greedy held-out accuracy equals the trainer's own evaluation of the same model and rows, and
    an independent count: HF generate's greedy completions, one prompt at a time, whose last <answer> equals the
    gold answer. The model is SFT'd on the held-out problems' solutions (it answers them), and every other gold
    answer is changed, so the expected accuracy is neither 0 nor 1 (before, an untrained model answered none
    and the test compared 0 with 0)."""
    import re

    from r1train.data import prompt_ids
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_model_and_tokenizer
    from r1train.tasks import arith

    toy = TOY + ["task_eval_size=12", "max_completion_length=64"]  # room for a whole solution
    base, c_rl = C.configs("demo.yaml", toy, str(tmp_path), {"grpo": "grpo"})
    train, ev = C.problems(base)
    model, tok = load_model_and_tokenizer(base)
    # a model that answers them: SFT on the held-out problems' correct solutions
    C.sft(C.configs("demo.yaml", toy + ["max_steps=200", "learning_rate=0.01"], str(tmp_path / "s"),
                    {"sft": "sft"})[1], model, tok, arith.cold_start_rows(ev, 0))
    rows = [dict(r, answer=str(int(r["answer"]) + 1000)) if i % 2 else r for i, r in enumerate(arith.rl_rows(ev))]
    model.eval()
    right = 0
    for r in rows:
        ids = torch.tensor([prompt_ids(tok, r["prompt"])])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=c_rl.max_completion_length, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        out = out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        found = re.findall(r"<answer>(.*?)</answer>", tok.decode(out), re.S)
        right += bool(found) and found[-1].strip() == r["answer"]
    want = right / len(rows)
    assert 0 < want < 1, want
    mine = C.evaluate(model, tok, rows, c_rl, samples=2)
    theirs = GRPOTrainer(c_rl, model, tok, arith.rl_rows(train), rows).evaluate()
    assert mine["greedy/accuracy"] == pytest.approx(want)
    assert theirs["eval/accuracy_greedy"] == pytest.approx(want)
    assert 0 <= mine["sampled/accuracy"] <= 1 and mine["greedy/length"] >= 1
    assert mine["eval_temperature"] == c_rl.eval_temperature


def test_evaluate_skips_rows_without_gold(tmp_path, monkeypatch):
    """The trainer's held-out accuracies count only rows with a gold answer (accuracy_reward None: a missing or
    blank one); with none, no accuracy is reported. The accuracy reward is replaced by one that scores a row by
    its gold answer alone (1 when even), so the expected accuracies follow from the rows."""
    from r1train import rewards
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_model_and_tokenizer
    from r1train.tasks import arith

    monkeypatch.setattr(rewards, "accuracy_reward", lambda prompts, texts, answer: [
        float(int(a) % 2 == 0) if rewards.has_gold(a) else None for a in answer])
    base, c_rl = C.configs("demo.yaml", TOY + ["task_eval_size=10"], str(tmp_path), {"grpo": "grpo"})
    train, ev = C.problems(base)
    model, tok = load_model_and_tokenizer(base)
    rows = arith.rl_rows(ev)
    want = sum(int(r["answer"]) % 2 == 0 for r in rows) / len(rows)
    blank = [dict(r, answer=a) for r, a in zip(rows[:4], (None, "", " ", float("nan")))]
    for ev_rows in (rows, rows + blank, blank[:2] + rows):
        got = GRPOTrainer(c_rl, model, tok, arith.rl_rows(train), ev_rows).evaluate()
        assert got == pytest.approx({"eval/accuracy": want, "eval/accuracy_greedy": want})
    assert GRPOTrainer(c_rl, model, tok, arith.rl_rows(train), blank).evaluate() == {}


@pytest.mark.slow
def test_every_stage_at_toy_size(tmp_path, capsys):
    """`r1train demo --stage all` at toy size: each stage's table, JSON and curves; the reported derived numbers
    recomputed from the reported metrics. (Directions of the effects need the real sizes: README table.)"""
    from r1train.cli import main

    assert main(["demo", "--stage", "all", *TOY, f"output_dir={tmp_path}", "eval_steps=1"]) == 0
    out = capsys.readouterr().out
    for title in ("R1-Zero", "cold start -> reasoning RL", "language consistency", "rejection sampling",
                  "distillation"):
        assert f"== {title}" in out
    res = {}
    for stage, sub, name in (("zero", "zero", "zero"), ("default", "", "demo"), ("language", "language", "language"),
                             ("rejection", "rejection", "rejection"), ("distill", "distill", "distill")):
        d = tmp_path / sub
        res[stage] = json.loads((d / f"{name}_results.json").read_text())
        assert res[stage]["wall_seconds"] > 0 and res[stage]["eval_prompts"] == 6
        for m in res[stage]["table"].values():
            for k in ("greedy/accuracy", "sampled/accuracy", "greedy/format", "sampled/mixing"):
                assert 0.0 <= m.get(k, 0.0) <= 1.0
    d = res["default"]
    assert (d["greedy_accuracy_before_rl"], d["accuracy_after_rl"]) == (d["after_sft"]["greedy/accuracy"],
                                                                        d["after_rl"]["sampled/accuracy"])
    lang = res["language"]
    plain, with_ = lang["rl_without_language_reward"], lang["rl_with_language_reward"]
    assert lang["mixing_reduction_sampled"] == pytest.approx(plain["sampled/mixing"] / max(with_["sampled/mixing"],
                                                                                           1 / 6))
    assert lang["accuracy_cost_greedy"] == pytest.approx(plain["greedy/accuracy"] - with_["greedy/accuracy"])
    for arm, after in (("rl-language", with_), ("rl-no-language", plain)):
        m = C.read_metrics(str(tmp_path / "language" / arm))
        rewards = {k for r in m for k in r if k.startswith("rewards/")}
        assert ("rewards/language/mean" in rewards) == (arm == "rl-language")
        # the accuracy curve starts and ends at the stage table's evaluations (each model evaluated once)
        greedy = C.curve(m, "eval/accuracy_greedy")
        assert greedy[0] == [0, lang["after_sft"]["greedy/accuracy"]]
        assert greedy[-1][1] == after["greedy/accuracy"]
        assert C.curve(m, "eval/accuracy")[-1][1] == after["sampled/accuracy"]
    rs = res["rejection"]["rejection_sampling"]
    assert rs["samples"] == 32 * 4 and rs["kept"] <= min(rs["correct"], rs["prompts"])
    assert rs["kept_share"] == pytest.approx(rs["kept"] / rs["samples"])
    assert res["rejection"]["start"] == "language stage (this run)" and res["rejection"]["rl_temperature"] == 0.7
    dist = res["distill"]
    assert dist["student_params"] <= dist["teacher_params"]  # equal here: the toy overrides size both
    f = dist["flops"]
    assert f["rl_over_distill"] == pytest.approx(f["student_rl"] / max(f["distill_sft"] + f["teacher_sampling"], 1))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for sub, name in (("zero", "zero"), ("", "demo"), ("language", "language"), ("distill", "distill")):
        assert (tmp_path / sub / f"{name}_curves.png").exists(), name


@pytest.mark.slow
def test_language_reward_lowers_mixing_at_small_size(tmp_path):
    """The language stage's effect in the direction the README reports, at a size a test can afford (a 1-layer,
    32-wide model, 40 SFT and 40 RL steps at lr 3e-3): the mixed cold start samples a second-language step
    word often, RL with the language reward samples it in under half as many completions as RL without it."""
    from r1train.demo import stages

    small = ["model_hidden_size=32", "model_num_layers=1", "max_steps=40", "task_train_size=200",
             "task_eval_size=40", "learning_rate=3e-3", "kernel_backend=torch", "disable_tqdm=true",
             "logging_steps=0", "eval_steps=0"]
    res = stages.language(small, str(tmp_path), {})
    without, with_ = res["rl_without_language_reward"], res["rl_with_language_reward"]
    assert res["after_sft"]["sampled/mixing"] > 0.1
    assert with_["sampled/mixing"] < 0.5 * without["sampled/mixing"], (with_, without)


def _small_config(tmp_path, name: str, sft_steps: int, rl_steps: int, rl_lr: float) -> str:
    """The stage's YAML with its SFT (or pretraining) and GRPO sections shortened, at an affordable size."""
    import yaml

    y = yaml.safe_load(open(os.path.join(C.CONFIG_DIR, name)))
    for sec in ("sft", "distill"):
        if sec in y:
            y[sec].update(max_steps=sft_steps, learning_rate=3e-3)
    y["grpo"].update(max_steps=rl_steps, learning_rate=rl_lr, eval_steps=0)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(y))
    return str(path)


SMALL = ["model_hidden_size=64", "model_num_layers=2", "task_train_size=400", "task_eval_size=60",
         "kernel_backend=torch", "disable_tqdm=true", "logging_steps=0"]


@pytest.mark.slow
def test_default_stage_grpo_raises_accuracy_at_small_size(tmp_path):
    """The default stage's effect in the direction the README reports, at a size a test can afford: the demo's
    model (4 layers x 128), 300 cold-start SFT steps on 1000 problems, 80 GRPO steps at the demo's lr, 200 held-out
    problems (about 90 s on 2 cores). Measured (seeds 42, 1, 7; transformers' warmup, SFT adam_beta2 0.9):
    greedy accuracy 44.5 -> 60.0, 43.0 -> 55.5, 39.0 -> 49.5%; pass@1 35.0 -> 47.0, 44.5 -> 52.0, 26.5 -> 33.0%
    (with beta2 0.999 the SFT stalled on a plateau at all three: greedy 17.0 / 10.0 / 11.5%). A 2-layer, 64-wide
    model with 60 held-out problems (this test before) moved within one problem of noise (16.7 -> 15.0% in one
    environment)."""
    from r1train.demo import stages

    small = ["task_train_size=1000", "task_eval_size=200", "kernel_backend=torch", "disable_tqdm=true",
             "logging_steps=0"]
    res = stages.default(small, str(tmp_path), {"config": _small_config(tmp_path, "demo.yaml", 300, 80, 3e-5)})
    before, after = res["after_sft"], res["after_rl"]
    assert before["greedy/format"] > 0.9 and 0.0 < before["sampled/accuracy"] < 0.6  # room to improve
    assert after["greedy/accuracy"] >= before["greedy/accuracy"] + 0.05, (before, after)
    assert after["sampled/accuracy"] > before["sampled/accuracy"], (before, after)


@pytest.mark.slow
def test_zero_stage_adopts_the_format_at_small_size(tmp_path):
    """R1-Zero's effect at an affordable size (400 pretraining steps, 80 GRPO steps at lr 1e-4, 2-layer
    64-wide): the base rarely uses the <think>/<answer> format; RL from the bare question adopts it (measured
    13% -> 98% sampled) and held-out accuracy rises."""
    from r1train.demo import stages

    res = stages.zero(SMALL, str(tmp_path), {"zero_config": _small_config(tmp_path, "demo_zero.yaml", 400, 80, 1e-4)})
    base, after = res["base"], res["after_rl"]
    assert base["sampled/format"] < 0.5 and after["sampled/format"] > 0.9, (base, after)
    assert after["sampled/accuracy"] > base["sampled/accuracy"]


@pytest.mark.slow
def test_distill_stage_beats_cold_start_at_small_size(tmp_path):
    """Distillation's effect at an affordable size: the teacher stands in for the rejection stage's model (the
    same 2-layer, 64-wide shape, 400 SFT steps on correct worked solutions: 47-77% greedy); a student SFT'd
    200 steps on its filtered samples beats the same student SFT'd on the flawed, mixed cold-start set
    (measured with seeds 42, 1, 7: greedy 18.3 / 20.0 / 16.7% against 1.7 / 3.3 / 5.0%)."""
    from r1train.demo import stages
    from r1train.loading import load_model_and_tokenizer
    from r1train.tasks import arith

    cfg = _small_config(tmp_path, "demo_distill.yaml", 200, 50, 5e-5)
    base, c_teacher = C.configs(cfg, SMALL + ["max_steps=400"], str(tmp_path / "teacher"), {"sft": "sft"})
    train, _ = C.problems(base)
    teacher, tok = load_model_and_tokenizer(base)
    teacher = C.sft(c_teacher, teacher, tok, arith.cold_start_rows(train, base.seed)).model
    res = stages.distill(SMALL, str(tmp_path / "distill"), {"distill_config": cfg, "rejection": teacher})
    cold, distilled = res["student_cold_start_sft"], res["student_distilled"]
    assert res["teacher_samples"]["kept"] > 100
    assert distilled["greedy/accuracy"] > cold["greedy/accuracy"] + 0.05, (cold, distilled)


@pytest.mark.slow
def test_rejection_stage_keeps_or_raises_pass_at_1_at_small_size(tmp_path):
    """Rejection sampling's effect at an affordable size: a start model SFT'd 300 steps on the flawed cold
    start (standing in for the language stage's model; 5-13% greedy) is sampled 4 times per training prompt,
    its correct, well-formed samples are kept, SFT'd on, then GRPO at T=0.7 for 40 steps: held-out pass@1 at
    T=0.7 is kept or raised (measured with seeds 42, 1, 7: 6.7 -> 15.0, 5.0 -> 15.0, 5.0 -> 5.0%; greedy moved
    13.3 -> 8.3, 10.0 -> 13.3, 6.7 -> 8.3%, so it is not asserted)."""
    import yaml

    from r1train.demo import stages
    from r1train.loading import load_model_and_tokenizer
    from r1train.tasks import arith

    y = yaml.safe_load(open(os.path.join(C.CONFIG_DIR, "demo_rejection.yaml")))
    y["grpo2"].update(max_steps=40, eval_steps=0)
    cfg = tmp_path / "demo_rejection.yaml"
    cfg.write_text(yaml.safe_dump(y))
    base, c_start = C.configs(os.path.join(C.CONFIG_DIR, "demo_distill.yaml"),
                              SMALL + ["max_steps=300", "learning_rate=3e-3"], str(tmp_path / "start"), {"sft": "sft"})
    train, _ = C.problems(base)
    start, tok = load_model_and_tokenizer(base)
    start = C.sft(c_start, start, tok, arith.cold_start_rows(train, base.seed, slip_share=0.6)).model
    res = stages.rejection(SMALL, str(tmp_path / "rejection"), {"rejection_config": str(cfg), "language": start})
    rs = res["rejection_sampling"]
    assert 0 < rs["kept"] <= rs["correct"] < rs["samples"]
    assert res["after_rl"]["sampled/accuracy"] >= res["start_model"]["sampled/accuracy"], res["table"]


def test_demo_stage_configs_check_the_reward_weights_count(tmp_path):
    """A demo stage's GRPO section with reward_weights of another count than its reward_funcs is a ConfigError when
    the stage's configs load (before any SFT or GRPO work), as the CLI and the recipe check it."""
    from r1train.config import ConfigError

    with pytest.raises(ConfigError, match="reward_weights has 3 entries but reward_funcs has 2"):
        C.configs("demo.yaml", ["reward_funcs=accuracy,format", "reward_weights=1,2,3"], str(tmp_path),
                  {"grpo": "grpo"})
    assert len(C.configs("demo.yaml", ["reward_funcs=accuracy,format", "reward_weights=1,2"], str(tmp_path),
                         {"grpo": "grpo"})) == 2


@pytest.mark.parametrize("section_yaml,msg", [
    ("sft:\n  model_hidden_size: 64\n", r"^\[sft\] model_hidden_size=64: the recipe builds its model and tokenizer "
                                        r"once, from the top level \(model_hidden_size=128\)"),
    ("grpo:\n  lr_scheduler_type: constant\n  warmup_ratio: 0.1\n",
     r"^\[grpo\] warmup_ratio=0.1 with lr_scheduler_type=constant"),
    ("grpo:\n  use_peft: true\n", r"^\[grpo\] use_peft=true needs peft"),
])
def test_demo_stage_configs_are_the_recipes(tmp_path, monkeypatch, section_yaml, msg):
    """The demo's stage configs load through the recipe's one loader (pipeline.stage_configs): a stage section that
    sets a model key is refused (the demo builds its model from the top level: the key was ignored), and a section's
    error names its [section] (it named none)."""
    import sys

    from r1train.config import ConfigError

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    y = tmp_path / "demo.yaml"
    y.write_text("model_name_or_path: tiny-qwen2\nmodel_hidden_size: 128\n" + section_yaml)
    with pytest.raises(ConfigError, match=msg):
        C.configs(str(y), [], str(tmp_path / "out"), {"sft": "sft", "grpo": "grpo"})
