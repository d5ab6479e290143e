"""The torch-free half of a sharding backend: which backend a sharding name belongs to, the files its launch needs,
and how an accelerate launch's environment names it. The launch, slurm and plan layers read these; the backend
itself (what it does to models and parameters) is dpo_dist.sharding.

Names are chosen once: a shipped sharding (`--sharding zero3`, `fsdp2`) belongs to exactly one backend, and every
later decision asks that backend (dpo_dist.sharding.registry), never `if sharding == ...`.
"""

from __future__ import annotations

import os

from dpo_dist.config.names import Backend, Placement, Sharding

# shipped sharding -> backend; the DeepSpeed ones also ship a JSON (ds_configs/<name>.json)
BACKEND_OF: dict[str, Backend] = {
    Sharding.ZERO2: Backend.DEEPSPEED,
    Sharding.ZERO3: Backend.DEEPSPEED,
    Sharding.ZERO3_OFFLOAD: Backend.DEEPSPEED,
    Sharding.FSDP2: Backend.FSDP2,
}


def backend_of(name: str | None, ds_config: str | None = None) -> Backend:
    """The backend of a run: a user DeepSpeed JSON is DeepSpeed; a shipped name says; no name: the accelerate
    launch's environment (an FSDP launch sets ACCELERATE_USE_FSDP), else DeepSpeed (zero3, the default)."""
    if ds_config:
        return Backend.DEEPSPEED
    if name:
        return BACKEND_OF[name]
    return launched_backend() or Backend.DEEPSPEED


def launched_backend() -> Backend | None:
    """The backend accelerate launched these workers for, from the environment it sets (None: not an accelerate
    launch, or one without a sharding plugin)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return Backend.FSDP2 if os.environ.get("FSDP_VERSION", "2") == "2" else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return Backend.DEEPSPEED
    return None


# backend -> the reference placements it runs (dpo_dist.sharding.<backend> declares the same); the others are refused
# by name before anything loads (docs/fsdp2.md: the placement x backend matrix)
PLACEMENTS_OF: dict[Backend, frozenset[str]] = {
    Backend.DEEPSPEED: frozenset(Placement.values()),
    Backend.FSDP2: frozenset({Placement.ZERO3, Placement.CPU, Placement.PRECOMPUTED, Placement.LORA}),
}


def placement_refusal(cfg) -> str | None:
    """One line when the run's reference placement does not run under its sharding backend yet, else None."""
    backend = backend_of(cfg.sharding.name, cfg.sharding.ds_config)
    placement = cfg.reference.placement
    done = PLACEMENTS_OF[backend]
    if placement in done:
        return None
    return (f"reference.placement {placement} does not run under sharding backend {backend} yet "
            f"(sharding.name {cfg.sharding.name or 'from the launch'}): use placement "
            f"{', '.join(p for p in Placement.values() if p in done)}, or a DeepSpeed sharding (--sharding zero3)")


# backends under which training after the gate (`init --train`, dpo_dist.api.train) is supported: both (FSDP2: DCP
# sharded checkpoints with the lineage marker, a re-verified resume, the Hugging Face export; docs/fsdp2.md). A new
# backend is refused here until its ShardingBackend.export and its checkpoints are done
TRAINS_AFTER_GATE: frozenset[Backend] = frozenset({Backend.DEEPSPEED, Backend.FSDP2})


def train_refusal(cfg) -> str | None:
    """One line when training after the gate does not run under the run's sharding backend yet, else None."""
    backend = backend_of(cfg.sharding.name, cfg.sharding.ds_config)
    if backend in TRAINS_AFTER_GATE:
        return None
    return (f"training after the gate (--train) does not run under sharding backend {backend} yet (its "
            "checkpoints, resume and Hugging Face export are not done): run the gate without --train, or train "
            f"under {' or '.join(sorted(TRAINS_AFTER_GATE))} (--sharding zero3)")


def uses_deepspeed_json(name: str) -> bool:
    """Whether the shipped sharding `name` comes with a DeepSpeed JSON (its launch passes --deepspeed_config_file)."""
    return BACKEND_OF.get(name) == Backend.DEEPSPEED


def fsdp2_trainer_kwargs(settings) -> dict:
    """TRL's DPOConfig arguments under FSDP2 (transformers builds accelerate's FSDP plugin from them). dpo-dist wraps
    the models itself, per decoder layer (dpo_dist.sharding.fsdp2), before the trainer exists, so the plugin's own
    auto-wrap is off (NO_WRAP): accelerate then takes the already-sharded policy as it is, and TRL's prepare_fsdp
    leaves an already-sharded reference alone instead of wrapping it whole at the root."""
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "auto_wrap_policy": "NO_WRAP", "reshard_after_forward": settings.reshard_after_forward,
        "cpu_offload": settings.cpu_offload, "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_ram_efficient_loading": False}}
