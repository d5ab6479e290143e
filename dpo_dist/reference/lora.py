"""reference.placement lora: the reference is the policy's own base with its adapters off (TRL's PEFT path); no
second copy of the weights exists."""

from __future__ import annotations

import contextlib

from dpo_dist.compat import trl as trl_compat
from dpo_dist.config.names import Placement
from dpo_dist.reference.base import ReferencePlacement
from dpo_dist.verify import model_checks, probes, weights


class LoraPlacement(ReferencePlacement):
    name = Placement.LORA
    is_policy_base = True

    def smoke_steps(self, configured: int) -> int:
        return 2 if configured == 1 else configured  # B starts at zero, so A gets no gradient until the second step

    def load(self, run):
        return None  # the policy's own base

    def before_shard(self, run, model, role: str):
        """FSDP2 shards only the parameters a module has when wrapped: the adapters are added on the meta model, and
        the PeftModel is the root that is sharded, proved, and trained (accelerate takes an FSDPModule as it is)."""
        if role != "policy":
            return model
        run.state.peft_policy = wrap_lora(run, model)
        return run.state.peft_policy

    def after_fill(self, run, root, role: str) -> None:
        if role == "policy":
            init_adapters(root, run.state.args.seed)

    def base_view(self, model):
        """Under FSDP2 the policy holds PEFT's names from the start (`...q_proj.base_layer.weight`, the adapters):
        its base is read from and proved against the files under the checkpoint's names."""
        if not any("lora_" in n for n, _ in model.named_parameters()):
            return model  # not wrapped yet (ZeRO: PEFT wraps after the static proofs)
        return BaseView(model)

    def static_checks(self, run, fp_policy):
        """The reference is the policy's base, checked again once PEFT has wrapped it (check_trainer)."""
        return model_checks.policy_trainable(run.state.policy, run.rr), fp_policy

    def forward_policy(self, run):
        if run.state.peft_policy is None:
            run.state.peft_policy = wrap_lora(run)
        return run.state.peft_policy

    def forward_reference(self, run, stack, policy_ready, ds):
        return probes.AdaptersOff(policy_ready)

    def build_trainer(self, run, train_rows, eval_rows):
        """TRL's own PEFT path, handed the PeftModel the forward proofs ran on (wrap_lora)."""
        from trl import DPOTrainer

        s = run.state
        peft_model = s.peft_policy
        with trl_compat.peft_wrap_returns(peft_model, s.peft_kwargs) as calls:
            trainer = DPOTrainer(model=peft_model.get_base_model(), ref_model=None,
                                 peft_config=peft_model.peft_config["default"], train_dataset=train_rows,
                                 eval_dataset=eval_rows, args=s.args, processing_class=s.tok)
        if len(calls) != 1:
            raise ValueError(f"TRL's DPOTrainer called get_peft_model {len(calls)} times (expected once): this TRL "
                             "version wraps LoRA models differently; dpo-dist supports trl 1.16")
        return trainer

    def check_trainer(self, run, trainer) -> bool:
        """Only adapter weights train; the base (= the reference) is frozen and still bitwise the checkpoint's."""
        rr, ctx = run.rr, run.ctx
        model = trainer.model
        # the PeftModel the forward proofs ran on (adapters on vs off), wrapped once, its only adapter the trained
        # one: TRL then computes the reference with adapters disabled (a "ref" adapter would be used instead)
        same = model is run.state.peft_policy
        adapters = list(getattr(model, "peft_config", {}))
        inner = type(model.get_base_model()).__name__ if hasattr(model, "get_base_model") else "-"
        ok = rr.add("trainer reference = base with adapters off",
                    trainer.ref_model is None and hasattr(model, "disable_adapter") and same
                    and adapters == ["default"] and "Peft" not in inner,
                    f"ref_model {trainer.ref_model}, {type(model).__name__} over {inner}, adapters {adapters}, "
                    f"the forward proofs' model: {same}",
                    "TRL did not train the PEFT-wrapped policy the forward proofs checked (or added a reference "
                    "adapter): report this as a dpo-dist bug")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        not_lora = [n for n in trainable if "lora_" not in n]
        ok &= rr.add("only adapters trainable", trainable and not not_lora,
                     f"{len(trainable)} adapter tensors trainable" if not not_lora else
                     f"base trainable: {not_lora[0]}", "base weights are trainable: the reference (base) would move")
        base = weights.model_fingerprints(model, ctx)
        mapped = {base_name(n): fp for n, fp in base.items() if "lora_" not in n}
        diff = weights.compare(run.state.fp_policy, mapped)
        ok &= rr.add("weights: reference base == checkpoint", not diff, f"{len(mapped)} base tensors bitwise equal "
                     "to the loaded checkpoint" if not diff else f"differ: {diff[0]}",
                     "wrapping with PEFT changed base weights: investigate the adapter setup")
        return ok

    def kl_reference(self, run, trainer):
        return lambda policy: contextlib.nullcontext(probes.AdaptersOff(policy))

    def report_extra(self, facts) -> str:
        return " (the policy's own base: no second copy)"

    def smoke_reference(self, run, trainer):
        return FrozenOnly(trainer.model)


