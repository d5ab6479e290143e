"""What each reference placement costs in memory, as data the planner reads (dpo_dist.plan never names a placement).

One record per `Placement` member, beside the strategy that runs it (dpo_dist/reference/<name>.py). It lives in the
config layer because the planner (layer 3) may not import dpo_dist.reference (layer 6) and must not import torch:
`dpo-dist plan` runs on a login node in a second. A new placement adds its record here;
tests/test_placement_registry.py fails until it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpo_dist.config.names import Placement

ALL_PHASES = ("load", "init", "train", "step")


@dataclass(frozen=True)
class PlacementMemory:
    """What the reference takes on the ranks that train the policy, per the planner's phases."""

    # the reference's weights on a training rank: sharded like the policy (w*Psi/P under ZeRO-3, a stage-0 replica
    # w*Psi under ZeRO-2), mapped once per node in host memory, or nothing
    weights: Literal["like_policy", "host_mmap", "none"]
    weights_phases: tuple[str, ...] = ALL_PHASES
    weights_note: str = ""  # "" = "ZeRO-3 partition" / "stage-0 replica under ZeRO-2" for like_policy
    # where the reference's no-grad forward runs on a training rank, in which phase, and why
    forward: Literal["accelerator", "host", "none"] = "accelerator"
    forward_phase: str = "train"
    forward_note: str = "no-grad forward while the policy's activations are live"
    trains_adapters: bool = False  # only LoRA adapters train; the reference is the frozen base (no model of its own)
    own_ranks: bool = False  # the reference lives on K extra ranks that do not train (the planner's reference role)
    # the recommendation's order among layouts that fit: lower is preferred
    cost: float = 0.0

    @property
    def separate_model(self) -> bool:
        """A reference model of its own is built (lora's is the policy's base with adapters off)."""
        return not self.trains_adapters


MEMORY: dict[Placement, PlacementMemory] = {
    Placement.ZERO3: PlacementMemory(weights="like_policy", cost=0.0),
    Placement.PRECOMPUTED: PlacementMemory(
        weights="like_policy", weights_phases=("load", "init"), weights_note="only until its log-probs are computed",
        forward_phase="init", forward_note="no-grad forwards that precompute the reference log-probs", cost=0.5),
    Placement.RANKS: PlacementMemory(weights="none", forward="none", own_ranks=True, cost=2.0),
    Placement.CPU: PlacementMemory(weights="host_mmap", forward="host",
                                   forward_note="the reference's forward runs on the CPU", cost=4.0),
    Placement.LORA: PlacementMemory(weights="none", trains_adapters=True, cost=5.0),
}


def memory_of(placement: str) -> PlacementMemory:
    """The record of a placement name (config values are plain strings; Placement members are too)."""
    return MEMORY[Placement(placement)]
