"""The R1 recipe on the engine: cold-start SFT -> reasoning RL -> rejection-sampling SFT -> RL, and
distillation (SFT of a student on a teacher's filtered samples). Each stage writes its own
output_dir/<stage>/ (metrics, curves, final checkpoint); the next stage starts from the previous model
(in memory below ZeRO-3; from the saved checkpoint under ZeRO-3, whose parameters are partitioned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import torch

from .checkpoint import check_output_dir
from .config import (
    ConfigError,
    TrainConfig,
    check_grpo_batch,
    check_grpo_config,
    check_token_budget,
    load_config,
    warn_unread_keys,
)
from .data import DatasetError, TokenCache, sft_template_kwargs
from .durable import write_replace
from .engine import device, setup_distributed
from .grpo import GRPOTrainer
from .loading import load_datasets, load_model_and_tokenizer, merge_adapters, patch_layers, tokenizer_of
from .optim import adamw_8bit_class
from .rewards import accuracy_reward, format_reward, has_gold, language_consistency_reward
from .rollout import sample_rows
from .sft import SFTTrainer


def stage_cfg(cfg: TrainConfig, name: str) -> TrainConfig:
    return dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, name))


# the keys the recipe's one model and tokenizer are built from (loading.load_model_and_tokenizer of the top-level
# config); each stage trains the model the previous one hands on, so a stage section cannot change them
MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "model_hidden_size", "model_num_layers")


def _check_model_keys(base: TrainConfig, c: TrainConfig, section: str):
    """A stage section that sets a model key to another value than the top level's: an error naming both (it
    was ignored, while the stage's trainer_state.json recorded it)."""
    for k in MODEL_KEYS:
        if getattr(c, k) != getattr(base, k):
            raise ConfigError(f"[{section}] {k}={getattr(c, k)!r}: the recipe builds its model and tokenizer once, "
                              f"from the top level ({k}={getattr(base, k)!r}), and each stage trains the model the "
                              f"previous stage hands on; set {k} at the top level of the config, not in a stage "
                              "section")


@contextlib.contextmanager
def _in_stage(section: str):
    """A ConfigError or DatasetError raised inside names the stage's section: `[section] ...` (once)."""
    try:
        yield
    except (ConfigError, DatasetError) as e:
        if not str(e).startswith(f"[{section}] "):
            e.args = (f"[{section}] {e}",)
        raise


def _check_stage(c: TrainConfig, section: str):
    """The checks of a stage's config that need no model, rows or output directory, the same functions its
    trainer calls when it is built: GRPO's batch, reward weights and token budget (check_grpo_config), and the
    `optim` key's package (make_optimizer's adamw_8bit_class). SFT's token budget is held to the stage's own rows
    (SFTTrainer.longest_row, below max_length): the rejection stage's exist only once sampled, so its trainer
    checks it then."""
    if section.startswith("grpo"):
        check_grpo_config(c)
    if c.optim == "adamw_torch_8bit":
        adamw_8bit_class()


def stage_configs(path, overrides, stages: dict) -> list[TrainConfig]:
    """The base config and every stage's (section -> output subdirectory), all loaded and checked before
    any stage runs, so a bad value in a late stage is an error now, naming its section, rather than after the
    early stages. The one loader of stage configs: the recipe's and the demo stages'."""
    out = [load_config(path, overrides)]
    for section, sub in stages.items():
        with _in_stage(section):
            c = stage_cfg(load_config(path, overrides, section=section), sub)
            _check_model_keys(out[0], c, section)
            _check_stage(c, section)
        out.append(c)
    paths = [c.resume_from_checkpoint for c in out[1:] if c.resume_from_checkpoint not in (None, "latest")]
    for p in dict.fromkeys(paths):  # one checkpoint path given to several stages (the top level, key=value)
        if paths.count(p) > 1:
            raise ConfigError(f"resume_from_checkpoint={p!r}: a checkpoint is one stage's, and {paths.count(p)} "
                              "stages would load it; use resume_from_checkpoint=latest (each stage resumes from its "
                              "own output directory), or set a path in one stage's section")
    return out


