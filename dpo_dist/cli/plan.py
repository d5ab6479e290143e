"""`dpo-dist plan` on the command line: its arguments, the inputs they describe, the ranked table and the plot.

The memory model itself (Cluster, RunSettings, plan/plan_all/check) is in `planner`. Module-level imports stay light so
that `dpo-dist plan --help` is fast: presets/config load in `_inputs`, matplotlib only in `plot`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from dpo_dist.config.names import Backend, Sharding
from dpo_dist.plan.inputs import DTYPE_BYTES, LOGITS_MODES, PLACEMENTS, Cluster, GiB, RunSettings
from dpo_dist.plan.planner import (
    PlanSet,
    check,
    mem_total,
    parse_bytes,
    plan_all,
    recommended_config,
    settings_from_run_config,
)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="checkpoint dir, its config.json, or a preset: "
                   "llama-3-8b, llama-3-70b, llama-3.1-405b, llama-3.2-1b, qwen2.5-7b, qwen2.5-72b, mixtral-8x7b "
                   "(default: the embedded tiny model)")
    p.add_argument("--config", help="run YAML: micro-batch, max_length, dtype, checkpointing, placement from it")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node; with --cpu: processes")
    p.add_argument("--gpu-mem", type=parse_bytes, default=80 * 10**9, help="per GPU (default 80GB = 80e9 bytes)")
    p.add_argument("--host-mem", type=parse_bytes, help="per node (default 1TiB; with --cpu: this machine's)")
    p.add_argument("--cpu", action="store_true", help="CPU-only ranks: 'GPU memory' is the processes' host memory")
    p.add_argument("--runtime-per-rank", type=parse_bytes, help="host bytes per rank before any model "
                   "(default 2GiB on GPU nodes, 0.5GiB with --cpu)")
    p.add_argument("--micro-batch", type=int, help="prompt pairs per rank (default 4, or the run YAML's)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (default 1024, or the run YAML's)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES))
    p.add_argument("--sharding", choices=list(Sharding.values()), help="only the layouts this shipped sharding runs "
                   "(fsdp2: FSDP2's, with and without its cpu_offload; default: every backend's)")
    p.add_argument("--zero", type=int, choices=[2, 3], help="only this DeepSpeed ZeRO stage")
    p.add_argument("--offload", choices=["none", "optimizer", "all"], help="only this offload")
    p.add_argument("--placement", choices=list(PLACEMENTS), help="only this reference placement")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], help="only with / without it")
    p.add_argument("--ref-ranks", type=int, help="K reference ranks for placement 'ranks' (default: smallest fit)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--logits", choices=list(LOGITS_MODES), default="fused",
                   help="fused: TRL 1.x chunked LM head (default); full: materialized fp32 logits")
    p.add_argument("--max-live-parameters", type=int, default=1_000_000_000, help="stage3_max_live_parameters")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of each memory kept free (default 0.10)")
    p.add_argument("--top", type=int, default=0, help="show only the N best rows (default: all)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", metavar="PNG", help="stacked bar chart per strategy against capacity (matplotlib)")
    p.add_argument("--write-config", metavar="YAML", help="write the recommended layout's config keys as a run YAML "
                   "to start from (refuses to overwrite an existing file)")


def _inputs(args: argparse.Namespace) -> tuple[dict, str, Any, Cluster, RunSettings]:
    from dpo_dist.plan.presets import resolve_model

    base = RunSettings(lora_rank=args.lora_rank, logits=args.logits, max_live_parameters=args.max_live_parameters,
                       ref_ranks=args.ref_ranks)
    model_spec = args.model
    if args.config:
        from dpo_dist.config.schema import load

        cfg = load(args.config)
        ds = None
        if cfg.sharding.ds_config:  # the user's own DeepSpeed JSON decides stage, offloads and ZeRO-3 knobs
            with open(cfg.sharding.ds_config) as f:
                ds = json.load(f)
        base = settings_from_run_config(cfg, ds, ref_ranks=args.ref_ranks, lora_rank=args.lora_rank,
                                        logits=args.logits)
        if args.model == "default":
            model_spec = cfg.model.path
    overrides = {k: v for k, v in (("micro_batch", args.micro_batch), ("max_length", args.max_length),
                                   ("dtype", args.dtype)) if v is not None}
    base = replace(base, **overrides)
    src = resolve_model(model_spec)
    if args.cpu:
        host = args.host_mem or mem_total()
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem=0, host_mem=host, device="cpu",
                          runtime_per_rank=args.runtime_per_rank)
    else:
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem=args.gpu_mem,
                          host_mem=args.host_mem or 1024 * GiB, runtime_per_rank=args.runtime_per_rank)
    return src.config, src.source, src.checkpoint, cluster, base


def _argument_problem(args: argparse.Namespace) -> str | None:
    """Ranges argparse cannot express; checked before any model is built, so a typo costs nothing."""
    import math
    from pathlib import Path

    if not (math.isfinite(args.headroom) and 0 <= args.headroom < 1):
        return (f"--headroom {args.headroom:g} is outside [0, 1) (--headroom): give the fraction of each memory "
                "kept free, e.g. 0.1")
    for flag, value, low in (("--top", args.top, 0), ("--lora-rank", args.lora_rank, 1),
                             ("--max-live-parameters", args.max_live_parameters, 1)):
        if value < low:
            return f"{flag} {value} is below {low} ({flag}): give a whole number >= {low}"
    if args.write_config:
        target = Path(args.write_config).expanduser()
        if target.exists():
            return (f"{target} exists (--write-config): choose a new file name, or delete it first (it is never "
                    "overwritten)")
        if not target.resolve().parent.is_dir():
            return f"no directory {target.resolve().parent} for --write-config: create it or choose another path"
    if args.plot:
        folder = Path(args.plot).expanduser().resolve().parent
        if not folder.is_dir():
            return f"no directory {folder} for the plot (--plot {args.plot}): create it or choose another path"
        try:  # matplotlib's own list (it picks the format from the extension); imported only when plotting anyway
            from matplotlib.backend_bases import FigureCanvasBase

            formats = sorted(FigureCanvasBase.get_supported_filetypes())
        except ImportError:  # plot() says matplotlib is missing
            formats = []
        ext = Path(args.plot).suffix.lstrip(".").lower()
        if formats and ext not in formats:
            return (f"--plot {args.plot}: '{ext or '(no extension)'}' is not an image format matplotlib writes "
                    f"(--plot): end the path in one of .{', .'.join(formats)}, e.g. plan.png")
    return None


def run(args: argparse.Namespace) -> int:
    problem = _argument_problem(args)
    if problem:
        print(f"dpo-dist plan: {problem}", file=sys.stderr)
        return 2
    try:
        config, source, ckpt, cluster, base = _inputs(args)
        only: dict[str, Any] = {}
        if args.zero:  # a DeepSpeed flag: ZeRO's stages
            only.update(zero_stage=args.zero, backend=Backend.DEEPSPEED.value)
        if args.sharding:
            only["sharding"] = args.sharding
        if args.offload:
            only.update(offload_optimizer=args.offload != "none", offload_params=args.offload == "all")
        if args.placement:
            only["placement"] = args.placement
        if args.gradient_checkpointing:
            only["gradient_checkpointing"] = args.gradient_checkpointing == "on"
        ps = plan_all(config, cluster, base, headroom=args.headroom, source=source, only=only,
                      shard_bytes=ckpt.largest_file_bytes if ckpt else None)
    except (ValueError, OSError) as e:
        print(f"dpo-dist plan: {e}", file=sys.stderr)
        return 2
    if not ps.plans:
        print("dpo-dist plan: no strategy matches the filters", file=sys.stderr)
        return 2
    requested = None
    if args.config:  # the run YAML's own layout, checked, with the alternative when it does not fit
        requested = check(config, cluster, base, headroom=args.headroom,
                          shard_bytes=ckpt.largest_file_bytes if ckpt else None)
    if args.plot:
        try:
            plot(ps, args.plot)
        except OSError as e:
            print(f"dpo-dist plan: could not write the plot ({args.plot}: {e.strerror or e}): choose a writable "
                  "path for --plot", file=sys.stderr)
            return 2
    grad_accum = _grad_accum(args)
    if args.json:
        data = ps.to_dict()
        if requested is not None:
            data["requested"] = requested.to_dict()
        if ps.recommended is not None:
            keys, batch, notes = recommended_config(ps.recommended, grad_accum)
            data["recommended_config"] = {"keys": keys, "global_batch": batch, "notes": notes}
        print(json.dumps(data, indent=1))
    else:
        print(render(ps, top=args.top))
        if ps.recommended is not None:
            print("\n" + recommendation_text(ps.recommended, grad_accum))
        if requested is not None:
            verdict = "fits" if requested.fits else "does NOT fit: " + "; ".join(requested.problems)
            print(f"\nyour config ({args.config}): {requested.label} {verdict}")
            if requested.alternative is not None:
                print(f"  instead: {requested.alternative.label}")
        if args.plot:
            print(f"\nplot: {args.plot}")
    if args.write_config:
        if ps.recommended is None:
            print("dpo-dist plan: nothing fits, so no config was written (--write-config)", file=sys.stderr)
            return 1
        try:
            write_config(ps, args.write_config, grad_accum)
        except OSError as e:
            print(f"dpo-dist plan: could not write {args.write_config} ({e.strerror or e}): choose a writable path "
                  "for --write-config", file=sys.stderr)
            return 2
        if not args.json:
            print(f"\nconfig to start from: {args.write_config} (set model.path, data and train.output_dir)")
    return 0


def _grad_accum(args: argparse.Namespace) -> int:
    if args.config:
        from dpo_dist.config.schema import load

        return load(args.config).train.gradient_accumulation_steps
    from dpo_dist.config.schema import TrainConfig

    return TrainConfig.gradient_accumulation_steps


def recommendation_text(rec, grad_accum: int) -> str:
    """The recommended label spelled out as the config keys that run it, and the global batch they give."""
    import yaml

    keys, batch, notes = recommended_config(rec, grad_accum)
    t = keys["train"]
    policy = batch // (t["per_device_train_batch_size"] * t["gradient_accumulation_steps"])
    lines = [f"recommended config keys ({rec.label}):"]
    lines += ["  " + ln for ln in yaml.safe_dump(keys, sort_keys=False).splitlines()]
    lines.append(f"global batch: {t['per_device_train_batch_size']} x {t['gradient_accumulation_steps']} x "
                 f"{policy} policy ranks = {batch:,} prompt pairs per optimizer step")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def write_config(ps: PlanSet, path: str, grad_accum: int) -> None:
    """A run YAML with the recommended layout's keys (exclusive create: never overwrites)."""
    import yaml

    rec = ps.recommended
    keys, batch, notes = recommended_config(rec, grad_accum)
    c = ps.cluster
    head = [f"# Written by `dpo-dist plan` for {ps.source} on {c.nodes} node(s) x {c.gpus_per_node} "
            f"({rec.label}); global batch {batch:,}.", "# Add model.path, data.train/eval and train.output_dir; "
            "every other key keeps its default (docs/training.md)."]
    head += [f"# {n}" for n in notes]
    with open(path, "x") as f:
        f.write("\n".join(head) + "\n" + yaml.safe_dump(keys, sort_keys=False))


