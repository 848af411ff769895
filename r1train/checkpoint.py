"""Checkpoints, the run's output directory, and stopping on SIGINT / SIGTERM.

output_dir/checkpoint-<step>/ = save_pretrained files (model, tokenizer) + ds/ (DeepSpeed model/optimizer/
scheduler states) + ref_model.pt (when beta > 0) + rng_state_<rank>.pth + trainer_state.json (step, config)
+ manifest.json, written last: every file's size, and the sha256 of files up to 64 MiB. A checkpoint is
written to tmp-checkpoint-<step>/ and renamed when complete; on resume it must match its manifest, or
`resume_from_checkpoint=latest` skips it (with a warning) for the newest complete one, and a named one is an
error. A resume must also keep the settings that define the run (RUN_KEYS, the ZeRO stage and DeepSpeed's
mixed precision) and the rows it trains from (their sha256: trainer_state.json's train_rows_sha256).

output_dir is locked by its run (flock on output_dir/.r1train.lock, released when the process ends, even by
kill -9), and a fresh run refuses a directory that holds another run's checkpoints or metrics unless
overwrite_output_dir=true (which deletes them first).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import uuid

import torch
import torch.distributed as dist

from .config import ConfigError, deepspeed_file, ds_bf16_enabled, read_deepspeed_config
from .durable import posix_fsync, write_replace
from .reward_model import is_model_object

log = logging.getLogger("r1train")

MANIFEST = "manifest.json"
HASH_MAX_BYTES = 64 << 20  # larger files (weights, optimizer states of big models) are checked by size only
LOCK = ".r1train.lock"
# config keys that define the run: a resume must keep them (max_steps, save/log/eval cadence, output_dir,
# kernel_backend, loss_impl, padding_free (but see PACKING_RUN_KEYS), reward_timeout ... may change: they do not
# change what is trained).
# task_eval_size too: its held-out problems are left out of the training rows; answer_column, completion_column,
# completion_only_loss: they define the objective, as the loss's keys (every option the loss is called with),
# the advantages', the rollouts' sampling, the rewards' and the reference's. The optimizer's hyperparameters are
# here because loading its state restores the checkpoint's (a new value would be silently ignored), entropy_coef
# too (the trainer state restores it); the schedule's because the restored scheduler runs the new config's
# lr_lambda from the checkpoint's step (its horizon, max_steps, is checked in load); the LoRA keys because they
# shape the saved state (another shape cannot load). Not zero_stage: a `deepspeed` file overrides it, and the stage
# the run uses is compared (zero_stage_of). A key a checkpoint's config lacks is not compared
RUN_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "model_hidden_size", "model_num_layers", "dataset_name",
            "dataset_split", "task_min_terms", "task_max_terms", "task_max_operand", "task_ops", "task_train_size",
            "task_eval_size", "task_flaw_share", "answer_column", "completion_column", "completion_only_loss",
            "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
            "num_generations", "max_prompt_length", "chat_template_kwargs", "max_completion_length", "max_length",
            "loss_type", "beta",
            "num_iterations", "reward_funcs", "reward_weights", "scale_rewards", "temperature",
            "importance_sampling_level", "bf16", "optim", "learning_rate", "weight_decay",
            "adam_beta1", "adam_beta2", "adam_epsilon", "use_peft", "lora_r", "lora_alpha", "lora_target_modules",
            "lora_modules_to_save", "lora_dropout", "use_rslora",
            # the schedule and the update
            "lr_scheduler_type", "warmup_ratio", "max_grad_norm",
            # the loss (GRPOTrainer._loss_kw) and adaptive entropy control
            "epsilon", "epsilon_high", "delta", "kl_estimator", "mask_truncated_completions",
            "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
            "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "off_policy_mask_threshold",
            "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
            "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile", "entropy_coef",
            "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target",
            # the batches, their rewards and advantages, the reference, MoE routing
            "top_p", "top_k", "min_p", "dynamic_sampling", "max_dynamic_sampling_rounds", "overlong_buffer_len",
            "language", "multi_objective_aggregation", "sync_ref_model", "ref_model_sync_steps",
            "ref_model_mixup_alpha", "moe_bias_update_rate", "moe_router_replay",
            # the rows of the recipe's rejection-sampling SFT stage and of distill, sampled again when they resume
            "rejection_num_samples", "rejection_max_per_prompt", "teacher_model")
# RUN_KEYS that only GRPO's training reads (its group size, loss, rewards, advantages, reference and routing
# replay): an SFT run's training never does, so a change of one does not block resuming an SFT run -- e.g. a
# recipe whose GRPO section changed while its SFT stage was interrupted. The sampling keys (temperature, top_p,
# top_k, min_p, max_completion_length, chat_template_kwargs, language) are not here: the recipe's rejection-sampling
# SFT stage and distill sample their training rows again when they resume
GRPO_ONLY_RUN_KEYS = frozenset((
    "num_generations", "loss_type", "beta", "num_iterations",
    "reward_funcs", "reward_weights", "scale_rewards", "importance_sampling_level", "epsilon",
    "epsilon_high", "delta", "kl_estimator", "mask_truncated_completions", "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "off_policy_mask_threshold", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile", "entropy_coef",
    "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target",
    "dynamic_sampling", "max_dynamic_sampling_rounds", "overlong_buffer_len", "multi_objective_aggregation",
    "sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha", "moe_router_replay"))
assert GRPO_ONLY_RUN_KEYS <= set(RUN_KEYS)
# With top_entropy_quantile < 1 the entropy threshold is taken over each micro-batch's tokens, and these keys make
# the micro-batches (packs of a token budget): a change trains other tokens (a helper's audit: the loss 3e-3 off the
# uninterrupted run's at the first resumed step, 5e-2 two steps later). With quantile 1 they may change
PACKING_RUN_KEYS = ("padding_free", "max_tokens_per_batch")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: missing, incomplete, damaged, or of another run."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM: `checkpoint` is the checkpoint saved at `step` (None when stopped before a step)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        msg = f"stopped by {name}"
        if checkpoint:
            msg += f" after step {step}; saved {checkpoint} (continue with resume_from_checkpoint=latest)"
        super().__init__(msg)


def zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


class CheckpointMixin:
    """Mixed into engine.Trainer (uses self.engine, self.ref, self.model, self.tok, self.cfg, self.rank, and on
    rank 0 self.rows_sha256: the fingerprint of the rows the run trains from)."""

    # ---- a trainer's own state beyond model, optimizer and RNG (JSON values; the same on every rank)
    def trainer_state(self) -> dict:
        return {}

    def load_trainer_state(self, state: dict):
        pass

    @torch.no_grad()
    def ref_state_dict(self) -> dict:
        """The reference model's full state (its own engine has no optimizer, so no DS checkpoint)."""
        import deepspeed

        out = {}
        for name, p in self.ref.module.named_parameters():
            ctx = deepspeed.zero.GatheredParameters([p]) if zero3(self.engine) else contextlib.nullcontext()
            with ctx:
                out[name] = p.data.detach().cpu().clone()
        out.update({n: b.detach().cpu().clone() for n, b in self.ref.module.named_buffers()})
        return out

    @torch.no_grad()
    def load_ref_state_dict(self, sd: dict):
        import deepspeed

        for name, p in self.ref.module.named_parameters():
            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3(self.engine) else None
            with ctx or contextlib.nullcontext():
                if ctx is None or self.rank == 0:
                    p.data.copy_(sd[name].to(p.dtype))
        for name, b in self.ref.module.named_buffers():
            if name in sd:
                b.data.copy_(sd[name])

    # ---- checkpoints: checkpoint-<step>/ = save_pretrained files + ds/ (optimizer etc.) + rng + state
    def checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.cfg.output_dir, f"checkpoint-{step}")

    def save(self, step: int) -> str:
        """Write checkpoint-<step>/ (through tmp-checkpoint-<step>/, renamed when complete) and return its
        path. A failed write (a full disk, a read-only directory) is a CheckpointError naming the step; no
        partial checkpoint is published and the earlier ones stay."""
        try:
            return self._save(step)
        except Exception as e:  # a failed write: OSError, RuntimeError (torch.save), SafetensorError
            if self.rank == 0:
                shutil.rmtree(os.path.join(self.cfg.output_dir, f"tmp-checkpoint-{step}"), ignore_errors=True)
            raise CheckpointError(f"saving checkpoint-{step} in output_dir {self.cfg.output_dir} failed: {e}") from e

    def _save(self, step: int):
        cfg = self.cfg
        final = self.checkpoint_dir(step)
        tmp = os.path.join(cfg.output_dir, f"tmp-checkpoint-{step}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        self.engine.save_checkpoint(tmp, tag="ds")
        ref_sd = self.ref_state_dict() if self.ref is not None else None
        sd = self.engine._zero3_consolidated_16bit_state_dict() if zero3(self.engine) else None
        torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   os.path.join(tmp, f"rng_state_{self.rank}.pth"))
        if self.rank == 0:
            if sd is not None:
                sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
            self.model.save_pretrained(tmp, state_dict=sd)
            if ref_sd is not None:
                torch.save(ref_sd, os.path.join(tmp, "ref_model.pt"))
            if hasattr(self.tok, "save_pretrained"):
                self.tok.save_pretrained(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
                json.dump({"global_step": step, "max_steps": self.max_steps, "trainer": type(self).__name__,
                           "world_size": self.world, "zero_stage": self.engine.zero_optimization_stage(),
                           "ds_precision": self.ds_precision,
                           "trainer_state": self.trainer_state(), "config": config_values(cfg),
                           "train_rows_sha256": self.rows_sha256,
                           "sft_whole_prompts": True},  # SFT keeps whole prompts (check_resume_state)
                          fh, indent=1)
        dist.barrier()
        if self.rank == 0:  # atomic publish: a crash before this leaves only tmp-checkpoint-<step>
            self.logger.sync()  # the run's rows up to this step on disk before the checkpoint that keeps them
            write_manifest(tmp)  # last: lists every rank's files, each on disk (fsync) before it
            # a step saved before (a resumed run saves it again) is renamed aside, deleted once the new copy is
            # published: a crash leaves one complete checkpoint-<step> (tmp-* are deleted at the next start)
            old = os.path.join(cfg.output_dir, f"tmp-checkpoint-{step}-replaced")
            if os.path.lexists(final):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            posix_fsync(cfg.output_dir)  # the renames are on disk before any older checkpoint is deleted
            shutil.rmtree(old, ignore_errors=True)
            self._prune(step)
        dist.barrier()
        self.saved_step = step
        return final

    def _prune(self, step: int):
        """save_total_limit: keep the newest `limit` checkpoints up to `step` (the one just saved). Newer ones
        are left alone: they predate a resume from an older step (one that `latest` skipped as damaged, or
        a resume from a named checkpoint), and counting them would delete this run's own checkpoints."""
        limit = self.cfg.save_total_limit
        if not limit:
            return
        left = _abandoned(self.cfg.output_dir)  # a left-behind checkpoint is not this run's: not counted
        done = [d for d in list_checkpoints(self.cfg.output_dir)
                if _step_of(d) <= step and os.path.exists(os.path.join(d, MANIFEST))
                and _manifest_sha(d) not in left.get(os.path.basename(d), ())]
        for d in sorted(done, key=_step_of)[:-limit]:
            shutil.rmtree(d, ignore_errors=True)

    def check_resume_state(self, path: str, state: dict):
        """A trainer's own check of the checkpoint it resumes from (rank 0, before any work; state: its
        trainer_state.json): CheckpointError where resuming would train differently from the run that wrote it.
        None here."""

    # ---- before any work: the output directory and the checkpoint to resume from (rank 0 decides)
    def prepare_run(self) -> str | None:
        """Lock output_dir, refuse (or clear) another run's outputs, and pick and check the checkpoint to
        resume from; every rank gets rank 0's verdict. Returns the checkpoint path (None: a fresh run)."""
        res = None
        if self.rank == 0:
            try:
                # read once, as the engine is built from it (a save must not depend on the file staying there)
                self.ds_precision = ds_precision_of(self.cfg)
                prepare_output_dir(self.cfg)
                if self.cfg.resume_from_checkpoint:
                    path = resolve_checkpoint(self.cfg.resume_from_checkpoint, self.cfg.output_dir)
                    state = check_resume_config(path, self.cfg, type(self).__name__, self.world)
                    check_train_rows(path, state, self.cfg, self.rows_sha256)
                    self.check_resume_state(path, state)
                    res = ("ok", path)
            except ConfigError as e:
                res = ("error", type(e).__name__, str(e))
        if self.world > 1:
            box = [res]
            dist.broadcast_object_list(box, src=0)
            res = box[0]
        if res and res[0] == "error":
            raise (CheckpointError if res[1] == "CheckpointError" else ConfigError)(res[2])
        return res[1] if res else None

    def load(self, path: str) -> int:
        """Restore a checkpoint that prepare_run picked and checked."""
        state = read_trainer_state(path)
        if state["global_step"] > self.max_steps:  # no step to train; finish() would save it as another step
            raise CheckpointError(f"resume_from_checkpoint={self.cfg.resume_from_checkpoint}: {path} is at step "
                                  f"{state['global_step']}, past this run's max_steps ({self.max_steps}): raise "
                                  "max_steps (or num_train_epochs), or resume from an earlier checkpoint")
        if schedule_has_horizon(self.cfg) and state.get("max_steps", self.max_steps) != self.max_steps:
            raise CheckpointError(f"resume_from_checkpoint={self.cfg.resume_from_checkpoint}: {path} was written by "
                                  f"a run of other settings: max_steps (the checkpoint's run has "
                                  f"{state['max_steps']} steps, this one {self.max_steps}); lr_scheduler_type="
                                  f"{self.cfg.lr_scheduler_type} with warmup_ratio={self.cfg.warmup_ratio} sets each "
                                  "step's rate from the number of steps. Resume with the checkpoint's max_steps (or "
                                  "num_train_epochs), or start a fresh run")
        # without its states DeepSpeed fails an assert deep inside, or (other versions, stages) only warns that it
        # found nothing and the run goes on from the base weights
        ds = os.path.join(path, "ds")
        if not os.path.isdir(ds) or self.engine.load_checkpoint(path, tag="ds")[0] is None:
            raise CheckpointError(f"resume_from_checkpoint={self.cfg.resume_from_checkpoint}: DeepSpeed loaded "
                                  f"nothing from {ds}: the checkpoint's model and optimizer states are missing")
        if self.ref is not None:
            self.load_ref_state_dict(torch.load(os.path.join(path, "ref_model.pt"), weights_only=True))
        rng = torch.load(os.path.join(path, f"rng_state_{self.rank}.pth"), weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.load_trainer_state(state.get("trainer_state", {}))
        self._record_rewind(path)
        return state["global_step"]

    def _record_rewind(self, path: str):
        """record_rewind once the resume is certain (loaded: a refused one records nothing), when the run's
        metrics are cut to its step; rank 0 writes, every rank gets its verdict (no rank left waiting)."""
        err = None
        if self.rank == 0:
            try:
                record_rewind(path, self.cfg.output_dir)
            except (OSError, ConfigError) as e:
                err = f"{type(e).__name__}: {e}"
        if self.world > 1:
            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        if err:
            raise CheckpointError(f"resume_from_checkpoint={self.cfg.resume_from_checkpoint}: could not record the "
                                  f"checkpoints this rewind leaves behind in {ABANDONED}: {err}")


def list_checkpoints(output_dir: str) -> list[str]:
    """Every checkpoint-<step>/ directory, complete or not."""
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, d) for d in os.listdir(output_dir)
            if d.startswith("checkpoint-") and d[11:].isdigit() and os.path.isdir(os.path.join(output_dir, d))]


