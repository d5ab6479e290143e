"""The interface every sharding backend implements: the questions the stages of `dpo-dist init` ask about how the
policy (and a reference placed like it) is sharded, answered once per backend in dpo_dist/sharding/<backend>.py.

Shaped like dpo_dist.reference.base: the stages never ask which backend runs; InitRun holds `run.sharding` beside
`run.placement`, and placements call `run.sharding.*` where they would otherwise touch a DeepSpeed engine or a
DTensor. Placements compose with backends (5 placements x 2 backends without 10 classes): config.sharding lists the
placements each backend runs (torch-free, so the preflight refuses the others by name, exit 2), and setup refuses
them again for the Python API (docs/fsdp2.md has the matrix).

What each parameter holds locally is not asked here: it is a property of the tensor (dpo_dist.sharding.views).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from dpo_dist.config.names import Backend
from dpo_dist.config.sharding import placement_refusal


class ShardingBackend:
    """One sharding backend. `run` below is the stages' InitRun (cfg, ctx, rr, state), as for placements."""

    name: ClassVar[Backend]

    # -- setup ------------------------------------------------------------------------------------------------------
    def setup(self, run) -> bool:
        """Resolve this backend's settings into run.state (ds_label, ds, stage) and add the rows of what conflicts
        with the launch; False stops the run."""
        raise NotImplementedError

    def describe(self, state) -> str:
        """The configuration row's words for this sharding."""
        raise NotImplementedError

    def refuse_placement(self, run) -> bool:
        """Refuse a placement this backend does not run yet (a row naming both; the CLI's preflight already refused
        it with exit 2, this is the Python API's path)."""
        refused = placement_refusal(run.cfg)
        return True if refused is None else run.rr.add("sharding fits placement", False, refused, refused)

    def shards_params(self, state) -> bool:
        """Whether the policy's parameters are sharded across ranks (ZeRO-3, FSDP2), not replicated (ZeRO-2)."""
        raise NotImplementedError

    def trainer_kwargs(self, run) -> dict[str, Any]:
        """What TRL's DPOConfig needs to train under this backend (deepspeed=..., or fsdp=..., fsdp_config=...)."""
        raise NotImplementedError

    # -- load -------------------------------------------------------------------------------------------------------
    def fast_loader_refusal(self, state) -> str | None:
        """Why dpo_dist.load's direct reader cannot fill this backend's shards (None: it may try)."""
        return None

    def load_model(self, run, path, plan, role: str):
        """The policy (role "policy") or a reference loaded like it (role "reference", frozen by the caller), sharded
        as this backend shards it; `plan` a dpo_dist.load.fastload plan or None (from_pretrained)."""
        raise NotImplementedError

    def whole(self):
        """A context in which a model is built whole on this rank, unsharded, whatever this backend does to the models
        it loads (the cpu placement's host-memory reference); nothing to undo by default."""
        return contextlib.nullcontext()

    # -- static proofs ----------------------------------------------------------------------------------------------
    def audit(self, run) -> bool:
        """Rows about how the loaded models are sharded (FSDP2: the wrap audit); nothing to add by default."""
        return True

    # -- forward proofs ---------------------------------------------------------------------------------------------
    def forward_config(self, state) -> dict[str, Any] | None:
        """What verify.probes.forward_ready needs to make a sharded model ready for forwards (a DeepSpeed config for
        its temporary inference engine; None where the sharded module runs forwards itself)."""
        return None

    # -- release ----------------------------------------------------------------------------------------------------
    def release(self, module, wrapped) -> None:
        """Free the weight storage of a frozen reference on this rank once nothing needs it (the precomputed
        placement, its log-probs cached): the storage itself, not our handles, since what the backend wrapped it in
        (`wrapped`: what TRL holds) may keep the module alive. Default: an unsharded module's parameters emptied."""
        import torch

        for p in module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    # -- trainer ----------------------------------------------------------------------------------------------------
    def check_trainer_reference(self, run, trainer, want_sharded: bool) -> bool:
        """Rows about what TRL made of a reference placed like the policy."""
        raise NotImplementedError

    def unwrap(self, wrapped):
        """The module inside what the trainer holds (a DeepSpeed engine's .module; an FSDP2 module is itself)."""
        return getattr(wrapped, "module", wrapped)

    # -- after the gate -----------------------------------------------------------------------------------------------
    def export(self, trainer, final, cfg, ctx) -> None:
        """Save the trained policy into `final` in Hugging Face format (safetensors and config.json, loadable with
        from_pretrained), in model.dtype. Called on every rank (the gathers are collectives); rank 0 writes."""
        raise NotImplementedError
