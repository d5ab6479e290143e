"""Put the trainer back where the gate proved it, after the smoke steps: training then starts from the initial state.

The smoke steps are real `trainer.train()` steps at a rehearsal learning rate: they create the DeepSpeed engine and its
optimizer, move the policy, advance the RNGs and leave the trainer holding an engine that a second `train()` cannot
use (transformers' train() frees accelerate's engine handle and, seeing the model already wrapped, never prepares a new
one: `'NoneType' object has no attribute 'backward'`, issue 26). A snapshot taken before them undoes all of it:

- the trainable weights: this rank's own part only (under ZeRO-3 its partition, `ds_tensor`; under FSDP2 the
  DTensor's local shard, the storage its all-gathers read; otherwise the tensor), copied to host memory, so the
  snapshot costs the trainable bytes this rank holds and no accelerator memory;
- the optimizer, the scheduler and the step counter: the smoke steps' engine is destroyed (its hooks removed) and the
  trainer handed its unwrapped model again, so the next `train()` builds a fresh engine, optimizer and scheduler from
  the restored weights exactly as the first one did (the fp32 master copies are made from the bf16 weights again;
  under FSDP2 the module stays sharded, the fp32 master is the restored shard, and a fresh optimizer is built);
- the RNG states (python, numpy, torch, every accelerator device): the dataloader's order and any sampling follow.

The smoke steps' logs, the KL monitor's history and adaptive state, and beta go back too (KLMonitor.snapshot/restore).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_dist.compat.deepspeed import local_partition
from dpo_dist.sharding import views


@dataclass
class Snapshot:
    rank: int
    weights: dict[str, tuple[bool, torch.Tensor]] = field(default_factory=dict)  # name -> (was a partition, copy)
    rng: dict[str, Any] = field(default_factory=dict)
    beta: float | None = None
    monitor: dict[str, Any] | None = None


def _local(p, rank: int) -> tuple[bool, torch.Tensor]:
    part = local_partition(p, rank)
    return (True, part[0]) if part is not None else (False, views.held(p))  # FSDP2: the DTensor's local shard


def take(trainer, rank: int, monitor=None) -> Snapshot:
    """Before the smoke steps: the trainable weights this rank holds, the RNGs, beta and the KL monitor's state."""
    snap = Snapshot(rank)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            partitioned, t = _local(p, rank)
            snap.weights[name] = (partitioned, t.detach().to("cpu", copy=True))
    snap.rng = _rng_state()
    snap.beta = getattr(trainer, "beta", None)
    snap.monitor = monitor.snapshot() if monitor is not None else None
    return snap


def restore(snap: Snapshot, trainer, monitor=None) -> None:
    """After the smoke steps: the smoke engine gone, the weights, RNGs, beta and monitor as they were."""
    engine = trainer.model_wrapped
    if engine is not trainer.model and hasattr(engine, "destroy"):
        engine.destroy()  # DeepSpeed: the ZeRO optimizer's and parameter hooks off the module
    # the next train() prepares the model afresh (a new engine, optimizer and scheduler); public Trainer attributes
    trainer.model_wrapped = trainer.model
    trainer.deepspeed = None
    trainer.optimizer = None
    trainer.lr_scheduler = None
    trainer.accelerator.free_memory()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if name not in snap.weights:
                continue
            was_part, saved = snap.weights[name]
            part = local_partition(p, snap.rank)
            if part is None:
                held = views.held(p)  # the tensor, or an FSDP2 DTensor's local shard (the storage FSDP2 gathers from)
                held.copy_(saved.view_as(held))
            elif was_part:
                part[0].data.copy_(saved.view_as(part[0]))
            else:  # a full tensor then (LoRA adapters are partitioned by the smoke engine): this rank's slice of it
                target, start, n, _ = part
                target.data.view(-1)[:n].copy_(saved.reshape(-1)[start:start + n])
    _set_rng_state(snap.rng)
    if snap.beta is not None:
        trainer.beta = snap.beta
    if monitor is not None and snap.monitor is not None:
        monitor.restore(snap.monitor)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
