"""The R1 recipe end to end at toy size (every stage runs and leaves a loadable checkpoint), distill's
error on a teacher with no correct samples, and the `sample` command."""

import json
import random

import pytest
import torch
import train_helpers as H

from r1train import pipeline
from r1train.cli import main
from r1train.config import ConfigError

SECTIONS = """
sft: {max_steps: 3, learning_rate: 0.003}
grpo: {max_steps: 2, beta: 0.01, sync_ref_model: true, ref_model_sync_steps: 1,
       reward_funcs: [accuracy, format, language]}
rejection: {rejection_num_samples: 2, task_train_size: 8, max_steps: 2}
grpo2: {max_steps: 1, temperature: 0.7}
"""


@pytest.mark.slow

def _rendered(tok, rows, num_samples, cfg):
    """A stand-in sampler's rollout: only the prompts' renderings per completion (sample_rows' prompt_texts)."""
    from types import SimpleNamespace

    from r1train.data import rendered_prompts

    return SimpleNamespace(prompt_texts=rendered_prompts(tok, [r["prompt"] for r in rows], cfg.chat_template_kwargs,
                                                         num_samples))

def test_recipe_distill_sample(tmp_path, monkeypatch):
    y = tmp_path / "recipe.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n" + SECTIONS)
    out = tmp_path / "out"
    langs, real = [], pipeline.rejection_sample
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: langs.append(kw["language"]) or real(*a, **kw))
    res = pipeline.recipe(str(y), [f"output_dir={out}"])
    assert langs == ["en"]  # stage 3 keeps only readable (single-language) samples
    assert set(res) >= {"cold_start_sft", "reasoning_rl", "rejection_kept", "final_rl"}
    for stage, steps in (("1-cold-start-sft", 3), ("2-reasoning-rl", 2), ("4-all-scenarios-rl", 1)):
        assert (out / stage / f"checkpoint-{steps}" / "model.safetensors").exists(), stage
        assert (out / stage / "metrics.jsonl").exists()
    final = out / "4-all-scenarios-rl" / "checkpoint-1"
    with pytest.raises(ValueError, match="teacher produced no correct"):
        pipeline.distill(str(y), [f"teacher_model={final}", "model_name_or_path=tiny-llama",
                                  f"output_dir={tmp_path / 'distill'}", "task_train_size=4"])
    assert main(["sample", f"model_name_or_path={final}", "max_steps=2", "num_generations=3",
                 f"output_dir={tmp_path / 'samples'}", "kernel_backend=torch"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]["rewards"]) == {"accuracy", "format"}


def test_shipped_recipe_config_loads_with_r1s_settings(tmp_path):
    """r1train/configs/r1_recipe.yaml (no test read it): every stage loads and passes its checks; the reasoning-RL
    stage has R1's KL term (k3 alone, beta 0.001: TRL's default multiplies k3 by the ratio) and clip ratio 10."""
    import os

    import r1train

    path = os.path.join(os.path.dirname(r1train.__file__), "configs", "r1_recipe.yaml")
    base, sft, grpo, rej, grpo2 = pipeline.stage_configs(path, [f"output_dir={tmp_path}"], {
        "sft": "1", "grpo": "2", "rejection": "3", "grpo2": "4"})
    assert grpo.beta == 0.001 and grpo.use_bias_correction_kl is False and grpo.epsilon == 10.0
    assert grpo.reward_funcs == ["accuracy", "format", "language"] and grpo2.temperature == 0.7
    assert base.model_name_or_path == sft.model_name_or_path == rej.model_name_or_path


@pytest.mark.slow
def test_own_model_dir_and_jsonl_data(tmp_path):
    """SFT then GRPO from a local model directory on user jsonl data (chat and plain-string prompts)."""
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"} for i in range(6)]
    rows += [{"prompt": f"Say {i}", "answer": str(i), "completion": f"<answer>{i}</answer>"} for i in range(2)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [o for o in H.FAST if not o.startswith("task_")] + [f"dataset_name={data}"]
    assert main(["sft", *common, "max_steps=2", f"output_dir={tmp_path / 'sft'}"]) == 0
    ckpt = tmp_path / "sft" / "checkpoint-2"
    assert (ckpt / "tokenizer.json").exists()
    assert main(["grpo", *common, f"model_name_or_path={ckpt}", "max_steps=2",
                 f"output_dir={tmp_path / 'grpo'}", f"eval_dataset_name={data}"]) == 0
    assert len(H.read_metrics(tmp_path / "grpo")) == 2


def test_distill_on_prompt_answer_data(tmp_path, monkeypatch):
    """distill on a dataset of prompts and answers (no completion column): the student's SFT trains on the
    teacher's samples. The teacher is a stand-in that answers every prompt correctly (a random tiny teacher
    answers none)."""
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def teacher(cfg, model, tok, prompts, **kw):
        assert kw["language"] == "zh"  # R1 keeps no chain of thought that mixes languages: cfg.language's filter
        return [{**r, cfg.completion_column: f"<think>{r['prompt']}</think><answer>{r['answer']}</answer>"}
                for r in prompts]

    monkeypatch.setattr(pipeline, "rejection_sample", teacher)
    common = [o for o in H.FAST if not o.startswith("task_")]
    res = pipeline.distill(None, common + [f"output_dir={tmp_path / 'out'}", f"dataset_name={data}",
                                           "teacher_model=tiny-qwen2", "max_steps=2", "language=zh"])
    assert res["distill_rows"] == len(rows)
    assert len(H.read_metrics(tmp_path / "out" / "distill")) == 2


def test_distill_resume_matches_the_prompts_not_the_samples(tmp_path, monkeypatch):
    """distill samples its SFT rows again when it resumes (they may differ across hardware): the resume matches
    the prompts they are sampled from, so other samples resume and an edited prompt file is a ConfigError."""
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)]
    data = tmp_path / "train.jsonl"
    calls = []

    def teacher(cfg, model, tok, prompts, **kw):  # other samples at each call
        calls.append(1)
        return [{**r, cfg.completion_column: f"<think>{len(calls)}</think><answer>{r['answer']}</answer>"}
                for r in prompts]

    def distill(*over):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return pipeline.distill(None, [o for o in H.FAST if not o.startswith("task_")] + [
            f"output_dir={tmp_path / 'out'}", f"dataset_name={data}", "teacher_model=tiny-qwen2", *over])

    monkeypatch.setattr(pipeline, "rejection_sample", teacher)
    distill("max_steps=2")
    distill("max_steps=4", "resume_from_checkpoint=latest")
    assert len(H.read_metrics(tmp_path / "out" / "distill")) == 4
    rows[3]["answer"] = "5"
    with pytest.raises(ConfigError, match=r"other training rows: the rows of dataset_name=.*train\.jsonl"):
        distill("max_steps=6", "resume_from_checkpoint=latest")


