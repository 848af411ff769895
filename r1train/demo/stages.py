"""The demo stages, each a function (overrides, out_dir, ctx) -> results dict. `ctx` carries models between
stages of one `--stage all` run (the language stage's RL model feeds rejection sampling, whose final model is
the distillation teacher); a stage run alone takes its predecessor's saved checkpoint, or runs it first.
"""

from __future__ import annotations

import logging
import os

from .. import pipeline
from ..checkpoint import final_checkpoint
from ..data import prompt_ids
from ..loading import load_model_and_tokenizer
from ..tasks import arith
from . import common as C

log = logging.getLogger("r1train")


def _finish(out_dir: str, name: str, title: str, rows, res: dict, panels: dict, notes=()) -> dict:
    res["table"] = {n: m for n, m in rows}
    res["curves_png"] = C.plot(os.path.join(out_dir, f"{name}_curves.png"), panels)
    res["results_json"] = C.write_json(os.path.join(out_dir, f"{name}_results.json"), res)
    print("\n" + C.table(title, rows, list(notes)))
    return res


def _rl_panels(rl_dir: str, extra: dict | None = None) -> dict:
    m = C.read_metrics(rl_dir)
    panels = {
        "held-out accuracy": {"greedy": C.curve(m, "eval/accuracy_greedy"), "sampled": C.curve(m, "eval/accuracy")},
        "train rewards": {"accuracy": C.curve(m, "rewards/accuracy/mean"), "format": C.curve(m, "rewards/format/mean"),
                          "language": C.curve(m, "rewards/language/mean")},
        "mean response length (tokens)": {"train": C.curve(m, "completions/mean_length")},
    }
    panels.update(extra or {})
    return panels


# ---- (2) cold start -> reasoning RL: the default `r1train demo`
def default(overrides, out_dir, ctx) -> dict:
    """Cold-start SFT on a set whose worked solutions forget the carry in most carry/borrow steps (so greedy
    decoding after SFT makes that slip), then GRPO with the accuracy and format rewards."""
    clock = C.Clock()
    base, c_sft, c_rl = C.configs(ctx.get("config") or "demo.yaml", overrides, out_dir, {"sft": "sft", "grpo": "grpo"})
    train, ev = C.problems(base)
    model, tok = load_model_and_tokenizer(base)
    cold = arith.cold_start_rows(train, base.seed, slip_share=base.task_slip_share)
    t = C.sft(c_sft, model, tok, cold)
    clock.lap("sft")
    eval_rows = arith.rl_rows(ev)
    before = C.evaluate(t.model, tok, eval_rows, c_rl)
    clock.lap("eval")
    t, after = C.grpo(c_rl, t.model, tok, arith.rl_rows(train), eval_rows, before)
    clock.lap("rl")
    res = {"stage": "default", "eval_prompts": len(ev), "eval_temperature": c_rl.eval_temperature,
           "cold_start": {"rows": len(cold), "slip_share": base.task_slip_share,
                          "flawed_rows": sum(r["completion"] != arith.r1_text(arith.chain(*p)[0], r["answer"])
                                             for r, p in zip(cold, train))},
           "after_sft": before, "after_rl": after,
           # the names of the earlier demo_results.json
           "accuracy_before_rl": before["sampled/accuracy"], "accuracy_after_rl": after["sampled/accuracy"],
           "greedy_accuracy_before_rl": before["greedy/accuracy"], "greedy_accuracy_after_rl": after["greedy/accuracy"],
           "sft_seconds": clock.phases["sft"], "phase_seconds": clock.phases, "wall_seconds": clock.total()}
    ctx["default"] = t.model
    gain = 100 * (after["greedy/accuracy"] - before["greedy/accuracy"])
    gain_s = 100 * (after["sampled/accuracy"] - before["sampled/accuracy"])
    notes = [f"held-out ({len(ev)} unseen problems): greedy accuracy {gain:+.1f} points, pass@1 "
             f"(T={c_rl.eval_temperature:g}) {gain_s:+.1f} points after GRPO; wall {res['wall_seconds']:.0f}s "
             f"(SFT {clock.phases['sft']:.0f}s); outputs in {out_dir}/"]
    return _finish(out_dir, "demo", "cold start -> reasoning RL (held-out)",
                   [("cold-start SFT", before), ("+ GRPO", after)], res, _rl_panels(c_rl.output_dir), notes)


