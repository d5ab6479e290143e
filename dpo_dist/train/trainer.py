"""TRL's DPOConfig and DPOTrainer, built from our config under the chosen DeepSpeed sharding.

The DPOConfig is created *before* any model is loaded: it sets up accelerate's DeepSpeed state and transformers'
HfDeepSpeedConfig, which is what makes `from_pretrained` load ZeRO-3 partitioned. transformers reconciles the "auto"
values of the DeepSpeed JSON against these arguments and reports every mismatch (`trainer_config_process`).
"""

from __future__ import annotations

from typing import Any

from dpo_dist.config.schema import RunConfig
from dpo_dist.config.trl_args import dpo_config_kwargs


def build_dpo_config(cfg: RunConfig, ds: dict[str, Any] | None, smoke_steps: int = 0, precompute: bool = False,
                     backend_kwargs: dict[str, Any] | None = None):
    """ds None: the arguments without DeepSpeed (training_fields reads the schedule from them). transformers keeps one
    global ZeRO-3 config, set by the last DPOConfig made with DeepSpeed and unset by one without: build those first.
    backend_kwargs: what the sharding backend adds (dpo_dist.sharding: fsdp/fsdp_config under FSDP2)."""
    from trl import DPOConfig

    kw = {**dpo_config_kwargs(cfg, ds or {}, smoke_steps, precompute), **(backend_kwargs or {})}
    if ds is None:
        kw.pop("deepspeed", None)
    return DPOConfig(**kw)


# What the smoke steps set differently from training (trl_args.dpo_config_kwargs), and what TrainingArguments derives
# from those: after the smoke steps the trainer's own arguments take these values from the training DPOConfig.
SMOKE_FIELDS = ("max_steps", "num_train_epochs", "learning_rate", "logging_steps", "save_strategy", "save_steps",
                "eval_strategy", "eval_steps", "do_eval", "warmup_steps", "lr_scheduler_type", "save_total_limit")


def training_fields(train_args) -> dict[str, Any]:
    return {name: getattr(train_args, name) for name in SMOKE_FIELDS}


def use_training_fields(trainer, fields: dict[str, Any] | None) -> None:
    """Switch the gate's trainer from the smoke steps' schedule to the run's (same object: whatever the trainer set on
    its arguments stays)."""
    for name, value in (fields or {}).items():
        setattr(trainer.args, name, value)


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