def _resumed(c: TrainConfig) -> TrainConfig:
    """resume_from_checkpoint=latest in the recipe (or true, which resolve_checkpoint reads as latest unless a
    directory has that name): a stage with no complete checkpoint yet (not reached, or killed before its first
    save) runs from its start, its partial outputs replaced; the others resume."""
    from .checkpoint import checkpoint_problem, list_checkpoints, resumes_latest

    if resumes_latest(c.resume_from_checkpoint) and all(checkpoint_problem(p) for p in list_checkpoints(c.output_dir)):
        return dataclasses.replace(c, resume_from_checkpoint=None, overwrite_output_dir=True)
    return c


def _in_memory(cfg: TrainConfig) -> bool:
    """The stage's model goes to the next stage in memory (its parameters are not partitioned)."""
    return cfg.zero_stage < 3 and cfg.deepspeed is None


def _check_handoff(cfg: TrainConfig, section: str):
    if cfg.use_peft and not _in_memory(cfg):
        raise ConfigError(f"[{section}] use_peft with zero_stage=3 or a deepspeed file: the next stage would load "
                          "this stage's checkpoint, which holds only the LoRA adapter; use zero_stage <= 2 (and no "
                          "deepspeed file) for the recipe's LoRA stages, or use_peft=false")


def _handoff(trainer, cfg: TrainConfig, nxt: TrainConfig):
    """The model `trainer` trained under cfg, for the next stage (config nxt); LoRA adapters are merged into its
    weights (a next stage with use_peft trains new adapters on the merged model). In nxt's dtype and patched as
    nxt says (_for_stage), as a fresh load would be."""
    if _in_memory(cfg):
        return _for_stage(merge_adapters(trainer.model), nxt)
    from transformers import AutoModelForCausalLM

    path = os.path.join(cfg.output_dir, f"checkpoint-{trainer.max_steps}")
    return _for_stage(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if nxt.bf16 else torch.float32),
                      nxt)


def _for_stage(model, nxt: TrainConfig):
    """A handed-on model for the stage of config nxt: float32 where nxt has bf16=false (DeepSpeed's bf16 mode casts
    the module it trains to bf16 in place, and a bf16=false stage would otherwise train bf16 parameters without
    mixed precision; the cast up is exact), patched as nxt says (patch_model, kernel_backend:
    loading.patch_layers)."""
    if not nxt.bf16 and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        model.float()
    return patch_layers(model, nxt)


def run_sft(cfg, model, tok, rows=None, eval_rows=None, evaluate=True, loaded=None):
    """rows: sampled SFT rows (distillation, rejection sampling); the dataset then needs no completions. loaded:
    the (train, eval) rows load_datasets(cfg, sft=rows is None) returns, where the caller holds them (None: loaded
    here). Returns the finished, released trainer (Trainer.release: its model goes on without the optimizer) and
    its final evaluation."""
    train, ev = load_datasets(cfg, sft=rows is None) if loaded is None else loaded
    # a resume matches the dataset's rows: with sampled rows, the prompts they were sampled from (sampled again
    # when the run resumes, they may differ across hardware)
    t = SFTTrainer(cfg, model, tok, rows if rows is not None else train, ev if eval_rows is None else eval_rows,
                   source_rows=train)
    t.train()
    res = t.finish_stage(evaluate)  # the final checkpoint before the final evaluation
    t.release()
    return t, res


def run_grpo(cfg, model, tok, eval_before=False):
    """eval_before: evaluate before training, logged at step 0. A resumed run does not evaluate again (as HF
    Trainer): its `before` is its step-0 row in metrics.jsonl (rank 0; {} where there is none). The trainer comes
    back finished and released, as run_sft's."""
    check_grpo_batch(cfg)
    train, ev = load_datasets(cfg)
    t = GRPOTrainer(cfg, model, tok, train, ev)
    before = {}
    if eval_before and t.step0 == 0:  # the same step0 on every rank: all of them evaluate (a collective), or none
        before = t.evaluate()
        if before:
            t.logger.log(0, before)
    elif eval_before:
        before = {k: v for k, v in (t.logger.logged(0, ("eval/accuracy",)) or {}).items() if k.startswith("eval/")}
    t.train()
    res = t.finish_stage()  # the final checkpoint before the final evaluation
    t.release()
    return t, before, res