# ---- (1) R1-Zero: RL from a base pretrained in the same run on plain problem/answer text
def zero(overrides, out_dir, ctx) -> dict:
    """Pretrain a tiny base on a plain-text corpus of problems and answers (most answer directly; some show
    their working; a few use the <think>/<answer> markup), then GRPO with the accuracy and format rewards
    from the bare question, no chain-of-thought SFT: the format is adopted, accuracy rises and responses
    grow longer as the working that pays off takes over."""
    clock = C.Clock()
    base, c_pre, c_rl = C.configs(ctx.get("zero_config") or "demo_zero.yaml", overrides, out_dir,
                                  {"sft": "pretrain", "grpo": "rl"})
    train, ev = C.problems(base)
    model, tok = load_model_and_tokenizer(base)
    corpus = arith.pretrain_rows(train, base.seed, max_operand=base.task_max_operand)
    t = C.sft(c_pre, model, tok, corpus)
    clock.lap("pretrain")
    eval_rows = arith.rl_rows(ev, chat=False)
    before = C.evaluate(t.model, tok, eval_rows, c_rl)
    clock.lap("eval")
    t, after = C.grpo(c_rl, t.model, tok, arith.rl_rows(train, chat=False), eval_rows, before)
    clock.lap("rl")
    texts = [r["completion"] for r in corpus]
    res = {"stage": "zero", "eval_prompts": len(ev), "eval_temperature": c_rl.eval_temperature,
           "corpus": {"documents": len(corpus), "problems": len(train),
                      "tagged": sum(x.startswith("<think>") for x in texts) / len(texts),
                      "with_working": sum("=" in x for x in texts) / len(texts)},
           "base": before, "after_rl": after, "phase_seconds": clock.phases, "wall_seconds": clock.total()}
    m = C.read_metrics(c_rl.output_dir)
    panels = {"format reward (train)": {"format": C.curve(m, "rewards/format/mean")},
              "accuracy": {"train reward": C.curve(m, "rewards/accuracy/mean"),
                           "held-out greedy": C.curve(m, "eval/accuracy_greedy"),
                           "held-out sampled": C.curve(m, "eval/accuracy")},
              "mean response length (tokens)": {"train": C.curve(m, "completions/mean_length")}}
    notes = [f"base pretrained on {len(corpus)} plain documents ({len(train)} problems, the rest one-step facts; "
             f"{100 * res['corpus']['tagged']:.0f}% use the tags, {100 * res['corpus']['with_working']:.0f}% show "
             f"working); RL from the bare question; "
             f"wall {res['wall_seconds']:.0f}s; outputs in {out_dir}/"]
    return _finish(out_dir, "zero", "R1-Zero: RL from a pretrained base, no SFT (held-out)",
                   [("base", before), ("+ GRPO", after)], res, panels, notes)


def _language_arms(c_rl):
    """(with the language reward, without it): the same RL config but its reward list."""
    import dataclasses

    if "language" not in c_rl.reward_funcs:
        raise ValueError("demo_language.yaml: grpo reward_funcs must include 'language'")
    plain = [r for r in c_rl.reward_funcs if r != "language"]
    weights = None if c_rl.reward_weights is None else [
        w for r, w in zip(c_rl.reward_funcs, c_rl.reward_weights) if r != "language"]
    return c_rl, dataclasses.replace(c_rl, reward_funcs=plain, reward_weights=weights,
                                     output_dir=c_rl.output_dir.replace("rl-language", "rl-no-language"))


