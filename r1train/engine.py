"""The training loop on DeepSpeed: setup, ZeRO 0-3, the reference model, checkpoints, logging.

One `step` = one batch of prompts (GRPO: one generation round, num_iterations optimizer steps; SFT: one
optimizer step). Data order, sampling noise and checkpoints are functions of (seed, step), so a resumed
run continues exactly where the killed one was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import signal
import socket
import time

import torch
import torch.distributed as dist

from .checkpoint import CheckpointMixin, StopOnSignal, TrainingInterrupted, rows_sha256, unlock_output_dir, zero3
from .config import (
    TrainConfig,
    check_deepspeed_values,
    check_offload,
    check_token_budget,
    deepspeed_file,
    ds_bf16_enabled,
    read_deepspeed_config,
)
from .loading import apply_lora, enable_activation_checkpointing, loss_impl_for, patch_layers
from .metrics import MetricsLogger
from .moe_load import ExpertLoad
from .optim import make_optimizer, param_groups
from .rollout import Policy, sample_rows


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm is NaN or inf: the run stops before it saves the diverged weights."""

    def __init__(self, step: int, values: dict, last_checkpoint: str | None):
        self.step, self.values, self.last_checkpoint = step, values, last_checkpoint
        got = ", ".join(f"{k} {v}" for k, v in values.items())
        super().__init__(f"training diverged at step {step} ({got}); nothing of this run after "
                         f"{'the last checkpoint, ' + last_checkpoint if last_checkpoint else 'its start'} is saved. "
                         "Lower learning_rate (or max_grad_norm), or check the rewards and data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed():
    """Single process with no launcher: fill in the env a launcher would set, then init (gloo on CPU)."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def teardown_distributed():
    """The end of a run that every rank completed: a barrier (no rank tears down a group another still uses),
    then destroy_process_group, which torch asks for before a process exits."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:  # the run's results are saved: a rank that timed out here (rank 0 alone uploads to its metrics backends
        # first) ends with a warning, not a failed exit
        dist.barrier()
    except (RuntimeError, dist.DistError) as e:
        logging.getLogger("r1train").warning("the end-of-run barrier failed (%s); the process group is destroyed "
                                             "anyway", e)
    destroy_process_group()


def destroy_process_group():
    """torch.distributed's group and DeepSpeed's clone of the world group with it (a ZeRO-3 init would use the
    dead clone); a later init in the same process builds both again."""
    import sys

    dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None


def device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def ds_config(cfg: TrainConfig, micro_batch: int, grad_accum: int) -> dict:
    c = read_deepspeed_config(deepspeed_file(cfg))
    check_deepspeed_values(cfg, c)  # also at load (validate); again here for a config changed after it
    fill = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": cfg.max_grad_norm}
    for k, v in fill.items():
        if c.get(k, "auto") == "auto":
            c[k] = v
    if "fp16" in c:  # checked (check_deepspeed_values): false or "auto", which transformers fills from its fp16 key
        c["fp16"] = {**c["fp16"], "enabled": False}
    c.setdefault("bf16", {})["enabled"] = ds_bf16_enabled(cfg, c)
    c.pop("train_batch_size", None)  # checked: "auto" or micro-batch x accumulation x processes
    c.pop("optimizer", None)  # checked: the engine gets r1train's (the reference engine would build this one)
    zo = c.setdefault("zero_optimization", {"stage": 0})
    check_offload(cfg, zo.get("stage", 0))
    pin = torch.cuda.is_available()
    # the keys turn offload on; a `deepspeed` file's own offload sections (e.g. pin_memory=false, which saves
    # the pinned copies' transient host memory) are kept over these defaults
    if cfg.offload_optimizer or "offload_optimizer" in zo:
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": pin, **zo.get("offload_optimizer", {})}
        c["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps on the CPU (not DeepSpeedCPUAdam)
    if cfg.offload_param or "offload_param" in zo:
        zo["offload_param"] = {"device": "cpu", "pin_memory": pin, **zo.get("offload_param", {})}
    return c


def reference_config(dsc: dict) -> dict:
    """The DeepSpeed config of the reference model (no optimizer): sharded like the policy under ZeRO-3
    (offload_param, if set, keeps it on the CPU too), a plain copy (stage 0) otherwise; the optimizer-side
    keys go (gradient clipping, offload_optimizer, bf16 master weights/gradients/optimizer states, which
    DeepSpeed rejects at stage 0)."""
    rc = {k: v for k, v in dsc.items() if k != "gradient_clipping"}
    rc["bf16"] = {k: v for k, v in rc.get("bf16", {}).items()
                  if k not in ("bf16_master_weights_and_grads", "bf16_optimizer_states")}
    zo = rc.get("zero_optimization", {})
    rc["zero_optimization"] = ({k: v for k, v in zo.items() if k != "offload_optimizer"}
                               if zo.get("stage", 0) == 3 else {"stage": 0})
    return rc


def oom_message(err: str, cfg: TrainConfig) -> str:
    """An out-of-memory error of the training step, with the keys that would cut memory in this run."""
    keys = [k for k, off in (("gradient_checkpointing=true", not cfg.gradient_checkpointing),
                             ("use_peft=true", not cfg.use_peft),
                             ("optim=adamw_torch_8bit", cfg.optim != "adamw_torch_8bit" and not cfg.use_peft),
                             ("rollout_release_memory=true", not cfg.rollout_release_memory),
                             ("beta=0 (no reference model)", cfg.beta != 0.0),
                             ("offload_optimizer=true", not cfg.offload_optimizer and not cfg.use_peft)) if off]
    msg = f"{err}\n\nr1train: out of memory in the training step."
    if keys:
        msg += f" Keys that cut memory (README, Memory): {', '.join(keys)}."
    if torch.cuda.is_available() and "expandable_segments:True" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        frag = (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30
        if frag >= 1.0:
            msg += (f" {frag:.1f} GiB are reserved by PyTorch but unallocated (fragments): run with "
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (measured on an H200: the 7B full fine-tune "
                    "with 8-bit moments fits with it, at 129.8 GiB, and runs out at 115 GiB without).")
    return msg


def drop_from_zero3_stack(module):
    """Take a ZeRO-3 engine's module and its submodules off DeepSpeed's global module stack
    (parameter_offload.FWD_MODULE_STACK), where the engine's setup and its forwards put them and its destroy()
    leaves them: the stack would keep the module, and through its hooks the engine and optimizer, alive for the
    process's life."""
    from deepspeed.runtime.zero import parameter_offload

    mine = {id(m) for m in module.modules()}
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if id(m) not in mine]


def lr_lambda(cfg: TrainConfig, total: int):
    """The lr multiplier at optimizer step s of `total`: transformers' get_scheduler (optimization.py) for each
    lr_scheduler_type, with TRL's warmup of ceil(warmup_ratio * total) steps rising from 0 (s / warm);
    `constant` has no warmup (transformers ignores it; the config rejects warmup_ratio with it)."""
    kind = cfg.lr_scheduler_type
    warm = 0 if kind == "constant" else math.ceil(cfg.warmup_ratio * total)

    def f(s):
        if s < warm:
            return s / max(1, warm)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        p = (s - warm) / max(1, total - warm)
        return max(0.0, 1 - p) if kind == "linear" else max(0.0, 0.5 * (1 + math.cos(math.pi * p)))
    return f


# Trainer.evaluate's metrics, and every key Trainer.train adds to a step's metrics after train_step (theirs on eval
# steps)
EVAL_METRICS = ("eval/accuracy", "eval/accuracy_greedy")
LOOP_METRICS = ("learning_rate", "epoch", "step_time", *EVAL_METRICS)


class Trainer(CheckpointMixin):
    """Base of GRPOTrainer / SFTTrainer: subclasses implement `train_step(step, rows) -> metrics`.

    source_rows: the rows train_rows are drawn from, whose fingerprint a resume must match (default train_rows;
    rows sampled when the run starts, as rejection sampling's and distill's, pass the prompts they sample from)."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_rows, eval_rows=None, *, optimizer_steps=1,
                 source_rows=None):
        import deepspeed

        self.cfg, self.tok = cfg, tokenizer
        if tokenizer is not None and tokenizer.pad_token_id is None:  # TRL's trainers: the eos token pads
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer: it has neither a pad token nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        self.train_rows, self.eval_rows = list(train_rows), list(eval_rows or [])
        if cfg.padding_free and cfg.max_tokens_per_batch is not None:  # before any work
            check_token_budget(cfg, *self.longest_row(cfg, self.train_rows))
        self.rank, self.world = setup_distributed()
        self.dev = device()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.prompts_per_rank = self.compute_prompts_per_rank()
        n_step = self.prompts_per_rank * self.world
        if not self.train_rows:
            raise ValueError("the training dataset is empty")
        # linear or logits (a ConfigError before prepare_run, which may delete old outputs)
        self.loss_impl = loss_impl_for(model, cfg, log=self.rank == 0)
        # rank 0 alone checks a resume and writes trainer_state.json: the others need no fingerprint
        self.rows_sha256 = rows_sha256(self.train_rows if source_rows is None else source_rows) \
            if self.rank == 0 else None
        resume = self.prepare_run()  # lock output_dir; the checkpoint to resume from, checked (before any work)
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.num_train_epochs * len(self.train_rows) / n_step))
        model = patch_layers(model, cfg)  # fused kernels in the forward (a model not built by r1train.loading)
        dsc = ds_config(cfg, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
        # bf16 without DeepSpeed's mixed precision (e.g. ds_zero0_bf16.json): the optimizer steps bf16 parameters
        # (buffers keep their dtype, as DeepSpeed's own cast does)
        if cfg.bf16 and not dsc["bf16"].get("enabled"):
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        if cfg.use_peft:  # the reference is then this model with its adapters disabled (ref_policy)
            model = apply_lora(model, cfg)
        ref = copy.deepcopy(model) if self.needs_ref() and not cfg.use_peft else None
        # training forwards run in train mode (from_pretrained returns eval mode): MoE routers count their
        # tokens for the bias update only in train mode with grad enabled (r1train/moe_load.py)
        model.train()
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.expert_load = ExpertLoad(model, cfg.moe_bias_update_rate)
        opt = make_optimizer(cfg, param_groups(cfg, model))  # the `optim` key; no decay for biases and norms
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, self.max_steps * optimizer_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=Policy(model, self.loss_impl), optimizer=opt,
                                                    lr_scheduler=sched, config=dsc)
        # ZeRO-0 in one process: DeepSpeed would still all-reduce the gradients over the world of one, through
        # flat copies of up to 5e8 values (and an fp32 copy of each when DeepSpeed's bf16 is off): 2.8 GiB of
        # transients that set the peak of the 1.5B step in TRL's bf16 layout (bench_memory peak_composition).
        # ZeRO 1-3 move the gradients into their partitions on that path: it stays.
        if self.engine.zero_optimization_stage() == 0 and self.engine.dp_world_size == 1:
            self.engine.enable_backward_allreduce = False
        self.ref = None
        if ref is not None:
            self.ref, *_ = deepspeed.initialize(model=Policy(ref, self.loss_impl), config=reference_config(dsc))
            self.ref.eval()
        if zero3(self.engine) and self.loss_impl == "linear":
            for e in filter(None, (self.engine, self.ref)):
                deepspeed.zero.register_external_parameter(e.module, e.module.head.weight)
        self.step0 = self.saved_step = self.load(resume) if resume else 0
        # checkpoint-<max_steps> once save_final saved it, or this run resumed from it (nothing left to save)
        self.final_checkpoint = None
        if resume and self.step0 == self.max_steps \
                and os.path.realpath(resume) == os.path.realpath(self.checkpoint_dir(self.max_steps)):
            self.final_checkpoint = self.checkpoint_dir(self.max_steps)
        self.logger = MetricsLogger(cfg.output_dir, rank=self.rank, report_to=cfg.report_to,
                                    config=dataclasses.asdict(cfg),
                                    resume_step=self.step0)

    # ---- hooks for subclasses
    def longest_row(self, cfg, rows) -> tuple[int, str]:
        """(the most tokens one of this trainer's training rows can take, what bounds it): padding_free's
        max_tokens_per_batch must hold it (checked before any work)."""
        raise NotImplementedError

    def compute_prompts_per_rank(self) -> int:
        return self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps

    def needs_ref(self) -> bool:
        return False

    def train_step(self, step: int, rows: list) -> dict:
        raise NotImplementedError

    def optimizer_step(self) -> tuple[bool, object]:
        """engine.step() after a backward: (whether it was an optimizer step, the gradients' global L2 norm before
        clipping, as transformers logs grad_norm; None on a micro-step). DeepSpeed's own norm where it keeps one
        (ZeRO >= 1, bf16 / fp16); at ZeRO-0 in fp32 it keeps none, so the norm of the gradients the step is about to
        apply (all-reduced in the boundary backward) is taken first: a device tensor, read with the step's metrics."""
        e = self.engine
        boundary, before = e.is_gradient_accumulation_boundary(), None
        if boundary and e.zero_optimization_stage() == 0 and not (e.bfloat16_enabled() or e.fp16_enabled()) \
                and getattr(e, "torch_autocast_z0_gradscaler", None) is None:  # scaled gradients: no true norm here
            # empty gradients left out: torch 2.4-2.5's CUDA _foreach_norm could return wrong norms with them
            grads = [p.grad for p in e.module.parameters() if p.grad is not None and p.grad.numel()]
            # one multi-tensor kernel per dtype (a launch per tensor took ~340 for a 1.5B model); fp32 also for
            # bf16 weights (ds_zero0_bf16: DeepSpeed's bf16 off)
            if grads:
                before = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        e.step()
        if not boundary:
            return False, None
        gn = e.get_global_grad_norm()
        return True, before if gn is None else gn

    # ---- data order: a function of (seed, step) only
    def rows_for(self, step: int) -> tuple[list, list[int]]:
        """This rank's rows for `step` and their global indices in the step's batch."""
        n, N = self.prompts_per_rank * self.world, len(self.train_rows)
        out, gidx = [], []
        for j in range(self.rank * self.prompts_per_rank, (self.rank + 1) * self.prompts_per_rank):
            epoch, pos = divmod(step * n + j, N)  # epochs are seeded permutations, back to back
            out.append(self.train_rows[self._perm(epoch)[pos]])
            gidx.append(j)
        return out, gidx

    def _perm(self, epoch: int) -> list[int]:
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._perm_cache, self._perm_epoch = torch.randperm(len(self.train_rows), generator=g).tolist(), epoch
        return self._perm_cache

    def ref_policy(self):
        """The reference policy for log-probs (called like the engine), or None: the reference engine, or
        with LoRA the policy itself with its adapters disabled."""
        if self.ref is not None:
            return self.ref
        if not (self.cfg.use_peft and self.needs_ref()):
            return None
        peft_model = self.engine.module.model

        def ref(*args, **kw):
            with torch.no_grad(), peft_model.disable_adapter():
                return self.engine(*args, **kw)
        return ref

    @property
    def model(self):
        """The bare HF model (generation, save_pretrained)."""
        return self.engine.module.model

    # ---- the loop
    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg, history = self.cfg, []
        bar = tqdm(total=self.max_steps, initial=self.step0, disable=cfg.disable_tqdm or self.rank != 0,
                   desc=type(self).__name__, dynamic_ncols=True)
        with StopOnSignal(self.rank) as stop:  # SIGINT / SIGTERM: a checkpoint after the current step, then stop
            for step in range(self.step0, self.max_steps):
                t0 = time.perf_counter()
                rows, _ = self.rows_for(step)
                # the rate this step's (first) optimizer step uses, as transformers' Trainer logs it ("before
                # update"): after the step, the scheduler has moved on to the next step's; a tensor for torchao's
                lr = float(self.engine.get_lr()[0])
                try:
                    m = self.train_step(step, rows)
                except torch.OutOfMemoryError as e:
                    raise torch.OutOfMemoryError(oom_message(str(e), cfg)) from e
                m["learning_rate"] = lr
                m["epoch"] = (step + 1) * self.prompts_per_rank * self.world / len(self.train_rows)
                m["step_time"] = time.perf_counter() - t0
                done = step + 1
                if cfg.eval_steps and done % cfg.eval_steps == 0 and done < self.max_steps:
                    m.update(self.evaluate())
                self.logger.log(done, m)
                history.append({"step": done, **m})
                bad = {k: m[k] for k in ("loss", "grad_norm") if k in m and not math.isfinite(m[k])}
                if bad:  # the same values on every rank (all-reduced): every rank stops here, before any save
                    bar.close()
                    raise TrainingDiverged(done, bad, self.checkpoint_dir(self.saved_step) if self.saved_step else None)
                bar.update(1)
                bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss", "reward", "eval/accuracy") if k in m})
                if self.rank == 0 and cfg.logging_steps and done % cfg.logging_steps == 0:
                    bar.write(" ".join(f"{k}={v:.4g}" for k, v in [("step", done)] + list(m.items())
                                       if isinstance(v, (int, float))))
                if cfg.save_steps and done % cfg.save_steps == 0 and done < self.max_steps:
                    self.save(done)
                signum = stop.requested(self.dev)  # the same answer on every rank
                if signum:
                    bar.close()
                    path = self.save(done) if self.saved_step != done else self.checkpoint_dir(done)
                    raise TrainingInterrupted(signum, done, path)
        bar.close()
        return history

    def save_final(self) -> str:
        """Save checkpoint-<max_steps> once the last step is trained. A SIGINT / SIGTERM during the save waits for it
        to be published (StopOnSignal), then stops the run (TrainingInterrupted naming it). A run resumed from its
        own checkpoint-<max_steps> keeps it as it is (the state it loaded: written again it would be the same)."""
        if self.final_checkpoint is not None:
            return self.final_checkpoint
        with StopOnSignal(self.rank) as stop:
            path = self.save(self.max_steps)
            signum = stop.requested(self.dev)  # the same answer on every rank
        self.final_checkpoint = path
        if signum:
            raise TrainingInterrupted(signum, self.max_steps, path)
        return path

    def finish_stage(self, evaluate: bool = True) -> dict:
        """The end of a run after train(): the final checkpoint (save_final), then the final evaluation (its row
        logged at max_steps once), then finish(); returns the evaluation's metrics. The checkpoint comes first, so
        a stop during the evaluation or finish (the CLI's SIGTERM handler, Ctrl-C) keeps every trained step:
        metrics.jsonl holds their rows up to it, and a rerun with resume_from_checkpoint=latest trains no step and
        evaluates it (log_once: the evaluation's row once)."""
        path = self.save_final()
        try:
            res = self.evaluate() if evaluate else {}
            if res:
                self.logger.log_once(self.max_steps, res)
            self.finish()
        except KeyboardInterrupt as e:
            raise TrainingInterrupted(getattr(e, "signum", signal.SIGINT), self.max_steps, path) from e
        return res

    def finish(self, save: bool = True):
        """save: checkpoint-<max_steps>, unless save_final saved it."""
        if save and self.final_checkpoint is None:
            self.save(self.max_steps)
        self.logger.sync()  # rows logged after the final save (the final evaluation's) on disk too
        self.logger.plot()
        self.logger.close()
        if self.rank == 0:
            unlock_output_dir(self.cfg.output_dir)

    def release(self):
        """After finish(), where the model goes on without this trainer: DeepSpeed's hooks come off the model (ZeRO's
        gradient hooks hold the optimizer, its fp32 master weights and moments, for as long as the model lives) and
        ZeRO-3's global module stack lets go of it, so dropping the trainer frees them. The model stays usable below
        ZeRO-3 (its parameters whole); the trainer cannot train, evaluate or save after it."""
        for e in filter(None, (self.engine, self.ref)):
            e.destroy()
            if zero3(e):
                drop_from_zero3_stack(e.module)

    # ---- evaluation: held-out pass@1 (sampled) and greedy accuracy of the accuracy reward
    @torch.no_grad()
    def evaluate(self, rows=None, batch_size: int = 64) -> dict:
        from .rewards import accuracy_reward

        rows = self.eval_rows if rows is None else rows
        if not rows:
            return {}
        mine = rows[self.rank::self.world]
        real = len(mine)
        if zero3(self.engine):  # every rank must run the same forwards: pad with copies, weight 0
            mine = mine + [rows[0]] * (math.ceil(len(rows) / self.world) - len(mine))
        k = self.cfg.eval_num_samples
        # on the trainer's device: NCCL (every CUDA run, one process included) reduces no CPU tensor
        tot = torch.zeros(3, dtype=torch.float64, device=self.dev)
        for greedy in (False, True):
            reps = 1 if greedy else k
            for s, chunk, _, texts in sample_rows(
                    self.model, self.tok, mine, num_samples=reps, cfg=self.cfg, seed_key=(self.cfg.seed, "eval"),
                    index=lambda i: self.rank + self.world * i, greedy=greedy, batch_size=batch_size,
                    temperature=self.cfg.eval_temperature, ds_engine=self.engine):
                gold = [r.get(self.cfg.answer_column) for r in chunk for _ in range(reps)]
                acc = accuracy_reward(None, texts, answer=gold)
                # weight 0: a zero-3 padding copy, or a row with no gold answer (accuracy None: not scored)
                w = [1.0 if s + i < real and acc[i * reps] is not None else 0.0 for i in range(len(chunk))]
                tot[1 if greedy else 0] += sum((a or 0.0) * w[i // reps] for i, a in enumerate(acc)) / reps
                if greedy:
                    tot[2] += sum(w)
        replay = getattr(self, "replay", None)
        if replay is not None:  # the routing these rollouts recorded (moe_router_replay) is not trained on
            replay.record = None
        if dist.is_initialized():
            dist.all_reduce(tot)
        acc_sampled, acc_greedy, n = tot.tolist()  # one host read
        if n == 0:  # no row has a gold answer to score against
            if self.rank == 0:
                logging.getLogger("r1train").warning(
                    "evaluation: none of the %d eval rows has a gold %r answer; no accuracy to report", len(rows),
                    self.cfg.answer_column)
            return {}
        return dict(zip(EVAL_METRICS, (acc_sampled / n, acc_greedy / n)))

    # ---- reference model
    @torch.no_grad()
    def sync_ref(self, alpha: float):
        """ref <- alpha * policy + (1 - alpha) * ref (gathered shard by shard under ZeRO-3)."""
        import deepspeed

        # paired by name: the policy may hold buffers the reference lacks (ExpertLoad's token counts on routers
        # it patched after the reference was copied), so positions do not line up
        ref_params = dict(self.ref.module.named_parameters())
        for name, p in self.engine.module.named_parameters():
            r = ref_params[name]
            ctx = deepspeed.zero.GatheredParameters([p, r], modifier_rank=0) if zero3(self.engine) else None
            with ctx or contextlib.nullcontext():
                if not zero3(self.engine) or self.rank == 0:
                    r.data.mul_(1 - alpha).add_(p.data.to(r.dtype), alpha=alpha)
        ref_buffers = dict(self.ref.module.named_buffers())
        for name, b in self.engine.module.named_buffers():
            if name in ref_buffers:
                ref_buffers[name].data.copy_(b.data)
