"""Where the frozen reference lives: zero3 (sharded inference engine), cpu (host memory, pages shared per node),
lora (the policy's base with adapters off), precomputed (log-probs computed once, cached on disk, reference freed).

Each placement answers the same questions for the stages in run.py: how to load the reference, how to build the
DPOTrainer around it, what to check in the built trainer, which module is the reference after training, and how many
bytes of reference weights a rank holds.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from pathlib import Path
from typing import Any

from dpo_dist.config.names import Placement
from dpo_dist.data.keys import data_key, tokenizer_key
from dpo_dist.load import models
from dpo_dist.verify import model_checks, weights
from dpo_dist.verify.report import RankReport

ZERO3, CPU, LORA, PRECOMPUTED, RANKS = (Placement.ZERO3, Placement.CPU, Placement.LORA, Placement.PRECOMPUTED,
                                       Placement.RANKS)
# placements that run TRL in precompute mode (no TRL-built reference)
USES_TRL_PRECOMPUTE = (CPU, PRECOMPUTED, RANKS)


def load_reference(run) -> Any:
    """The reference module (None for lora: it is the policy's own base)."""
    cfg, s = run.cfg, run.s
    placement = cfg.reference.placement
    if placement == LORA:
        return None
    if placement == RANKS:  # held by the reference ranks: here only their hello (loaded, fingerprinted, or why not)
        hello = s["remote"].hello()
        if "error" in hello:
            raise ValueError(hello["error"])
        run.rr.facts["reference_load_seconds"] = hello.get("load_seconds")
        return None
    if placement == CPU:
        # Built outside ZeRO-3's partitioning context: this copy must stay whole, in host memory.
        with models.outside_zero3():
            ref, shared = models.load_cpu_shared(s["ref_path"], cfg.model.dtype, cfg.model.trust_remote_code)
        ref.runs_on_cpu = True
        run.rr.facts["cpu_reference_shared_pages"] = shared
    else:  # ZeRO-3: the fast partitioned loader when run.load planned it (the policy's plan for the same checkpoint)
        ref = models.load_causal_lm(s["ref_path"], cfg.model.dtype, cfg.model.trust_remote_code,
                                    cfg.model.allow_pickle, plan=s.get("ref_plan"))
    models.freeze(ref)
    return ref


def weights_digest(fingerprints: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(fingerprints.items())).encode()).hexdigest()[:16]


def disk_dataset(dataset, root: Path, ctx):
    """A dataset backed by files under `root/data-<hash>`, so TRL's precompute cache persists across runs and sits
    where every rank finds it (an in-memory dataset caches in a temporary dir, and other ranks then miss the file:
    FileNotFoundError seen on rank 1)."""
    from datasets import load_from_disk

    where = root / f"data-{data_key(dataset)}"
    if ctx.is_main and not (where / "state.json").exists():
        dataset.save_to_disk(str(where))
    ctx.barrier()
    return load_from_disk(str(where))


def precompute_keys(run, train_rows, eval_rows) -> tuple[Path, str, dict[str, str]]:
    """Where precomputed log-probs are cached, and under which keys: the reference's weights fingerprint, and a hash
    of the rows, the tokenizer, the length limits and the precompute batching (batch size, processes, padding
    multiple: bf16 log-probs move with padding, and the step-0 check compares them bitwise with the policy's under
    that batching). Same inputs, same key, in any output dir."""
    cfg = run.cfg
    root = Path(cfg.reference.cache_dir or Path(cfg.train.output_dir) / "ref_logps")
    digest = weights_digest(run.s["fp_reference"])
    args = run.s["args"]
    batching = (args.precompute_ref_batch_size or args.per_device_train_batch_size, args.pad_to_multiple_of,
                run.ctx.roles.policy_ranks if run.ctx.roles is not None else run.ctx.world_size)
    limits = (tokenizer_key(run.s["tok"]), cfg.train.max_length, cfg.train.max_prompt_length, *batching)
    keys = {"train": data_key(train_rows, *limits), "eval": data_key(eval_rows, *limits)}
    run.rr.facts["precompute_key"] = {"reference_weights": digest, "train_data": keys["train"]}
    return root, digest, keys


