"""model.loader: which loader the load stage uses for a checkpoint (dpo_dist.load.fastload or transformers'
from_pretrained), decided the same on every rank."""

from __future__ import annotations

from pathlib import Path


def fast_plan(run, path: Path, fact: str = "loader"):
    """The dpo_dist.load.fastload plan for the checkpoint at `path`, or None for transformers' from_pretrained,
    decided the same on every rank (an all-reduced flag); records the choice and why in facts[fact] and facts[fact +
    "_reason"]. model.loader fast raises ValueError (one line: what blocked it, and the fix) where auto falls back
    with a warning."""
    from dpo_dist.load import fastload

    cfg, rr = run.cfg, run.rr
    choice, plan = cfg.model.loader, None
    sharded = run.sharding.shards_params(run.state)
    refusal = run.sharding.fast_loader_refusal(run.state)  # the backend's reasons (ZeRO-2, NVMe offload, ...)
    if choice == "transformers":
        why = "model.loader: transformers"
    elif refusal and not sharded:
        why = refusal
    else:
        why = refusal or ""
        if not why:
            try:
                plan = fastload.plan_load(path, cfg.model.dtype, cfg.model.trust_remote_code)
            except fastload.FastLoadRefused as e:
                why = " ".join(str(e).split())
        if not run.ctx.all_ok(plan is not None):
            plan, why = None, why or "refused on another rank"
    if plan is not None:
        rr.facts.update({fact: "fast", fact + "_reason": "dpo_dist.load.fastload: each rank reads its own "
                         "partitions' bytes from the files"})
        return plan
    if choice == "fast":
        raise ValueError(f"model.loader is fast but the fast loader cannot load {path}: {why}. Fix: set "
                         "model.loader: transformers (or auto) to load with from_pretrained")
    if choice == "auto" and sharded:
        run.ctx.warn(f"fast loader not used for {path} ({why}): loading with transformers' from_pretrained")
    rr.facts.update({fact: "transformers", fact + "_reason": why})
    return None
