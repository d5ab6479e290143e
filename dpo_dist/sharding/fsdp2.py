"""sharding backend fsdp2: PyTorch FSDP2 (`fully_shard`, DTensor), the models wrapped by dpo-dist itself.

Policy and reference are each sharded per decoder layer (the model's `_no_split_modules` blocks), then the root, on a
1-D mesh over every rank, before the trainer exists: the proofs then run on exactly the layout that trains, and
accelerate (`fsdp2_prepare_model`) and TRL (`prepare_fsdp`) take the modules as they are (they skip an FSDPModule)
instead of wrapping the reference once at the root (TRL: every reference forward would gather the whole model).

Loading without a full copy on any rank: the model is built on the meta device, sharded there, given empty local
shards (`to_empty`), and each rank reads its own Shard(0) rows of every tensor straight from the safetensors files
(dpo_dist.load.fastload's pread reader; a Shard(0) local shard is a contiguous row range). Where the fast plan is
refused (dtype cast, converted or tied tensors), rank 0 loads with from_pretrained and broadcasts, each rank keeping
its rows (load_rank0_broadcast), with the loader's one warning line.

Mixed precision (sharding.fsdp2.mixed_precision bf16): compute in bf16, gradients reduced in fp32, and the trained
policy's stored copy upcast to fp32 as accelerate does (bf16 -> fp32 is exact, so the proofs compare in the checkpoint
dtype: dpo_dist.verify.weights casts back); the frozen reference stays in the checkpoint dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dpo_dist.config.names import Backend
from dpo_dist.config.sharding import fsdp2_trainer_kwargs
from dpo_dist.load import models
from dpo_dist.sharding import views
from dpo_dist.sharding.base import ShardingBackend
from dpo_dist.sharding.views import dtensor_view


class Fsdp2Backend(ShardingBackend):
    name = Backend.FSDP2  # its placements: config.sharding.PLACEMENTS_OF (docs/fsdp2.md: the matrix)

    def setup(self, run) -> bool:
        from dpo_dist.compat.accelerate import fsdp_on_cpu

        if run.ctx.device.type == "cpu":
            fsdp_on_cpu()  # accelerate 1.15 ignores an FSDP plugin on CPU otherwise (GPU: accelerate's own branch)
        run.state.update(ds_label="fsdp2", ds=None, stage=None)
        return True

    def describe(self, state) -> str:
        return "FSDP2 (fsdp2)"

    def shards_params(self, state) -> bool:
        return True

    def trainer_kwargs(self, run) -> dict[str, Any]:
        return fsdp2_trainer_kwargs(run.cfg.sharding.fsdp2)

    def fast_loader_refusal(self, state) -> str | None:
        return None

    def load_model(self, run, path, plan, role: str):
        if plan is not None and not plan.aliases:
            return load_sharded(run, plan, role)
        # the loader choice warned once, naming why the files cannot be read shard by shard
        return load_rank0_broadcast(run, path, role)

    def audit(self, run) -> bool:
        """The policy's wrap; the reference's where the placement loads it like the policy (sharded: zero3,
        precomputed), and the dtype of any reference module held here (the cpu placement's host copy too)."""
        ok = wrap_audit(run.state.policy, "policy", run.rr)
        ref = run.state.reference
        if ref is None:
            return ok
        if run.placement.loads_like_policy:
            ok &= wrap_audit(ref, "reference", run.rr)
        return ok & reference_dtype(ref, run.cfg, run.rr)

    def release(self, module, wrapped) -> None:
        """Nothing to free in place: FSDP2 keeps no handle on a module outside it (its state, hooks and shards live on
        the module), so the module goes once its holders drop it, which the caller verifies (a shard's storage cannot
        be shrunk in place: the fast loader's reads into it make it non-resizable)."""

    def check_trainer_reference(self, run, trainer, want_sharded: bool) -> bool:
        from torch.distributed.fsdp import FSDPModule

        ref = trainer.ref_model
        state = trainer.accelerator.state
        ok = isinstance(ref, FSDPModule) and ref is run.state.reference and not ref.training
        return run.rr.add("trainer reference is the sharded one", ok,
                          f"{type(ref).__name__}, accelerate {state.distributed_type.value}, training {ref.training}, "
                          f"{'the' if ref is run.state.reference else 'not the'} reference dpo-dist proved",
                          "TRL did not keep dpo-dist's per-layer FSDP2 reference: launch with accelerate and "
                          "launch/fsdp2.yaml (dpo-dist launch --sharding fsdp2)")

    def export(self, trainer, final, cfg, ctx) -> None:
        """transformers' save_model writes no weights under SHARDED_STATE_DICT (its checkpoints are DCP shards), so
        the export is done here, with torch's FSDP2 gather (what accelerate's get_state_dict calls):
        get_model_state_dict(full_state_dict, cpu_offload) all-gathers one tensor at a time and only rank 0 keeps it,
        in host memory (no rank holds more than one full tensor beyond its shards; rank 0 the host copy of the whole
        model, as ZeRO-3's 16-bit gather). The fp32 master is written in model.dtype, as ZeRO-3 writes its 16-bit
        weights: the same final/ under either backend, what the next run loads."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from dpo_dist.load.checkpoint import DTYPES

        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.is_main:
            want = DTYPES[cfg.model.dtype]
            state = {k: v.to(want) if v.is_floating_point() else v for k, v in state.items()}
            self.unwrap(trainer.model).save_pretrained(str(final), state_dict=state, safe_serialization=True)
        del state


def mesh(ctx):
    """The 1-D device mesh over every rank (gloo on CPU, NCCL on GPUs: the process group's own backend)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not torch.distributed.is_initialized():
        raise RuntimeError("FSDP2 needs a process group: launch with accelerate or torchrun")
    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's decoder layers: modules whose class is one of its `_no_split_modules` (FSDP2 subclasses a wrapped
    module's class, so the class is looked up along the MRO)."""
    from dpo_dist.compat.transformers import no_split_modules

    names = set(no_split_modules(model))
    return [(n, m) for n, m in model.named_modules()
            if n and any(k.__name__ in names for k in type(m).__mro__)]


def policy_args(settings, role: str, ctx) -> dict[str, Any]:
    """fully_shard's keyword arguments for a unit of the policy or the reference."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if settings.mixed_precision == "bf16" else MixedPrecisionPolicy()
    kw: dict[str, Any] = {"mesh": mesh(ctx), "mp_policy": mp}
    if role == "policy":
        kw["reshard_after_forward"] = settings.reshard_after_forward
        if settings.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
    else:  # the frozen reference always frees each layer after its forward: it never runs a backward
        kw["reshard_after_forward"] = True
    return kw


def shard(model, role: str, cfg, ctx, outer=None) -> None:
    """fully_shard every decoder layer, then the root. The policy's trainable parameters are upcast to fp32 first
    under bf16 mixed precision (what accelerate's fsdp2_prepare_model does: FSDP2 wants one stored dtype per unit,
    the optimizer an fp32 master)."""
    from torch.distributed.fsdp import fully_shard

    settings = cfg.sharding.fsdp2
    layers = blocks(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): FSDP2 would "
                         "shard it as one unit; use a DeepSpeed sharding (--sharding zero3)")
    if role == "policy" and settings.mixed_precision == "bf16":
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
    kw = policy_args(settings, role, ctx)
    skip = os.environ.get(SKIP_LAYER_ENV, "").split(":")
    for i, (_, layer) in enumerate(layers):
        if skip[0] == role and skip[1:] == [str(i)]:
            continue  # the test hook: this layer stays inside the root's unit
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if outer is not None and outer is not model:
        # a wrapper the placement made (lora: the PeftModel) is the root the trainer gets (accelerate takes an
        # FSDPModule as it is), holding no parameter of its own; the Hugging Face model stays a unit of its own,
        # since the wrapper's generate() calls it directly
        fully_shard(outer, **kw)


def load_rank0_broadcast(run, path, role: str):
    """Where the files cannot be read shard by shard (a dtype cast, converted or tied tensors): rank 0 loads the model
    with from_pretrained, the others build it on the meta device; both are sharded, and torch's
    set_model_state_dict(broadcast_from_rank0) sends each full tensor from rank 0 for every rank to keep its own rows
    (accelerate's cpu_ram_efficient_loading path: one full copy, on rank 0 only). Buffers (the rotary tables, not in
    the state dict when non-persistent) are broadcast from rank 0 by name, in one order on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg, ctx = run.cfg, run.ctx
    m = cfg.model
    if ctx.rank == 0:
        model = models.load_causal_lm(path, m.dtype, m.trust_remote_code, m.allow_pickle)
        full = model.state_dict()
    else:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=m.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[m.dtype],
                                                     trust_remote_code=m.trust_remote_code)
        model.config.name_or_path = str(path)
        if model.can_generate():
            try:
                model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
            except OSError:
                pass
        full = {}
    root = run.placement.before_shard(run, model, role)  # lora: the PeftModel (its adapters set by after_fill)
    shard(model, role, cfg, ctx, outer=root)
    if ctx.rank != 0:
        root.to_empty(device=ctx.device)
    if full:  # under the model's own names (lora: PEFT's `base_layer` names of the checkpoint's tensors)
        named = {id(p): n for n, p in run.placement.base_view(model).named_parameters()}
        full = {n: full[named.get(id(t), n)] for n, t in model.state_dict(keep_vars=True).items()
                if named.get(id(t), n) in full}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=root is model))
    del full
    with torch.no_grad():
        for _, buf in sorted(model.named_buffers()):
            torch.distributed.broadcast(buf, src=0)
    model.eval()
    run.placement.after_fill(run, root, role)
    if root is not model:
        from dpo_dist.compat.torch_fsdp import settle_root

        settle_root(root)
    return root