def build_trainer(run, train_rows, eval_rows):
    """The DPOTrainer for this placement (train_rows, eval_rows: datasets.Dataset, memory-mapped)."""
    cfg, s, ctx = run.cfg, run.s, run.ctx
    placement = cfg.reference.placement
    common = dict(args=s["args"], processing_class=s["tok"])
    if placement == PRECOMPUTED:
        from dpo_dist.reference.trainers import PrecomputedDPOTrainer

        root, digest, keys = precompute_keys(run, train_rows, eval_rows)
        train = disk_dataset(train_rows, root, ctx)
        evald = disk_dataset(eval_rows, root, ctx) if eval_rows else None
        trainer = PrecomputedDPOTrainer(model=s["policy"], ref_model=s["reference"], train_dataset=train,
                                        eval_dataset=evald, reference_digest=digest, data_keys=keys, **common)
        run.rr.facts["precompute_cache_hits"] = trainer.cache_hits
        free_reference(run, trainer)
        return trainer
    if placement == RANKS:
        return build_ranks_trainer(run, train_rows, eval_rows, common)
    train, evald = train_rows, eval_rows
    if placement == CPU:
        from dpo_dist.reference.trainers import CpuReferenceDPOTrainer

        return CpuReferenceDPOTrainer(model=s["policy"], ref_model=None, cpu_reference=s["reference"],
                                      train_dataset=train, eval_dataset=evald, **common)
    from trl import DPOTrainer

    if placement == LORA:  # TRL's own PEFT path, handed the PeftModel the forward proofs ran on (wrap_lora)
        peft_model = s["peft_policy"]
        with trl_wraps_into(peft_model, s["peft_kwargs"]) as calls:
            trainer = DPOTrainer(model=s["policy"], ref_model=None, peft_config=peft_model.peft_config["default"],
                                 train_dataset=train, eval_dataset=evald, **common)
        if len(calls) != 1:
            raise ValueError(f"TRL's DPOTrainer called get_peft_model {len(calls)} times (expected once): this TRL "
                             "version wraps LoRA models differently; dpo-dist supports trl 1.16")
        return trainer
    return DPOTrainer(model=s["policy"], ref_model=s["reference"], train_dataset=train, eval_dataset=evald, **common)


def lora_config(cfg):
    from peft import LoraConfig

    lo = cfg.reference.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                      task_type="CAUSAL_LM")


def wrap_lora(run):
    """lora: the policy wrapped with PEFT exactly as TRL's DPOTrainer wraps a model passed with a peft_config (same
    seed before, same adapter dtype rule), done before the forward proofs so that they run, and free their working
    set, before the trainer exists, as for the other placements (bench/README.md)."""
    from peft import get_peft_model
    from transformers import set_seed

    args = run.s["args"]
    set_seed(args.seed)  # DPOTrainer seeds right before get_peft_model: the same adapter initialization
    plugin = args.deepspeed_plugin
    # ZeRO-3: adapters in the base dtype (TRL: mixed bf16/fp32 persistent parameters break ZeRO-3's all-gather)
    kwargs = {"autocast_adapter_dtype": False} if plugin is not None and plugin.zero_stage == 3 else {}
    run.s["peft_kwargs"] = kwargs
    return get_peft_model(run.s["policy"], lora_config(run.cfg), **kwargs)


@contextlib.contextmanager
def trl_wraps_into(peft_model, kwargs: dict):
    """While DPOTrainer(model=base, peft_config=...) is built, its get_peft_model(base, peft_config) returns the
    PeftModel that wrap_lora already made from that base (checked: same base, config and arguments), so TRL takes its
    new-adapter path (reference = the base with adapters disabled, ref_model None) without wrapping twice.

    Passing the PeftModel itself (peft_config=None) is not the same in trl 1.16: it then treats the adapter as a
    pretrained one and adds a frozen copy of it, adapter "ref", as the reference, copied from the adapter's tensors,
    which the forward proofs' ZeRO-3 engine has partitioned by then (RuntimeError: size ... must match ... 0)."""
    import trl.trainer.dpo_trainer as dpo_module

    original, calls = dpo_module.get_peft_model, []

    def reuse(model, peft_config, **got):
        calls.append(got)
        if model is not peft_model.get_base_model() or peft_config is not peft_model.peft_config["default"] or \
                got != kwargs:
            raise ValueError(f"TRL wraps the policy with PEFT differently from dpo-dist ({type(model).__name__}, "
                             f"arguments {got} vs {kwargs}): report this as a dpo-dist bug")
        return peft_model

    dpo_module.get_peft_model = reuse
    try:
        yield calls
    finally:
        dpo_module.get_peft_model = original


