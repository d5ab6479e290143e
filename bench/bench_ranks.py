"""Reference on separate ranks: time per training step with P policy ranks served by one reference rank, with the
reference rank batching its policy ranks' requests into one forward a round, and without (one forward per request).

    .venv/bin/python bench/bench_ranks.py                 # P = 1, 3, 7 (K = 1), both modes, ~6 min on 2 cores
    .venv/bin/python bench/bench_ranks.py --policy-ranks 1 2 --steps 4 --runs 3

Each run is a real `dpo-dist launch --cpu` of P + 1 processes with `reference.placement: ranks`, serving online (a
reference forward per micro-batch), on the embedded tiny model; figures come from the run's report.json: the smoke
steps' wall time, how long policy ranks waited for reference answers during them, and the reference rank's forward
count and busy time for training's reference forwards (the KL checks' forwards are counted apart). Writes
bench/results_ranks.json and bench/results_ranks.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dpo_dist.runtime.distributed import free_port

HERE = Path(__file__).resolve().parent
OUT = Path("/tmp/dpo-dist-bench/ranks")


def one_run(p: int, batch: bool, steps: int, tag: str) -> dict:
    out = OUT / f"p{p}-{'batched' if batch else 'unbatched'}-{tag}"
    argv = [sys.executable, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", str(p + 1), "--port",
            str(free_port()), "--", "--placement", "ranks", "--output-dir", str(out), "--overwrite",
            "--smoke-steps", str(steps), "--set", f"reference.batch_requests={str(batch).lower()}",
            "--set", "train.per_device_train_batch_size=2", "--set", "train.gradient_accumulation_steps=1",
            "--set", "verify.generation=false", "--set", "verify.fingerprint_files=false",
            "--set", "kl.every_steps=1000", "--set", "data.eval=null", "--set", "reference.pad_to_multiple_of=64"]
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=HERE.parent)
    rep_path = out / "report.json"
    if proc.returncode != 0 or not rep_path.exists():
        raise SystemExit(f"run P={p} batch={batch} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    rep = json.loads(rep_path.read_text())
    per = rep["per_rank_facts"]
    served = per[str(p)][f"rank_{p}_served"]
    waits = [per[str(r)][f"rank_{r}_reference_wait_seconds"] for r in range(p)]
    n = len(rep["facts"]["smoke_losses"])
    kind = served["by_kind"]["log_probs"]  # training's reference forwards (TRL's fused head), not the KL checks'
    return {"P": p, "batched": batch, "steps": n, "step_seconds": rep["facts"]["smoke_seconds"] / n,
            "policy_wait_per_step": statistics.mean(waits) / n, "reference_forwards": kind["forwards"],
            "reference_rounds": kind["rounds"], "reference_busy_per_step": kind["seconds"] / n,
            "wall": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy-ranks", type=int, nargs="+", default=[1, 3, 7])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in args.policy_ranks:
        for i in range(args.runs):
            for batch in (True, False):  # interleaved: a busy minute hits both
                r = one_run(p, batch, args.steps, str(i))
                print(json.dumps(r), flush=True)
                rows.append(r)
    summary = []
    for p in args.policy_ranks:
        for batch in (True, False):
            rs = [r for r in rows if r["P"] == p and r["batched"] == batch]
            summary.append({k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k]
                            for k in rs[0] if k != "wall"})
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "when": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs, "load": os.getloadavg()[0]}
    (HERE / "results_ranks.json").write_text(json.dumps({"meta": meta, "runs": rows, "summary": summary}, indent=2))
    lines = [f"Reference on separate ranks (K=1), online serving, tiny model, {meta['machine']}, {meta['when']}, "
             f"median of {args.runs} run(s), {args.steps} steps each; per step, micro-batch 2 per policy rank, "
             "padded to a multiple of 64 in both modes.", "",
             "| P policy ranks | reference batching | s / step | policy wait for reference / step (s) | reference "
             "forwards / step (requests: P) | reference busy / step (s) |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['P']} | {'on' if s['batched'] else 'off'} | {s['step_seconds']:.3f} | "
                     f"{s['policy_wait_per_step']:.3f} | {s['reference_forwards'] / s['steps']:.1f} | "
                     f"{s['reference_busy_per_step']:.3f} |")
    (HERE / "results_ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
