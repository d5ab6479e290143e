"""reference.placement precomputed: the reference's log-probs computed once by TRL's precompute pass, cached on disk
under the reference's fingerprint (precompute_cache), then the reference freed before training."""

from __future__ import annotations

import contextlib
import gc

from dpo_dist.config.names import Placement
from dpo_dist.reference.base import ReferencePlacement, load_like_policy
from dpo_dist.reference.precompute_cache import cached_datasets, check_precomputed_columns


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
    sharding backend frees what its wrapper would keep alive (`release`: DeepSpeed's engine, hooks and coordinator
    hold the module, so its partitions are emptied in place); then every handle here is dropped and what still holds
    the module, if anything, is measured (a weak reference: a module nothing holds is gone, its storage with it)."""
    import weakref

    wrapped = trainer.ref_model
    prompts = list(run.cfg.kl.prompts or run.cfg.verify.prompts)
    run.state.recorded_reference = record_reference_logits(run, wrapped, prompts)
    trainer.ref_model = None
    run.sharding.release(run.state.reference, wrapped)
    alive = weakref.ref(run.state.reference)
    run.state.reference = wrapped = None
    gc.collect()
    left = alive()
    run.rr.facts[f"rank_{run.ctx.rank}_reference_bytes_after_free"] = 0 if left is None else storage_bytes(left)


def storage_bytes(model) -> int:
    """Bytes of storage still behind the parameters this rank holds (each storage once): what freeing left, whatever
    the tensors' shapes still say."""
    from dpo_dist.sharding import views

    seen = {}
    for p in model.parameters():
        storage = views.held(p).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