class RecordedReference:
    """precomputed: the reference is freed before training, so its logits for the KL monitor's prompts are recorded
    first and replayed in the same order (initial_kl runs this rank's prompts one per forward, always in order)."""

    runs_on_cpu = True

    def __init__(self, logits: list):
        self.logits, self.i = logits, 0

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        out = self.logits[self.i % len(self.logits)]
        self.i += 1
        return SimpleNamespace(logits=out)


def record_reference_logits(run, engine, prompts: list[str]) -> RecordedReference:
    import torch

    from dpo_dist.verify import probes

    mine, _ = probes.rank_share(prompts, run.ctx)
    out = []
    with torch.no_grad():
        for text in mine:
            enc = probes.encode_batch(run.s["tok"], [probes.render_prompt(run.s["tok"], text)], run.ctx.device)
            out.append(engine(**enc).logits.float().cpu())
    return RecordedReference(out)


def kl_reference(run, trainer, prompts: list[str]):
    """For the KL monitor: given the policy module, a context manager yielding the reference to compare with."""
    import contextlib

    from dpo_dist.verify import probes

    placement = run.cfg.reference.placement
    if placement == LORA:
        return lambda policy: contextlib.nullcontext(probes.AdaptersOff(policy))
    if placement == CPU:
        module = trainer.ref_model.module
        return lambda policy: contextlib.nullcontext(module)
    if placement == RANKS:
        remote = run.s["remote"]
        return lambda policy: contextlib.nullcontext(remote)
    if placement == PRECOMPUTED:
        recorded = run.s["recorded_reference"]

        def replay(policy):
            recorded.i = 0
            return contextlib.nullcontext(recorded)

        return replay
    return lambda policy: contextlib.nullcontext(trainer.ref_model)


def free_reference(run, trainer) -> None:
    """precomputed: once the log-probs exist, release the reference's weight storage on this rank and measure what
    is left. The storage itself is released (not just our handles): DeepSpeed's engine, hooks and coordinator keep
    references to the module object, so waiting for garbage collection would free nothing."""
    import torch

    ref = run.s["reference"]
    engine = trainer.ref_model
    prompts = list(run.cfg.kl.prompts or run.cfg.verify.prompts)
    run.s["recorded_reference"] = record_reference_logits(run, engine, prompts)
    from dpo_dist.train.kl_monitor import reset_zero3_trace

    reset_zero3_trace(engine)
    trainer.ref_model = None
    if engine is not None and hasattr(engine, "destroy"):
        engine.empty_partition_cache()
        engine.destroy()
    for p in ref.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None:
            ds_tensor.data = torch.empty(0, dtype=ds_tensor.dtype, device=ds_tensor.device)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    gc.collect()
    run.rr.facts[f"rank_{run.ctx.rank}_reference_bytes_after_free"] = weights.local_bytes(ref, run.ctx)
    run.s["reference"] = None


