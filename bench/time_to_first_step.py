"""Time to the first training step, per stage, and the full-model forwards each forward proof runs (issue 23).

For each placement (zero3, cpu, lora, precomputed, ranks) it runs, as a user would,

    python -m dpo_dist launch --cpu --num-processes 2 (ranks: 3) --port P -- --model CKPT --placement X \
        --smoke-steps 1 --output-dir OUT --overwrite

and reads rank 0's timeline from report.json: load, static proofs, forward proofs (and each proof separately:
facts.forward_seconds), data, trainer, the first step (facts.smoke_seconds: trainer.train() of one step; the smoke
stage also fingerprints before and after), with the forwards each proof ran (facts.forward_counts). `--before-commit
C` runs the same launches on commit C's tree (extracted with `git archive`) for comparison; a tree that does not
record forward counts gets them computed from its code's rule (FORWARDS_BEFORE).

    .venv/bin/python bench/time_to_first_step.py                                   # deep trained checkpoint
    .venv/bin/python bench/time_to_first_step.py --before-commit 46c2aa4 --only zero3
    .venv/bin/python bench/time_to_first_step.py --checkpoint ~/.cache/dpo-dist/bench-llama-0.5b --random-weights \
        --init-arg=--force --out bench/results_ttfs_443m      # the 443M bench model (the planner refuses it)

Writes bench/results_ttfs.json (raw, with date and machine) and bench/results_ttfs.md (the table). One run per cell
(not medians): on a shared machine the seconds move with other jobs; the forward counts do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import run_cmd  # noqa: E402 - the tests' runner: process-tree cleanup on timeout
from deep_checkpoint import cached  # noqa: E402

from dpo_dist.runtime.distributed import free_port  # noqa: E402

WORK = Path("/tmp/dpo-dist-bench/ttfs")
PLACEMENTS = {"zero3": 2, "cpu": 2, "lora": 2, "precomputed": 2, "ranks": 3}
STAGES = ("load", "static proofs", "forward proofs", "data", "trainer")
RANDOM = ["--set", "verify.generation=false", "--set", "verify.perplexity=false", "--set",
          "verify.tokenizer_order=false"]


def forwards_before(policy_ranks: int, prompts: int = 4, new_tokens: int = 24, lora: bool = False) -> dict:
    """The forwards per rank of the forward proofs before issue 23 (46c2aa4), from its code: generation one forward
    per new token, perplexity 1, the order probe one per text (1 + prompts), the initial KL one policy and one
    reference forward per prompt of this rank's share, and the self-noise KL two policy forwards per prompt."""
    share = -(-prompts // policy_ranks)
    return {"generation": new_tokens, "perplexity": 1, "tokenizer order (in order + shuffled, per text)": 1 + prompts,
            "initial KL (policy)": share, "initial KL (reference)": share, "self-noise (policy, twice)": 2 * share}


def tree_for(commit: str | None) -> Path:
    if commit is None:
        return ROOT
    dest = WORK / f"tree-{commit}"
    if not (dest / "dpo_dist").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_one(tree: Path, ckpt: Path, placement: str, extra: list[str], timeout: float, collect: bool = False) -> dict:
    """One launch (or, with `collect`, the report an earlier launch left in its output directory)."""
    out = WORK / f"{tree.name}-{placement}"
    argv = [sys.executable, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", str(PLACEMENTS[placement]),
            "--port", str(free_port()), "--", "--model", str(ckpt), "--placement", placement, "--smoke-steps", "1",
            "--output-dir", str(out), "--overwrite", *extra]
    t0, load0 = time.time(), os.getloadavg()[0]
    if collect:
        code, log, load0 = None, "", None
    else:
        code, log = run_cmd(argv, {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)}, timeout, cwd=tree)
    wall = round(time.time() - t0, 1)
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    stages = {row["stage"]: row["ranks"].get("0", row["ranks"].get(0, {})).get("seconds")
              for row in rep.get("timeline", [])}
    facts = rep.get("facts", {})
    if code is None:  # collected: the verdict the report holds (1: a check failed, or no report)
        code = 0 if rep.get("passed") else 1
    counts = facts.get("forward_counts")
    policy_ranks = PLACEMENTS[placement] - (1 if placement == "ranks" else 0)
    return {"placement": placement, "tree": tree.name, "exit": code, "wall_s": wall, "stages": stages,
            "loadavg": [] if collect else [round(load0, 1), round(os.getloadavg()[0], 1)],
            "first_step_s": facts.get("smoke_seconds"), "forward_seconds": facts.get("forward_seconds"),
            "forward_counts": counts or forwards_before(policy_ranks), "counts_recorded": counts is not None,
            "failed": [r["check"] for r in rep.get("checks", []) if not r["ok"]],
            "log_tail": log[-1500:] if code else ""}


def fmt(x) -> str:
    return "" if x is None else f"{x:.1f}"


def render(results: list[dict], meta: dict) -> str:
    lines = [f"Time to the first training step ({meta['date']}, {meta['machine']}; checkpoint {meta['checkpoint']}; "
             "one run per cell, a shared machine: seconds are noisy, forward counts are exact)", "",
             "| placement | tree | load (s) | static proofs (s) | forward proofs (s) | data (s) | trainer (s) | first "
             "step (s) | forward proofs / first step | full forwards per rank | per proof: forwards (s) | exit | load "
             "average (start / end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["stages"]
        fwd, step = st.get("forward proofs"), r["first_step_s"]
        secs = r["forward_seconds"] or {}
        per = "; ".join(f"{k}: {v}" + (f" ({secs[k]:.1f})" if k in secs else "")
                        for k, v in r["forward_counts"].items() if v)
        ratio = f"{fwd / step:.2f}" if fwd and step else ""
        counted = "" if r["counts_recorded"] else " (from its code)"
        lines.append(f"| {r['placement']} | {r['tree']} | {fmt(st.get('load'))} | {fmt(st.get('static proofs'))} | "
                     f"{fmt(fwd)} | {fmt(st.get('data'))} | {fmt(st.get('trainer'))} | {fmt(step)} | {ratio} | "
                     f"{sum(r['forward_counts'].values())}{counted} | {per} | {r['exit']} | "
                     f"{' / '.join(str(x) for x in r.get('loadavg', []))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the deep trained test checkpoint")
    ap.add_argument("--random-weights", action="store_true", help="switch off the proofs that judge trained weights")
    ap.add_argument("--before-commit", default=None, help="also run this commit's tree, for comparison")
    ap.add_argument("--init-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for init, e.g. --init-arg=--force (repeatable)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--collect", action="store_true",
                    help="launch nothing: tabulate the reports the last runs left (an interrupted run's)")
    ap.add_argument("--out", type=Path, default=HERE / "results_ttfs")
    args = ap.parse_args()
    ckpt = args.checkpoint or cached()
    extra = (RANDOM if args.random_weights else []) + args.init_arg
    trees = [tree_for(None)] + ([tree_for(args.before_commit)] if args.before_commit else [])
    results = []
    for placement in args.only:
        for tree in trees:  # interleaved: a busy minute hits both versions
            print(f"[bench] {placement} on {tree.name} ...", file=sys.stderr, flush=True)
            r = run_one(tree, ckpt, placement, extra, args.timeout, args.collect)
            print(f"[bench]   exit {r['exit']}, {r['wall_s']} s, {r['stages']}", file=sys.stderr, flush=True)
            results.append(r)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                       f"{os.getloadavg()[0]:.1f} at the end", "checkpoint": str(ckpt)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = render(results, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