def render(ps: PlanSet, top: int = 0) -> str:
    m, c = ps.model, ps.cluster
    dev = "CPU ranks (GPU columns = each process's own memory)" if c.device == "cpu" else \
        f"{c.gpus_per_node} GPUs x {c.gpu_mem / GiB:.1f} GiB"
    lines = [
        f"model: {ps.source} ({m['model_type']}): {m['params'] / 1e9:.3f}B parameters (built on the meta device in "
        f"{m['build_seconds']} s), largest layer {m['largest_layer_name']} {m['largest_layer_params'] / 1e6:.1f}M",
        f"cluster: {c.nodes} node(s) x {dev}, host {c.host_mem / GiB:.0f} GiB per node, runtime "
        f"{c.runtime / GiB:.1f} GiB per rank",
    ]
    s0 = ps.plans[0].settings
    lines.append(f"run: micro-batch {s0.micro_batch} pairs x {s0.max_length} tokens, {s0.dtype}, logits {s0.logits}"
                 f"; GiB per rank unless marked")
    cols = ("weights", "grads", "master", "Adam", "fp32g", "ref", "gather", "act", "logits")
    head = f"{'#':>3} {'strategy':<46}" + "".join(f"{h:>7}" for h in cols) + \
        f"{'load':>7}{'GPU pk':>8}{'host/node':>10}  fits"
    lines += ["", head, "-" * len(head)]
    rows = ps.plans[:top] if top else ps.plans
    for n, p in enumerate(rows, 1):
        comp = {x.name: x for x in p.roles[0].components}

        def g(*names: str, comp=comp) -> int:
            return sum(max(comp[x].gpu, comp[x].host) for x in names if x in comp)

        ref = comp.get("reference weights")
        ref_b = (max(ref.gpu, ref.host, ref.host_shared) if ref else 0)
        if len(p.roles) > 1:
            ref_b = p.roles[1].components[0].gpu
        vals = (g("policy weights"), g("gradients"), g("fp32 master weights"), g("Adam states"),
                g("fp32 step gradients", "bf16 param buffer"), ref_b,
                g("largest gathered layer", "live parameters", "unsharded gradient"),
                g("activations"), g("logits"), max(r.phase_gpu("load") for r in p.roles))
        mark = "yes" if p.fits else "no"
        if p.fits and not p.available:
            mark += "*"
        label = p.label + ("" if p.settings.sharding_name() == "custom" else f" [{p.settings.sharding_name()}]")
        lines.append(f"{n:>3} {label[:46]:<46}" + "".join(f"{_gib(v):>7}" for v in vals)
                     + f"{_gib(p.gpu_peak):>8}{_gib(p.host_node_peak):>10}  {mark}")
    lines.append("")
    lines.append("fp32g = fp32 gradients of the optimizer step; gather = largest gathered layer + live ZeRO-3 "
                 "parameters (FSDP2: the root unit + 2 decoder layers in bf16, and one unit's unsharded gradient); "
                 "FSDP2's weights are its fp32 master shards (master column) under mixed precision bf16; load = GPU "
                 "peak while loading; GPU pk = worst phase; off-opt/off-all = optimizer / "
                 "optimizer+parameter offload (those parts sit in host memory); [name] = shipped sharding config, "
                 "else a custom ds_config; * = fits, but this dpo-dist version does not run that placement (under "
                 "that backend) yet")
    if ps.recommended is None:
        best = ps.plans[0]
        lines.append(f"nothing fits. Closest: {best.label} ({best.usage:.0%} of capacity): "
                     + "; ".join(best.problems))
        return "\n".join(lines)
    rec = ps.recommended
    lines.append(f"recommended: {rec.label}  (sharding: {rec.settings.sharding_name()})")
    if ps.recommended_available is not None and ps.recommended_available is not rec:
        lines.append(f"recommended among what this version runs: {ps.recommended_available.label}")
    lines.append("")
    lines.append(f"breakdown of the recommended layout ({rec.roles[0].role} rank, GiB):")
    for role in rec.roles:
        if len(rec.roles) > 1:
            lines.append(f"  [{role.role} ranks: {role.ranks}]")
        for x in role.components:
            where = "GPU" if x.gpu else ("host, per node" if x.host_shared else "host")
            if x.gpu or x.host or x.host_shared:
                lines.append(f"  {x.name:<28}{_gib(x.gpu or x.host or x.host_shared):>8} {where:<15} "
                             f"{','.join(x.phases):<22} {x.note}")
    ph = rec.phases()
    lines.append("  peaks by phase (GPU | host per node): " + ", ".join(
        f"{k} {_gib(v['gpu'])} | {_gib(v['host_node'])}" for k, v in ph.items()))
    return "\n".join(lines)


