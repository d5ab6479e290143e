"""Before loading anything: does this layout fit the cluster (the memory plan), and `init --dry-run`, which goes
through the construction path on the meta device (sharding, placement, config checks, trainer arguments) with no
weights, so a 70B or 405B run can be checked on a laptop in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from dpo_dist.config.placement_memory import memory_of
from dpo_dist.config.schema import RunConfig


@dataclass(frozen=True)
class ClusterArgs:
    """Cluster overrides from the command line; None = detected from the launch environment and this machine."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    gpu_mem: int | None = None
    host_mem: int | None = None


ASSUMED_GPU_MEM = 80 * 10**9  # --gpus-per-node on a machine with no GPU to measure: an 80 GB GPU
ASSUMED_HOST_MEM = 1024 * 2**30


def cluster_for(args: ClusterArgs):
    return cluster_and_assumption(args)[0]


def cluster_and_assumption(args: ClusterArgs):
    """(the cluster to plan for, a line saying what was assumed rather than measured, or None)."""
    from dpo_dist.plan import planner

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = args.nodes or max(1, world // max(1, per_node))
    cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or None
    if not (args.gpu_mem or args.host_mem or args.gpus_per_node or args.nodes):
        return planner.detect_cluster(per_node, nodes, cpu=cpu), None
    base = planner.detect_cluster(per_node, nodes, cpu=cpu) if not args.gpu_mem else None
    wants_gpu = bool(args.gpu_mem or (args.gpus_per_node and not cpu))  # told about GPUs: plan for GPUs
    if base is not None and base.device == "cpu" and not wants_gpu:
        mem = args.host_mem or base.host_mem
        cluster = planner.Cluster(nodes=nodes, gpus_per_node=per_node, gpu_mem=0, host_mem=mem, device="cpu")
        return cluster, (f"assumed: no GPU on this machine and no --gpus-per-node, so {nodes} node(s) x {per_node} "
                         f"cpu rank(s) sharing {mem / 2**30:.0f} GiB per node; pass --gpus-per-node (and --gpu-mem) "
                         "to plan for GPUs")
    measured = base is not None and base.device == "gpu"
    gpu_mem = args.gpu_mem or (base.gpu_mem if measured else ASSUMED_GPU_MEM)
    host_mem = args.host_mem or (base.host_mem if measured else ASSUMED_HOST_MEM)
    cluster = planner.Cluster(nodes=nodes, gpus_per_node=per_node, gpu_mem=gpu_mem, host_mem=host_mem, device="gpu")
    guessed = [f"{gpu_mem / 1e9:.0f} GB per GPU (--gpu-mem)" for _ in [0] if not args.gpu_mem and not measured]
    guessed += [f"{host_mem / 2**30:.0f} GiB host memory per node (--host-mem)" for _ in [0]
                if not args.host_mem and not measured]
    told = f"{nodes} node(s) x {per_node} GPU(s)"
    if guessed:
        return cluster, (f"assumed: {told} as given, with no GPU here to measure: {', '.join(guessed)}; pass them "
                         "to plan for your nodes")
    return cluster, None


def plan_for(cfg: RunConfig, cluster_args: ClusterArgs) -> tuple[Any, Any, dict]:
    """(plan with alternative, cluster, model config) for this run config, under its sharding backend."""
    from dpo_dist.config.backend_memory import backend_memory_of
    from dpo_dist.config.resources import resolve_ds_config
    from dpo_dist.config.sharding import backend_of
    from dpo_dist.plan import planner, presets

    source = presets.resolve_model(cfg.model.path)
    ds = None  # a backend with typed options (FSDP2) has no DeepSpeed JSON to read
    if backend_memory_of(backend_of(cfg.sharding.name, cfg.sharding.ds_config)).reads_ds_config:
        _, ds = resolve_ds_config(cfg.sharding.name, cfg.sharding.ds_config)
    cluster = cluster_for(cluster_args)
    plan = planner.check(source.config, cluster, planner.settings_from_run_config(cfg, ds))
    return plan, cluster, source.config


def refusal(plan, cluster) -> str | None:
    """One line when the layout cannot fit, naming one that would (or saying none does)."""
    if plan.fits:
        return None
    where = f"{cluster.nodes} node(s) x {cluster.gpus_per_node} {cluster.device} rank(s)"
    alt = plan.alternative
    instead = "no layout dpo-dist knows fits this cluster"
    if alt is not None:
        from dpo_dist.config.backend_memory import backend_memory_of

        keys = backend_memory_of(alt.settings.backend).offload_keys.get(alt.settings.offload, {})
        also = "".join(f", sharding.{k}.{kk}: {str(vv).lower()}" for k, v in keys.items() for kk, vv in v.items())
        instead = (f"{alt.label} would fit (sharding {alt.settings.sharding_name() or 'custom'}{also}, placement "
                   f"{alt.settings.placement})")
    return (f"layout {plan.label} does not fit {where}: {'; '.join(plan.problems)}. {instead}; --force runs it "
            "anyway")


def dry_run(cfg: RunConfig, cluster_args: ClusterArgs) -> int:
    """Construct everything but the weights and print what a real run would do. Exit 0 if it fits, 2 if not."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_dist.config.backend_memory import backend_memory_of
    from dpo_dist.config.resources import batch_mismatch, resolve_ds_config
    from dpo_dist.config.schema import resolve_beta
    from dpo_dist.config.sharding import backend_of
    from dpo_dist.config.trl_args import dpo_config_kwargs

    t0 = time.perf_counter()
    plan, cluster, model_conf = plan_for(cfg, cluster_args)
    assumption = cluster_and_assumption(cluster_args)[1]
    backend = backend_memory_of(backend_of(cfg.sharding.name, cfg.sharding.ds_config))
    label, ds = cfg.sharding.name, {}  # a backend with typed options (FSDP2) has no DeepSpeed JSON
    if backend.reads_ds_config:
        label, ds = resolve_ds_config(cfg.sharding.name, cfg.sharding.ds_config)
    problems = []
    # the trainer's world: placement ranks keeps its last reference.ranks processes out of training
    train_world = cluster.world - (cfg.reference.ranks if memory_of(cfg.reference.placement).own_ranks else 0)
    bad_batch = batch_mismatch(ds, cfg, train_world)
    if bad_batch:
        problems.append(bad_batch)
    conf = AutoConfig.for_model(**{k: v for k, v in model_conf.items() if k != "architectures"})
    with torch.device("meta"):  # the real model classes, no weights
        policy = AutoModelForCausalLM.from_config(conf)
        reference = AutoModelForCausalLM.from_config(conf) if memory_of(cfg.reference.placement).separate_model \
            else None
    n = sum(p.numel() for p in policy.parameters())
    if reference is not None:
        reference.requires_grad_(False)
        reference.eval()
        assert not any(p.requires_grad for p in reference.parameters())
    kwargs = dpo_config_kwargs(cfg, ds, cfg.verify.smoke_steps)
    kwargs.pop("deepspeed")  # checked against these arguments by batch_mismatch; DeepSpeed itself needs a GPU world
    from trl import DPOConfig

    DPOConfig(**{**kwargs, "use_cpu": True})  # TRL/transformers validate the trainer arguments here
    beta, why = resolve_beta(cfg)
    gbatch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * train_world
    lines = [
        f"dry run: {type(policy).__name__} with {n / 1e9:.3f}B parameters (built on the meta device, no weights)",
        f"  sharding {label} ({backend.label.format(stage=plan.settings.zero_stage)}), reference placement"
        f" {cfg.reference.placement}, "
        f"world {cluster.world} = {cluster.nodes} node(s) x {cluster.gpus_per_node}",
        f"  global batch {cfg.train.per_device_train_batch_size} x {cfg.train.gradient_accumulation_steps} x "
        f"{train_world} = {gbatch}{' (policy ranks only)' if train_world != cluster.world else ''}, "
        f"max_length {cfg.train.max_length}, beta {beta:g} ({why})",
        f"  plan: {'fits' if plan.fits else 'does NOT fit'}; peak {plan.gpu_peak / 2**30:.1f} GiB per "
        f"{'GPU' if cluster.device == 'gpu' else 'rank'}, host {plan.host_node_peak / 2**30:.1f} GiB per node",
    ]
    if assumption:
        lines.append(f"  {assumption}")
    lines += forward_lines(cfg, train_world, cluster.device)
    refuse = refusal(plan, cluster)
    if refuse:
        problems.append(refuse)
    lines += [f"  problem: {p}" for p in problems]
    lines.append(f"  ({time.perf_counter() - t0:.1f} s)")
    print("\n".join(lines), flush=True)
    return 0 if not problems else 2


def forward_lines(cfg: RunConfig, world: int, device: str) -> list[str]:
    """The forward proofs' cost in full-model forwards per rank (under ZeRO-3 each gathers the whole model), per proof,
    from dpo_dist.plan.forwards: what the run will record in report.json's facts.forward_counts."""
    from dpo_dist.plan.forwards import planned_forwards

    plan = planned_forwards(cfg.verify, world, deterministic=device == "cpu")
    lines = [f"  forward proofs: {plan.total} full-model forwards per rank"
             f"{' (on CPU: no self-noise repeat, forwards are deterministic)' if device == 'cpu' else ''}"]
    lines += [f"    {name}: {n}" for name, n in plan.counts.items()]
    return lines
