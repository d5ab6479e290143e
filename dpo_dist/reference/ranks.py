"""reference.placement ranks: the reference held by K separate reference ranks (dpo_dist/reference/rank_server.py),
asked per micro-batch (serve: online) or once for the whole dataset (serve: precompute); a policy rank holds no
reference weights, and TRL runs in precompute mode so that it builds no reference here."""

from __future__ import annotations

import contextlib

from dpo_dist.config.names import Placement
from dpo_dist.reference.base import ReferencePlacement
from dpo_dist.reference.precompute_cache import cached_datasets, check_precomputed_columns
from dpo_dist.verify import model_checks


class RanksPlacement(ReferencePlacement):
    name = Placement.RANKS
    trl_precompute = True

    def tokenize_before_trainer(self, cfg) -> bool:
        return cfg.reference.serve != "precompute"  # precompute copies the data to its cache dir, tokenized in TRL

    def load(self, run):
        """Held by the reference ranks: here only their hello (loaded, fingerprinted, or why not)."""
        hello = run.state.remote.hello()
        if "error" in hello:
            raise ValueError(hello["error"])
        run.rr.facts["reference_load_seconds"] = hello.get("load_seconds")
        return None

    def reference_bytes(self, run) -> int:
        """Measured: every live parameter that is not the policy's."""
        from dpo_dist.reference.rank_server import stray_parameter_bytes

        trainer = run.state.trainer
        return stray_parameter_bytes([trainer.model if trainer is not None else run.state.policy])

    def static_checks(self, run, fp_policy):
        """The static proofs against the reference held on the reference ranks, from its hello."""
        rr, hello, pol = run.rr, run.state.remote.hello(), run.state.policy
        frozen = not hello["trainable"] and not hello["in_train"]
        ok = rr.add("reference frozen and in eval mode (reference ranks)", frozen,
                    f"reference rank process {hello['rank']}: 0 trainable, all modules eval" if frozen else
                    f"trainable {hello['trainable']}, in train mode {hello['in_train']}",
                    "the reference on the reference ranks is trainable or in train mode")
        ok &= model_checks.policy_trainable(pol, rr)
        ok &= model_checks.configs_equal(pol.config.to_dict(), hello["config"], rr)
        fp_ref = hello["fingerprints"]
        ok &= model_checks.weights_equal(fp_policy, fp_ref, rr, note=" (reference fingerprinted on its own ranks)")
        return ok, fp_ref

    def forward_reference(self, run, stack, policy_ready, ds):
        return run.state.remote  # the reference ranks answer with their logits

    def build_trainer(self, run, train_rows, eval_rows):
        """TRL in precompute mode with no reference on this rank; the reference ranks answer either per micro-batch
        (serve: online) or once for the whole dataset before training (serve: precompute, cached on disk under the
        reference's fingerprint like the precomputed placement)."""
        from dpo_dist.reference.trainers import RemoteOnlineDPOTrainer, RemotePrecomputeDPOTrainer

        s = run.state
        common = dict(model=s.policy, ref_model=None, remote_reference=s.remote, args=s.args, processing_class=s.tok)
        if run.cfg.reference.serve == "online":
            return RemoteOnlineDPOTrainer(train_dataset=train_rows, eval_dataset=eval_rows, **common)
        trainer = RemotePrecomputeDPOTrainer(**cached_datasets(run, train_rows, eval_rows), **common)
        run.rr.facts["precompute_cache_hits"] = trainer.cache_hits
        return trainer

    def check_trainer(self, run, trainer) -> bool:
        """TRL built no reference here, and this policy rank holds no reference weights (measured)."""
        from dpo_dist.reference.rank_server import RemoteReference

        rr, ctx = run.rr, run.ctx
        online = run.cfg.reference.serve == "online"
        ref = trainer.ref_model
        cache = "reused" if online or all(trainer.cache_hits.values()) else "computed"
        ok = rr.add("trainer reference served by reference ranks",
                    isinstance(ref, RemoteReference) if online else ref is None,
                    f"{type(ref).__name__} -> {ctx.roles.describe(ctx.roles.server_of(ctx.roles.global_rank))}"
                    if online else f"log-probs precomputed by the reference ranks, cache {cache}",
                    "TRL built its own reference on a policy rank: report this as a dpo-dist bug")
        if not online:
            ok &= check_precomputed_columns(trainer, rr, "ref_chosen_logps, ref_rejected_logps in the train dataset")
        nbytes = rr.facts[f"rank_{ctx.rank}_reference_bytes_training"]  # the trainer stage measured it
        ok &= rr.add("no reference weights on policy ranks", nbytes == 0,
                     f"{nbytes} bytes of parameters outside the policy on this rank (measured)",
                     "a policy rank holds parameters that are not the policy's: something loaded a reference here")
        return ok

    def kl_reference(self, run, trainer):
        remote = run.state.remote
        return lambda policy: contextlib.nullcontext(remote)

    def report_extra(self, facts) -> str:
        return f" (measured; the reference lives on {facts.get('reference_ranks', 'the')} reference rank(s))"

    def smoke_reference(self, run, trainer):
        return None  # held (and checked) on the reference ranks
