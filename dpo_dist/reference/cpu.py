"""reference.placement cpu: a whole reference in host memory (pages shared per node), run by CpuReferenceDPOTrainer
on CPU per micro-batch; nothing shards, moves or copies it, whatever shards the policy (ZeRO-3 or FSDP2: the backend's
`whole` context builds it unsharded)."""

from __future__ import annotations

import contextlib

from dpo_dist.config.names import Placement
from dpo_dist.load import models
from dpo_dist.reference.base import ReferencePlacement
from dpo_dist.sharding import views
from dpo_dist.verify import model_checks


class CpuPlacement(ReferencePlacement):
    name = Placement.CPU
    trl_precompute = True

    def load(self, run):
        cfg, s = run.cfg, run.state
        # Built whole whatever the policy's sharding does to the models it loads: this copy stays in host memory.
        with run.sharding.whole():
            ref, shared = models.load_cpu_shared(s.ref_path, cfg.model.dtype, cfg.model.trust_remote_code)
        ref.runs_on_cpu = True
        run.rr.facts["cpu_reference_shared_pages"] = shared
        models.freeze(ref)
        return ref

    def cross_device(self, ctx) -> bool:
        """On an accelerator the reference's forwards run on other hardware than the policy's."""
        return ctx.device.type != "cpu"

    def build_trainer(self, run, train_rows, eval_rows):
        from dpo_dist.reference.trainers import CpuReferenceDPOTrainer

        s = run.state
        return CpuReferenceDPOTrainer(model=s.policy, ref_model=None, cpu_reference=s.reference,
                                      train_dataset=train_rows, eval_dataset=eval_rows, args=s.args,
                                      processing_class=s.tok, whole=run.sharding.whole)

    def check_trainer(self, run, trainer) -> bool:
        rr = run.rr
        ref = trainer.ref_model
        on_cpu = all(p.device.type == "cpu" for p in ref.module.parameters()) and not views.is_sharded(ref.module)
        ok = rr.add("trainer reference on CPU, unsharded", type(ref).__name__ == "CpuReference" and on_cpu,
                    f"{type(ref).__name__}, parameters on cpu: {on_cpu}",
                    "the CPU reference was wrapped or moved: do not pass it to TRL as ref_model")
        return ok & model_checks.check_roles(run.state.policy, ref.module, rr, prefix="trainer: ")

    def kl_reference(self, run, trainer):
        module = trainer.ref_model.module
        return lambda policy: contextlib.nullcontext(module)

    def report_extra(self, facts) -> str:
        return ", pages shared per node" if facts.get("cpu_reference_shared_pages") else ", private copy"