def test_demo_config_is_the_users_file(tmp_path, monkeypatch):
    """`r1train demo --config demo.yaml` reads the file in the working directory, not the packaged one of the
    same name (each stage loads its configs first: the spy stops there)."""
    from r1train import demo
    from r1train.demo import common

    (tmp_path / "demo.yaml").write_text("model_hidden_size: 24\ntask_train_size: 40\n")
    monkeypatch.chdir(tmp_path)
    seen, real = [], common.configs

    def spy(*a):
        seen.append(real(*a)[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "configs", spy)
    with pytest.raises(KeyboardInterrupt):
        demo.run("default", [f"output_dir={tmp_path / 'out'}"], config="demo.yaml")
    assert (seen[0].model_hidden_size, seen[0].task_train_size) == (24, 40)


def test_demo_smoke(tmp_path, capsys):
    """`r1train demo` end to end with its YAML at toy size (the real run is `make demo`)."""
    res = pipeline.demo(None, ["model_hidden_size=32", "model_num_layers=1", "max_steps=2", "task_eval_size=8",
                               "task_train_size=64", "kernel_backend=torch", "disable_tqdm=true",
                               "report_to=none", f"output_dir={tmp_path}"])
    assert set(res) >= {"accuracy_before_rl", "accuracy_after_rl", "greedy_accuracy_before_rl",
                        "greedy_accuracy_after_rl", "wall_seconds"}
    out = capsys.readouterr().out
    assert "== cold start -> reasoning RL" in out and "greedy accuracy" in out
    assert (tmp_path / "demo_results.json").exists() and (tmp_path / "grpo" / "metrics.jsonl").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "grpo" / "curves.png").exists() and (tmp_path / "demo_curves.png").exists()


def test_rejection_sampling_names_rows_without_an_answer(tmp_path, monkeypatch, caplog):
    """Rejection sampling keeps only samples whose <answer> matches answer_column. Rows without it were dropped
    unseen: with reward_funcs not holding accuracy (so loading checks no answer column), distill on prompts with
    no answers said the teacher produced no correct samples, and the recipe skipped its stage 3. Now no row with
    the column is a DatasetError naming answer_column (before any sampling), and some rows without it a warning
    with their count; the rows with answers are kept. The sampler is a stand-in that answers correctly."""
    import logging
    import random

    from r1train.config import load_config
    from r1train.data import DatasetError

    rng = random.Random()
    rows = [{"prompt": f"What is {i}+{rng.randint(0, 99)}?", "answer": str(rng.randint(0, 999))}
            for i in range(rng.randint(4, 12))]
    gone = rng.sample(range(len(rows)), rng.randint(1, len(rows) - 1))
    for i in gone:
        del rows[i]["answer"]

    def sampler(model, tok, rows, *, num_samples, **kw):
        texts = [f"<think>sum</think><answer>{r.get('answer', '0')}</answer>" for r in rows for _ in range(num_samples)]
        yield 0, rows, _rendered(tok, rows, num_samples, kw["cfg"]), texts

    monkeypatch.setattr(pipeline, "sample_rows", sampler)
    monkeypatch.setattr(pipeline, "setup_distributed", lambda: None)
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "reward_funcs=format"])
    model = torch.nn.Linear(1, 1)
    with caplog.at_level(logging.WARNING, logger="r1train"):
        kept = pipeline.rejection_sample(cfg, model, None, rows, num_samples=3, keep=2)
    assert [r["prompt"] for r in kept] == [r["prompt"] for i, r in enumerate(rows) if i not in gone]
    assert f"{len(gone)} of {len(rows)} rows have no 'answer'" in caplog.text
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    common = [o for o in H.FAST if not o.startswith("task_")]
    with pytest.raises(DatasetError, match="answer_column='answer': no row has this column"):
        pipeline.distill(None, common + [f"output_dir={tmp_path / 'out'}", f"dataset_name={data}",
                                         "teacher_model=tiny-qwen2", "reward_funcs=format"])


