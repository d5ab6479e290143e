"""TRL's DPOConfig and DPOTrainer, built from our config under the chosen DeepSpeed sharding.

The DPOConfig is created *before* any model is loaded: it sets up accelerate's DeepSpeed state and transformers'
HfDeepSpeedConfig, which is what makes `from_pretrained` load ZeRO-3 partitioned. transformers reconciles the "auto"
values of the DeepSpeed JSON against these arguments and reports every mismatch (`trainer_config_process`).
"""

from __future__ import annotations

import math
from typing import Any

from .config import RunConfig, resolve_beta

LN2 = math.log(2.0)


def accelerator_is_cpu() -> bool:
    """DeepSpeed's own accelerator choice (DS_ACCELERATOR=cpu, or no GPU): then the trainer must run use_cpu, else
    DeepSpeed's batch-size assertion fails because accelerate counts no devices."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


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
        seed=t.seed,
        data_seed=t.seed,
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        deepspeed=ds,
        ddp_timeout=cfg.sharding.timeout_s,
        use_cpu=accelerator_is_cpu(),
        report_to="none",
        disable_dropout=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=precompute,
    )
    kw["gradient_checkpointing"] = t.gradient_checkpointing  # explicit: TRL's DPOConfig defaults it to True
    if cfg.reference.placement == "ranks" and cfg.reference.batch_requests and cfg.reference.pad_to_multiple_of:
        # reference ranks batch only requests of equal length (see reference_ranks.group_requests): padding every
        # micro-batch to a multiple makes equal lengths common. Policy and reference see the same padded inputs (but
        # the run is no longer bitwise the unpadded one: padding moves bf16 results).
        kw["pad_to_multiple_of"] = cfg.reference.pad_to_multiple_of
    kw.update(t.extra)
    if smoke_steps:
        # A rehearsal: N real steps, a loss logged at every step, nothing saved, and a learning rate large enough
        # that a bf16 weight visibly moves (a 1e-6 Adam step is below bf16 resolution for most weights).
        kw.update(max_steps=smoke_steps, logging_steps=1, save_strategy="no",
                  learning_rate=cfg.verify.smoke_learning_rate, eval_strategy="no")
        if "save_strategy" in t.extra:  # a rehearsal that saves (to test resuming) keeps the config's save_steps
            kw.update(save_strategy=t.extra["save_strategy"], save_steps=t.save_steps)
    return kw


def build_dpo_config(cfg: RunConfig, ds: dict[str, Any], smoke_steps: int = 0, precompute: bool = False):
    from trl import DPOConfig

    return DPOConfig(**dpo_config_kwargs(cfg, ds, smoke_steps, precompute))


def describe_ref_engine(trainer) -> dict[str, Any]:
    """What TRL made of the reference: a DeepSpeed engine, its ZeRO stage, optimizer-free, eval mode."""
    ref = trainer.ref_model
    engine = type(ref).__name__
    stage = ref.zero_optimization_stage() if hasattr(ref, "zero_optimization_stage") else None
    has_opt = getattr(ref, "basic_optimizer", None) is not None or getattr(ref, "client_optimizer", None) is not None
    module = getattr(ref, "module", ref)  # the engine object's own .training flag is not what runs forwards
    return {"type": engine, "stage": stage, "optimizer": has_opt, "training": module.training}


class LossRecorder:
    """A TrainerCallback that keeps every logged training loss (the first one must be ln 2)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.losses: list[float] = []
                self.kl_logged: list[float] = []  # what reached the trainer's log lines (and TensorBoard)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))
                if logs and "kl/true_token_kl" in logs:
                    self.kl_logged.append(float(logs["kl/true_token_kl"]))

        return _Recorder()