def check_trainer(run, trainer) -> bool:
    """Placement-specific checks of what TRL built."""
    rr, s, placement = run.rr, run.s, run.cfg.reference.placement
    if placement == ZERO3:
        from dpo_dist.train.trainer import describe_ref_engine

        eng = describe_ref_engine(trainer)
        want_stage = 3 if s["stage"] == 3 else 0
        ok = rr.add("trainer reference is a prepared engine",
                    eng["type"] == "DeepSpeedEngine" and eng["stage"] == want_stage and not eng["optimizer"]
                    and not eng["training"], f"{eng['type']} stage {eng['stage']}, optimizer {eng['optimizer']}, "
                    f"training {eng['training']}",
                    "TRL did not wrap the reference as a DeepSpeed inference engine: launch with accelerate and a "
                    "DeepSpeed config (launch/zero3.yaml)")
        return ok & model_checks.check_roles(s["policy"], trainer.ref_model.module, rr, prefix="trainer: ")
    if placement == CPU:
        ref = trainer.ref_model
        on_cpu = all(p.device.type == "cpu" and not hasattr(p, "ds_tensor") for p in ref.module.parameters())
        ok = rr.add("trainer reference on CPU, unsharded", type(ref).__name__ == "CpuReference" and on_cpu,
                    f"{type(ref).__name__}, parameters on cpu: {on_cpu}",
                    "the CPU reference was wrapped or moved: do not pass it to TRL as ref_model")
        return ok & model_checks.check_roles(s["policy"], ref.module, rr, prefix="trainer: ")
    if placement == LORA:
        return check_lora(trainer, s["fp_policy"], run)
    if placement == RANKS:
        return check_ranks_trainer(run, trainer)
    # precomputed
    cols = set(trainer.train_dataset.column_names)
    ok = rr.add("reference log-probs precomputed", {"ref_chosen_logps", "ref_rejected_logps"} <= cols,
                f"cache {'reused' if all(trainer.cache_hits.values()) else 'computed'}: {trainer.cache_hits}",
                "TRL did not add ref_chosen_logps/ref_rejected_logps to the dataset")
    left = rr.facts[f"rank_{run.ctx.rank}_reference_bytes_after_free"]
    ok &= rr.add("reference freed before training", left == 0 and trainer.ref_model is None,
                 f"{left} bytes of reference weights left", "something still holds the reference model")
    return ok


def check_lora(trainer, fp_before: dict[str, str], run) -> bool:
    """LoRA: only adapter weights train; the base (= the reference) is frozen and still bitwise the checkpoint's."""
    rr, ctx = run.rr, run.ctx
    model = trainer.model
    # the PeftModel the forward proofs ran on (adapters on vs off), wrapped once, its only adapter the trained one:
    # TRL then computes the reference with adapters disabled (a "ref" adapter would be used instead)
    same = model is run.s.get("peft_policy")
    adapters = list(getattr(model, "peft_config", {}))
    inner = type(model.get_base_model()).__name__ if hasattr(model, "get_base_model") else "-"
    ok = rr.add("trainer reference = base with adapters off",
                trainer.ref_model is None and hasattr(model, "disable_adapter") and same and adapters == ["default"]
                and "Peft" not in inner,
                f"ref_model {trainer.ref_model}, {type(model).__name__} over {inner}, adapters {adapters}, "
                f"the forward proofs' model: {same}",
                "TRL did not train the PEFT-wrapped policy the forward proofs checked (or added a reference adapter):"
                " report this as a dpo-dist bug")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    not_lora = [n for n in trainable if "lora_" not in n]
    ok &= rr.add("only adapters trainable", trainable and not not_lora,
                 f"{len(trainable)} adapter tensors trainable" if not not_lora else f"base trainable: {not_lora[0]}",
                 "base weights are trainable: the reference (base) would move")
    base = weights.model_fingerprints(model, ctx)
    mapped = {base_name(n): fp for n, fp in base.items() if "lora_" not in n}
    diff = weights.compare(fp_before, mapped)
    ok &= rr.add("weights: reference base == checkpoint", not diff, f"{len(mapped)} base tensors bitwise equal to "
                 "the loaded checkpoint" if not diff else f"differ: {diff[0]}",
                 "wrapping with PEFT changed base weights: investigate the adapter setup")
    return ok


def base_name(peft_name: str) -> str:
    """PEFT's name of a base weight -> the checkpoint's: `base_model.model.X.q_proj.base_layer.weight` ->
    `X.q_proj.weight`."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def smoke_reference(run, trainer):
    """The module whose weights must not move during training (None when the reference was freed)."""
    placement = run.cfg.reference.placement
    if placement in (PRECOMPUTED, RANKS):  # freed, or held (and checked) on the reference ranks
        return None
    if placement == LORA:
        return FrozenOnly(trainer.model)
    return trainer.ref_model.module


class FrozenOnly:
    """named_parameters() of a model's frozen parameters only (the LoRA placement's reference = the frozen base)."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if not p.requires_grad)