@pytest.mark.slow
def test_recipe_resumes_latest_after_a_kill_in_a_middle_stage(tmp_path, monkeypatch):
    """A recipe killed in stage 2 (after its first checkpoint) and rerun with resume_from_checkpoint=latest ends
    as an uninterrupted run: the same metrics in every stage and the same final weights. Before, the rerun
    stopped at the first stage with no checkpoint yet (a CheckpointError: no checkpoint-<step>), so a killed
    recipe could only restart from scratch. Stages with no complete checkpoint now run from their start."""
    import random

    from safetensors.torch import load_file

    from r1train.grpo import GRPOTrainer

    y = tmp_path / "recipe.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n" + SECTIONS)
    over = [f"seed={random.randrange(1000)}", "save_steps=1"]
    pipeline.recipe(str(y), over + [f"output_dir={tmp_path / 'ref'}"])
    real = GRPOTrainer.save

    def killed(self, step):
        path = real(self, step)
        raise KeyboardInterrupt(path)

    monkeypatch.setattr(GRPOTrainer, "save", killed)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="2-reasoning-rl"):
        pipeline.recipe(str(y), over + [f"output_dir={run}"])
    monkeypatch.setattr(GRPOTrainer, "save", real)
    assert not (run / "4-all-scenarios-rl").exists()
    pipeline.recipe(str(y), over + [f"output_dir={run}", "resume_from_checkpoint=latest"])
    for stage in ("1-cold-start-sft", "2-reasoning-rl", "4-all-scenarios-rl"):
        a, b = (H.strip_timing(H.read_metrics(d / stage)) for d in (tmp_path / "ref", run))
        assert a == b and a, stage
        # the stages' evaluations too, once each (a resumed finished stage evaluated again and appended a copy)
        ea, eb = ([r for r in map(json.loads, (d / stage / "metrics.jsonl").read_text().splitlines())
                   if "loss" not in r] for d in (tmp_path / "ref", run))
        assert ea == eb and ea, stage
    final = "4-all-scenarios-rl/checkpoint-1/model.safetensors"
    wa, wb = (load_file(d / final) for d in (tmp_path / "ref", run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_recipe_resume_true_starts_a_stage_with_no_checkpoint_fresh(tmp_path, monkeypatch):
    """resume_from_checkpoint=true (HF Trainer's True, any case) means `latest` (checkpoint.resolve_checkpoint),
    so a recipe stage with no checkpoint yet runs from its start, as with `latest`. Before, only the exact string
    "latest" had this fallback: with true the first stage not reached was a CheckpointError (no
    checkpoint-<step>), so a killed recipe could not be resumed with true. A directory named `true` stays a path.
    (load_config now also turns true into latest; a TrainConfig made or replaced in code keeps the string.)"""
    import dataclasses

    from r1train.config import load_config

    monkeypatch.chdir(tmp_path)
    base = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'stage'}"])
    for spec in ("latest", "true", "True", "TRUE"):
        r = pipeline._resumed(dataclasses.replace(base, resume_from_checkpoint=spec))
        assert (r.resume_from_checkpoint, r.overwrite_output_dir) == (None, True), spec
    (tmp_path / "true").mkdir()  # resolve_checkpoint reads this as the checkpoint directory `true`
    c = dataclasses.replace(base, resume_from_checkpoint="true")
    assert pipeline._resumed(c) is c


def test_rejection_sampling_counts_blank_answers_as_missing(tmp_path, monkeypatch, caplog):
    """A blank or NaN gold answer is no gold answer (accuracy_reward gives None, so no sample of its row can be
    kept), as a missing one is. Before, only None counted as missing: rows whose answers were all "" (an empty
    CSV column) or NaN passed without the DatasetError naming answer_column, and distill then blamed the teacher
    ("produced no correct, well-formed samples"); some blank rows went without the warning."""
    import logging

    from r1train.config import load_config
    from r1train.data import DatasetError

    def sampler(model, tok, rows, *, num_samples, **kw):
        texts = [f"<think>sum</think><answer>{r.get('answer')}</answer>" for r in rows for _ in range(num_samples)]
        yield 0, rows, _rendered(tok, rows, num_samples, kw["cfg"]), texts

    monkeypatch.setattr(pipeline, "sample_rows", sampler)
    monkeypatch.setattr(pipeline, "setup_distributed", lambda: None)
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}"])
    model = torch.nn.Linear(1, 1)
    blank = [{"prompt": f"q{i}", "answer": a} for i, a in enumerate(("", " ", float("nan"), None))]
    with pytest.raises(DatasetError, match="answer_column='answer': no row has"):
        pipeline.rejection_sample(cfg, model, None, blank, num_samples=2, keep=1)
    rows = blank + [{"prompt": "q9", "answer": "7"}]
    with caplog.at_level(logging.WARNING, logger="r1train"):
        kept = pipeline.rejection_sample(cfg, model, None, rows, num_samples=2, keep=1)
    assert [r["prompt"] for r in kept] == ["q9"]
    assert "4 of 5 rows have no 'answer'" in caplog.text


def test_rejection_sampling_keeps_completions_whose_prompt_opens_the_thought(tmp_path, monkeypatch):
    """A prompt rendered with "<think>" at its end (R1-Distill's and Qwen3's templates) opens each completion's
    thought: rejection sampling scores the format with that tag before the completion (it kept none before: the
    completions hold no opening tag). A completion that opens the thought again is not kept; prompts without the
    tag score as before."""
    from r1train.config import load_config

    rng = random.Random(random.getrandbits(32))
    gold = [str(rng.randint(0, 99)) for _ in range(4)]

    def sampler(model, tok, rows, *, num_samples, **kw):
        yield 0, rows, _rendered(tok, rows, num_samples, kw["cfg"]), [
            f"{pre}s{rng.randint(0, 9)}</think><answer>{r['answer']}</answer>"
            for r in rows for pre in ("", "<think>")[:num_samples]]

    monkeypatch.setattr(pipeline, "sample_rows", sampler)
    monkeypatch.setattr(pipeline, "setup_distributed", lambda: None)
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}"])
    rows = [{"prompt": f"q{i} <think>" + "\n" * (i % 2), "answer": a} for i, a in enumerate(gold[:2])] + \
        [{"prompt": f"q{i}", "answer": a} for i, a in enumerate(gold[2:], 2)]
    kept = pipeline.rejection_sample(cfg, torch.nn.Linear(1, 1), None, rows, num_samples=2, keep=2, language="en")
    # prefilled prompts: the completion without the tag (the one repeating it has two); plain ones: with the tag
    assert [(r["prompt"], r[cfg.completion_column].startswith("<think>")) for r in kept] == \
        [(rows[0]["prompt"], False), (rows[1]["prompt"], False), (rows[2]["prompt"], True), (rows[3]["prompt"], True)]


def test_results_json_is_written_atomically(tmp_path, monkeypatch):
    """pipeline_results.json / distill_results.json: a write that fails midway (a full disk, a kill) leaves the
    previous complete file, not a truncated one. Before, the file was opened with "w" (emptied) and written in
    place."""
    import os

    pipeline._write(str(tmp_path), "pipeline_results.json", {"final_rl": {"eval/accuracy": 0.5}})
    real = os.fsync

    def fails_midway(fd):  # the new text is in the file beside it when its flush to disk fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fails_midway)
    with pytest.raises(OSError):
        pipeline._write(str(tmp_path), "pipeline_results.json", {"final_rl": {"eval/accuracy": 0.75}})
    monkeypatch.setattr(os, "fsync", real)
    assert json.loads((tmp_path / "pipeline_results.json").read_text()) == {"final_rl": {"eval/accuracy": 0.5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline_results.json"]  # no temporary file left


def test_distill_into_a_student_with_another_tokenizer(tmp_path, monkeypatch):
    """Distillation hands the teacher's kept samples over as text, so a student whose tokenizer differs from the
    teacher's (R1's Llama students of DeepSeek-V3) trains on them with its own: SFT on every kept row, which the
    student's tokenizer encodes (it refused before: "the student's tokenizer differs from the teacher's")."""
    from r1train.tasks import char_tokenizer, tiny_model

    stok = char_tokenizer(vocab_size=160)  # the character vocabulary plus 51 filler tokens: another vocabulary
    student_dir = tmp_path / "student"
    tiny_model("tiny-llama", stok, hidden_size=32, num_layers=1).save_pretrained(student_dir)
    stok.save_pretrained(student_dir)
    kept = [{"prompt": f"What is {i}+1?", "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"} for i in range(4)]
    seen = []
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: kept)
    real = pipeline.run_sft
    monkeypatch.setattr(pipeline, "run_sft", lambda cfg, model, tok, rows, **kw: seen.append((len(tok), rows)) or
                        real(cfg, model, tok, rows=rows, **kw))
    res = pipeline.distill(None, H.FAST + ["teacher_model=tiny-qwen2", f"model_name_or_path={student_dir}",
                                           f"output_dir={tmp_path / 'distill'}", "max_steps=2"])
    assert res["distill_rows"] == 4 and seen == [(160, kept)]
    assert (tmp_path / "distill" / "distill_results.json").exists()


def test_recipe_refuses_one_checkpoint_path_for_every_stage(tmp_path):
    """resume_from_checkpoint=<a path> on the command line (or the YAML top level) reaches every stage of the
    recipe, and a later stage loading the first stage's checkpoint failed only after the earlier stages ran: an
    error naming the key before any stage runs. A path in one stage's section stays allowed."""
    y = tmp_path / "recipe.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n" + SECTIONS)
    ckpt = tmp_path / "out" / "1-cold-start-sft" / "checkpoint-3"
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=.*4 stages would load it"):
        pipeline.stage_configs(str(y), [f"resume_from_checkpoint={ckpt}"], {
            "sft": "a", "grpo": "b", "rejection": "c", "grpo2": "d"})
    y.write_text(y.read_text().replace("sft: {max_steps: 3,", f"sft: {{resume_from_checkpoint: {ckpt}, max_steps: 3,"))
    cfgs = pipeline.stage_configs(str(y), [], {"sft": "a", "grpo": "b", "rejection": "c", "grpo2": "d"})
    assert [c.resume_from_checkpoint for c in cfgs[1:]] == [str(ckpt), None, None, None]