COLORS = {"policy weights": "#1f77b4", "gradients": "#ff7f0e", "fp32 master weights": "#2ca02c",
          "Adam states": "#98df8a", "fp32 step gradients": "#bcbd22", "bf16 param buffer": "#dbdb8d",
          "reference weights": "#9467bd", "largest gathered layer": "#d62728", "live parameters": "#ff9896",
          "ZeRO buffers": "#7f7f7f", "activations": "#8c564b", "logits": "#e377c2", "reference forward": "#c5b0d5",
          "gathered while loading": "#d62728", "gathered (init forwards)": "#d62728", "checkpoint pages": "#c7c7c7",
          "full copies while loading": "#17becf", "runtime": "#aaaaaa", "unsharded gradient": "#ff9896"}


def plot(ps: PlanSet, path: str) -> None:
    """Two panels of horizontal stacked bars, one bar per strategy: GPU memory of the worst rank at its peak phase
    (device="cpu": the process's own memory) against the GPU's capacity; host memory per node against the node's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = list(ps.plans)
    n = len(plans)
    fig, axes = plt.subplots(1, 2, figsize=(16, 1.5 + 0.28 * n), sharey=True)
    seen: set[str] = set()
    for y, p in enumerate(plans):
        role = max(p.roles, key=lambda r: r.peak_gpu()[0])
        left = 0.0
        for x in role.components:
            if p.gpu_peak_phase in x.phases and x.gpu:
                axes[0].barh(y, x.gpu / GiB, left=left, color=COLORS.get(x.name, "#333333"),
                             label=x.name if x.name not in seen else None)
                seen.add(x.name)
                left += x.gpu / GiB
        ph = p.host_node_phase
        left = 0.0
        r0 = p.roles[0]
        cpu = p.cluster.device == "cpu"
        parts = [("runtime", p.cluster.runtime * p.cluster.gpus_per_node)]
        for x in r0.components:
            if ph in x.phases:
                parts.append((x.name, p.cluster.gpus_per_node * (x.host + (x.gpu if cpu else 0)) + x.host_shared))
        for name, b in parts:
            if b:
                axes[1].barh(y, b / GiB, left=left, color=COLORS.get(name, "#333333"),
                             label=name if name not in seen else None)
                seen.add(name)
                left += b / GiB
    # keep the capacity lines readable: clip at 3x capacity and write the real total at the end of clipped bars
    caps = (ps.cluster.gpu_mem if ps.cluster.device == "gpu" else ps.cluster.host_mem / ps.cluster.gpus_per_node,
            ps.cluster.host_mem)
    totals = ([p.gpu_peak for p in plans], [p.host_node_peak for p in plans])
    for ax, cap, tot in zip(axes, caps, totals, strict=True):
        limit = min(max(tot), 3 * cap) / GiB * 1.02
        ax.set_xlim(0, limit)
        for y, t in enumerate(tot):
            if t / GiB > limit:
                ax.text(limit * 0.99, y, f"{t / GiB:,.0f} GiB \u2192", ha="right", va="center", fontsize=6,
                        color="white")
    labels = [("" if p.fits else "\u2717 ") + p.label for p in plans]
    axes[0].set_yticks(range(n), labels, fontsize=7)
    axes[0].invert_yaxis()
    if ps.cluster.device == "gpu":
        axes[0].axvline(ps.cluster.gpu_mem / GiB, color="k", ls="--", lw=1)
        axes[0].set_title(f"per GPU at its peak phase (capacity {ps.cluster.gpu_mem / GiB:.0f} GiB, dashed)")
    else:
        axes[0].set_title("per process, device part (CPU ranks)")
    axes[1].axvline(ps.cluster.host_mem / GiB, color="k", ls="--", lw=1)
    axes[1].set_title(f"host per node at its peak phase (capacity {ps.cluster.host_mem / GiB:.0f} GiB, dashed)")
    for ax in axes:
        ax.set_xlabel("GiB")
        ax.grid(axis="x", alpha=0.3)
    handles, names = _legend(axes)
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=min(len(names), 7), frameon=False)
    fig.suptitle(f"{ps.source}: {ps.model['params'] / 1e9:.2f}B params, {ps.cluster.nodes} node(s) x "
                 f"{ps.cluster.gpus_per_node} ranks" + (f"; recommended: {ps.recommended.label}" if ps.recommended
                                                        else "; nothing fits"), fontsize=10)
    fig.tight_layout(rect=(0, 0.8 / (1.5 + 0.28 * n), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _legend(axes) -> tuple[list, list]:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


__all__ = ["add_arguments", "run", "render", "plot"]