def reference_bytes(run) -> int:
    if run.cfg.reference.placement == RANKS:  # measured: every live parameter that is not the policy's
        from dpo_dist.reference.ranks import stray_parameter_bytes

        trainer = run.s.get("trainer")
        return stray_parameter_bytes([trainer.model if trainer is not None else run.s["policy"]])
    ref = run.s.get("reference")
    return 0 if ref is None else weights.local_bytes(ref, run.ctx)


def check_reference_report(rr: RankReport, placement: str, nbytes: int, facts: dict) -> None:
    """A row that names the placement and what it costs this rank."""
    extra = ""
    if placement == CPU:
        extra = ", pages shared per node" if facts.get("cpu_reference_shared_pages") else ", private copy"
    if placement == LORA:
        extra = " (the policy's own base: no second copy)"
    if placement == RANKS:
        extra = f" (measured; the reference lives on {facts.get('reference_ranks', 'the')} reference rank(s))"
    rr.add("reference placement", True, f"{placement}: {nbytes / 2**20:.1f} MiB of reference weights on this rank"
           + extra)


def build_ranks_trainer(run, train_rows, eval_rows, common):
    """placement ranks: TRL in precompute mode with no reference on this rank; the reference ranks answer either per
    micro-batch (serve: online) or once for the whole dataset before training (serve: precompute, cached on disk
    under the reference's fingerprint like the precomputed placement)."""
    from dpo_dist.reference.trainers import RemoteOnlineDPOTrainer, RemotePrecomputeDPOTrainer

    cfg, s, ctx = run.cfg, run.s, run.ctx
    if cfg.reference.serve == "online":
        return RemoteOnlineDPOTrainer(model=s["policy"], ref_model=None, remote_reference=s["remote"],
                                      train_dataset=train_rows, eval_dataset=eval_rows, **common)
    root, digest, keys = precompute_keys(run, train_rows, eval_rows)
    trainer = RemotePrecomputeDPOTrainer(
        model=s["policy"], ref_model=None, remote_reference=s["remote"],
        train_dataset=disk_dataset(train_rows, root, ctx),
        eval_dataset=disk_dataset(eval_rows, root, ctx) if eval_rows else None, reference_digest=digest,
        data_keys=keys, **common)
    run.rr.facts["precompute_cache_hits"] = trainer.cache_hits
    return trainer


def check_ranks_trainer(run, trainer) -> bool:
    """placement ranks: TRL built no reference here, and this policy rank holds no reference weights (measured)."""
    from dpo_dist.reference.ranks import RemoteReference

    rr, ctx = run.rr, run.ctx
    online = run.cfg.reference.serve == "online"
    ref = trainer.ref_model
    ok = rr.add("trainer reference served by reference ranks",
                isinstance(ref, RemoteReference) if online else ref is None,
                f"{type(ref).__name__} -> {ctx.roles.describe(ctx.roles.server_of(ctx.roles.global_rank))}"
                if online else "log-probs precomputed by the reference ranks, cache "
                f"{'reused' if all(trainer.cache_hits.values()) else 'computed'}",
                "TRL built its own reference on a policy rank: report this as a dpo-dist bug")
    if not online:
        cols = set(trainer.train_dataset.column_names)
        ok &= rr.add("reference log-probs precomputed", {"ref_chosen_logps", "ref_rejected_logps"} <= cols,
                     "ref_chosen_logps, ref_rejected_logps in the train dataset",
                     "TRL did not add ref_chosen_logps/ref_rejected_logps to the dataset")
    nbytes = rr.facts[f"rank_{ctx.rank}_reference_bytes_training"]  # run.build measured it (reference_bytes)
    ok &= rr.add("no reference weights on policy ranks", nbytes == 0,
                 f"{nbytes} bytes of parameters outside the policy on this rank (measured)",
                 "a policy rank holds parameters that are not the policy's: something loaded a reference here")
    return ok