def test_distill_resumed_before_its_first_checkpoint_starts_fresh(tmp_path, monkeypatch):
    """distill rerun with resume_from_checkpoint=latest after a kill before the student's first save: the student
    starts fresh, as a recipe stage with no checkpoint does (it failed with "no checkpoint-<step>" after sampling
    the teacher again)."""
    kept = [{"prompt": f"What is {i}+1?", "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"} for i in range(4)]
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: kept)
    out = tmp_path / "run"
    (out / "distill").mkdir(parents=True)
    (out / "distill" / "metrics.jsonl").write_text("")  # a killed run's partial outputs, no checkpoint
    res = pipeline.distill(None, H.FAST + ["teacher_model=tiny-qwen2", "model_name_or_path=tiny-qwen2",
                                           f"output_dir={out}", "max_steps=2", "resume_from_checkpoint=latest"])
    assert res["distill_rows"] == 4 and (out / "distill" / "checkpoint-2").is_dir()


def test_rejection_sampled_rows_train_on_the_prompt_they_were_sampled_from(tmp_path, monkeypatch):
    """Conversational prompts are sampled with chat_template_kwargs alone (sample_rows: no row column, as TRL's GRPO);
    the kept rows carry exactly those keywords and no tools, so the SFT on them renders the prompt as it was sampled:
    its tokens equal the tokenizer's apply_chat_template of the prompt with the sampling keywords."""
    from r1train.config import load_config
    from r1train.data import TokenCache, sft_tokens
    from r1train.tasks import char_tokenizer

    def sampler(model, tok, rows, *, num_samples, **kw):
        yield 0, rows, _rendered(tok, rows, num_samples, kw["cfg"]), [
            f"<think>s</think><answer>{r['answer']}</answer>" for r in rows for _ in range(num_samples)]

    monkeypatch.setattr(pipeline, "sample_rows", sampler)
    monkeypatch.setattr(pipeline, "setup_distributed", lambda: None)
    rows = [{"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5"},
            {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "chat_template_kwargs": {"think": False},
             "tools": [{"type": "function"}]},
            {"prompt": "4+4?", "answer": "8", "chat_template_kwargs": {"x": 1}}]
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "chat_template_kwargs={think: true}"])
    tok = char_tokenizer()
    tok.chat_template = "{% if think %}<think>{% endif %}" + tok.chat_template
    kept = pipeline.rejection_sample(cfg, torch.nn.Linear(1, 1), tok, rows, num_samples=1, keep=1)
    # sampling rendered the chat prompts with cfg's keywords alone (no row column, no tools); a string prompt with none
    assert [(r.get("chat_template_kwargs"), "tools" in r) for r in kept] == [({"think": True}, False),
                                                                           ({"think": True}, False), ({"x": 1}, False)]
    plain = load_config(overrides=H.FAST + [f"output_dir={tmp_path}"])
    kept_plain = pipeline.rejection_sample(plain, torch.nn.Linear(1, 1), tok, rows, num_samples=1, keep=1)
    assert ["chat_template_kwargs" in r for r in kept_plain] == [False, False, True]
    distilled = pipeline.rejection_sample(cfg, torch.nn.Linear(1, 1), tok, rows, num_samples=1, keep=1,
                                          as_sampled=False)  # distill: the student renders with its own template
    assert [r.get("chat_template_kwargs") for r in distilled] == [r.get("chat_template_kwargs") for r in rows]
    ctx, _ = sft_tokens(tok, kept[0], 0, completion_column=cfg.completion_column, max_length=512,
                        completion_only_loss=True, cache=TokenCache(tok))
    want = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True,
                                   think=True)["input_ids"]
    assert ctx[:len(want)] == list(want) and tok.decode(want).startswith("<think>")


def test_distill_samples_the_teacher_with_its_own_tokenizer(tmp_path, monkeypatch):
    """tokenizer_name_or_path is the student's: the teacher (teacher_model) samples through its own tokenizer.
    Before, the teacher was loaded with tokenizer_name_or_path too, so a teacher of another vocabulary sampled
    through the student's (here refused: the student's 160 tokens are past the teacher's embedding)."""
    from transformers import AutoTokenizer

    from r1train.tasks import char_tokenizer, tiny_model

    teacher_dir, student_tok = tmp_path / "teacher", tmp_path / "student_tok"
    ttok = char_tokenizer()
    tiny_model("tiny-qwen2", ttok, hidden_size=32, num_layers=1).save_pretrained(teacher_dir)
    ttok.save_pretrained(teacher_dir)
    char_tokenizer(vocab_size=160).save_pretrained(student_tok)  # another vocabulary
    kept = [{"prompt": f"What is {i}+1?", "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"} for i in range(4)]
    seen = {}

    def teacher(cfg, model, tok, rows, **kw):
        seen["teacher"] = tok.get_vocab()
        return kept

    def student_sft(cfg, model, tok, rows, **kw):
        seen["student"] = tok.get_vocab()
        return real_sft(cfg, model, tok, rows=rows, **kw)

    real_sft = pipeline.run_sft
    monkeypatch.setattr(pipeline, "rejection_sample", teacher)
    monkeypatch.setattr(pipeline, "run_sft", student_sft)
    pipeline.distill(None, H.FAST + [f"teacher_model={teacher_dir}", "model_name_or_path=tiny-llama",
                                     f"tokenizer_name_or_path={student_tok}", f"output_dir={tmp_path / 'out'}",
                                     "max_steps=1"])
    assert seen["teacher"] == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    assert seen["student"] == AutoTokenizer.from_pretrained(student_tok).get_vocab()
    assert seen["teacher"] != seen["student"]