def load_sharded(run, plan, role: str):
    """Build on meta, shard, allocate the local shards, fill each rank's own rows from the files: no full tensor on
    any rank, no collective."""
    from dpo_dist.compat import transformers as hf_compat
    from dpo_dist.load import fastload

    cfg, ctx = run.cfg, run.ctx
    with hf_compat.init_contexts(plan.model_class, plan.dtype):  # the meta device
        model = hf_compat.instantiate(plan.model_class, plan.config)
    root = run.placement.before_shard(run, model, role)  # lora: the PeftModel, its adapters sharded with the base
    shard(model, role, cfg, ctx, outer=root)
    root.to_empty(device=ctx.device)
    params = dict(run.placement.base_view(model).named_parameters())
    reader = fastload.Reader()
    try:
        for name, e in sorted(plan.entries.items(), key=lambda kv: (kv[1].file, kv[1].start)):
            view = dtensor_view(params[name])
            with torch.no_grad():
                if view.flat.dtype == e.dtype:
                    reader.read(e, view.start, view.flat)
                else:  # an fp32 master of a bf16 checkpoint: read the file's dtype, widen (exact)
                    tmp = torch.empty(view.flat.numel(), dtype=e.dtype)
                    reader.read(e, view.start, tmp)
                    view.flat.copy_(tmp)
            hf_compat.mark_loaded(params[name])
        fastload.read_buffers(model, plan, reader)
    finally:
        reader.close()
    fastload.finish(model, plan)
    run.placement.after_fill(run, root, role)  # after finish: initialize_weights would re-initialize adapters
    if root is not model:
        from dpo_dist.compat.torch_fsdp import settle_root

        settle_root(root)  # the wrapper, not the model its generate() calls first
    model.config.name_or_path = str(plan.path)
    return root


