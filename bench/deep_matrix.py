"""Every reference placement under ZeRO-3 and ZeRO-2 on the deep test checkpoint (tests/deep_checkpoint.py), one
smoke step each: does every numeric check pass, with which value, tolerance and tolerance source, and how long each
launch takes.

    .venv/bin/python bench/deep_matrix.py                     # 10 launches, ~15 min on 2 busy cores
    .venv/bin/python bench/deep_matrix.py --only precomputed ranks --stages 3

The same launches as `pytest -m slow tests/test_deep_numerics_matrix.py`; prints a markdown table and writes
/tmp/dpo-dist-bench/deep-matrix/results.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import launch_init  # noqa: E402 - the tests' launcher: same command line, same process-tree cleanup
from deep_checkpoint import cached  # noqa: E402

OUT = Path("/tmp/dpo-dist-bench/deep-matrix")
PLACEMENTS = {"zero3": 2, "cpu": 2, "lora": 2, "precomputed": 2, "ranks": 3}  # placement -> processes (ranks: W=3)
NUMERIC = ("initial KL < limit", "step-0 DPO loss = ln 2", "precomputed log-probs == policy's, same batching")


def run_one(ckpt: Path, placement: str, stage: int, out: Path) -> dict:
    t0 = time.time()
    res = launch_init(out, "--model", str(ckpt), "--placement", placement, "--smoke-steps", "1", "--set",
                      "verify.generation=false", sharding=f"zero{stage}", nproc=PLACEMENTS[placement], timeout=900)
    wall = round(time.time() - t0, 1)
    rows = {r["check"]: r for r in (res.report or {}).get("checks", [])}
    failed = [r["check"] for r in rows.values() if not r["ok"]]
    loss = (res.report or {}).get("facts", {}).get("smoke_losses", [float("nan")])[0]
    return {"placement": placement, "zero": stage, "exit": res.returncode, "wall_s": wall, "failed": failed,
            "step0_loss": loss, "gap": abs(loss - math.log(2)),
            "numeric": {n: {k: rows[n].get(k) for k in ("ok", "tolerance", "tolerance_source")} for n in NUMERIC
                        if n in rows}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    ap.add_argument("--stages", nargs="+", type=int, default=[3, 2], choices=[2, 3])
    args = ap.parse_args()
    ckpt = cached()
    results = []
    for stage in args.stages:
        for placement in args.only:
            r = run_one(ckpt, placement, stage, OUT / f"{placement}-zero{stage}")
            results.append(r)
            print(json.dumps(r), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| placement | ZeRO | exit | step-0 loss | abs(loss - ln 2) | loss tolerance (source) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        tol = r["numeric"].get("step-0 DPO loss = ln 2", {})
        src = (tol.get("tolerance_source") or "").split(":")[0]
        print(f"| {r['placement']} | {r['zero']} | {r['exit']} | {r['step0_loss']:.6f} | {r['gap']:.3g} | "
              f"{tol.get('tolerance', float('nan')):.3g} ({src}) | {r['wall_s']} |")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