@pytest.mark.parametrize("key,section", [("model_name_or_path", "grpo"), ("tokenizer_name_or_path", "rejection"),
                                         ("model_hidden_size", "sft"), ("model_num_layers", "grpo2")])
def test_recipe_refuses_model_keys_in_a_stage_section(tmp_path, key, section):
    """The recipe builds its model and tokenizer once, from the top level, and hands the model from stage to
    stage: a model key in a stage section was silently ignored (while the stage's trainer_state.json recorded
    it). It is a ConfigError naming the key and the section before any stage runs; the top level's own value
    repeated in a section changes nothing and stays allowed."""
    import yaml

    from r1train.config import load_config
    from r1train.tasks import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")
    other = {"model_name_or_path": "tiny-llama", "tokenizer_name_or_path": str(tmp_path / "tok"),
             "model_hidden_size": 48, "model_num_layers": 2}[key]
    top = "\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n"
    stages = {"sft": "a", "grpo": "b", "rejection": "c", "grpo2": "d"}
    y = tmp_path / "recipe.yaml"

    def with_section_value(value):
        sections = yaml.safe_load(SECTIONS)
        sections[section][key] = value
        y.write_text(top + yaml.safe_dump(sections))
        return str(y)

    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}=.*top level"):
        pipeline.stage_configs(with_section_value(other), [], stages)
    same = getattr(load_config(str(y)), key)  # the top level's value
    cfgs = pipeline.stage_configs(with_section_value(same), [], stages)
    assert all(getattr(c, key) == same for c in cfgs)


def _recipe_yaml(tmp_path, **sections) -> str:
    """A toy recipe config: H.FAST at the top level, SECTIONS with `sections`' keys set over them."""
    import yaml

    secs = yaml.safe_load(SECTIONS)
    for name, keys in sections.items():
        secs[name].update(keys)
    y = tmp_path / "recipe.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + f"\noutput_dir: {tmp_path / 'out'}\n"
                 + yaml.safe_dump(secs))
    return str(y)


@pytest.mark.parametrize("section,keys,msg", [
    ("sft", {"warmup_ratio": 0.1}, r"warmup_ratio=0.1 with lr_scheduler_type=constant"),
    ("grpo2", {"padding_free": True, "max_tokens_per_batch": 20},
     r"max_tokens_per_batch must be >= max_prompt_length \+ max_completion_length .* got 20"),
    ("rejection", {"optim": "adamw_torch_8bit"}, r"optim=adamw_torch_8bit needs torchao"),
    ("grpo2", {"use_peft": True}, r"use_peft=true needs peft, which is not installed: pip install peft"),
])
def test_recipe_checks_every_stage_before_the_first_runs_naming_it(tmp_path, monkeypatch, section, keys, msg):
    """Every stage's config is loaded and checked (the checks its trainer makes that need no model or rows: here
    a section's value, GRPO's token budget, the `optim` key's package) before the model loads or any stage runs,
    and the error names the stage's section. Before, a section's error did not say which stage it came from, and
    optim=adamw_torch_8bit without torchao, or use_peft without peft, in a late stage failed when that stage's
    trainer was built."""
    import sys

    ran = []

    def stand_in(name):
        def run(*a, **kw):
            ran.append(name)
            raise AssertionError(f"{name} ran before every stage was checked")
        return run

    for name in ("load_model_and_tokenizer", "run_sft", "run_grpo", "rejection_sample", "load_datasets"):
        monkeypatch.setattr(pipeline, name, stand_in(name))
    for mod in ("torchao", "torchao.optim", "torchao.optim.adam", "peft"):  # as if torchao and peft were not installed
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ConfigError, match=rf"^\[{section}\] {msg}"):
        pipeline.recipe(_recipe_yaml(tmp_path, **{section: keys}))
    assert ran == [] and not (tmp_path / "out").exists()


def test_recipe_names_the_stage_whose_sft_rows_exceed_its_token_budget(tmp_path, monkeypatch):
    """SFT's token budget below max_length is held to the stage's own rows (SFTTrainer.longest_row): the rejection
    stage's are sampled after the earlier stages, so its trainer checks them when it is built, and the error
    names the stage (it named no stage). Before stage 1 runs, the floor every kept row of a conversational prompt
    reaches (its prompt as the SFT renders it + one completion token) is checked too (it was found only after the
    cold-start SFT and GRPO stages ran). Stages 1 and 2 are stand-ins here."""
    from r1train.data import TokenCache, sft_template_kwargs
    from r1train.loading import load_datasets, load_model_and_tokenizer

    kept = [{"prompt": f"What is {i}+1?", "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>" * 20} for i in range(4)]
    ran = []
    real = pipeline.run_sft
    monkeypatch.setattr(pipeline, "run_sft", lambda cfg, model, tok, rows=None, **kw: real(
                        cfg, model, tok, rows=rows, **kw) if rows is not None else (ran.append("sft") or model, {}))
    monkeypatch.setattr(pipeline, "run_grpo", lambda cfg, model, tok: (model, {}, {}))
    monkeypatch.setattr(pipeline, "_handoff", lambda model, cfg, nxt: model)
    monkeypatch.setattr(pipeline, "_trained", lambda t, section, before: before)  # the stand-ins train nothing
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: kept)
    # the floor, computed apart: the longest rendered prompt of the rejection stage's data + 1
    c3 = pipeline.stage_configs(_recipe_yaml(tmp_path), [], {"rejection": "r"})[1]
    tok = load_model_and_tokenizer(c3)[1]
    cache = TokenCache(tok)
    floor = max(len(cache.prompt(r["prompt"], sft_template_kwargs(tok, r, i, cache))) + 1
                for i, r in enumerate(load_datasets(c3)[0]))
    y = _recipe_yaml(tmp_path, rejection={"padding_free": True, "max_tokens_per_batch": floor - 1, "max_length": 512})
    with pytest.raises(ConfigError, match=rf"^\[rejection\] max_tokens_per_batch must be >= the longest SFT row's "
                                          rf"tokens \(at least prompt \d+'s .*\) = {floor}, got {floor - 1}"):
        pipeline.recipe(y)
    assert ran == []  # before stage 1
    budget = floor  # the floor holds; the kept rows (~200 tokens) are longer
    assert budget < 150
    y = _recipe_yaml(tmp_path, rejection={"padding_free": True, "max_tokens_per_batch": budget, "max_length": 512})
    with pytest.raises(ConfigError, match=r"^\[rejection\] max_tokens_per_batch must be >= the longest SFT row's "
                                          rf"tokens \(row \d+; .*\) = \d+, got {budget}"):
        pipeline.recipe(y)
    assert ran == ["sft"] and not (tmp_path / "out" / "3-rejection-sft").exists()  # before the stage's work


