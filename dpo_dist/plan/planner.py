"""The memory model behind `dpo-dist plan`: memory per GPU and per node for every strategy, before launching.

This module holds the planning (Cluster, RunSettings, Plan, PlanSet, plan/plan_all/check, cluster detection, size
parsing); the per-component byte formulas and the accounting they follow (Component, RolePlan, the role builders)
are in `memory`, the inputs (Cluster, RunSettings) in `inputs`, the `dpo-dist plan` command line, its table
and its plot in `dpo_dist.cli.plan`.

The API is pure: `plan(model_config, cluster, settings) -> Plan` (one layout) and `plan_all(...) -> PlanSet` (every
strategy, ranked, one recommended); `check(...)` is `plan` plus the recommended alternative when the layout does not
fit (what `dpo-dist init` uses to refuse a layout). Parameter counts come from the model built on the meta device
(`presets.model_stats`); the byte counts follow DeepSpeed 0.19's ZeRO code and TRL 1.16's DPO forward (sources in
docs/planner.md). Module-level imports stay light: torch/transformers load only when a model is counted.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from dpo_dist.config.backend_memory import backend_memory_of
from dpo_dist.config.placement_memory import memory_of
from dpo_dist.plan.inputs import BACKENDS, DTYPE_BYTES, PLACEMENTS, Cluster, GiB, RunSettings
from dpo_dist.plan.memory import PHASES, RolePlan, host_node, reference_role, train_role

# HF sharded checkpoints are written in files of a few GB; a preset has no files, so assume this per file.
PRESET_SHARD_BYTES = 5 * 10**9
# Preference order among layouts that fit (lower is better): what each choice costs in speed or in method.
OFFLOAD_COST = {"none": 0.0, "optimizer": 3.0, "all": 6.0}
CHECKPOINTING_COST = 2.0


# ---------------------------------------------------------------------------------------------------------------
# outputs


@dataclass(frozen=True)
class Plan:
    """Per-component bytes of one layout on one cluster, whether it fits, and (from `check`) an alternative."""

    settings: RunSettings
    cluster: Cluster
    model: dict[str, Any]  # ModelStats as a dict
    roles: tuple[RolePlan, ...]
    gpu_peak: int  # worst rank, worst phase (device="cpu": the rank's own memory without runtime/shared pages)
    gpu_peak_phase: str
    gpu_capacity: int
    host_node_peak: int
    host_node_phase: str
    host_rank_peak: int  # worst rank's resident set (what VmHWM shows), worst phase
    host_capacity: int
    fits: bool
    problems: tuple[str, ...]
    score: float
    available: bool  # runnable by this dpo-dist version (reference.placement implemented)
    model_states_gpu: int  # policy weights + grads + optimizer + gathered layers on GPU, worst training phase
    alternative: Plan | None = None

    @property
    def label(self) -> str:
        return self.settings.label()

    @property
    def usage(self) -> float:
        """Worst of GPU and host use as a fraction of capacity (1.0 = full)."""
        host = self.host_node_peak / self.host_capacity
        return host if self.cluster.device == "cpu" else max(self.gpu_peak / self.gpu_capacity, host)

    def components(self, role: str = "train") -> dict[str, dict[str, Any]]:
        rp = next(r for r in self.roles if r.role == role)
        return {c.name: {"gpu": c.gpu, "host": c.host, "host_shared": c.host_shared, "phases": list(c.phases),
                         "note": c.note} for c in rp.components}

    def phases(self) -> dict[str, dict[str, int]]:
        cpu = self.cluster.device == "cpu"
        out = {}
        for ph in PHASES:
            out[ph] = {"gpu": max(r.phase_gpu(ph) for r in self.roles),
                       "host_node": host_node(self.roles, ph, self.cluster),
                       "host_rank_rss": max(r.phase_rank_rss(ph, cpu) for r in self.roles)}
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "label": self.label, "sharding": self.settings.sharding_name(), "settings": asdict(self.settings),
            "fits": self.fits, "available": self.available, "problems": list(self.problems), "score": self.score,
            "usage": round(self.usage, 4),
            "gpu": {"peak_bytes": self.gpu_peak, "peak_phase": self.gpu_peak_phase,
                    "capacity_bytes": self.gpu_capacity, "model_states_bytes": self.model_states_gpu},
            "host": {"node_peak_bytes": self.host_node_peak, "node_peak_phase": self.host_node_phase,
                     "rank_peak_bytes": self.host_rank_peak, "capacity_bytes": self.host_capacity},
            "phases": self.phases(),
            "roles": {r.role: {"ranks": r.ranks, "components": self.components(r.role)} for r in self.roles},
        }
        if self.alternative is not None:
            d["alternative"] = self.alternative.to_dict()
        return d


@dataclass(frozen=True)
class PlanSet:
    """Every strategy for one model and cluster: fitting ones first (best first), then the rest by how far off."""

    model: dict[str, Any]
    source: str
    cluster: Cluster
    plans: tuple[Plan, ...]
    recommended: Plan | None
    recommended_available: Plan | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"source": self.source, **self.model}, "cluster": asdict(self.cluster),
            "recommended": self.recommended.label if self.recommended else None,
            "recommended_available": self.recommended_available.label if self.recommended_available else None,
            "strategies": [p.to_dict() for p in self.plans],
        }


# ---------------------------------------------------------------------------------------------------------------
# planning


def _assemble(m: dict[str, Any], c: Cluster, s: RunSettings, roles: tuple[RolePlan, ...], headroom: float,
              extra_problems: list[str]) -> Plan:
    cpu = c.device == "cpu"
    gpu_peak, gpu_phase = max(r.peak_gpu() for r in roles)
    node_peak, node_phase = max((host_node(roles, ph, c), ph) for ph in PHASES)
    rank_peak = max(r.phase_rank_rss(ph, cpu) for r in roles for ph in PHASES) + c.runtime
    gpu_cap = c.host_mem // c.gpus_per_node if cpu else c.gpu_mem
    problems = list(extra_problems)
    if not cpu and gpu_peak > gpu_cap * (1 - headroom):
        problems.append(f"GPU: {gpu_peak / GiB:.1f} GiB needed ({gpu_phase}) > {(1 - headroom) * gpu_cap / GiB:.1f}"
                        f" GiB usable")
    if node_peak > c.host_mem * (1 - headroom):
        problems.append(f"host: {node_peak / GiB:.1f} GiB per node needed ({node_phase}) > "
                        f"{(1 - headroom) * c.host_mem / GiB:.1f} GiB usable")
    train = roles[0]
    state_names = {"policy weights", "gradients", "fp32 master weights", "Adam states", "fp32 step gradients",
                   "largest gathered layer", "live parameters", "unsharded gradient"}
    states = max(sum(x.gpu for x in train.components if x.name in state_names and ph in x.phases)
                 for ph in ("train", "step"))
    score = (OFFLOAD_COST[s.offload] + memory_of(s.placement).cost + backend_memory_of(s.backend).stage_cost[
        s.zero_stage] + (CHECKPOINTING_COST if s.gradient_checkpointing else 0))
    from dpo_dist.config.schema import IMPLEMENTED_PLACEMENTS
    from dpo_dist.config.sharding import PLACEMENTS_OF

    return Plan(settings=s, cluster=c, model=m, roles=roles, gpu_peak=gpu_peak, gpu_peak_phase=gpu_phase,
                gpu_capacity=gpu_cap, host_node_peak=node_peak, host_node_phase=node_phase, host_rank_peak=rank_peak,
                host_capacity=c.host_mem, fits=not problems, problems=tuple(problems), score=score,
                available=s.placement in IMPLEMENTED_PLACEMENTS and s.placement in PLACEMENTS_OF[s.backend],
                model_states_gpu=states)


def plan(model_config: dict[str, Any], cluster: Cluster, settings: RunSettings, *, headroom: float = 0.10,
         shard_bytes: int | None = None) -> Plan:
    """Bytes per rank and per node of one layout. `model_config` is a config.json dict; `shard_bytes` the largest
    checkpoint file (None: min(model size, 5 GB), as for a preset). Raises ValueError for an impossible request."""
    from dpo_dist.plan.presets import model_stats

    bad = cluster.problems() + settings.problems()
    if bad:
        raise ValueError("; ".join(bad))
    m = model_stats(model_config).as_dict()
    w = DTYPE_BYTES[settings.dtype]
    if shard_bytes is None:
        shard_bytes = min(w * m["params"], PRESET_SHARD_BYTES)
    world = cluster.world
    extra: list[str] = []
    if memory_of(settings.placement).own_ranks:
        if world < 2:
            raise ValueError("placement 'ranks' needs at least 2 ranks (K reference + P training)")
        k = settings.ref_ranks or _pick_ref_ranks(m, cluster, settings, headroom, shard_bytes)
        if k >= world:
            raise ValueError(f"ref_ranks K={k} leaves no training rank out of {world}")
        settings = replace(settings, ref_ranks=k)
        roles = (train_role(m, settings, cluster, world - k, shard_bytes),
                 reference_role(m, settings, k, shard_bytes))
    else:
        roles = (train_role(m, settings, cluster, world, shard_bytes),)
    return _assemble(m, cluster, settings, roles, headroom, extra)


def _pick_ref_ranks(m: dict[str, Any], c: Cluster, s: RunSettings, headroom: float, shard_bytes: int) -> int:
    """Smallest K (1, 2, 4, ... then whole nodes) whose reference ranks fit; else half the ranks."""
    world = c.world
    cands = sorted({k for k in [2**j for j in range(int(math.log2(world)) + 1)] + [c.gpus_per_node * j for j in
                                                                                     range(1, c.nodes + 1)]
                    if 1 <= k <= world // 2})
    cap = (c.host_mem // c.gpus_per_node if c.device == "cpu" else c.gpu_mem) * (1 - headroom)
    for k in cands:
        if reference_role(m, s, k, shard_bytes).peak_gpu()[0] <= cap:
            return k
    return max(1, world // 2)


def strategies(world: int, base: RunSettings) -> list[RunSettings]:
    """Every layout dpo-dist can describe: per backend (its record: stages and offloads; ZeRO-2/3 x none /
    optimizer / all, FSDP2 x none / all) x checkpointing x reference placement."""
    out = []
    for backend in BACKENDS:
        bm = backend_memory_of(backend)
        for stage in bm.stages:
            for off in bm.offloads:
                if off == "all" and stage != max(bm.stages):  # the weights are offloaded only where sharded
                    continue
                for ckpt in (False, True):
                    for placement in PLACEMENTS:
                        own_ranks = memory_of(placement).own_ranks
                        if own_ranks and world < 2:
                            continue
                        out.append(replace(base, backend=backend, zero_stage=stage, offload_optimizer=off != "none",
                                           offload_params=off == "all", gradient_checkpointing=ckpt,
                                           placement=placement, ref_ranks=base.ref_ranks if own_ranks else None))
    return out


def plan_all(model_config: dict[str, Any], cluster: Cluster, base: RunSettings | None = None, *,
             headroom: float = 0.10, shard_bytes: int | None = None, source: str = "",
             only: dict[str, Any] | None = None) -> PlanSet:
    """Plan every strategy (optionally only those whose settings match `only`; its key "sharding" matches the
    shipped sharding that runs a layout), rank them, recommend one: the
    cheapest layout that fits (no offload over offload, no checkpointing over it, ZeRO-2 over ZeRO-3, and reference
    placements zero3 < precomputed < ranks < cpu < lora; backends by their record's order: ZeRO-2 < ZeRO-3 <
    FSDP2), then the same among what this version can run."""
    from dpo_dist.plan.presets import model_stats

    base = base or RunSettings()
    plans = []
    for s in strategies(cluster.world, base):
        if only and any((s.sharding_name() if k == "sharding" else getattr(s, k)) != v for k, v in only.items()):
            continue
        plans.append(plan(model_config, cluster, s, headroom=headroom, shard_bytes=shard_bytes))
    plans.sort(key=lambda p: (not p.fits, p.score if p.fits else p.usage, p.usage))
    fitting = [p for p in plans if p.fits]
    rec = fitting[0] if fitting else None
    rec_av = next((p for p in fitting if p.available), None)
    return PlanSet(model=model_stats(model_config).as_dict(), source=source, cluster=cluster, plans=tuple(plans),
                   recommended=rec, recommended_available=rec_av)


def check(model_config: dict[str, Any], cluster: Cluster, settings: RunSettings, *, headroom: float = 0.10,
          shard_bytes: int | None = None) -> Plan:
    """`plan` for the requested layout; when it does not fit, `.alternative` is the recommended layout that does
    under the run's backend, else under any (keeping the run's micro-batch, length and dtype), or None if nothing
    fits. For `dpo-dist init`."""
    p = plan(model_config, cluster, settings, headroom=headroom, shard_bytes=shard_bytes)
    if p.fits:
        return p
    alt = plan_all(model_config, cluster, settings, headroom=headroom, shard_bytes=shard_bytes)
    # the run's own backend first (a user who chose FSDP2 is shown an FSDP2 layout when one fits)
    same = next((q for q in alt.plans if q.fits and q.available and q.settings.backend == settings.backend), None)
    choice = same or alt.recommended_available or alt.recommended
    return replace(p, alternative=choice)


def settings_from_run_config(cfg, ds_config: dict[str, Any] | None = None, ref_ranks: int | None = None,
                             **overrides: Any) -> RunSettings:
    """RunSettings of a dpo-dist RunConfig: its backend (config/sharding.backend_of), and the layout from the
    backend's typed options (sharding.fsdp2: cpu_offload, mixed_precision) or its resolved DeepSpeed dict (stage,
    offloads and ZeRO-3 knobs)."""
    from dpo_dist.config.names import Sharding
    from dpo_dist.config.sharding import backend_of

    backend = backend_of(cfg.sharding.name, cfg.sharding.ds_config)
    bm = backend_memory_of(backend)
    common = dict(backend=str(backend), placement=cfg.reference.placement,
                  micro_batch=cfg.train.per_device_train_batch_size, max_length=cfg.train.max_length,
                  gradient_checkpointing=cfg.train.gradient_checkpointing, dtype=cfg.model.dtype,
                  ref_ranks=ref_ranks if ref_ranks is not None or not memory_of(cfg.reference.placement).own_ranks
                  else cfg.reference.ranks)
    if bm.options_key:  # the backend's own options: its offload moves everything ("all"), its mixed precision
        opts = getattr(cfg.sharding, bm.options_key)
        return RunSettings(**{**common, "zero_stage": max(bm.stages), "offload_optimizer": opts.cpu_offload,
                              "offload_params": opts.cpu_offload, "mixed_precision": opts.mixed_precision,
                              **overrides})
    zo = (ds_config or {}).get("zero_optimization", {})
    name = cfg.sharding.name or Sharding.ZERO3
    stage = int(zo.get("stage", 2 if name == Sharding.ZERO2 else 3))
    off_opt = (zo.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    off_par = (zo.get("offload_param") or {}).get("device", "none") not in (None, "none")
    if not ds_config:
        off_opt = off_par = name == Sharding.ZERO3_OFFLOAD

    def num(key: str, default: int) -> int:
        v = zo.get(key, default)
        return int(v) if isinstance(v, (int, float)) else default

    kw = dict(common, zero_stage=stage, offload_optimizer=off_opt, offload_params=off_par,
              max_live_parameters=num("stage3_max_live_parameters", 1_000_000_000),
              sub_group_size=num("sub_group_size", 1_000_000_000),
              reduce_bucket_size=zo.get("reduce_bucket_size") if isinstance(zo.get("reduce_bucket_size"), int)
              else None)
    kw.update(overrides)
    return RunSettings(**kw)


def detect_cluster(processes_per_node: int, nodes: int = 1, cpu: bool | None = None) -> Cluster:
    """The cluster this process runs on, assuming every node looks like this one: GPU memory from torch (the first
    visible device), host memory from /proc/meminfo; `cpu=None` decides by torch.cuda.is_available()."""
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        return local_cpu_cluster(processes_per_node, nodes)
    gpu = torch.cuda.get_device_properties(0).total_memory
    return Cluster(nodes=nodes, gpus_per_node=processes_per_node, gpu_mem=gpu, host_mem=mem_total())


def local_cpu_cluster(processes: int, nodes: int = 1) -> Cluster:
    """This machine as a CPU cluster: `processes` ranks per node sharing MemTotal."""
    return Cluster(nodes=nodes, gpus_per_node=processes, gpu_mem=0, host_mem=mem_total(), device="cpu")


def mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


# ---------------------------------------------------------------------------------------------------------------
# sizes on the command line and in configs

_UNITS = {"": GiB, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'80GB' = 80e9, '80GiB' or '80G' or '80' = 80 * 2^30, '2TB' = 2e12."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GB, 80GiB, 2TB)")
    return int(float(num) * _UNITS[unit])


__all__ = ["Cluster", "RunSettings", "Plan", "PlanSet", "plan", "plan_all", "check", "strategies",
           "settings_from_run_config", "local_cpu_cluster", "detect_cluster", "parse_bytes"]


def recommended_config(p: Plan, gradient_accumulation_steps: int = 4) -> tuple[dict[str, Any], int, list[str]]:
    """The run-config keys a plan's layout implies (sharding, placement, gradient checkpointing, offload, batch), the
    global batch they give, and notes for what the keys cannot say (a layout no shipped sharding config runs). The
    planner's label ('ZeRO-3 ckpt ref:zero3') is these keys in short; `dpo-dist plan --write-config` writes them."""
    s = p.settings
    notes: list[str] = []
    name = s.sharding_name()
    if name == "custom":
        sharding: dict[str, Any] = {"ds_config": f"ds_zero{s.zero_stage}_offload_optimizer.json"}
        notes.append(f"sharding.ds_config: write that JSON from ds_configs/zero{s.zero_stage}.json with "
                     "zero_optimization.offload_optimizer.device: cpu (no shipped config offloads only the optimizer)")
    else:
        sharding = {"name": str(getattr(name, "value", name)),
                    **backend_memory_of(s.backend).offload_keys.get(s.offload, {})}
    reference: dict[str, Any] = {"placement": str(getattr(s.placement, "value", s.placement))}
    policy_ranks = p.cluster.world
    if memory_of(s.placement).own_ranks and s.ref_ranks:
        reference["ranks"] = s.ref_ranks
        policy_ranks -= s.ref_ranks
    keys = {
        "model": {"dtype": str(getattr(s.dtype, "value", s.dtype))},
        "reference": reference,
        "sharding": sharding,
        "train": {"gradient_checkpointing": s.gradient_checkpointing, "per_device_train_batch_size": s.micro_batch,
                  "gradient_accumulation_steps": gradient_accumulation_steps, "max_length": s.max_length},
    }
    return keys, s.micro_batch * gradient_accumulation_steps * policy_ranks, notes