@torch.no_grad()
def rejection_sample(cfg, model, tok, rows, *, num_samples: int, keep: int, batch_size: int = 64,
                     language: str | None = None, stats: dict | None = None, as_sampled: bool = True):
    """R1 stage 3: sample num_samples per prompt, keep up to `keep` correct, well-formed ones as SFT rows.
    language: also require a readable chain of thought (language reward 1, or no words at all); the recipe and
    distill pass cfg.language (R1 keeps no chain of thought that mixes languages). stats, when given, gets the
    counts: samples, correct, kept, prompts_kept (prompts with at least one kept sample)."""
    missing = sum(not has_gold(r.get(cfg.answer_column)) for r in rows)  # None, NaN, blank: never matched
    if rows and missing == len(rows):
        raise DatasetError(f"answer_column={cfg.answer_column!r}: no row has this column (or a non-blank value in "
                           "it), and rejection sampling keeps only samples whose <answer> matches it")
    if missing:
        logging.getLogger("r1train").warning("rejection sampling: %d of %d rows have no %r value (missing or "
                                             "blank); none of their samples can be kept", missing, len(rows),
                                             cfg.answer_column)
    setup_distributed()
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # each rank samples rows[rank::world]; a row's seeds stay keyed by its index in `rows`, so its completions
    # are those of one process. The model here is whole on every rank (ds_engine None: below ZeRO-3 it is the
    # trained module, under ZeRO-3 reloaded from the checkpoint), so generate needs no collective and the
    # ranks may make different numbers of calls.
    share = rows[rank::world] if world > 1 else rows
    spread = {"index": lambda i: rank + i * world} if world > 1 else {}
    model = model.to(device())
    kept, n = [], {"samples": 0, "correct": 0, "kept": 0, "prompts_kept": 0}  # kept: (row, its kept texts)
    for _, chunk, ro, texts in sample_rows(model, tok, share, num_samples=num_samples, cfg=cfg,
                                          seed_key=(cfg.seed, "rs"), batch_size=batch_size, **spread):
        gold = [r.get(cfg.answer_column) for r in chunk for _ in range(num_samples)]
        # a template that ends the prompt with <think> opens each completion's thought (rewards.thought_texts)
        shown = ro.prompt_texts
        ok = [a == 1.0 and f == 1.0 for a, f in zip(accuracy_reward(None, texts, answer=gold),
                                                      format_reward(None, texts, prompts_text=shown))]
        n["samples"] += len(texts)
        n["correct"] += sum(ok)
        if language is not None:
            lang = language_consistency_reward(None, texts, language=language, prompts_text=shown)
            ok = [o and (v is None or v == 1.0) for o, v in zip(ok, lang)]
        for i, r in enumerate(chunk):
            seen = []
            for j in range(num_samples):
                t = texts[i * num_samples + j]
                if ok[i * num_samples + j] and t not in seen and len(seen) < keep:
                    seen.append(t)
            kept.append((r, seen))
            n["kept"] += len(seen)
            n["prompts_kept"] += bool(seen)
    if world > 1:  # every rank: the kept texts of every row, in the rows' order, and the counts of all ranks
        every = [None] * world
        dist.all_gather_object(every, ([seen for _, seen in kept], n))  # texts only: each rank has the rows
        kept = [(r, every[g % world][0][g // world]) for g, r in enumerate(rows)]
        n = {k: sum(e[1][k] for e in every) for k in n}
    # for an SFT by the sampling tokenizer (the recipe) the rows render their prompts as sampled; distill's student
    # renders them with its own chat template (as_sampled=False)
    out = [{**(_as_sampled(r, cfg) if as_sampled else r), cfg.completion_column: t} for r, seen in kept for t in seen]
    if stats is not None:
        stats.update(n)
    return out


def _as_sampled(row, cfg) -> dict:
    """row as its prompt was sampled, for an SFT by the sampling tokenizer: sample_rows renders a conversational
    prompt with cfg.chat_template_kwargs alone (no row's tools / chat_template_kwargs column, as TRL's GRPO), and SFT
    renders a row with its tools and chat_template_kwargs columns (TRL's SFTTrainer): so the kept row carries
    exactly cfg's keywords and no tools, and the SFT trains on the prompt its samples were drawn from."""
    if not isinstance(row.get("prompt"), list):
        return row
    out = {k: v for k, v in row.items() if k not in ("tools", "chat_template_kwargs")}
    if cfg.chat_template_kwargs:
        out["chat_template_kwargs"] = dict(cfg.chat_template_kwargs)
    return out


def _trained(trainer, section: str, before: str | None) -> str | None:
    """section when its trainer trained steps in this call (it did not resume its final checkpoint), else before."""
    return section if trainer.step0 < trainer.max_steps else before


def _check_upstream(c: TrainConfig, trained: str | None):
    """A stage resuming its checkpoint (resume_from_checkpoint=latest found one) after an earlier stage, `trained`,
    trained steps in this call (its config changed since, e.g. more max_steps): that checkpoint was trained from
    the model the earlier stage handed on before, and resuming it would keep it silently. An error naming both."""
    if trained is not None and c.resume_from_checkpoint:
        raise ConfigError(f"{c.output_dir} holds this stage's checkpoint, trained from the model stage [{trained}] "
                          f"handed on before; [{trained}] trained steps in this run, so that checkpoint does not "
                          f"derive from its model now: delete {c.output_dir} to train this stage (and the later "
                          "ones) from it")


def recipe(cfg_path=None, overrides=()):
    """Cold-start SFT -> GRPO -> rejection-sampling SFT -> GRPO; returns the accuracy after each stage."""
    base, c1, c2, c3, c4 = stage_configs(cfg_path, overrides, {
        "sft": "1-cold-start-sft", "grpo": "2-reasoning-rl", "rejection": "3-rejection-sft",
        "grpo2": "4-all-scenarios-rl"})
    c1, c2, c3, c4 = map(_resumed, (c1, c2, c3, c4))
    for c, section in ((c1, "sft"), (c2, "grpo"), (c3, "rejection")):  # the stages whose model is handed on
        _check_handoff(c, section)
    for c, section in ((c1, "sft"), (c2, "grpo"), (c3, "rejection"), (c4, "grpo2")):
        with _in_stage(section):  # another run's outputs: an error now, not after the stages before it ran
            check_output_dir(c)
    model, tok = load_model_and_tokenizer(base)
    # the rejection stage's data and SFT rows' floor, before stage 1 runs (the rows' own check: after sampling)
    with _in_stage("rejection"):
        rejection_data = load_datasets(c3)  # (train, eval): sampled from, then the stage's SFT source and eval rows
        rejection_rows = rejection_data[0]
        _check_sft_budget_floor(c3, tok, [_as_sampled(r, c3) for r in rejection_rows])
    results = {}
    # a finished stage's trainer is dropped once its model is handed on (`del t`), before the next stage is built:
    # its engine and optimizer (fp32 master weights, moments) are not held beside the next one's
    with _in_stage("sft"):
        t, results["cold_start_sft"] = run_sft(c1, model, tok)
    trained = _trained(t, "sft", None)  # the last stage before this one that trained steps in this call
    with _in_stage("grpo"):
        model = _handoff(t, c1, c2)
        del t
        _check_upstream(c2, trained)
        t, _, results["reasoning_rl"] = run_grpo(c2, model, tok)
    trained = _trained(t, "grpo", trained)
    model = _handoff(t, c2, c3)
    del t
    with _in_stage("rejection"):
        rows = rejection_sample(c3, model, tok, rejection_rows, num_samples=c3.rejection_num_samples,  # R1: readable
                                keep=c3.rejection_max_per_prompt, language=c3.language)
        results["rejection_kept"] = len(rows)
        if rows:
            _check_upstream(c3, trained)
            t, results["rejection_sft"] = run_sft(c3, model, tok, rows=rows, loaded=rejection_data)
            trained = _trained(t, "rejection", trained)
            model = _handoff(t, c3, c4)
            del t
        else:  # nothing correct to keep: the stage is a no-op (logged), the RL model goes on in grpo2's dtype
            logging.getLogger("r1train").warning("rejection sampling kept no samples; skipping its SFT stage")
            model = _for_stage(model, c4)
    with _in_stage("grpo2"):
        _check_upstream(c4, trained)
        _, _, results["final_rl"] = run_grpo(c4, model, tok)
    _write(base.output_dir, "pipeline_results.json", results)
    return results


def distill(cfg_path=None, overrides=()):
    """SFT of the student (model_name_or_path) on teacher_model's correct, well-formed samples."""
    cfg = load_config(cfg_path, overrides, section="distill")
    warn_unread_keys("distill", cfg)
    if not cfg.teacher_model:
        raise ConfigError("teacher_model: distill needs teacher_model=<checkpoint directory>")
    _check_stage(cfg, "distill")  # before the teacher samples, as the student's trainer would after
    check_output_dir(_resumed(stage_cfg(cfg, "distill")))  # likewise: another run's outputs where the student saves
    train, ev = load_datasets(cfg)  # also its student SFT's rows: stage_cfg and _resumed change no dataset key
    _check_sft_budget_floor(cfg, tokenizer_of(cfg), train)
    teacher, tok = load_model_and_tokenizer(cfg, cfg.teacher_model)  # with its own tokenizer
    rows = rejection_sample(cfg, teacher, tok, train, num_samples=cfg.rejection_num_samples,
                            keep=cfg.rejection_max_per_prompt, language=cfg.language, as_sampled=False)
    del teacher
    if not rows:  # a user error (the CLI's exit 2): the teacher or the sampling keys
        raise ConfigError(f"teacher_model={cfg.teacher_model}: the teacher produced no correct, well-formed samples "
                          "to learn from (raise rejection_num_samples or use a stronger teacher)")
    # the hand-off is text (prompt, completion): the student's own tokenizer and chat template read it, so a
    # student of another family (R1's Qwen and Llama students of DeepSeek-V3) needs no common vocabulary
    student, stok = load_model_and_tokenizer(cfg)
    _, res = run_sft(_resumed(stage_cfg(cfg, "distill")), student, stok, rows=rows,  # latest: fresh if none yet
                     loaded=(train, ev))
    res["distill_rows"] = len(rows)
    _write(cfg.output_dir, "distill_results.json", res)
    return res


def _check_sft_budget_floor(cfg: TrainConfig, tok, prompts):
    """padding_free's max_tokens_per_batch below max_length is held to the SFT rows of sampled completions
    (SFTTrainer.longest_row: distill's student, the recipe's rejection stage), which exist once the model has
    sampled. Before it samples: any prompt's samples may be kept, and the row of a conversational prompt holds the
    prompt as the SFT renders it (tok; the row's tools / chat_template_kwargs columns), whatever the completion, and at
    least one completion token, up to max_length. So the budget must hold that much for every such prompt (a string
    prompt is tokenized with its completion: known only then)."""
    if not cfg.padding_free or cfg.max_tokens_per_batch is None or cfg.max_tokens_per_batch >= cfg.max_length:
        return
    cache = TokenCache(tok)
    floors = [(min(len(cache.prompt(r["prompt"], sft_template_kwargs(tok, r, i, cache))) + 1, cfg.max_length), i)
              for i, r in enumerate(prompts) if isinstance(r["prompt"], list)]
    if floors:
        n, i = max(floors)
        check_token_budget(cfg, n, f"the longest SFT row's tokens (at least prompt {i}'s and one completion token; "
                                   f"max_length={cfg.max_length} holds every row)")


def demo(cfg_path=None, overrides=()):
    """The default demo stage (r1train.demo: cold-start SFT of the tiny model on the built-in task, then GRPO);
    prints its held-out table and returns its results."""
    from . import demo as demo_stages

    return demo_stages.run("default", overrides, config=cfg_path)["default"]


def _write(d, name, obj):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    write_replace(os.path.join(d, name), json.dumps(obj, indent=1))  # a failed write leaves the previous file
