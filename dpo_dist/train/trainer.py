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
    """backend_kwargs: what the sharding backend adds (dpo_dist.sharding: fsdp/fsdp_config under FSDP2)."""
    from trl import DPOConfig

    return DPOConfig(**{**dpo_config_kwargs(cfg, ds, smoke_steps, precompute), **(backend_kwargs or {})})


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
