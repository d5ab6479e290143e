"""FSDP2 against ZeRO-3 on this machine: `dpo-dist init` as a user runs it (`dpo-dist launch --cpu --num-processes
2 --sharding {zero3,fsdp2}`) on the ~0.44B-parameter bf16 benchmark checkpoint (bench/make_checkpoint.py, the one
bench_init.py uses), both with their shipped loaders (each rank reads only its own shard's bytes), the workers'
/proc sampled for VmHWM and PSS (bench_init.WorkerSampler).

    .venv/bin/python bench/bench_fsdp2.py [--runs 1] [--checkpoint DIR]

Not part of the test suite. Writes bench/results_fsdp2.json. Per rank: peak RSS (VmHWM), the bytes of policy and
reference weights held, and the memory right after loading (the report's rank_<r>_memory_kb). Wall and load times
are only comparable on an idle machine (the figures say how loaded it was: the 1-minute load average).
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

from bench_init import DEFAULT_CKPT, PY, ROOT, WorkerSampler, ensure_checkpoint, run  # noqa: E402
from conftest import free_port  # noqa: E402


def one(ckpt: Path, sharding: str, out: Path) -> dict:
    init_args = ["--model", str(ckpt), "--output-dir", str(out), "--overwrite", "--force",
                 "--set", "verify.generation=false"]
    argv = [PY, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", "2", "--sharding", sharding, "--port",
            str(free_port()), "--", *init_args]
    sampler = WorkerSampler()
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    code = run(argv, {"PYTHONUNBUFFERED": "1"}, 1800, out.with_suffix(".log"), sampler, cwd=ROOT)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    facts, per = report["facts"], report["per_rank_facts"]
    ranks = {r: {**sampler.by_rank.get(r, {}), "policy_bytes": per[str(r)].get(f"rank_{r}_policy_bytes"),
                 "reference_bytes": per[str(r)].get(f"rank_{r}_reference_bytes"),
                 "after_load_kb": per[str(r)].get(f"rank_{r}_memory_kb")} for r in range(2)}
    return {"exit": code, "passed": report["passed"], "wall_s": round(wall, 1), "load_s": facts.get("load_seconds"),
            "fingerprint_s": facts.get("fingerprint_seconds"), "loader": facts.get("loader"),
            "load_average_1min_at_start": load_avg, "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dpo-dist-bench-fsdp2"))
    ap.add_argument("--out", type=Path, default=BENCH / "results_fsdp2.json")
    a = ap.parse_args()
    ckpt = ensure_checkpoint(a.checkpoint)
    a.work.mkdir(parents=True, exist_ok=True)
    res: dict = {"checkpoint": str(ckpt), "bytes": (ckpt / "model.safetensors").stat().st_size, "runs": {}}
    for i in range(a.runs):
        for sharding in ("zero3", "fsdp2"):  # interleaved, so a noisy minute spreads over both
            r = one(ckpt, sharding, a.work / f"{sharding}-{i}")
            res["runs"].setdefault(sharding, []).append(r)
            print(sharding, json.dumps(r), flush=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
