"""What the stages of `dpo-dist init` hand each other, typed: a field set by one stage and read by a later one. A
mistyped name raises (slots) instead of reading a silent None, as a dict key would."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class InitState:
    # setup
    ds_label: str | None = None  # the sharding's name, or the path of a user DeepSpeed config
    ds: dict[str, Any] | None = None  # the resolved DeepSpeed config
    stage: int | None = None  # its ZeRO stage
    smoke_steps: int = 0  # steps the smoke stage runs (the placement may raise the configured number)
    args: Any = None  # trl.DPOConfig
    train_fields: dict[str, Any] | None = None  # with smoke steps: the schedule training runs under after them
    # tokenizer
    pol_path: Path | None = None
    ref_path: Path | None = None
    tok: Any = None
    # data: {"train": PreparedData, "eval": PreparedData | None}
    data: dict[str, Any] | None = None
    # load
    ref_plan: Any = None  # dpo_dist.load.fastload plan for the reference (placements that load it as the policy)
    policy: Any = None
    reference: Any = None  # the reference module on this rank; None where it lives elsewhere or was freed
    # static proofs
    fp_policy: dict[str, str] | None = None
    fp_reference: dict[str, str] | None = None
    lineage: dict[str, Any] | None = None
    # forward proofs (lora: the PEFT-wrapped policy, and the arguments it was wrapped with)
    peft_policy: Any = None
    peft_kwargs: dict[str, Any] | None = None
    # trainer
    trainer: Any = None
    kl_monitor: Any = None
    recorded_reference: Any = None  # precomputed: the reference's logits for the KL monitor's prompts
    # placement ranks: this policy rank's line to its reference rank (dpo_dist.reference.rank_server.RemoteReference)
    remote: Any = None

    def update(self, **values: Any) -> None:
        """Set several fields; an unknown name raises TypeError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"InitState has no field {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)