def test_distill_with_no_correct_teacher_samples_is_a_cli_error(tmp_path, monkeypatch, capsys):
    """A teacher with no correct, well-formed samples is a user error: `r1train: error: ...` naming teacher_model,
    exit 2, as the CLI's other user errors (a plain ValueError before: a traceback and exit 1)."""
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: [])
    rc = main(["distill", *H.FAST, "teacher_model=tiny-qwen2", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "r1train: error: teacher_model=tiny-qwen2" in err and "no correct" in err, err
    assert "Traceback" not in err


def test_handoff_gives_the_next_stage_its_dtype(tmp_path):
    """DeepSpeed's bf16 mode casts the module it trains to bf16 in place; handed on in memory, a next stage with
    bf16=false trained those bf16 parameters without mixed precision. Now the next stage gets its own dtype, as a
    fresh load would: fp32 (the cast up exact) where it has bf16 off, the trained values kept."""
    from types import SimpleNamespace

    from r1train.config import load_config
    from r1train.tasks import char_tokenizer, tiny_model

    model = tiny_model("tiny-qwen2", char_tokenizer()).to(torch.bfloat16)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    ov = H.FAST + [f"output_dir={tmp_path}"]
    done, bf16_next, fp32_next = (load_config(overrides=ov + [f"bf16={b}"]) for b in ("true", "true", "false"))
    t = SimpleNamespace(model=model, max_steps=1)
    assert all(p.dtype == torch.bfloat16 for p in pipeline._handoff(t, done, bf16_next).parameters())
    handed = pipeline._handoff(t, done, fp32_next)
    assert all(p.dtype == torch.float32 for p in handed.parameters())
    assert all(torch.equal(p, want[n].float()) for n, p in handed.named_parameters())


@pytest.mark.parametrize("zero", [2, 3])
def test_recipe_frees_each_finished_stages_trainer(tmp_path, monkeypatch, zero):
    """A finished stage's trainer (its DeepSpeed engines, the optimizer's fp32 master weights and moments) is freed
    before the next stage's trainer is built and before rejection sampling: only its model goes on. The recipe kept
    the trainer bound while the next stage ran; once dropped, ZeRO-2's gradient hooks on the handed-on model, or
    ZeRO-3's global module stack, still kept the optimizer alive (Trainer.release takes them off)."""
    import gc
    import weakref

    kept = [{"prompt": f"What is {i}+1?", "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"} for i in range(4)]
    finished, checks = [], []  # (stage, weak references to its trainer's optimizer and engines); (where, alive)

    def record(name, t):
        parts = [t.engine.optimizer, t.engine] + ([t.ref] if t.ref is not None else [])
        finished.append((name, [weakref.ref(p) for p in parts]))

    def check(where):
        gc.collect()
        checks.append((where, [name for name, refs in finished if any(r() is not None for r in refs)]))

    real_sft, real_grpo = pipeline.run_sft, pipeline.run_grpo

    def sft(cfg, model, tok, rows=None, **kw):
        check(f"sft {len(finished)}")
        t, res = real_sft(cfg, model, tok, rows=rows, **kw)
        record("sft", t)
        return t, res

    def grpo(cfg, model, tok):
        check(f"grpo {len(finished)}")
        if len(finished) == 3:  # the last stage: every earlier trainer checked
            raise KeyboardInterrupt
        t, before, res = real_grpo(cfg, model, tok)
        record("grpo", t)
        return t, before, res

    def rejection(*a, **kw):
        check("rejection sampling")
        return kept

    monkeypatch.setattr(pipeline, "run_sft", sft)
    monkeypatch.setattr(pipeline, "run_grpo", grpo)
    monkeypatch.setattr(pipeline, "rejection_sample", rejection)
    one = {"max_steps": 1, "eval_steps": 0, "task_eval_size": 2}
    y = _recipe_yaml(tmp_path, sft=dict(one), grpo=dict(one), rejection=dict(one), grpo2=dict(one))
    with pytest.raises(KeyboardInterrupt):
        pipeline.recipe(y, [f"zero_stage={zero}"])
    assert checks == [("sft 0", []), ("grpo 1", []), ("rejection sampling", []), ("sft 2", []), ("grpo 3", [])]


def _stand_ins(monkeypatch, *names):
    """pipeline's functions `names` replaced by ones that fail the test when called."""
    def stand_in(name):
        def run(*a, **kw):
            raise AssertionError(f"{name} ran")
        return run

    for name in names:
        monkeypatch.setattr(pipeline, name, stand_in(name))


def test_distill_checks_its_sft_token_budget_before_the_teacher_samples(tmp_path, monkeypatch):
    """distill's SFT token budget (padding_free's max_tokens_per_batch below max_length) was checked by the student's
    trainer, after the teacher had sampled. Each SFT row holds its (conversational) prompt as the student renders it
    and at least one completion token, whatever the teacher samples: a budget below that for some prompt is the
    trainer's error before the teacher loads. The longest prompt's tokens are counted here with the tokenizer's own
    chat template."""
    from r1train.config import load_config
    from r1train.loading import load_datasets
    from r1train.tasks import char_tokenizer

    ov = H.FAST + [f"output_dir={tmp_path}", "teacher_model=tiny-qwen2", "padding_free=true", "max_length=512"]
    tok = char_tokenizer()
    prompts, _ = load_datasets(load_config(overrides=ov))
    floor = max(len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
                for r in prompts) + 1
    _stand_ins(monkeypatch, "load_model_and_tokenizer", "rejection_sample")
    with pytest.raises(ConfigError, match=rf"max_tokens_per_batch must be >= the longest SFT row's tokens \(at least "
                                          rf"prompt \d+'s and one completion token; .*\) = {floor}, got {floor - 1}$"):
        pipeline.distill(None, ov + [f"max_tokens_per_batch={floor - 1}"])
    with pytest.raises(AssertionError, match="load_model_and_tokenizer ran"):  # the budget holds: on to the teacher
        pipeline.distill(None, ov + [f"max_tokens_per_batch={floor}"])
    assert not (tmp_path / "distill").exists()


@pytest.mark.parametrize("keys,msg", [(["optim=adamw_torch_8bit"], r"optim=adamw_torch_8bit needs torchao"),
                                      (["use_peft=true"], r"use_peft=true needs peft, which is not installed")])
def test_distill_checks_its_config_before_the_teacher_samples(tmp_path, monkeypatch, keys, msg):
    """The student's config is checked as a recipe stage's is (pipeline._check_stage, the config's validation)
    before the teacher loads: a missing package for optim or use_peft failed when the student's trainer was built,
    after the teacher had sampled."""
    import sys

    for mod in ("torchao", "torchao.optim", "torchao.optim.adam", "peft"):  # as if not installed
        monkeypatch.setitem(sys.modules, mod, None)
    _stand_ins(monkeypatch, "load_model_and_tokenizer", "rejection_sample", "load_datasets")
    with pytest.raises(ConfigError, match=msg):
        pipeline.distill(None, H.FAST + [f"output_dir={tmp_path}", "teacher_model=tiny-qwen2", *keys])


def _fused(model) -> dict:
    """{module name: its fused-op backend} of the modules rk.patch's fused layers patched."""
    return {n: m._r1k_layers_backend for n, m in model.named_modules() if type(m).__dict__.get("_r1k_layers")}


@pytest.mark.parametrize("nxt", [["patch_model=false"], ["patch_model=true", "kernel_backend=auto"]])
def test_handoff_patches_the_model_as_the_next_stage_says(tmp_path, nxt):
    """A model patched at load (patch_model=true: tiny-qwen2's fused layers and lm_head, backend torch) stayed patched
    with that backend in every later stage, whatever the later stages' configs said. Handed on, it is patched as the
    next stage's config says: unpatched (transformers' classes and forward again, the trained weights kept: its
    logits are those of an unpatched model with them) or patched with the next stage's backend."""
    from types import SimpleNamespace

    from r1train.config import load_config
    from r1train.loading import load_model_and_tokenizer

    ov = H.FAST + [f"output_dir={tmp_path}"]  # kernel_backend=torch
    first = load_config(overrides=ov + ["patch_model=true"])
    model, _ = load_model_and_tokenizer(first)
    plain, _ = load_model_and_tokenizer(load_config(overrides=ov + ["patch_model=false"]))
    assert _fused(model) and set(_fused(model).values()) == {"torch"} and model._r1k_lm_head["backend"] == "torch"
    assert not _fused(plain) and not hasattr(plain, "_r1k_lm_head")
    with torch.no_grad():  # trained: other weights than a fresh model's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain.load_state_dict(model.state_dict())
    nxt_cfg = load_config(overrides=ov + nxt)
    handed = pipeline._handoff(SimpleNamespace(model=model, max_steps=1), first, nxt_cfg)
    assert handed is model
    if not nxt_cfg.patch_model:
        assert not _fused(handed) and not hasattr(handed, "_r1k_lm_head") and "forward" not in vars(handed)
        assert [type(m) for m in handed.modules()] == [type(m) for m in plain.modules()]
        ids = torch.randint(3, 20, (2, 7))
        with torch.no_grad():
            assert torch.equal(handed(ids).logits, plain(ids).logits)
    else:
        assert set(_fused(handed).values()) == {"auto"} and handed._r1k_lm_head["backend"] == "auto"
        assert _fused(handed).keys() == _fused(load_model_and_tokenizer(first)[0]).keys()


def test_a_model_patched_by_its_caller_is_left_to_it(tmp_path):
    """The trainer's patch (loading.patch_layers) undoes only what r1train patched: a model the caller patched itself
    stays patched under a config that patches nothing."""
    import r1kernels as rk
    from r1train.config import load_config
    from r1train.loading import load_model_and_tokenizer, patch_layers

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "patch_model=false"])
    model, _ = load_model_and_tokenizer(cfg)
    rk.patch(model, backend="torch")
    assert set(_fused(patch_layers(model, cfg)).values()) == {"torch"} and hasattr(model, "_r1k_lm_head")


