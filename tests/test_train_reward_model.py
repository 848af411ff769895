"""A reward model as a reward function (TRL 1.16's): its scores against the model's forward on each text alone,
naming and config errors, a short GRPO run scored by one."""

import json
import os
import random

import pytest
import torch
import train_helpers as H
from conftest import assert_close

from r1train import rewards as R
from r1train.config import ConfigError
from r1train.reward_model import RewardModel
from r1train.tasks import char_tokenizer
from r1train.tasks.models import tiny_config

CHARS = "0123456789+-= abcdefxyz\n"


def save_reward_model(path, num_labels=1, bos_no_pad=False):
    """A tiny random Qwen2ForSequenceClassification (hidden 32, 2 layers) and the char tokenizer, saved to path.
    bos_no_pad: the tokenizer adds a BOS token to every text (add_special_tokens=True) and has no pad token."""
    from tokenizers import processors
    from transformers import AutoModelForSequenceClassification

    tok = char_tokenizer()
    if bos_no_pad:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    cfg = tiny_config("tiny-qwen2", len(tok), hidden_size=32, num_layers=2, tokenizer=tok, num_labels=num_labels)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # unit-scale scores (HF's 0.02 init puts every score near 0)
    if bos_no_pad:
        tok.pad_token = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm")


def rand_text(lo, hi):
    return "".join(random.choice(CHARS) for _ in range(random.randint(lo, hi)))


def reference(path, texts):
    """The saved model in float64 on each text alone (no padding, no special tokens): logits[0, 0]."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
                            for t in texts])


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_scores_match_each_text_alone(rm_dir, chat):
    from transformers import AutoTokenizer

    n = 7
    comps = [rand_text(1, 30) for _ in range(n)]  # lengths differ: the batches are right-padded
    if chat:
        prompts = [[{"role": "user", "content": rand_text(1, 12)}] for _ in range(n)]
        tok = AutoTokenizer.from_pretrained(rm_dir)
        texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                 for p, c in zip(prompts, comps)]
        assert texts[0].startswith("<|user|>") and texts[0].endswith(comps[0] + "<|eos|>")
    else:
        prompts = [rand_text(1, 12) for _ in range(n)]
        texts = [p + c for p, c in zip(prompts, comps)]
    ref = reference(rm_dir, texts)
    assert ref.std() > 1e-3  # the scores differ: a constant reward would match trivially
    for bs in (1, 3, n):
        rm = RewardModel(rm_dir, batch_size=bs)
        out = torch.tensor(rm(prompts, comps), dtype=torch.float64)
        assert_close(out, ref, torch.float32, name=f"batch_size={bs}")
    if chat:  # TRL's conversational completions score the same
        trl = R.as_trl_completions(prompts, comps)
        assert_close(torch.tensor(rm(prompts, trl), dtype=torch.float64), ref, torch.float32, name="trl format")
    assert rm.device == torch.device("cpu") and not rm.model.training
    # through the runner: the call runs in a worker thread under reward_timeout
    table, failed = R.RewardRunner([rm_dir], timeout=60)(prompts, comps, [[1]] * n, {})
    assert not any(failed)
    assert_close(torch.tensor([row[0] for row in table], dtype=torch.float64), ref, torch.float32, name="runner")


def test_mixed_prompt_formats_score_each_text_by_its_own_prompt(rm_dir):
    """A .jsonl dataset may mix chat and string prompts: each completion is scored on its own prompt's text (TRL's
    for a batch of that format); the first prompt's format used to decide for all (list + str: TypeError)."""
    chat, plain = [{"role": "user", "content": "1+1?"}], "1+1?"
    rm = RewardModel(rm_dir)
    for prompts in ([chat, plain], [plain, chat]):
        want = [rm(*pc)[0] for pc in (([p], ["x2"]) for p in prompts)]  # each alone: one format per batch
        assert rm(prompts, ["x2", "x2"]) == pytest.approx(want, rel=1e-5, abs=1e-5)  # float32, padded


