"""reference.placement precomputed: the reference's log-probs computed once by TRL's precompute pass, cached on disk
under the reference's fingerprint (precompute_cache), then the reference freed before training."""

from __future__ import annotations

import contextlib
import gc

from dpo_dist.config.names import Placement
from dpo_dist.reference.base import ReferencePlacement, load_like_policy
from dpo_dist.reference.precompute_cache import cached_datasets, check_precomputed_columns
from dpo_dist.verify import weights


class PrecomputedPlacement(ReferencePlacement):
    name = Placement.PRECOMPUTED
    trl_precompute = True
    loads_like_policy = True

    def tokenize_before_trainer(self, cfg) -> bool:
        return False  # the data is copied to the cache dir first and tokenized there, inside TRL

    def load(self, run):
        return load_like_policy(run)

    def build_trainer(self, run, train_rows, eval_rows):
        from dpo_dist.reference.trainers import PrecomputedDPOTrainer

        s = run.state
        trainer = PrecomputedDPOTrainer(model=s.policy, ref_model=s.reference, args=s.args, processing_class=s.tok,
                                        **cached_datasets(run, train_rows, eval_rows))
        run.rr.facts["precompute_cache_hits"] = trainer.cache_hits
        free_reference(run, trainer)
        return trainer

    def check_trainer(self, run, trainer) -> bool:
        rr = run.rr
        cache = "reused" if all(trainer.cache_hits.values()) else "computed"
        ok = check_precomputed_columns(trainer, rr, f"cache {cache}: {trainer.cache_hits}")
        left = rr.facts[f"rank_{run.ctx.rank}_reference_bytes_after_free"]
        ok &= rr.add("reference freed before training", left == 0 and trainer.ref_model is None,
                     f"{left} bytes of reference weights left", "something still holds the reference model")
        return ok

    def kl_reference(self, run, trainer):
        recorded = run.state.recorded_reference

        def replay(policy):
            recorded.i = 0
            return contextlib.nullcontext(recorded)

        return replay

    def smoke_reference(self, run, trainer):
        return None  # freed


class RecordedReference:
    """The reference is freed before training, so its logits for the KL monitor's prompts are recorded first and
    replayed in the same order (initial_kl runs this rank's prompts one per forward, always in order)."""

    runs_on_cpu = True

    def __init__(self, logits: list):
        self.logits, self.i = logits, 0

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        out = self.logits[self.i % len(self.logits)]
        self.i += 1
        return SimpleNamespace(logits=out)


def record_reference_logits(run, engine, prompts: list[str]) -> RecordedReference:
    import torch

    from dpo_dist.verify import probes

    mine, _ = probes.rank_share(prompts, run.ctx)
    tok = run.state.tok
    out = []
    with torch.no_grad():
        for text in mine:
            enc = probes.encode_batch(tok, [probes.render_prompt(tok, text)], run.ctx.device)
            out.append(engine(**enc).logits.float().cpu())
    return RecordedReference(out)


def free_reference(run, trainer) -> None:
    """Once the log-probs exist, release the reference's weight storage on this rank and measure what is left. The
    storage itself is released (not just our handles): DeepSpeed's engine, hooks and coordinator keep references to
    the module object, so waiting for garbage collection would free nothing."""
    import torch

    from dpo_dist.compat.deepspeed import reset_zero3_trace

    ref = run.state.reference
    engine = trainer.ref_model
    prompts = list(run.cfg.kl.prompts or run.cfg.verify.prompts)
    run.state.recorded_reference = record_reference_logits(run, engine, prompts)
    reset_zero3_trace(engine)
    trainer.ref_model = None
    if engine is not None and hasattr(engine, "destroy"):
        engine.empty_partition_cache()
        engine.destroy()
    for p in ref.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None:
            ds_tensor.data = torch.empty(0, dtype=ds_tensor.dtype, device=ds_tensor.device)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    gc.collect()
    run.rr.facts[f"rank_{run.ctx.rank}_reference_bytes_after_free"] = weights.local_bytes(ref, run.ctx)
    run.state.reference = None