@pytest.mark.parametrize("entry", ["recipe", "distill"])
def test_sampled_sft_stages_load_their_dataset_once(tmp_path, monkeypatch, entry):
    """The recipe's rejection-sampling SFT and distill's student SFT sample from the stage's dataset, then train on
    the kept samples with the dataset's rows as their resume fingerprint and its held-out rows as evaluation:
    run_sft loaded that dataset a second time for them. It is loaded once per stage, and the SFT is what run_sft
    loading the rows itself gives: the same training, source and evaluation rows, fingerprint and final
    evaluation. The earlier stages and the teacher's sampling are stand-ins here."""
    import dataclasses

    from r1train.loading import load_datasets, load_model_and_tokenizer

    kept = [{"prompt": f"What is {i}+1?", "answer": str(i + 1),
             "completion": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"} for i in range(4)]
    loads, built = [], []

    def counted(cfg, *a, **kw):
        loads.append(cfg.output_dir)
        return load_datasets(cfg, *a, **kw)

    class Recorded(pipeline.SFTTrainer):
        def __init__(self, cfg, model, tok, train_rows, eval_rows, **kw):
            super().__init__(cfg, model, tok, train_rows, eval_rows, **kw)
            built.append((train_rows, eval_rows, kw.get("source_rows"), self.rows_sha256))

    real_sft = pipeline.run_sft
    monkeypatch.setattr(pipeline, "load_datasets", counted)
    monkeypatch.setattr(pipeline, "SFTTrainer", Recorded)
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: kept)
    sft_steps = ["max_steps=2", "eval_steps=0", "task_eval_size=4"]
    if entry == "recipe":
        monkeypatch.setattr(pipeline, "run_sft", lambda cfg, model, tok, rows=None, **kw: real_sft(
                            cfg, model, tok, rows=rows, **kw) if rows is not None else (model, {}))
        monkeypatch.setattr(pipeline, "run_grpo", lambda cfg, model, tok: (model, {}, {}))
        monkeypatch.setattr(pipeline, "_handoff", lambda model, cfg, nxt: model)
        monkeypatch.setattr(pipeline, "_trained", lambda t, section, before: before)  # the stand-ins train nothing
        y = _recipe_yaml(tmp_path, rejection=dict(o.split("=") for o in sft_steps))
        res = pipeline.recipe(y)["rejection_sft"]
        stage = pipeline.stage_configs(y, [], {"rejection": "3-rejection-sft"})[1]
    else:
        ov = H.FAST + ["teacher_model=tiny-qwen2", f"output_dir={tmp_path / 'out'}", *sft_steps]
        res = pipeline.distill(None, ov)
        res.pop("distill_rows")
        stage = pipeline.stage_cfg(pipeline.load_config(None, ov, section="distill"), "distill")
    assert loads == [stage.output_dir if entry == "recipe" else str(tmp_path / "out")], loads
    assert len(built) == 1
    # run_sft loading the stage's rows itself, in another output directory, from the model the stage started from
    ref_cfg = dataclasses.replace(stage, output_dir=str(tmp_path / "ref"))
    model, tok = load_model_and_tokenizer(ref_cfg)
    _, want = real_sft(ref_cfg, model, tok, rows=kept)
    assert len(loads) == 2 and len(built) == 2
    (rows, ev, source, sha), (rows_ref, ev_ref, source_ref, sha_ref) = built
    assert rows == rows_ref == kept and ev == ev_ref and ev and source == source_ref and sha == sha_ref
    assert res == want and res


def test_recipe_with_no_rejection_rows_hands_grpo2_its_dtype(tmp_path, monkeypatch):
    """Rejection sampling that keeps no row skips its SFT; the RL model, prepared for the rejection stage's bf16,
    went to a bf16=false grpo2 as it was (bf16 parameters trained without mixed precision, saved in bf16). Now
    grpo2 gets its own dtype, as after an SFT stage."""
    y = tmp_path / "recipe.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n" + SECTIONS.replace(
        "grpo: {max_steps: 2,", "grpo: {bf16: true, max_steps: 1,").replace(
        "rejection: {", "rejection: {bf16: true, ").replace("sft: {max_steps: 3,", "sft: {max_steps: 1,"))
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: [])
    seen, real = [], pipeline.run_grpo

    def spy(cfg, model, tok, **kw):
        seen.append((cfg.output_dir, cfg.bf16, {p.dtype for p in model.parameters()}))
        if cfg.output_dir.endswith("4-all-scenarios-rl"):
            raise KeyboardInterrupt
        return real(cfg, model, tok, **kw)

    monkeypatch.setattr(pipeline, "run_grpo", spy)
    with pytest.raises(KeyboardInterrupt):
        pipeline.recipe(str(y), [f"output_dir={tmp_path / 'out'}"])
    assert seen[-1][1:] == (False, {torch.float32}), seen