def test_no_special_tokens_and_eos_padding(tmp_path):
    """A tokenizer that adds a BOS (add_special_tokens=True) and has no pad token: texts are scored without the
    BOS (TRL's add_special_tokens=False) and batches are padded with eos, the scores those of each text alone."""
    from transformers import AutoTokenizer

    path = save_reward_model(tmp_path / "bos-rm", bos_no_pad=True)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token is None and tok("12")["input_ids"][0] == tok.bos_token_id  # the case is what it claims
    n = 6
    prompts, comps = [rand_text(1, 12) for _ in range(n)], [rand_text(1, 30) for _ in range(n)]
    texts = [p + c for p, c in zip(prompts, comps)]
    ref = reference(path, texts)
    rm = RewardModel(path, batch_size=n)
    assert_close(torch.tensor(rm(prompts, comps), dtype=torch.float64), ref, torch.float32, name="no BOS")
    assert rm.tokenizer.pad_token == rm.tokenizer.eos_token
    with_bos = reference(path, [tok.bos_token + t for t in texts])
    assert (with_bos - ref).abs().max() > 1e-3  # a BOS would have changed the scores


def test_bf16_run_scores_in_bf16(rm_dir):
    """bf16=true: the reward model runs in bfloat16 (TRL 1.16 scores in bf16 then), within bf16's tolerance of
    float64; bf16=false keeps the checkpoint's dtype."""
    import types

    n = 5
    prompts, comps = [rand_text(1, 12) for _ in range(n)], [rand_text(1, 30) for _ in range(n)]
    ref = reference(rm_dir, [p + c for p, c in zip(prompts, comps)])
    rm = R.resolve(rm_dir, types.SimpleNamespace(bf16=True))
    got = torch.tensor(rm(prompts, comps), dtype=torch.float64)
    assert rm.model.dtype == torch.bfloat16
    assert_close(got, ref, torch.bfloat16, name="bf16 scores")
    rm32 = R.resolve(rm_dir, types.SimpleNamespace(bf16=False))
    rm32(prompts[:1], comps[:1])
    assert rm32.model.dtype == torch.float32


def test_resolve_and_name(rm_dir):
    fn = R.resolve(rm_dir)
    assert isinstance(fn, RewardModel) and fn.model is None  # loaded on first use
    assert R.reward_name(rm_dir) == R.reward_name(rm_dir + "/") == R.reward_name(fn) == "tiny-rm"
    run = R.RewardRunner([rm_dir, "format"])
    assert run.names == ["tiny-rm", "format"]
    with pytest.raises(ConfigError, match="listed twice"):
        R.check_reward_funcs([rm_dir, rm_dir + "/"])
    assert R.resolve("format") is R.format_reward  # names and import paths resolve as before
    assert R.resolve("train_helpers:digit_share") is H.digit_share


def test_bad_directories(tmp_path, rm_dir):
    two = save_reward_model(tmp_path / "two", num_labels=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(rm_dir, "config.json")).read())
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    causal = tmp_path / "causal"  # a causal LM's directory: no num_labels=1 head
    save_reward_model(causal)
    c = json.loads((causal / "config.json").read_text())
    c.pop("id2label", None), c.pop("label2id", None)
    (causal / "config.json").write_text(json.dumps({**c, "architectures": ["Qwen2ForCausalLM"]}))
    malformed = []  # valid JSON, wrong field types: transformers raises TypeError / AttributeError
    for i, c in enumerate([{"model_type": "qwen2", "id2label": 5}, {"model_type": "qwen2", "num_labels": "1",
                                                                     "id2label": {"0": "a"}}]):
        d = tmp_path / f"malformed{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(c))
        (d / "model.safetensors").write_bytes(open(os.path.join(rm_dir, "model.safetensors"), "rb").read())
        malformed.append((d, "cannot read"))
    cases = [(two, "num_labels=2"), (empty, "no model"), (no_weights, "no weights"), (bad_json, "cannot read"),
             (causal, "saved as a causal LM"), *malformed]
    for path, what in cases:
        with pytest.raises(ConfigError, match=f"^reward_funcs: .*{what}") as e:
            R.check_reward_funcs(["format", str(path)])
        assert str(path) in str(e.value)
    other = save_reward_model(tmp_path / "elsewhere" / os.path.basename(rm_dir))  # another model, the same name
    with pytest.raises(ConfigError, match="would both log as 'tiny-rm'.*rename one"):
        R.check_reward_funcs([rm_dir, other])
    with pytest.raises(ConfigError, match="reward_funcs: .*two.*num_labels=2"):  # at config load
        H.grpo_trainer(tmp_path / "out", f"reward_funcs={two}")