def _step_of(path: str) -> int:
    return int(os.path.basename(path)[11:])


# ---- manifest: a checkpoint is complete when its files match manifest.json (written last)
def _sha256_of(fh) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return _sha256_of(fh)


def write_manifest(path: str):
    """path/manifest.json: every file under path with its size (and sha256 up to HASH_MAX_BYTES). Each file
    (whichever process wrote it) and each directory is on disk (fsync) before the manifest is written, and the
    manifest before this returns: a manifest that survives a crash or power loss lists files that survived it."""
    files = {}
    for root, _, names in os.walk(path):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, path)
            if rel == MANIFEST:
                continue
            with open(p, "rb") as fh:  # one open per file: its size, its hash, its fsync
                e = {"size": os.fstat(fh.fileno()).st_size}
                if e["size"] <= HASH_MAX_BYTES:
                    e["sha256"] = _sha256_of(fh)
                posix_fsync(fh.fileno())
            files[rel] = e
        posix_fsync(root)
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        # save_id: this save's own (files past HASH_MAX_BYTES are listed by size only, so two saves of one step
        # by two runs of the same settings could list the same: ABANDONED names saves by the manifest's hash)
        json.dump({"format": 1, "save_id": uuid.uuid4().hex, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))
    posix_fsync(path)


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint (None: it is)."""
    if not os.path.isdir(path):
        return "no such directory"
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            files = json.load(fh)["files"]
        items = [(rel, int(e["size"]), e.get("sha256")) for rel, e in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save did not finish (or an r1train without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if "trainer_state.json" not in files:
        return f"{MANIFEST} lists no trainer_state.json"
    for rel, size, sha in sorted(items):
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != size:
            return f"{rel} has {os.path.getsize(p)} bytes, its manifest says {size}"
        if sha is not None and _sha256(p) != sha:
            return f"{rel} does not match its sha256 in {MANIFEST}"
    return None


def resolve_checkpoint(spec: str, output_dir: str) -> str:
    """resume_from_checkpoint -> a complete checkpoint directory. `latest`: the newest complete
    checkpoint-<step> in output_dir (damaged or unfinished newer ones are skipped with a warning); `true` too
    (HF Trainer's resume_from_checkpoint=True), unless a directory has that name."""
    given = spec  # the error names the value the user set (true, True, ...)
    if resumes_latest(spec):
        spec = "latest"
    if spec != "latest":
        problem = checkpoint_problem(spec)
        if problem:
            raise CheckpointError(f"resume_from_checkpoint={spec}: not a complete checkpoint: {problem}"
                                  " (resume_from_checkpoint=latest picks the newest complete one)")
        return spec
    found = sorted(list_checkpoints(output_dir), key=_step_of, reverse=True)
    if not found:
        raise CheckpointError(f"resume_from_checkpoint={given}: no checkpoint-<step> in {output_dir}")
    skipped, left = [], _abandoned(output_dir)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None and _manifest_sha(path) in left.get(os.path.basename(path), ()):
            problem = f"a run resumed from an earlier checkpoint left it behind (listed in {ABANDONED})"
        if problem is None:
            return path
        log.warning("resume_from_checkpoint=latest: skipping %s, which is incomplete or damaged: %s",
                    path, problem)
        skipped.append(f"{os.path.basename(path)}: {problem}")
    raise CheckpointError(f"resume_from_checkpoint={given}: no complete checkpoint in {output_dir} ("
                          + "; ".join(skipped) + ")")


def read_trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json (global_step, max_steps, the run's config, ...)."""
    with open(os.path.join(path, "trainer_state.json")) as fh:
        return json.load(fh)


def final_checkpoint(output_dir: str) -> str | None:
    """The final checkpoint of a finished run in output_dir: the newest complete one, not left behind by a resume,
    whose global_step is its run's max_steps; None when there is none (no checkpoint, or the newest complete one
    is an interrupted run's)."""
    left = _abandoned(output_dir)
    for path in sorted(list_checkpoints(output_dir), key=_step_of, reverse=True):
        if checkpoint_problem(path) or _manifest_sha(path) in left.get(os.path.basename(path), ()):
            continue
        state = read_trainer_state(path)
        return path if state.get("global_step") == state.get("max_steps") else None
    return None


# output_dir's record of the checkpoints a resume from an earlier one left behind: {name: [manifest sha256, ...]}
ABANDONED = "abandoned_checkpoints.json"


def _manifest_sha(path: str) -> str | None:
    """The sha256 of a checkpoint's manifest (which lists every file's sha256: one save's identity), or None."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _abandoned(output_dir: str) -> dict:
    """ABANDONED's {checkpoint name: [manifest sha256, ...]} ({} when there is none)."""
    path = os.path.join(output_dir, ABANDONED)
    try:
        with open(path) as fh:
            left = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        left = e
    if not (isinstance(left, dict) and all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                           for v in left.values())):
        raise CheckpointError(f"output_dir: {path} is unreadable or not a {{checkpoint: [manifest sha256, ...]}} "
                              f"object ({left if isinstance(left, Exception) else type(left).__name__}); it lists "
                              "the checkpoints resume_from_checkpoint=latest must not continue from")
    return left


def record_rewind(path: str, output_dir: str):
    """A resume from `path`, a checkpoint of output_dir older than others there (a rewind): those newer ones
    belong to the run it leaves, and resume_from_checkpoint=latest, after this run saves an earlier step and is
    killed, would continue that run's instead (its metrics cut at this step). Each is listed in ABANDONED by its
    manifest's sha256, which `latest` skips; a save of the same step by this run (another manifest) is not."""
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != os.path.realpath(output_dir):
        return
    newer = [d for d in list_checkpoints(output_dir) if _step_of(d) > _step_of(path)]
    left = _abandoned(output_dir)
    added = False
    for d in newer:
        sha = _manifest_sha(d)
        name = os.path.basename(d)
        if sha is not None and sha not in left.get(name, []):
            left.setdefault(name, []).append(sha)
            added = True
    if not added:
        return
    log.warning("resume_from_checkpoint=%s: %s, newer, belong to the run this one leaves; "
                "resume_from_checkpoint=latest will not continue from them", path,
                ", ".join(sorted(os.path.basename(d) for d in newer)))
    write_replace(os.path.join(output_dir, ABANDONED), json.dumps(left, indent=1, sort_keys=True))


def resumes_latest(spec) -> bool:
    """resume_from_checkpoint names the newest checkpoint: `latest`, or `true` (HF Trainer's True) unless a
    directory has that name (load_config reads true as latest; a config changed in code may still hold it)."""
    return spec == "latest" or (isinstance(spec, str) and spec.lower() == "true" and not os.path.isdir(spec))


def check_resume_config(path: str, cfg, trainer: str, world: int) -> dict:
    """The checkpoint's run and this one must agree on RUN_KEYS (an SFTTrainer's: less GRPO_ONLY_RUN_KEYS), the
    trainer and the number of processes. Returns the checkpoint's trainer_state.json."""
    state = read_trainer_state(path)
    saved = state.get("config", {})
    now = config_values(cfg)
    keys = [k for k in RUN_KEYS if trainer != "SFTTrainer" or k not in GRPO_ONLY_RUN_KEYS]
    quantile = min(saved.get("top_entropy_quantile", 1.0), now.get("top_entropy_quantile", 1.0))
    if trainer != "SFTTrainer" and quantile < 1:
        keys += PACKING_RUN_KEYS
    diff = [f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in keys if k in saved and saved[k] != now[k]]
    if state.get("trainer", trainer) != trainer:
        diff.append(f"trainer (checkpoint {state['trainer']}, now {trainer})")
    if state.get("world_size", world) != world:
        diff.append(f"number of processes (checkpoint {state['world_size']}, now {world})")
    stage = zero_stage_of(cfg)  # DeepSpeed cannot load one stage's optimizer states into another's
    if state.get("zero_stage", stage) != stage:
        diff.append(f"ZeRO stage, zero_stage or the deepspeed file's (checkpoint {state['zero_stage']}, now {stage})")
    precision = ds_precision_of(cfg)  # the dtype of the saved master weights and optimizer states
    if state.get("ds_precision", precision) != precision:
        diff.append(f"DeepSpeed mixed precision, the deepspeed file's bf16 section (checkpoint "
                    f"{state['ds_precision']}, now {precision})")
    if diff:
        raise CheckpointError(f"resume_from_checkpoint={cfg.resume_from_checkpoint}: {path} was written by a run "
                              f"with other settings: {', '.join(diff)}. Resume with the checkpoint's values, or "
                              "start a fresh run (another output_dir, or overwrite_output_dir=true)")
    return state


def config_values(cfg) -> dict:
    """The config as trainer_state.json keeps it and a resume compares it: its values in canonical form
    (_canonical), one form per value in every process (a reward function in reward_funcs by its qualified name,
    not its repr's address)."""
    return json.loads(json.dumps(_canonical(vars(cfg))))


def _canonical(v):
    """v as JSON values, one form per value in every process: dict keys as strings (a non-string key tagged by
    its type), sets sorted (their order follows PYTHONHASHSEED), numpy arrays and scalars and torch tensors as
    (nested) lists of numbers in full (a repr elides the middle of a large one), bytes as hex; anything else by
    its repr without addresses (_repr: a function by its qualified name)."""
    if isinstance(v, dict):
        d = {k if isinstance(k, str) else f"{type(k).__name__}:{_repr(k)}": _canonical(x) for k, x in v.items()}
        if len(d) < len(v):  # keys alike in canonical form (objects of one type): every pair, sorted, kept
            return sorted(([_canonical(k), _canonical(x)] for k, x in v.items()), key=_json_order)
        return d
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((_canonical(x) for x in v), key=_json_order)
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if callable(getattr(v, "tolist", None)):
        return _canonical(v.tolist())
    return _repr(v)


def _json_order(v) -> str:
    """A sort key of canonical values that is the same in every process: their JSON with sorted keys."""
    return json.dumps(v, sort_keys=True)


def _repr(v) -> str:
    """repr(v) without addresses (which differ between processes): a transformers model object (a reward model)
    by its class and _name_or_path; where the repr holds an address, a callable by its qualified name
    (_callable_name), another object by its type."""
    if is_model_object(v):  # its repr is the module tree: alike for every model of one architecture
        return f"{type(v).__qualname__}({v.config._name_or_path!r})"
    r = repr(v)
    if " at 0x" not in r:
        return r
    return _callable_name(v) if callable(v) else type(v).__qualname__


def _callable_name(v) -> str:
    """A callable by name: a function, method or class by its module and qualified name, a functools.partial by
    its function and arguments, another callable object by its class's."""
    if isinstance(v, functools.partial):
        args = ", ".join([*map(_repr, v.args), *(f"{k}={_repr(x)}" for k, x in v.keywords.items())])
        return f"functools.partial({_callable_name(v.func)}{', ' if args else ''}{args})"
    named = v if hasattr(v, "__qualname__") else type(v)
    return f"{getattr(named, '__module__', None)}.{named.__qualname__}"


def rows_sha256(rows) -> str:
    """The fingerprint of a run's training rows: sha256 over each row's canonical JSON (_canonical, sorted keys)
    on a line, in the rows' order: defined for rows of JSON values, sets, arrays, tensors, bytes and other
    objects, with keys of any type."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(_canonical(row), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_train_rows(path: str, state: dict, cfg, sha: str):
    """The checkpoint's run and this one train on the same rows (their rows_sha256 in trainer_state.json): a
    dataset edited or regenerated under the same name would silently resume on other rows. A checkpoint written
    before the rows were recorded resumes unchecked (a warning)."""
    saved = state.get("train_rows_sha256")
    if saved is None:
        log.warning("resume_from_checkpoint=%s: %s records no fingerprint of its training rows; not checked that "
                    "this run trains on the same rows", cfg.resume_from_checkpoint, path)
    elif saved != sha:
        raise CheckpointError(f"resume_from_checkpoint={cfg.resume_from_checkpoint}: {path} was written by a run on "
                              f"other training rows: the rows of dataset_name={cfg.dataset_name!r} (or the rows "
                              f"given in code) differ from the checkpoint's (sha256 {saved[:12]} in the checkpoint, "
                              f"{sha[:12]} now): the data changed since. Resume on the checkpoint's rows, or start "
                              "a fresh run (another output_dir, or overwrite_output_dir=true)")


def schedule_has_horizon(cfg) -> bool:
    """Whether the learning rate at an optimizer step depends on the run's number of steps (engine.lr_lambda):
    a decay's end, or a warmup of ceil(warmup_ratio * total) steps."""
    return cfg.lr_scheduler_type in ("linear", "cosine") or cfg.warmup_ratio > 0


def zero_stage_of(cfg) -> int:
    """The ZeRO stage a run uses, read as engine.ds_config reads it: from the `deepspeed` file, which overrides
    zero_stage, else from r1train's ds_zero<zero_stage>.json (which holds stage zero_stage)."""
    return read_deepspeed_config(deepspeed_file(cfg)).get("zero_optimization", {}).get("stage", 0)


def ds_precision_of(cfg) -> dict:
    """DeepSpeed's mixed precision of a run, as engine.ds_config resolves it from the `deepspeed` file (else
    r1train's ds_zero<N>.json): bf16 (DeepSpeed's bf16 on: fp32 master weights and optimizer states, unless the
    file keeps them in bf16; "auto" is the bf16 key) and its two bf16_* options (False with bf16 off). A
    checkpoint's optimizer state has this layout and dtype: another one fails to load (deep in DeepSpeed) or
    loads into other dtypes, so a resume keeps it (check_resume_config)."""
    c = read_deepspeed_config(deepspeed_file(cfg))
    bf16, on = c.get("bf16", {}), bool(ds_bf16_enabled(cfg, c))
    return {"bf16": on, **{k: on and bool(bf16.get(k, False))
                           for k in ("bf16_master_weights_and_grads", "bf16_optimizer_states")}}


# ---- the output directory: one run at a time; a fresh run does not mix with another run's outputs
_LOCKS: dict[str, object] = {}  # realpath -> open lock file held by this process


def lock_output_dir(output_dir: str):
    """flock output_dir/.r1train.lock for this process (re-entrant within it; the kernel drops the lock when
    the process ends, however it ends)."""
    key = os.path.realpath(output_dir)
    if key in _LOCKS:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        fh = open(os.path.join(output_dir, LOCK), "a+")
    except OSError as e:
        raise ConfigError(f"output_dir: cannot use {output_dir!r}: {e}") from e
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        _LOCKS[key] = fh
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "unknown"
        fh.close()
        raise ConfigError(f"output_dir {output_dir} is in use by another run ({owner}); wait for it to end or "
                          "choose another output_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    _LOCKS[key] = fh


def unlock_output_dir(output_dir: str):
    fh = _LOCKS.pop(os.path.realpath(output_dir), None)
    if fh is not None:
        fh.close()  # closing the file releases the flock


# besides checkpoint-* / tmp-checkpoint-*
RUN_OUTPUTS = ("metrics.jsonl", "completions.jsonl", "curves.png", "runs", ABANDONED)


def recover_replaced(output_dir: str):
    """A save of a step that has a checkpoint renames the old copy to tmp-checkpoint-<step>-replaced, then the new
    one, complete, from tmp-checkpoint-<step> to checkpoint-<step> (CheckpointMixin._save): a kill between the two
    renames leaves no checkpoint-<step>, and the start's cleanup of tmp-* would delete both copies. Publish the
    new copy where it is complete (the resumed run's, which metrics.jsonl follows), else the old one."""
    for n in os.listdir(output_dir):
        step = n[len("tmp-checkpoint-"):-len("-replaced")]
        if not (n.startswith("tmp-checkpoint-") and n.endswith("-replaced") and step.isdigit()):
            continue
        final = os.path.join(output_dir, f"checkpoint-{step}")
        if os.path.lexists(final):  # killed after publishing: the old copy is deleted with the other tmp-*
            continue
        for src in (os.path.join(output_dir, f"tmp-checkpoint-{step}"), os.path.join(output_dir, n)):
            if checkpoint_problem(src) is None:
                log.warning("output_dir: a save of checkpoint-%s was killed while replacing it; restoring it from %s",
                            step, src)
                os.replace(src, final)
                posix_fsync(output_dir)  # on disk before the start's cleanup deletes the other copy
                break


def resumes_elsewhere(cfg) -> bool:
    """resume_from_checkpoint names a checkpoint directory outside output_dir (not `latest`): output_dir's own
    outputs, if any, are another run's."""
    spec = cfg.resume_from_checkpoint
    if not spec or resumes_latest(spec):
        return False
    parent = os.path.dirname(os.path.abspath(os.path.normpath(spec)))
    return os.path.realpath(parent) != os.path.realpath(cfg.output_dir)


def check_output_dir(cfg) -> tuple[list[str], list[str]]:
    """prepare_output_dir's refusal without its lock or any deletion (a caller checks before costly work, e.g.
    distill before its teacher samples): a fresh run, or one resuming from a checkpoint of another directory,
    refuses an output_dir holding another run's checkpoints or metrics unless overwrite_output_dir=true. ->
    (checkpoint names, non-empty logs) such a run would delete; ([], []) when there are none or it resumes there."""
    d = cfg.output_dir
    elsewhere = resumes_elsewhere(cfg)
    if not os.path.isdir(d) or (cfg.resume_from_checkpoint and not elsewhere):
        return [], []
    ckpts = [n for n in os.listdir(d) if n.startswith("checkpoint-")]
    logs = [n for n in ("metrics.jsonl", "completions.jsonl")
            if os.path.isfile(os.path.join(d, n)) and os.path.getsize(os.path.join(d, n))]
    if (ckpts or logs) and not cfg.overwrite_output_dir:
        shown = sorted(ckpts, key=lambda n: (len(n), n))[-3:] + logs
        if elsewhere:
            raise ConfigError(f"output_dir {d} holds a run's outputs ({', '.join(shown)}), and "
                              f"resume_from_checkpoint={cfg.resume_from_checkpoint} is a checkpoint of another "
                              "directory: resuming from it here would cut those metrics to its step and save over "
                              "those checkpoints. To continue the run in output_dir (e.g. a retried job that first "
                              "resumed from that checkpoint) use resume_from_checkpoint=latest; else choose another "
                              "output_dir, or pass overwrite_output_dir=true to delete them")
        raise ConfigError(f"output_dir {d} holds another run's outputs ({', '.join(shown)}): resume it with "
                          "resume_from_checkpoint=latest, choose another output_dir, or pass "
                          "overwrite_output_dir=true to delete them")
    return ckpts, logs


def prepare_output_dir(cfg):
    """Lock output_dir; then check_output_dir's refusal, or with overwrite_output_dir=true delete the previous
    run's outputs (a resume would cut metrics.jsonl to its checkpoint's step and save over the checkpoints)."""
    d = cfg.output_dir
    lock_output_dir(d)
    recover_replaced(d)
    for n in os.listdir(d):  # unfinished saves of a killed run (nobody else writes here: we hold the lock)
        if n.startswith("tmp-checkpoint-"):
            shutil.rmtree(os.path.join(d, n), ignore_errors=True)
    ckpts, logs = check_output_dir(cfg)
    if not (ckpts or logs):
        return
    log.warning("overwrite_output_dir=true: deleting the previous run's outputs in %s", d)
    for n in ckpts + list(RUN_OUTPUTS):
        p = os.path.join(d, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)


# ---- SIGINT / SIGTERM: finish the step, save a checkpoint, stop
class StopOnSignal:
    """While active, the first SIGINT or SIGTERM only sets a flag (the loop saves a checkpoint after the
    current step and raises TrainingInterrupted); a second one stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, rank: int = 0):
        self.rank, self.signum, self._prev = rank, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._prev = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                          if signal.getsignal(s) is not signal.SIG_IGN}  # e.g. SIGINT of a background job
        return self

    def __exit__(self, *exc):
        for s, h in self._prev.items():
            signal.signal(s, h)
        self._prev = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            raise TrainingInterrupted(signum)
        self.signum = signum
        if self.rank == 0:
            print(f"\nr1train: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, dev) -> int:
        """The signal number if any rank got one (the same answer on every rank), else 0."""
        flag = self.signum or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

