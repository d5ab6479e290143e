"""Our run config -> the keyword arguments of TRL's DPOConfig (pure: the memory planner's dry run and the trainer
build the same arguments; TRL itself is imported only where the DPOConfig is made, dpo_dist.train.trainer)."""

from __future__ import annotations

from typing import Any

from dpo_dist.config.names import Dtype, Placement
from dpo_dist.config.schema import RunConfig, resolve_beta


def accelerator_is_cpu() -> bool:
    """DeepSpeed's own accelerator choice (DS_ACCELERATOR=cpu, or no GPU): then the trainer must run use_cpu, else
    DeepSpeed's batch-size assertion fails because accelerate counts no devices."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def eval_strategy(cfg: RunConfig) -> str:
    """auto: the eval set that was given is evaluated during training (every eval_steps), none: no evaluation."""
    e = cfg.train.eval_strategy
    return ("steps" if cfg.data.eval else "no") if e == "auto" else e


def dpo_config_kwargs(cfg: RunConfig, ds: dict[str, Any], smoke_steps: int = 0, precompute: bool = False
                      ) -> dict[str, Any]:
    """Keyword arguments of TRL's DPOConfig. CPU-only follows DeepSpeed's accelerator (set by the launch env)."""
    t = cfg.train
    kw: dict[str, Any] = dict(
        output_dir=t.output_dir,
        beta=resolve_beta(cfg)[0],
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is the share of the steps
        lr_scheduler_type=t.lr_scheduler_type,
        eval_strategy=eval_strategy(cfg),
        eval_steps=t.eval_steps or t.save_steps,
        seed=t.seed,
        data_seed=t.seed,
        bf16=cfg.model.dtype == Dtype.BFLOAT16,
        fp16=cfg.model.dtype == Dtype.FLOAT16,
        deepspeed=ds,
        ddp_timeout=cfg.sharding.timeout_s,
        use_cpu=accelerator_is_cpu(),
        report_to="none",
        disable_dropout=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=precompute,
    )
    kw["gradient_checkpointing"] = t.gradient_checkpointing  # explicit: TRL's DPOConfig defaults it to True
    if cfg.reference.placement == Placement.RANKS and cfg.reference.batch_requests \
            and cfg.reference.pad_to_multiple_of:
        # reference ranks batch only requests of equal length (see rank_server.group_requests): padding every
        # micro-batch to a multiple makes equal lengths common. Policy and reference see the same padded inputs (but
        # the run is no longer bitwise the unpadded one: padding moves bf16 results).
        kw["pad_to_multiple_of"] = cfg.reference.pad_to_multiple_of
    kw.update(t.extra)
    if smoke_steps:
        # A rehearsal: N real steps, a loss logged at every step, nothing saved, and a learning rate large enough
        # that a bf16 weight visibly moves (a 1e-6 Adam step is below bf16 resolution for most weights).
        # Its own schedule: full rate from the first step (a warmup would make step 1 a no-op), linear decay, and
        # whatever a rehearsal that saves wrote is kept.
        kw.update(max_steps=smoke_steps, logging_steps=1, save_strategy="no",
                  learning_rate=cfg.verify.smoke_learning_rate, eval_strategy="no", warmup_steps=0,
                  lr_scheduler_type="linear", save_total_limit=None)
        if "save_strategy" in t.extra:  # a rehearsal that saves (to test resuming) keeps the config's save_steps
            kw.update(save_strategy=t.extra["save_strategy"], save_steps=t.save_steps)
    return kw


# options of older TRL/transformers that users carry over, and what replaced them (a did-you-mean would mislead)
REMOVED_OPTIONS = {
    "rpo_alpha": "TRL 1.x has no rpo_alpha: RPO is loss_type: [sigmoid, sft] with loss_weights: [1, ALPHA]; ",
    "warmup_ratio": "transformers 5 dropped warmup_ratio: warmup_steps takes a fraction below 1 as a ratio; ",
}


def unknown_extra_problems(extra: dict[str, Any]) -> list[str]:
    """train.extra keys that are not DPOConfig fields, each with a did-you-mean from DPOConfig's own fields: caught
    with the other input checks (exit 2), not as DPOConfig's TypeError once every rank has loaded the model. Imports
    TRL (seconds), so it runs in init's preflight, not in every config load (plan, launch)."""
    import dataclasses
    import difflib

    if not extra:
        return []
    from trl import DPOConfig

    known = sorted(f.name for f in dataclasses.fields(DPOConfig))
    out = []
    for key in sorted(set(extra) - set(known)):
        close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
        hint = REMOVED_OPTIONS.get(key) or (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
        out.append(f"'train.extra.{key}' is not a DPOConfig field of TRL 1.16. Fix: {hint}correct or remove it")
    return out