def lora_config(cfg):
    from peft import LoraConfig

    lo = cfg.reference.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                      task_type="CAUSAL_LM")


def wrap_lora(run, model=None):
    """The policy wrapped with PEFT exactly as TRL's DPOTrainer wraps a model passed with a peft_config (same seed
    before, same adapter dtype rule), done before the forward proofs so that they run, and free their working set,
    before the trainer exists, as for the other placements (bench/README.md)."""
    from peft import get_peft_model
    from transformers import set_seed

    args = run.state.args
    set_seed(args.seed)  # DPOTrainer seeds right before get_peft_model: the same adapter initialization
    plugin = args.deepspeed_plugin
    # ZeRO-3: adapters in the base dtype (TRL: mixed bf16/fp32 persistent parameters break ZeRO-3's all-gather)
    kwargs = {"autocast_adapter_dtype": False} if plugin is not None and plugin.zero_stage == 3 else {}
    run.state.peft_kwargs = kwargs
    return get_peft_model(run.state.policy if model is None else model, lora_config(run.cfg), **kwargs)


def init_adapters(peft_model, seed: int) -> None:
    """The adapters of a model sharded on the meta device and filled from the files (which hold none): LoRA's B = 0
    (so the policy starts exactly at the base) and A as PEFT initializes it (init_lora_weights=True: kaiming-uniform,
    a=sqrt(5)), drawn whole from the run's seed in module order on every rank, so all ranks hold rows of the same
    tensor, each copying its own Shard(0) rows into its local shard (a DTensor's own random init is not used: its
    draws depend on the mesh and the RNG tracker, not on the seed alone)."""
    import math

    import torch
    from peft.tuners.lora import LoraLayer

    from dpo_dist.sharding.views import local_view

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peft_model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            for adapter in layer.lora_A:
                for p, zero in ((layer.lora_A[adapter].weight, False), (layer.lora_B[adapter].weight, True)):
                    full = torch.zeros(p.shape, dtype=torch.float32)
                    if not zero:
                        _kaiming_uniform(full, math.sqrt(5), gen)
                    view = local_view(p, 0, 1)
                    view.flat.copy_(full.reshape(-1)[view.start:view.start + view.flat.numel()])


def _kaiming_uniform(t, a: float, gen) -> None:
    """torch.nn.init.kaiming_uniform_(t, a) (PEFT's init of lora_A) drawn from `gen`."""
    import math

    fan_in = t.shape[1]
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + a * a)) / math.sqrt(fan_in)
    t.uniform_(-bound, bound, generator=gen)


def base_name(peft_name: str) -> str:
    """PEFT's name of a base weight -> the checkpoint's: `base_model.model.X.q_proj.base_layer.weight` ->
    `X.q_proj.weight`."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


class BaseView:
    """A PEFT-wrapped model seen as its checkpoint: the base parameters (and state dict) under the checkpoint's names,
    no adapters; anything else is the Hugging Face model's own (config, class attributes, modules)."""

    def __init__(self, model):
        get_base = getattr(model, "get_base_model", None)
        self._model = get_base() if callable(get_base) else model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for n, p in self._model.named_parameters(remove_duplicate=remove_duplicate):
            if "lora_" not in n:
                yield base_name(n), p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def state_dict(self, *args, keep_vars: bool = False, **kwargs):
        return {base_name(n): t for n, t in self._model.state_dict(keep_vars=keep_vars).items() if "lora_" not in n}


class FrozenOnly:
    """named_parameters() of a model's frozen parameters only (the LoRA placement's reference = the frozen base)."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if not p.requires_grad)
