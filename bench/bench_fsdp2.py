"""FSDP2 against ZeRO-3 on this machine: `dpo-dist init` as a user runs it (`dpo-dist launch --cpu --num-processes
2 --sharding {zero3,fsdp2}`) on the ~0.44B-parameter bf16 benchmark checkpoint (bench/make_checkpoint.py, the one
bench_init.py uses), the workers' /proc sampled for VmHWM and PSS (bench_init.WorkerSampler).

    .venv/bin/python bench/bench_fsdp2.py [--runs 1] [--checkpoint DIR]
    .venv/bin/python bench/bench_fsdp2.py --render       # the table again from bench/results_fsdp2.json

Variants (issue 22 item 3): ZeRO-3 and FSDP2 with their shipped loaders (each rank reads only its own shard's
bytes); FSDP2 with `model.loader=transformers`, which takes accelerate's `cpu_ram_efficient_loading` path (rank 0
loads the whole model with from_pretrained, every rank receives its rows by `set_model_state_dict(...,
broadcast_from_rank0)`); the pread floor of the same bytes (bench/load_driver.py's `read` mode under torchrun: each
rank preads 1/2 of every tensor, which for this checkpoint, every first dimension even, are exactly its Shard(0)
rows; twice, policy and reference); and the embedded 1M-parameter checkpoint under each sharding, each backend's
runtime baseline. Ideal peak per rank = that baseline + the weight bytes the rank holds (policy + reference), as in
bench_init's product group. Beside each measured peak: the memory planner's figure for the same layout
(dpo_dist.plan, phases load + init, per rank RSS incl. its 0.5 GiB CPU runtime).

Not part of the test suite. Writes bench/results_fsdp2.json and bench/results_fsdp2.md. Wall and load times are
only comparable on an idle machine: each run records the 1-minute load average at its start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import bench_init  # noqa: E402
from bench_init import DEFAULT_CKPT, PY, ROOT, WorkerSampler, ensure_checkpoint, run  # noqa: E402
from conftest import free_port  # noqa: E402

TINY = ROOT / "dpo_dist" / "default" / "tiny-sft"
KB = 1024
# label -> (checkpoint "bench" or "tiny", --sharding, model.loader or None for auto)
VARIANTS = {
    "baseline@tiny zero3": ("tiny", "zero3", None),
    "baseline@tiny fsdp2": ("tiny", "fsdp2", None),
    "zero3": ("bench", "zero3", None),
    "fsdp2": ("bench", "fsdp2", None),
    "fsdp2 rank0+broadcast": ("bench", "fsdp2", "transformers"),
}


def one(ckpt: Path, sharding: str, out: Path, loader: str | None = None) -> dict:
    init_args = ["--model", str(ckpt), "--output-dir", str(out), "--overwrite", "--force",
                 "--set", "verify.generation=false", "--set", "verify.perplexity=false",
                 "--set", "verify.tokenizer_order=false"]  # random weights read as untrained (bench_init's choice)
    if loader:
        init_args += ["--set", f"model.loader={loader}"]
    argv = [PY, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", "2", "--sharding", sharding, "--port",
            str(free_port()), "--", *init_args]
    sampler = WorkerSampler()
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    code = run(argv, {"PYTHONUNBUFFERED": "1"}, 1800, out.with_suffix(".log"), sampler, cwd=ROOT)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    facts, per = report["facts"], report["per_rank_facts"]
    if loader and facts.get("loader") != loader:
        raise RuntimeError(f"model.loader {loader}: loaded by {facts.get('loader')}: see {out.with_suffix('.log')}")
    ranks = {str(r): {**sampler.by_rank.get(r, {}), "policy_bytes": per[str(r)].get(f"rank_{r}_policy_bytes"),
                 "reference_bytes": per[str(r)].get(f"rank_{r}_reference_bytes"),
                 "after_load_kb": per[str(r)].get(f"rank_{r}_memory_kb")} for r in range(2)}
    return {"exit": code, "passed": report["passed"], "wall_s": round(wall, 1), "load_s": facts.get("load_seconds"),
            "fingerprint_s": facts.get("fingerprint_seconds"), "loader": facts.get("loader"),
            "loader_reason": facts.get("loader_reason"), "load_average_1min_at_start": round(load_avg, 2),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2), "ranks": ranks}


def floor(ckpt: Path, work: Path) -> dict:
    """bench_init's load group restricted to its `idle` (runtime) and `read` (pread floor) modes."""
    bench_init.LOAD_MODES = ["idle", "read"]
    load_avg = os.getloadavg()[0]
    res = bench_init.bench_load(ckpt, 1, work)
    res["load_average_1min_at_start"] = round(load_avg, 2)
    res["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return res


def planned(ckpt: Path, sharding: str) -> dict:
    """The planner's per-rank RSS for this init (placement zero3, micro-batch 4, the data's longest example as
    max_length, phases load + init), rank 0 with the checkpoint pages it maps, rank 1 without."""
    from planner_vs_reality import longest_example

    from dpo_dist.config.schema import from_dict
    from dpo_dist.plan import planner
    from dpo_dist.plan.presets import resolve_model

    src = resolve_model(str(ckpt))
    cluster = planner.local_cpu_cluster(2)
    cfg = from_dict({"sharding": {"name": sharding}})
    settings = planner.settings_from_run_config(cfg, None, max_length=longest_example(str(ckpt), 1024))
    p = planner.plan(src.config, cluster, settings, shard_bytes=src.checkpoint.largest_file_bytes)
    role = p.roles[0]
    out = {"label": p.label, "max_length": settings.max_length}
    for ph in ("load", "init"):
        out[ph] = {"rank0": role.phase_rank_rss(ph, cpu=True) + cluster.runtime,
                   "rank1": role.phase_rank_rss(ph, cpu=True) - role.phase_host_shared(ph) + cluster.runtime}
    out["peak"] = {r: max(out[ph][r] for ph in ("load", "init")) for r in ("rank0", "rank1")}
    return out


def summarize(res: dict) -> dict:
    runs = res["runs"]
    base = {sh: {r: min(x["ranks"][str(r)]["vmhwm_kb"] for x in runs[f"baseline@tiny {sh}"]) for r in range(2)}
            for sh in ("zero3", "fsdp2")}
    out = {}
    for label, (which, sharding, _) in VARIANTS.items():
        if which != "bench" or label not in runs:
            continue
        xs = runs[label]
        per = {}
        for r in range(2):
            rk = [x["ranks"][str(r)] for x in xs]
            held = (rk[0]["policy_bytes"] + rk[0]["reference_bytes"]) / KB
            ideal = base[sharding][r] + held
            peak = min(x["vmhwm_kb"] for x in rk)
            load_peak = min(x["after_load_kb"].get("VmHWM", 0) for x in rk) or None
            per[r] = {"held_kb": held, "baseline_kb": base[sharding][r], "ideal_kb": ideal, "peak_kb": peak,
                      "x_ideal": round(peak / ideal, 3), "load_peak_kb": load_peak,
                      "load_x_ideal": round(load_peak / ideal, 3) if load_peak else None}
        out[label] = {"load_s": [x["load_s"] for x in xs], "wall_s": [x["wall_s"] for x in xs],
                      "load_average": [x["load_average_1min_at_start"] for x in xs], "loader": xs[0]["loader"],
                      "passed": all(x["passed"] for x in xs), "per_rank": per,
                      "rank0_over_rank1_peak": round(per[0]["peak_kb"] / per[1]["peak_kb"], 3)}
    return out


def render(res: dict) -> str:
    s, fl = res["summary"], res.get("floor")
    lines = [f"# FSDP2 vs ZeRO-3 (bench/bench_fsdp2.py), {res.get('date', '')}, {res.get('machine', '')}", "",
             f"checkpoint {res['checkpoint']} ({res['bytes'] / 2**20:.0f} MiB, bf16), 2 CPU ranks, placement zero3;"
             " MiB per rank (rank 0 / rank 1); ideal = the backend's runtime baseline (embedded 1M model) + the "
             "weight bytes the rank holds; load peak = VmHWM when the load stage ends; planned = dpo-dist plan's "
             "peak over phases load + init, per rank RSS with the 0.5 GiB CPU runtime; rank 0's also counts the "
             "largest checkpoint file as mapped, which the pread loaders never map (from_pretrained does)", "",
             "| variant | loader | load s | load avg | held | ideal | load peak (x ideal) | init peak (x ideal) | "
             "planned | rank 0 / rank 1 peak |", "|---|---|---|---|---|---|---|---|---|---|"]

    def mib(pr: dict, key: str) -> str:
        return " / ".join(f"{(pr[r][key] or 0) / KB:.0f}" for r in range(2))

    def with_x(pr: dict, key: str, x: str) -> str:
        return " / ".join(f"{(pr[r][key] or 0) / KB:.0f} ({pr[r][x]})" for r in range(2))

    for label, v in s.items():
        pr = v["per_rank"]
        pl = res.get("planned", {}).get(label)
        plan = (" / ".join(f"{pl['peak'][f'rank{r}'] / 2**20:.0f}" for r in range(2)) + " (measured / planned "
                + " / ".join(f"{pr[r]['peak_kb'] * KB / pl['peak'][f'rank{r}']:.2f}" for r in range(2)) + ")"
                if pl else "-")
        lines.append(f"| {label} | {v['loader']} | {', '.join(str(x) for x in v['load_s'])} | "
                     f"{', '.join(str(x) for x in v['load_average'])} | {mib(pr, 'held_kb')} | "
                     f"{mib(pr, 'ideal_kb')} | "
                     f"{with_x(pr, 'load_peak_kb', 'load_x_ideal')} | {with_x(pr, 'peak_kb', 'x_ideal')} | {plan} | "
                     f"{v['rank0_over_rank1_peak']} |")
    if fl:
        rd, idle = fl["read"], fl["idle"]
        lines += ["", f"pread floor (bench/load_driver.py read, each rank 1/2 of every tensor = its Shard(0) rows, "
                  f"policy + reference): {rd['load_s']:.2f} s (load average {fl['load_average_1min_at_start']}), "
                  "peak " + " / ".join(f"{rd['per_rank'][str(r)]['peak_kb'] / KB:.0f}" for r in range(2))
                  + " MiB (x ideal " + " / ".join(f"{rd['per_rank'][str(r)]['x_ideal']:.3f}" for r in range(2))
                  + f"); idle runtime {idle['per_rank']['0']['peak_kb'] / KB:.0f} MiB"]
        floors = res.get("floor_runs") or [fl]
        best = min(f["read"]["load_s"] for f in floors)
        if len(floors) > 1:
            lines.append("pread floor per run: " + ", ".join(
                f"{f['read']['load_s']:.2f} s (load average {f['load_average_1min_at_start']})" for f in floors))
        for label, v in s.items():
            lines.append(f"- {label}: fastest load {min(v['load_s']) / best:.1f}x the fastest pread floor")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=[*VARIANTS, "floor"], help="run only these (merged into --out)")
    ap.add_argument("--render", action="store_true", help="only recompute the summary, plan and table from --out")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dpo-dist-bench-fsdp2"))
    ap.add_argument("--out", type=Path, default=BENCH / "results_fsdp2.json")
    a = ap.parse_args()
    res: dict = json.loads(a.out.read_text()) if a.out.exists() and (a.render or a.only) else {"runs": {}}
    if not a.render:
        import platform

        ckpt = ensure_checkpoint(a.checkpoint)
        a.work.mkdir(parents=True, exist_ok=True)
        res.update({"checkpoint": str(ckpt), "bytes": (ckpt / "model.safetensors").stat().st_size,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared"})
        todo = a.only or [*VARIANTS, "floor"]
        for i in range(a.runs):
            for label in (x for x in VARIANTS if x in todo):  # interleaved, so a noisy minute spreads over all
                which, sharding, loader = VARIANTS[label]
                slug = label.replace(" ", "-").replace("@", "-").replace("+", "-")
                r = one(ckpt if which == "bench" else TINY, sharding, a.work / f"{slug}-{i}", loader)
                res["runs"].setdefault(label, [])
                if i == 0 and a.only:
                    res["runs"][label] = []
                res["runs"][label].append(r)
                print(label, json.dumps(r), flush=True)
                a.out.write_text(json.dumps(res, indent=1) + "\n")
        if "floor" in todo:
            res["floor"] = floor(ckpt, a.work)
            a.out.write_text(json.dumps(res, indent=1) + "\n")
    res["summary"] = summarize(res)
    res["planned"] = {}
    for label, (which, sharding, _) in VARIANTS.items():
        if which == "bench":
            try:
                res["planned"][label] = planned(Path(res["checkpoint"]), sharding)
            except Exception as e:  # noqa: BLE001 - a planner that cannot plan this layout: say so in the table
                print(f"no plan for {label}: {e}", file=sys.stderr)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    md = render(res)
    a.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