def test_model_object_scores_as_its_directory(tmp_path, rm_dir):
    """A sequence-classification model object in reward_funcs (TRL 1.16 takes a PreTrainedModel) is a RewardModel
    scoring it with the tokenizer of its config._name_or_path (TRL's), logged under that path's last part. It was
    called as a reward function (it is callable), and every sample failed ("exactly one of input_ids or
    inputs_embeds")."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    fn = R.resolve(model)
    assert isinstance(fn, RewardModel) and fn.tokenizer is not None and R.reward_name(model) == "tiny-rm"
    n = random.randint(3, 7)
    prompts, comps = [rand_text(1, 12) for _ in range(n)], [rand_text(1, 30) for _ in range(n)]
    ref = reference(rm_dir, [p + c for p, c in zip(prompts, comps)])
    assert_close(torch.tensor(fn(prompts, comps), dtype=torch.float64), ref, torch.float32, name="model object")
    assert fn.model is model and not model.training
    run = R.RewardRunner([model, "format"], timeout=60)
    table, failed = run(prompts, comps, [[1]] * n, {})
    assert run.names == ["tiny-rm", "format"] and not any(failed), run.last_errors
    assert_close(torch.tensor([row[0] for row in table], dtype=torch.float64), ref, torch.float32, name="runner")
    t = H.grpo_trainer(tmp_path / "run", "max_steps=1", "per_device_train_batch_size=4", "reward_timeout=60",
                       reward_funcs=[model])
    h = t.train()[0]
    t.finish(save=False)
    assert h["rewards/failed"] == 0 and h["rewards/tiny-rm/std"] > 0, h


def test_bad_model_objects_name_reward_funcs(tmp_path, rm_dir):
    """A model object that is no one-label sequence-classification model, has no tokenizer at its
    config._name_or_path, or is wrapped (a torch module around one), is a ConfigError naming reward_funcs when the
    reward functions are resolved, not a failure of every sample; so is one that clashes with another's name."""
    from transformers import AutoModelForSequenceClassification

    from r1train.tasks.models import tiny_model

    built = AutoModelForSequenceClassification.from_config(
        tiny_config("tiny-qwen2", len(char_tokenizer()), hidden_size=32, num_layers=1, num_labels=1))
    two = AutoModelForSequenceClassification.from_pretrained(save_reward_model(tmp_path / "two", num_labels=2))

    class Wrapped(torch.nn.Module):  # as peft's PeftModel or torch.compile's module: a config, no PreTrainedModel
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    one = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    cases = [(tiny_model("tiny-qwen2", char_tokenizer()), "a Qwen2ForCausalLM object is no reward model"),
             (two, r"num_labels=2"), (built, "cannot load a tokenizer from ''"),
             (Wrapped(one), "a Wrapped around a transformers model")]
    for obj, what in cases:
        with pytest.raises(ConfigError, match=f"^reward_funcs: .*{what}"):
            R.RewardRunner(["format", obj])
    with pytest.raises(ConfigError, match=r"tiny-rm' is listed twice \(as Qwen2ForSequenceClassification\('"):
        R.check_reward_funcs([one, rm_dir])
    other = AutoModelForSequenceClassification.from_pretrained(
        save_reward_model(tmp_path / "elsewhere" / "tiny-rm"), num_labels=1)
    with pytest.raises(ConfigError, match="would both log as 'tiny-rm'"):
        R.check_reward_funcs([one, other])


def _strip_labels(path, **keys):
    """path's config.json without id2label / label2id (as a config that never set them saves), keys set over it."""
    c = json.loads((path / "config.json").read_text())
    c.pop("id2label", None), c.pop("label2id", None)
    (path / "config.json").write_text(json.dumps({**c, **keys}))


