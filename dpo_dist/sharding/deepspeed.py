"""sharding backend deepspeed: ZeRO-2/3 from a shipped or user DeepSpeed JSON (today's behaviour, behind the seam).

The DeepSpeed state is ambient: the DPOConfig made in setup registers the JSON with transformers, and models loaded
after it come out partitioned (from_pretrained under zero.Init, or dpo_dist.load.fastload into the partitions)."""

from __future__ import annotations

from typing import Any

from dpo_dist.config.names import Backend
from dpo_dist.config.resources import batch_mismatch, launch_stage_conflict, resolve_ds_config, zero_stage
from dpo_dist.load import models
from dpo_dist.sharding.base import ShardingBackend


class DeepSpeedBackend(ShardingBackend):
    name = Backend.DEEPSPEED

    def setup(self, run) -> bool:
        cfg = run.cfg
        label, ds = resolve_ds_config(cfg.sharding.name, cfg.sharding.ds_config)
        conflict = launch_stage_conflict(ds, label)
        if conflict:
            return run.rr.add("sharding matches launch", False, conflict, conflict)
        run.state.update(ds_label=label, ds=ds, stage=zero_stage(ds))
        bad_batch = batch_mismatch(ds, cfg, run.ctx.world_size)
        if bad_batch:
            return run.rr.add("batch sizes consistent", False, bad_batch, bad_batch)
        return True

    def describe(self, state) -> str:
        return f"ZeRO-{state.stage} ({state.ds_label})"

    def shards_params(self, state) -> bool:
        return state.stage == 3

    def trainer_kwargs(self, run) -> dict[str, Any]:
        return {"deepspeed": run.state.ds}

    def fast_loader_refusal(self, state) -> str | None:
        if state.stage != 3:
            return f"ZeRO-{state.stage}: the fast loader fills ZeRO-3 partitions only"
        zero = state.ds.get("zero_optimization") or {}
        offload = str((zero.get("offload_param") or {}).get("device", "none")).lower()
        quantized = zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights")
        if offload == "nvme":
            return "parameters offloaded to NVMe"
        if quantized is True:
            return "ZeRO quantized weights"
        return None

    def load_model(self, run, path, plan, role: str):
        cfg = run.cfg
        return models.load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle,
                                     plan=plan)

    def whole(self):
        from dpo_dist.compat.transformers import outside_zero3

        return outside_zero3()  # transformers partitions every model built while a ZeRO-3 config is registered

    def release(self, module, wrapped) -> None:
        """DeepSpeed's engine, hooks and coordinator keep references to the module: reset the ZeRO-3 trace, destroy
        the engine, then empty each partition and each parameter."""
        import torch

        from dpo_dist.compat.deepspeed import reset_zero3_trace

        reset_zero3_trace(wrapped)
        if wrapped is not None and hasattr(wrapped, "destroy"):
            wrapped.empty_partition_cache()
            wrapped.destroy()
        for p in module.parameters():
            ds_tensor = getattr(p, "ds_tensor", None)
            if ds_tensor is not None:
                ds_tensor.data = torch.empty(0, dtype=ds_tensor.dtype, device=ds_tensor.device)
        super().release(module, wrapped)

    def forward_config(self, state) -> dict[str, Any] | None:
        return state.args.hf_deepspeed_config.config

    def check_trainer_reference(self, run, trainer, want_sharded: bool) -> bool:
        eng = describe_engine(trainer.ref_model)
        want_stage = 3 if want_sharded else 0
        return run.rr.add("trainer reference is a prepared engine",
                          eng["type"] == "DeepSpeedEngine" and eng["stage"] == want_stage and not eng["optimizer"]
                          and not eng["training"], f"{eng['type']} stage {eng['stage']}, optimizer "
                          f"{eng['optimizer']}, training {eng['training']}",
                          "TRL did not wrap the reference as a DeepSpeed inference engine: launch with accelerate "
                          "and a DeepSpeed config (launch/zero3.yaml)")

    def export(self, trainer, final, cfg, ctx) -> None:
        # ZeRO-3: the 16-bit weights gathered to rank 0 (stage3_gather_16bit_weights_on_model_save); ZeRO-2 and a LoRA
        # policy (its adapters): the trainer's own save
        trainer.save_model(str(final))


def describe_engine(ref) -> dict[str, Any]:
    """What TRL made of the reference: a DeepSpeed engine, its ZeRO stage, optimizer-free, eval mode."""
    stage = ref.zero_optimization_stage() if hasattr(ref, "zero_optimization_stage") else None
    has_opt = getattr(ref, "basic_optimizer", None) is not None or getattr(ref, "client_optimizer", None) is not None
    module = getattr(ref, "module", ref)  # the engine object's own .training flag is not what runs forwards
    return {"type": type(ref).__name__, "stage": stage, "optimizer": has_opt, "training": module.training}
