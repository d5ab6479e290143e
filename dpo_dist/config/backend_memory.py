"""What each sharding backend costs in memory, as data the planner reads (dpo_dist.plan never names a backend).

One record per `Backend` member, beside the strategy that runs it (dpo_dist/sharding/<name>.py), as placements have
theirs (config/placement_memory.py) and for the same reasons: the planner (layer 3) may not import dpo_dist.sharding
and must not import torch. A new backend adds its record here; tests/test_planner.py fails until it does.

Sources of each trait: DeepSpeed 0.19's stage-3 / stage-1-2 optimizers (docs/planner.md's table); torch 2.13's
FSDP2 (`fully_shard`, `MixedPrecisionPolicy`, `CPUOffloadPolicy`) and accelerate 1.15's `fsdp2_prepare_model`, which
upcasts trainable parameters to fp32 when mixed precision is on (the sharded fp32 parameter is the master copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dpo_dist.config.names import Backend, Sharding


@dataclass(frozen=True)
class BackendMemory:
    """How a backend lays the policy's model states and its gathered weights out on a training rank."""

    label: str  # the layout's name in the plan: "ZeRO-{stage}" or "FSDP2" ({stage} filled in)
    stages: tuple[int, ...]  # 2: optimizer states and gradients sharded, weights replicated; 3: weights sharded too
    offloads: tuple[str, ...]  # what it can move to host memory: "none", "optimizer", "all" (+ the weights)
    # where the fp32 master copy of a trainable parameter lives under mixed precision: in the optimizer beside the
    # 16-bit weights (DeepSpeed: 2 + 4 bytes), or as the sharded parameter itself (FSDP2: 4 bytes, no 16-bit shard;
    # gradients and Adam states then follow the parameter's dtype and no fp32 gradient copy is made at step time)
    master: Literal["optimizer", "parameter"]
    # what is gathered for a forward/backward: DeepSpeed's modules one at a time (the largest module, plus what
    # stage3_max_live_parameters keeps), or FSDP2's wrap units (a decoder layer each, and the root's own parameters)
    gather: Literal["module", "unit"]
    prefetch_units: int = 0  # units gathered at once (the one computing + those prefetched), "unit" only
    reduce_bytes: int = 0  # bytes per element of a unit's gradient cast for reduce-scatter (fp32 reduce), "unit" only
    reduce_bucket: bool = False  # DeepSpeed's reduce bucket (hidden^2 elements; x2 with overlap_comm at stage 2)
    offload_moves_reference: bool = True  # offloading the weights offloads the like-policy reference's too
    reads_ds_config: bool = False  # stage, offloads and ZeRO-3 knobs come from a DeepSpeed JSON
    options_key: str = ""  # the run config's typed options for it (sharding.<key>): cpu_offload, mixed_precision
    # (stage, offload) -> the shipped sharding that runs it; a layout missing here is a custom DeepSpeed JSON
    shipped: dict[tuple[int, str], str] = field(default_factory=dict)
    offload_keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # offload -> run config sharding keys
    stage_cost: dict[int, float] = field(default_factory=dict)  # the recommendation's order: lower is preferred


MEMORY: dict[Backend, BackendMemory] = {
    Backend.DEEPSPEED: BackendMemory(
        label="ZeRO-{stage}", stages=(2, 3), offloads=("none", "optimizer", "all"), master="optimizer",
        gather="module", reduce_bucket=True, reads_ds_config=True,
        shipped={(2, "none"): Sharding.ZERO2.value, (3, "none"): Sharding.ZERO3.value,
                 (3, "all"): Sharding.ZERO3_OFFLOAD.value},
        stage_cost={2: 0.0, 3: 1.0}),
    # FSDP2 shards everything (stage 3 in ZeRO's terms); its CPUOffloadPolicy moves the policy's parameters,
    # gradients and optimizer states together ("all"), never the reference (dpo_dist.sharding.fsdp2 wraps it alone).
    # Two units gathered: the one computing and the one FSDP2's implicit prefetch all-gathers next.
    Backend.FSDP2: BackendMemory(
        label="FSDP2", stages=(3,), offloads=("none", "all"), master="parameter", gather="unit", prefetch_units=2,
        reduce_bytes=4, offload_moves_reference=False, options_key="fsdp2",
        shipped={(3, "none"): Sharding.FSDP2.value, (3, "all"): Sharding.FSDP2.value},
        offload_keys={"all": {"fsdp2": {"cpu_offload": True}}},
        stage_cost={3: 1.5}),  # after ZeRO-3: training after the gate is not done under FSDP2 yet
}


def backend_memory_of(backend: str) -> BackendMemory:
    """The record of a backend name (plain strings from configs; Backend members are too)."""
    return MEMORY[Backend(backend)]