def test_demo_output_dir_in_the_config_file_is_the_root(tmp_path, monkeypatch):
    """`r1train demo --config my.yaml` with output_dir in the file: the stages go under it (they went under
    outputs/demo, whose demo.yaml has overwrite_output_dir: true, deleting an earlier demo's outputs); a key=value
    output_dir still wins."""
    from r1train import demo
    from r1train.demo import common

    (tmp_path / "my.yaml").write_text(f"model_hidden_size: 24\noutput_dir: {tmp_path / 'mine'}\n")
    monkeypatch.chdir(tmp_path)
    seen, real = [], common.configs

    def spy(*a):
        seen.append(real(*a)[1].output_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "configs", spy)
    for ov, root in (([], tmp_path / "mine"), ([f"output_dir={tmp_path / 'cli'}"], tmp_path / "cli")):
        with pytest.raises(KeyboardInterrupt):
            demo.run("default", ov, config="my.yaml")
        assert seen[-1] == str(root / "sft")


def test_final_checkpoint_is_a_finished_runs(tmp_path, monkeypatch):
    """final_checkpoint (a demo stage's predecessor, run alone): the newest complete checkpoint only when its run
    finished (global_step = max_steps). A run stopped after step 1 of 2 left checkpoint-1, which a later stage took
    as the predecessor's model."""
    from r1train.checkpoint import final_checkpoint
    from r1train.grpo import GRPOTrainer

    out = tmp_path / "run"
    real = GRPOTrainer.save

    def stopped(self, step):
        path = real(self, step)
        raise KeyboardInterrupt(path)

    monkeypatch.setattr(GRPOTrainer, "save", stopped)
    t = H.grpo_trainer(out, "max_steps=2", "save_steps=1", reward_funcs=[H.digit_share])
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.setattr(GRPOTrainer, "save", real)
    assert (out / "checkpoint-1").is_dir() and final_checkpoint(str(out)) is None
    assert final_checkpoint(str(tmp_path / "none")) is None
    t = H.grpo_trainer(out, "max_steps=2", "save_steps=1", "resume_from_checkpoint=latest",
                       reward_funcs=[H.digit_share])
    t.train()
    t.finish()
    assert final_checkpoint(str(out)) == str(out / "checkpoint-2")


def test_recipe_rerun_after_an_earlier_stage_trained_more_is_an_error(tmp_path):
    """A finished recipe rerun with resume_from_checkpoint=latest after the sft section's max_steps grew: stage 1
    trains on, and stage 2 resumed its finished checkpoint, trained from the old stage-1 model, silently (its
    results kept as if derived from the new one). Now an error naming that directory; an unchanged rerun trains
    nothing and is no error."""
    y = tmp_path / "recipe.yaml"
    sections = SECTIONS.replace("sft: {max_steps: 3,", "sft: {max_steps: 1,").replace(
        "grpo: {max_steps: 2,", "grpo: {max_steps: 1,").replace("max_steps: 2}", "max_steps: 1}")
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n" + sections)
    over = [f"output_dir={tmp_path / 'out'}", "resume_from_checkpoint=latest"]
    pipeline.recipe(str(y), over)
    pipeline.recipe(str(y), over)  # nothing trains
    y.write_text(y.read_text().replace("sft: {max_steps: 1,", "sft: {max_steps: 2,"))
    with pytest.raises(ConfigError, match=r"\[grpo\] .*2-reasoning-rl holds this stage's checkpoint.*\[sft\] trained"):
        pipeline.recipe(str(y), over)


def test_another_runs_outputs_are_refused_before_any_sampling(tmp_path, monkeypatch):
    """distill into an output_dir whose distill/ holds another run's outputs refused them only after the teacher
    sampled every prompt; the recipe, a late stage's only after the stages before it trained. Both now before."""
    def never(*a, **kw):
        raise AssertionError("sampled or trained before the output_dir check")

    monkeypatch.setattr(pipeline, "rejection_sample", never)
    monkeypatch.setattr(pipeline, "run_sft", never)
    out = tmp_path / "run"
    (out / "distill" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match="distill holds another run's outputs"):
        pipeline.distill(None, H.FAST + ["teacher_model=tiny-qwen2", f"output_dir={out}", "max_steps=1"])
    y = tmp_path / "recipe.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + "\n" + SECTIONS)
    (out / "4-all-scenarios-rl").mkdir()
    (out / "4-all-scenarios-rl" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"\[grpo2\] output_dir .*4-all-scenarios-rl holds another run's"):
        pipeline.recipe(str(y), [f"output_dir={out}"])