def test_config_without_labels_is_one_label(tmp_path, rm_dir):
    """A reward model's config.json with no id2label (or num_labels) declares no label count: transformers' default
    (2) is not one, and TRL loads the model with num_labels=1. It is accepted and scores as the same weights do
    with the label declared. A config that declares 2 labels (num_labels alone) is refused, and so is one that
    declares none over a 2-label head (as transformers saves a 2-label model: its default, not written)."""
    import shutil

    path = tmp_path / "no-labels"
    shutil.copytree(rm_dir, path)
    _strip_labels(path)
    R.check_reward_funcs([str(path)])
    n = random.randint(2, 6)
    prompts, comps = [rand_text(1, 12) for _ in range(n)], [rand_text(1, 30) for _ in range(n)]
    got = RewardModel(str(path), batch_size=n)
    assert got(prompts, comps) == pytest.approx(RewardModel(rm_dir)(prompts, comps), rel=1e-6, abs=1e-6)
    assert got.model.config.num_labels == 1 and got.model.score.weight.shape[0] == 1
    two = tmp_path / "two-labels"
    shutil.copytree(rm_dir, two)
    _strip_labels(two, num_labels=2)
    with pytest.raises(ConfigError, match="^reward_funcs: .*two-labels.*num_labels=2"):
        R.check_reward_funcs([str(two)])
    saved = save_reward_model(tmp_path / "saved-two", num_labels=2)  # transformers saves no id2label for 2 labels
    assert "id2label" not in json.loads(open(os.path.join(saved, "config.json")).read())
    with pytest.raises(ConfigError, match=r"^reward_funcs: .*saved-two.* declares no labels .*score\.weight has "
                                          r"shape \(2, 32\).*num_labels=2"):
        R.check_reward_funcs([saved])


def test_head_without_weights_is_an_error(tmp_path, rm_dir):
    """num_labels=1 in the config but no trained head in the weights: an error, never random scores."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "headless"
    save_reward_model(path)
    w = load_file(path / "model.safetensors")
    save_file({k: v for k, v in w.items() if not k.startswith("score.")}, path / "model.safetensors",
              metadata={"format": "pt"})
    rm = R.resolve(str(path))  # the config alone is fine
    with pytest.raises(ConfigError, match="reward_funcs: .*headless.* has no weights for .*score"):
        rm(["p"], ["c"])


def test_grpo_with_reward_model(tmp_path, rm_dir):
    t = H.grpo_trainer(tmp_path, "max_steps=2", "per_device_train_batch_size=4", f"reward_funcs={rm_dir}",
                       "reward_timeout=60")
    hist = t.train()
    t.finish(save=False)
    assert len(hist) == 2
    for h in hist:
        assert h["rewards/failed"] == 0, h
        assert h["rewards/tiny-rm/std"] > 0, h  # model scores, not a constant
        assert h["reward"] == pytest.approx(h["rewards/tiny-rm/mean"], rel=1e-6, abs=1e-9)


def test_two_processes_score_their_own_completions(tmp_path, rm_dir):
    """torchrun with 2 processes: every logged completion's reward is the model's score of its own text."""
    out = tmp_path / "out"
    p = H.run_cli(["grpo", *H.FAST, "max_steps=1", "per_device_train_batch_size=4", f"reward_funcs={rm_dir}",
                   "reward_timeout=60", "task_eval_size=1", "save_steps=0", f"output_dir={out}"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert H.read_metrics(out)[0]["rewards/failed"] == 0
    rows = [json.loads(ln) for ln in open(out / "completions.jsonl")]
    assert len(rows) == 2 * 4  # both ranks' completions
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["completion"]}], tokenize=False)
             for r in rows]
    got = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    assert_close(got, reference(rm_dir, texts), torch.float32, name="logged rewards")


def test_model_path_errors_name_their_key(tmp_path):
    """load_model_and_tokenizer(cfg, path) for distill's teacher_model: a directory that does not exist (or holds
    no loadable model) was reported as model_name_or_path (or "model directory"), a key the user had right."""
    from r1train.config import load_config
    from r1train.loading import load_model_and_tokenizer

    cfg = load_config(overrides=[f"teacher_model={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"^teacher_model: .*nope"):
        load_model_and_tokenizer(cfg, cfg.teacher_model)
    (tmp_path / "empty").mkdir()
    cfg = load_config(overrides=[f"teacher_model={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"^teacher_model: .*empty"):
        load_model_and_tokenizer(cfg, cfg.teacher_model)
    cfg = load_config(overrides=[f"model_name_or_path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"^model_name_or_path: .*nope"):
        load_model_and_tokenizer(cfg)