# Test hook (tests/test_fsdp2.py): "<policy|reference>:<layer index>" leaves that decoder layer unwrapped, so the wrap
# audit can be shown to fail naming it. Inert unless set.
SKIP_LAYER_ENV = "DPO_DIST_TEST_FSDP2_SKIP_LAYER"


def wrap_audit(model, role: str, rr) -> bool:
    """One row per model: how many FSDP units, every decoder layer its own, the root wrapped, reshard-after-forward
    and the mixed-precision policy each unit really has (read back from FSDP2, not what was asked). Fails naming the
    first module that is not wrapped."""
    from torch.distributed.fsdp import FSDPModule

    from dpo_dist.compat.torch_fsdp import unit_settings

    units = {n or "<root>": unit_settings(m) for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    layers = blocks(model)
    bare = [f"{n} ({type(m).__name__})" for n, m in layers if not isinstance(m, FSDPModule)]
    if not isinstance(model, FSDPModule):
        bare.insert(0, f"the root ({type(model).__name__})")
    reshard = sorted({str(units[n]["reshard_after_forward"]) for n, _ in layers if n in units})
    mp = sorted({f"{_short(s['param_dtype'])} compute / {_short(s['reduce_dtype'])} reduce" for s in units.values()
                 if s["params"]})
    seen = (f"{len(units)} FSDP units: {len(layers) - len([b for b in bare if not b.startswith('the root')])}/"
            f"{len(layers)} decoder layers each its own, root {'wrapped' if '<root>' in units else 'not wrapped'}; "
            f"layers reshard after forward: {'/'.join(reshard) or '-'}; mixed precision: {'; '.join(mp) or '-'}")
    return rr.add(f"{role} FSDP2 wrap", not bare, seen if not bare else f"not wrapped: {bare[0]}; {seen}",
                  f"{bare[0] if bare else ''} of the {role} is not its own FSDP unit: every decoder layer must be "
                  "fully_shard-ed before the root (a layer left inside the root's unit is gathered with the whole "
                  "model at every forward)")


def reference_dtype(ref, cfg, rr) -> bool:
    """The frozen reference is held in model.dtype: a reference left in float32 (TRL's path-loaded default) computes
    other log-probs than the bf16 policy, and its fingerprints then differ only by dtype; this row names it."""
    from dpo_dist.load.checkpoint import DTYPES

    want = DTYPES[cfg.model.dtype]
    held = sorted({str(t.dtype).replace("torch.", "") for t in map(views.held, ref.parameters())})
    return rr.add("reference dtype", held == [_short(want)], f"held in {', '.join(held)}",
                  f"the reference is held in {', '.join(held)}, not model.dtype {cfg.model.dtype}: load and keep it "
                  "in the checkpoint's dtype (only the trained policy's master copy is upcast)")


def _short(dtype) -> str:
    return "model dtype" if dtype is None else str(dtype).replace("torch.", "")