# ---- (3) language consistency
def language(overrides, out_dir, ctx) -> dict:
    """Cold-start chains of thought whose step words mix two vocabularies ("plus"/"minus" and 加/减; a line
    in the second one with probability task_mix_share) and forget most carries; then GRPO from the same SFT
    checkpoint twice: accuracy + format, and accuracy + format + language consistency (R1's reward: share
    of chain-of-thought words in the target language)."""
    import copy

    clock = C.Clock()
    base, c_sft, c_rl = C.configs("demo_language.yaml", overrides, out_dir, {"sft": "sft", "grpo": "rl-language"})
    c_lang, c_plain = _language_arms(c_rl)
    train, ev = C.problems(base)
    model, tok = load_model_and_tokenizer(base)
    cold = arith.cold_start_rows(train, base.seed, slip_share=base.task_slip_share, mix_share=base.task_mix_share,
                                 words=True)
    t = C.sft(c_sft, model, tok, cold)
    clock.lap("sft")
    eval_rows, rl_rows = arith.rl_rows(ev), arith.rl_rows(train)
    before = C.evaluate(t.model, tok, eval_rows, c_rl)
    cold_start = t.model
    t_plain, plain = C.grpo(c_plain, copy.deepcopy(cold_start), tok, rl_rows, eval_rows, before)
    clock.lap("rl without the language reward")
    t_lang, lang = C.grpo(c_lang, cold_start, tok, rl_rows, eval_rows, before)
    clock.lap("rl with the language reward")
    ctx["language"] = t_lang.model
    floor = 1 / len(ev)  # a rate measured as 0 counts as one mixed completion, so the ratio stays finite
    res = {"stage": "language", "eval_prompts": len(ev), "eval_temperature": c_rl.eval_temperature,
           "cold_start": {"rows": len(cold), "mix_share": base.task_mix_share, "slip_share": base.task_slip_share,
                          "mixed_rows": sum(C._mixed([r["completion"] for r in cold]))},
           "after_sft": before, "rl_without_language_reward": plain, "rl_with_language_reward": lang,
           "mixing_reduction_greedy": plain["greedy/mixing"] / max(lang["greedy/mixing"], floor),
           "mixing_reduction_sampled": plain["sampled/mixing"] / max(lang["sampled/mixing"], floor),
           "accuracy_cost_greedy": plain["greedy/accuracy"] - lang["greedy/accuracy"],
           "accuracy_cost_sampled": plain["sampled/accuracy"] - lang["sampled/accuracy"],
           "phase_seconds": clock.phases, "wall_seconds": clock.total()}
    m_plain, m_lang = C.read_metrics(c_plain.output_dir), C.read_metrics(c_lang.output_dir)
    panels = {"language reward (train)": {"with": C.curve(m_lang, "rewards/language/mean")},
              "held-out accuracy (sampled)": {"without": C.curve(m_plain, "eval/accuracy"),
                                              "with": C.curve(m_lang, "eval/accuracy")},
              "held-out accuracy (greedy)": {"without": C.curve(m_plain, "eval/accuracy_greedy"),
                                             "with": C.curve(m_lang, "eval/accuracy_greedy")},
              "train accuracy reward": {"without": C.curve(m_plain, "rewards/accuracy/mean"),
                                        "with": C.curve(m_lang, "rewards/accuracy/mean")}}
    notes = [f"mixing rate (sampled, T={c_rl.eval_temperature:g}) {100 * plain['sampled/mixing']:.1f}% without the "
             f"language reward -> {100 * lang['sampled/mixing']:.1f}% with it ({res['mixing_reduction_sampled']:.1f}x "
             f"lower); accuracy cost {100 * res['accuracy_cost_greedy']:+.1f} points greedy, "
             f"{100 * res['accuracy_cost_sampled']:+.1f} sampled; wall {res['wall_seconds']:.0f}s"]
    return _finish(out_dir, "language", "language consistency (held-out)",
                   [("cold-start SFT (mixed)", before), ("+ GRPO without language", plain),
                    ("+ GRPO with language", lang)], res, panels, notes)


def _predecessor(name: str, overrides, ctx, base):
    """The model a stage starts from: in memory (same run), else the predecessor's saved final checkpoint,
    else the predecessor stage is run now. -> (model, tokenizer, source)."""
    from . import out_dir as stage_dir

    sub = {"language": "rl-language", "rejection": "rl"}[name]
    if name in ctx:
        return ctx[name], load_model_and_tokenizer(base)[1], f"{name} stage (this run)"
    ckpt = final_checkpoint(os.path.join(stage_dir(name, overrides), sub))  # not an interrupted run's
    if ckpt is None:
        print(f"[demo] no finished {name} stage checkpoint under {stage_dir(name, overrides)}; running that stage "
              "first")
        globals()[name](overrides, stage_dir(name, overrides), ctx)
        return ctx[name], load_model_and_tokenizer(base)[1], f"{name} stage (run now)"
    model, tok = load_model_and_tokenizer(base, ckpt)
    return model, tok, ckpt


def _sampled_prompts(train, c_rs) -> list[dict]:
    """The training prompts rejection sampling draws from: the first c_rs.task_train_size."""
    return arith.rl_rows(train[:c_rs.task_train_size])


