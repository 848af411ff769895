"""Checkpoints: output_dir/checkpoint-<step>/ = save_pretrained files (model, tokenizer) + ds/ (DeepSpeed
model/optimizer/scheduler states) + ref_model.pt (when beta > 0) + rng_state_<rank>.pth + trainer_state.json.
Written to tmp-checkpoint-<step>/ and renamed when complete, so a crash never leaves a partial
checkpoint-<step>/ (resume ignores tmp-* and any directory without trainer_state.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil

import torch
import torch.distributed as dist


def zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


class CheckpointMixin:
    """Mixed into engine.Trainer (uses self.engine, self.ref, self.model, self.tok, self.cfg, self.rank)."""

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
    def save(self, step: int):
        cfg = self.cfg
        final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
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
                           "world_size": self.world, "config": vars(cfg)}, fh, indent=1, default=str)
        dist.barrier()
        if self.rank == 0:  # atomic publish: a crash before this leaves only tmp-checkpoint-<step>
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self):
        limit = self.cfg.save_total_limit
        if not limit:
            return
        for d in sorted(list_checkpoints(self.cfg.output_dir), key=_step_of)[:-limit]:
            shutil.rmtree(d, ignore_errors=True)

    def load(self, path: str) -> int:
        if path == "latest":
            found = list_checkpoints(self.cfg.output_dir)
            if not found:
                raise FileNotFoundError(f"resume_from_checkpoint=latest: no checkpoint-* in {self.cfg.output_dir}")
            path = max(found, key=_step_of)
        if not os.path.exists(os.path.join(path, "trainer_state.json")):
            raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint")
        self.engine.load_checkpoint(path, tag="ds")
        if self.ref is not None:
            self.load_ref_state_dict(torch.load(os.path.join(path, "ref_model.pt"), weights_only=True))
        rng = torch.load(os.path.join(path, f"rng_state_{self.rank}.pth"), weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        with open(os.path.join(path, "trainer_state.json")) as fh:
            return json.load(fh)["global_step"]


def list_checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, d) for d in os.listdir(output_dir)
            if d.startswith("checkpoint-") and d[11:].isdigit()
            and os.path.exists(os.path.join(output_dir, d, "trainer_state.json"))]


def _step_of(path: str) -> int:
    return int(os.path.basename(path)[11:])

