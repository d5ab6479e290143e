"""The interface every reference placement implements: the questions the stages of `dpo-dist init`
(dpo_dist/init/stages.py) ask about the reference, answered once per placement in dpo_dist/reference/<placement>.py.

The stages never ask which placement runs; they ask it what to do (as TRL detects its backend once and dispatches,
and torchtune's recipes call one `_setup_reference_model`). `run` below is the stages' InitRun: its cfg, ctx, rr
(RankReport) and state (dpo_dist.init.state.InitState) are what a placement reads and writes.

The defaults here are those of a reference module loaded on this rank (zero3 and cpu); the placements override what
differs.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from dpo_dist.config.names import Placement
from dpo_dist.load import models
from dpo_dist.verify import model_checks, probes, weights


class ReferencePlacement:
    """One placement of the frozen reference. Subclasses set `name` and implement load, build_trainer, check_trainer
    and kl_reference; the rest has the default of a reference module held on this rank."""

    name: ClassVar[Placement]
    # TRL runs in precompute mode (precompute_ref_log_probs): TRL builds no reference of its own
    trl_precompute: ClassVar[bool] = False
    # the reference is loaded like the policy (load_causal_lm), so it may use the fast loader's plan
    loads_like_policy: ClassVar[bool] = False
    # the reference is the policy's own base with its adapters off (the KL row then says so)
    is_policy_base: ClassVar[bool] = False

    # -- setup ------------------------------------------------------------------------------------------------------
    def check_setup(self, run) -> bool:
        """Refuse a sharding this placement cannot run with (a report row), before anything loads."""
        return True

    def smoke_steps(self, configured: int) -> int:
        return configured

    def tokenize_before_trainer(self, cfg) -> bool:
        """Whether the data is tokenized once before the trainer (dpo_dist.data.tokenize_once). Placements that copy
        the data to their own cache dir first (precompute_cache.disk_dataset) tokenize there, inside TRL."""
        return True

    # -- load -------------------------------------------------------------------------------------------------------
    def load(self, run) -> Any:
        """The reference module on this rank, frozen (None where it is not a module here)."""
        raise NotImplementedError

    def before_shard(self, run, model, role: str):
        """FSDP2's loader, between the meta build and `fully_shard` (which shards only the parameters a module has
        when wrapped): the module to shard as the root and return as the loaded model. Default: the model itself."""
        return model

    def after_fill(self, run, root, role: str) -> None:
        """FSDP2's loader, after the checkpoint's rows are in the shards: initialize what the files do not hold."""

    def base_view(self, model):
        """The model's checkpoint parameters under the checkpoint's names (what is read from and proved against the
        files). Default: the model itself."""
        return model

    def reference_bytes(self, run) -> int:
        ref = run.state.reference
        return 0 if ref is None else weights.local_bytes(ref, run.ctx)

    # -- static proofs ----------------------------------------------------------------------------------------------
    def static_checks(self, run, fp_policy: dict[str, str]) -> tuple[bool, dict[str, str]]:
        """Roles, configs and bitwise weights of policy vs reference; returns (ok, the reference's fingerprints)."""
        ctx, rr, pol, ref = run.ctx, run.rr, run.state.policy, run.state.reference
        ok = model_checks.check_roles(pol, ref, rr)
        ok &= model_checks.configs_equal(pol.config.to_dict(), ref.config.to_dict(), rr)
        fp_ref = weights.model_fingerprints(ref, ctx, "fingerprint reference")
        ok &= model_checks.weights_equal(fp_policy, fp_ref, rr,
                                         gap=lambda name: weights.max_abs_diff(pol, ref, name, ctx))
        return ok, fp_ref

    # -- forward proofs ---------------------------------------------------------------------------------------------
    def forward_policy(self, run):
        """The policy module the forward proofs run (and the trainer then trains)."""
        return run.state.policy

    def forward_reference(self, run, stack: contextlib.ExitStack, policy_ready, ds: dict[str, Any]):
        """The reference the forward proofs compare with, made ready inside `stack` (policy_ready: the policy as the
        forward proofs run it)."""
        return stack.enter_context(probes.forward_ready(run.state.reference, ds, run.ctx))

    def cross_device(self, ctx) -> bool:
        """Whether the reference's forwards run on other hardware than the policy's (tolerances then widen)."""
        return False

    # -- trainer ----------------------------------------------------------------------------------------------------
    def build_trainer(self, run, train_rows, eval_rows):
        """The DPOTrainer for this placement (train_rows, eval_rows: datasets.Dataset, memory-mapped)."""
        raise NotImplementedError

    def check_trainer(self, run, trainer) -> bool:
        """Placement-specific checks of what TRL built."""
        raise NotImplementedError

    def kl_reference(self, run, trainer):
        """For the KL monitor: given the policy module, a context manager yielding the reference to compare with."""
        raise NotImplementedError

    def report_extra(self, facts: dict[str, Any]) -> str:
        """What the "reference placement" row adds after the bytes held."""
        return ""

    def report_row(self, rr, nbytes: int) -> None:
        """A row that names the placement and what it costs this rank."""
        rr.add("reference placement", True, f"{self.name}: {nbytes / 2**20:.1f} MiB of reference weights on this "
               "rank" + self.report_extra(rr.facts))

    # -- smoke steps ------------------------------------------------------------------------------------------------
    def smoke_reference(self, run, trainer):
        """The module whose weights must not move during training (None when the reference is not here)."""
        return run.sharding.unwrap(trainer.ref_model)


def load_like_policy(run):
    """zero3 and precomputed: the reference loaded as the policy was, frozen (the fast partitioned loader when the load
    stage planned it: the policy's plan for the same checkpoint)."""
    s = run.state
    ref = run.sharding.load_model(run, s.ref_path, s.ref_plan, "reference")
    models.freeze(ref)
    return ref