def _start_and_sample(predecessor, overrides, ctx, base, c_rs, c_eval, clock):
    """The predecessor's model, the problems, its held-out metrics, and its rejection samples of the first
    c_rs.task_train_size training prompts (correct, well-formed, in c_rs.language) with their counts."""
    model, tok, source = _predecessor(predecessor, overrides, ctx, base)
    clock.lap("predecessor")
    train, ev = C.problems(base)
    eval_rows = arith.rl_rows(ev)
    start = C.evaluate(model, tok, eval_rows, c_eval)
    stats = {}
    prompts = _sampled_prompts(train, c_rs)
    rows = pipeline.rejection_sample(c_rs, model, tok, prompts, num_samples=c_rs.rejection_num_samples,
                                     keep=c_rs.rejection_max_per_prompt, language=c_rs.language, stats=stats)
    stats["kept_share"] = stats["kept"] / max(stats["samples"], 1)
    stats["prompts"] = len(prompts)
    clock.lap("rejection sampling")
    return model, tok, source, train, ev, eval_rows, start, rows, stats


# ---- (4) rejection sampling -> SFT -> RL at T=0.7
def rejection(overrides, out_dir, ctx) -> dict:
    """From the language stage's RL model: sample rejection_num_samples per training prompt, keep the correct,
    well-formed, single-language ones (at most rejection_max_per_prompt each), SFT on them, then GRPO at
    temperature 0.7."""
    clock = C.Clock()
    base, c_rs, c_rl = C.configs(ctx.get("rejection_config") or "demo_rejection.yaml", overrides, out_dir,
                                 {"rejection": "sft", "grpo2": "rl"})
    model, tok, source, train, ev, eval_rows, before, rows, stats = _start_and_sample(
        "language", overrides, ctx, base, c_rs, c_rl, clock)
    if rows:
        model = C.sft(c_rs, model, tok, rows, _sampled_prompts(train, c_rs)).model
        mid = C.evaluate(model, tok, eval_rows, c_rl)
    else:  # nothing correct to keep (a toy-size run): the SFT step is skipped, the RL model goes on
        log.warning("demo rejection: no sample was kept; skipping the rejection SFT")
        mid = before
    clock.lap("sft")
    t, after = C.grpo(c_rl, model, tok, arith.rl_rows(train), eval_rows, mid)
    clock.lap("rl")
    ctx["rejection"] = t.model
    res = {"stage": "rejection", "start": source, "eval_prompts": len(ev), "eval_temperature": c_rl.eval_temperature,
           "rl_temperature": c_rl.temperature, "rejection_sampling": stats, "start_model": before,
           "after_rejection_sft": mid, "after_rl": after, "phase_seconds": clock.phases, "wall_seconds": clock.total()}
    notes = [f"rejection sampling: {stats['samples']} samples of {stats['prompts']} prompts, {stats['correct']} "
             f"correct and well-formed, {stats['kept']} kept ({100 * stats['kept_share']:.1f}%; "
             f"{stats['prompts_kept']} prompts); RL at T={c_rl.temperature:g}; wall {res['wall_seconds']:.0f}s"]
    return _finish(out_dir, "rejection", "rejection sampling -> SFT -> RL (held-out)",
                   [("start (language RL)", before), ("+ rejection SFT", mid),
                    (f"+ GRPO T={c_rl.temperature:g}", after)], res, _rl_panels(c_rl.output_dir), notes)


def _flops(n_params: int, metrics: list[dict], kind: str, batch: int, prompt_tokens: float) -> float:
    """Training FLOPs from a stage's metrics.jsonl: 6 N per trained token, 2 N per generated/prefilled token.
    SFT rows carry the step's tokens (prompt + completion) in `tokens`; GRPO rows carry completions/mean_length."""
    total = 0.0
    for r in metrics:
        if kind == "sft" and "tokens" in r:
            total += 6 * n_params * r["tokens"]
        elif kind == "grpo" and "completions/mean_length" in r:
            toks = batch * (prompt_tokens + r["completions/mean_length"])
            total += 8 * n_params * toks  # one rollout (2N) + one training forward/backward (6N) per token
    return total


