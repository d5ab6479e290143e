"""reference.placement zero3: the reference sharded like the policy, wrapped by TRL as a ZeRO inference engine
(TRL's prepare_deepspeed)."""

from __future__ import annotations

import contextlib

from dpo_dist.config.names import Placement
from dpo_dist.reference.base import ReferencePlacement, load_like_policy
from dpo_dist.verify import model_checks


class Zero3Placement(ReferencePlacement):
    name = Placement.ZERO3
    loads_like_policy = True

    def check_setup(self, run) -> bool:
        cfg, stage = run.cfg, run.state.stage
        if not run.sharding.shards_params(run.state) and cfg.reference.on_zero2 == "refuse":
            return run.rr.add("sharding fits placement", False, f"policy ZeRO-{stage}, reference zero3",
                              "reference.placement zero3 shards the reference only with a ZeRO-3 policy: use "
                              "--sharding zero3, or set reference.on_zero2: replica")
        return True

    def load(self, run):
        """The fast partitioned loader when the load stage planned it (the policy's plan for the same checkpoint)."""
        return load_like_policy(run)

    def build_trainer(self, run, train_rows, eval_rows):
        from trl import DPOTrainer

        s = run.state
        return DPOTrainer(model=s.policy, ref_model=s.reference, train_dataset=train_rows, eval_dataset=eval_rows,
                          args=s.args, processing_class=s.tok)

    def check_trainer(self, run, trainer) -> bool:
        rr, s = run.rr, run.state
        ok = run.sharding.check_trainer_reference(run, trainer, run.sharding.shards_params(s))
        return ok & model_checks.check_roles(s.policy, run.sharding.unwrap(trainer.ref_model), rr,
                                             prefix="trainer: ")

    def kl_reference(self, run, trainer):
        return lambda policy: contextlib.nullcontext(trainer.ref_model)