# ---- (5) distillation
def distill(overrides, out_dir, ctx) -> dict:
    """A smaller student three ways, all on the same training prompts: (a) SFT on the flawed, mixed cold-start
    set; (b) the same SFT recipe on the teacher's filtered samples (the rejection stage's final model,
    correct + well-formed + one language); (c) (a) then GRPO with at least (b)'s training FLOPs (teacher
    sampling included)."""
    import copy

    clock = C.Clock()
    base, c_cold, c_dist, c_rl, c_teach = C.configs(
        ctx.get("distill_config") or "demo_distill.yaml", overrides, out_dir,
        {"sft": "student-cold-start-sft", "distill": "student-distill-sft", "grpo": "student-rl",
         "rejection": "teacher-samples"})
    teacher, tok, source, train, ev, eval_rows, teacher_eval, rows, stats = _start_and_sample(
        "rejection", overrides, ctx, base, c_teach, c_rl, clock)
    cold = arith.cold_start_rows(train, base.seed, slip_share=base.task_slip_share, mix_share=base.task_mix_share,
                                 words=True)
    student, stok = load_model_and_tokenizer(base)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    init = copy.deepcopy(student)  # (b) starts from the same initialization as (a)
    t_a = C.sft(c_cold, student, stok, cold)
    a = C.evaluate(t_a.model, stok, eval_rows, c_rl)
    clock.lap("student cold-start sft")
    b = {}
    if rows:
        b = C.evaluate(C.sft(c_dist, init, stok, rows, _sampled_prompts(train, c_teach)).model, stok, eval_rows, c_rl)
    else:  # a toy-size teacher that solves nothing
        log.warning("demo distill: the teacher produced no correct, readable sample; no distilled student")
    clock.lap("student distill sft")
    t_c, c = C.grpo(c_rl, copy.deepcopy(t_a.model), stok, arith.rl_rows(train), eval_rows, a)
    clock.lap("student rl")
    prompt_tokens = sum(len(prompt_ids(stok, r["prompt"])) for r in eval_rows)  # as sampling encodes them
    prompt_tokens /= len(eval_rows)
    flops = {"distill_sft": _flops(n_student, C.read_metrics(c_dist.output_dir), "sft",
                                   c_dist.per_device_train_batch_size, prompt_tokens),
             "teacher_sampling": 2 * n_teacher * stats["samples"] * (prompt_tokens + teacher_eval["sampled/length"]),
             "student_rl": _flops(n_student, C.read_metrics(c_rl.output_dir), "grpo",
                                  c_rl.per_device_train_batch_size, prompt_tokens)}
    flops["rl_over_distill"] = flops["student_rl"] / max(flops["distill_sft"] + flops["teacher_sampling"], 1.0)
    res = {"stage": "distill", "teacher": source, "teacher_params": n_teacher, "student_params": n_student,
           "eval_prompts": len(ev), "eval_temperature": c_rl.eval_temperature, "teacher_samples": stats,
           "teacher_model": teacher_eval, "student_cold_start_sft": a, "student_distilled": b,
           "student_cold_start_sft_plus_rl": c, "flops": flops,
           "distilled_minus_cold_start_greedy": b["greedy/accuracy"] - a["greedy/accuracy"] if b else None,
           "distilled_minus_rl_greedy": b["greedy/accuracy"] - c["greedy/accuracy"] if b else None,
           "phase_seconds": clock.phases, "wall_seconds": clock.total()}
    notes = [f"student {n_student / 1e6:.2f}M params, teacher {n_teacher / 1e6:.2f}M; distilled on {stats['kept']} "
             f"teacher samples ({100 * stats['kept_share']:.1f}% of {stats['samples']} kept); student RL used "
             f"{flops['rl_over_distill']:.2f}x the distillation's FLOPs (teacher sampling included); "
             f"wall {res['wall_seconds']:.0f}s"]
    m = C.read_metrics(c_rl.output_dir)
    panels = {"student RL: held-out accuracy": {"greedy": C.curve(m, "eval/accuracy_greedy"),
                                                "sampled": C.curve(m, "eval/accuracy")},
              "student RL: train accuracy reward": {"accuracy": C.curve(m, "rewards/accuracy/mean")}}
    return _finish(out_dir, "distill", "distillation into a smaller student (held-out)",
                   [("teacher", teacher_eval), ("student: cold-start SFT", a), ("student: distilled", b),
                    ("student: cold-start SFT + RL", c)], res, panels, notes)
