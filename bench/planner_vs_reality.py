"""The memory planner against reality: planned host memory per rank vs the measured peak RSS of a real 2-process run.

For each checkpoint it runs, exactly as a user would,

    python -m dpo_dist launch --cpu --num-processes 2 --sharding zero3 --port <free> -- --model DIR --output-dir OUT \
        --set verify.generation=false --set verify.perplexity=false --set verify.tokenizer_order=false \
        --overwrite [--smoke-steps N]

samples /proc/<pid>/status of the two worker ranks (told apart by RANK in /proc/<pid>/environ) every 0.1 s and keeps
their VmHWM (the kernel's own high-water mark of the resident set, so sampling cannot miss the peak; it counts mapped
file pages too), and compares it with `dpo_dist.plan.planner.plan` for the same layout on this machine as a CPU
cluster: ZeRO-3 policy (`--sharding fsdp2`: FSDP2 with its shipped options), reference placement zero3, bf16,
micro-batch 4, and as max_length the longest tokenized example of the embedded data (what the collator pads to; the
configured 1024 would plan activations for tokens never seen). Only the phases the run reaches are compared: load +
init without smoke steps, every phase with them.

    python bench/planner_vs_reality.py --model dpo_dist/default/tiny-sft --model /tmp/llama-500m --smoke-steps 0 1
    python bench/make_checkpoint.py --out /tmp/llama-500m --layers 37     # ~0.5B random Llama

Writes a markdown table to stdout and the raw numbers to --out (JSON). On a CUDA machine,
`--gpu-activations --model llama-3.2-1b --micro-batch 1 --max-length 2048` instead compares the planner's activation
bytes with the CUDA memory a real training forward keeps (transformers only, no DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import descendants  # noqa: E402 - the test suite's: a launch's whole process tree

from dpo_dist.runtime.distributed import free_port  # noqa: E402

MiB = 1 << 20


def rank_of(pid: int) -> int | None:
    """RANK of a worker process started by the launcher (None for anything else: the launcher, helpers)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if "dpo_dist" not in cmd or " init" not in cmd:
            return None
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def status_bytes(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def init_args(model: str, out_dir: Path, smoke_steps: int) -> list[str]:
    """The `dpo-dist init` arguments of a measured run (tests/test_gate.py checks init still accepts them). No
    --force: the plan must accept the layout at the data's padded length. Random-weight checkpoints (make_checkpoint)
    read as untrained, so the proofs that judge trained weights are off; the KL and the fingerprints still run."""
    return ["--model", model, "--output-dir", str(out_dir), "--set", "verify.generation=false", "--set",
            "verify.perplexity=false", "--set", "verify.tokenizer_order=false", "--overwrite", "--smoke-steps",
            str(smoke_steps)]


def measure(model: str, out_dir: Path, smoke_steps: int, extra_env: dict[str, str], timeout: float,
            sharding: str = "zero3") -> dict:
    """Run the real 2-process init and return per-rank peaks (bytes), wall time and exit code."""
    argv = [sys.executable, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", "2", "--sharding", sharding,
            "--port", str(free_port()),
            "--", *init_args(model, out_dir, smoke_steps)]
    log = out_dir.parent / f"{out_dir.name}.log"  # not with_suffix: "llama-0.5b-smoke1" has a dot
    load_avg = os.getloadavg()[0]  # a shared machine: the seconds mean little without it
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **extra_env}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ranks: dict[int, int] = {}  # pid -> rank
    peak: dict[int, dict[str, int]] = {}
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, 9)
            raise RuntimeError(f"timed out after {timeout} s; log: {log}")
        for pid in descendants(proc.pid):
            if pid not in ranks:
                r = rank_of(pid)
                if r is None:
                    continue
                ranks[pid] = r
            st = status_bytes(pid)
            if st:
                p = peak.setdefault(ranks[pid], {})
                p["VmHWM"] = max(p.get("VmHWM", 0), st.get("VmHWM", 0))
                p["max_RssAnon"] = max(p.get("max_RssAnon", 0), st.get("RssAnon", 0))
                p["max_RssFile"] = max(p.get("max_RssFile", 0), st.get("RssFile", 0))
        time.sleep(0.1)
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "ranks": peak,
            "load_average_1min": [round(load_avg, 2), round(os.getloadavg()[0], 2)],
            "log": str(log)}


def longest_example(model: str, max_length: int) -> int:
    """Tokens of the longest prompt+completion in the embedded train data (the padded length of its batch)."""
    from transformers import AutoTokenizer

    from dpo_dist.config.resources import DEFAULT_DIR

    tok = AutoTokenizer.from_pretrained(model)
    longest = 0
    for line in (DEFAULT_DIR / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        for completion in (row["chosen"], row["rejected"]):
            longest = max(longest, len(tok(row["prompt"] + completion)["input_ids"]) + 1)  # + eos
    return min(longest, max_length)


def planned(model: str, smoke_steps: int, max_length: int, sharding: str = "zero3") -> dict:
    from dpo_dist.plan import planner
    from dpo_dist.plan.presets import resolve_model

    src = resolve_model(model)
    cluster = planner.local_cpu_cluster(2)
    from dpo_dist.config.schema import from_dict

    cfg = from_dict({"sharding": {"name": sharding}})  # the shipped sharding's layout (zero3, or fsdp2's defaults)
    settings = planner.settings_from_run_config(cfg, None, micro_batch=4, max_length=max_length)
    p = planner.plan(src.config, cluster, settings, shard_bytes=src.checkpoint.largest_file_bytes)
    phases = planner.PHASES if smoke_steps else ("load", "init")
    role = p.roles[0]
    # rank 0 reads the checkpoint files (its RSS counts their pages); rank 1 does not
    rank0 = max(role.phase_rank_rss(ph, cpu=True) for ph in phases) + cluster.runtime
    rank1 = max(role.phase_rank_rss(ph, cpu=True) - role.phase_host_shared(ph) for ph in phases) + cluster.runtime
    worst_phase = max(phases, key=lambda ph: role.phase_rank_rss(ph, cpu=True))
    return {"params": p.model["params"], "max_length": max_length, "phases": list(phases), "rank0": rank0,
            "rank1": rank1, "worst_phase": worst_phase,
            "components": {c.name: c.gpu + c.host + c.host_shared for c in role.components
                           if any(ph in c.phases for ph in phases)}}


def gpu_activation_check(model: str, micro_batch: int, max_length: int) -> list[dict]:
    """On a CUDA GPU (no DeepSpeed needed): the planner's activation bytes vs torch.cuda memory held after a real
    training forward (random bf16 weights, SDPA), with and without gradient checkpointing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_dist.plan import memory as plan_memory
    from dpo_dist.plan.presets import model_stats, resolve_model

    src = resolve_model(model)
    fields = {k: v for k, v in src.config.items() if k not in ("architectures", "transformers_version")}
    stats = model_stats(src.config).as_dict()
    cfg = AutoConfig.for_model(**fields)
    with torch.device("cuda"):  # built on the GPU: random init on the CPU takes minutes for billions of params
        net = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    tokens = 2 * micro_batch * max_length
    ids = torch.randint(0, stats["vocab_size"], (2 * micro_batch, max_length), device="cuda")
    out = []
    for ckpt in (False, True):
        if ckpt:  # transformers >= 5.2x names it activation_checkpointing_enable
            if hasattr(net, "activation_checkpointing_enable"):
                net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        hidden = net.model(input_ids=ids, use_cache=False).last_hidden_state
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        hidden.float().mean().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        net.zero_grad(set_to_none=True)
        del hidden
        planned = tokens * plan_memory.activation_bytes_per_token(stats, 2, ckpt)
        if ckpt:  # the recomputed layer exists only in backward
            planned -= tokens * (plan_memory.activation_bytes_per_token({**stats, "num_layers": 1}, 2, False)
                                 - plan_memory.activation_bytes_per_token({**stats, "num_layers": 0}, 2, False))
        out.append({"checkpointing": ckpt, "tokens": tokens, "planned_saved": planned, "measured_held": held,
                    "ratio": round(held / planned, 4), "fwd_bwd_peak_over_weights": peak,
                    "device": torch.cuda.get_device_name()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="checkpoint dir (repeatable; default: the embedded one)")
    ap.add_argument("--smoke-steps", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", default="/tmp/planner-vs-reality", help="run output dirs")
    ap.add_argument("--out", default=None, help="JSON results (default: <work>/results.json)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="extra environment for the run, e.g. MALLOC_MMAP_THRESHOLD_=1048576")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--gpu-activations", action="store_true",
                    help="instead: on a CUDA GPU, the planner's activation bytes vs torch.cuda allocations")
    ap.add_argument("--sharding", default="zero3", help="the shipped sharding to run and plan (zero3, fsdp2)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()
    models = args.model or [str(ROOT / "dpo_dist" / "default" / "tiny-sft")]
    if args.gpu_activations:
        rows = [dict(model=m, **r) for m in models for r in gpu_activation_check(m, args.micro_batch,
                                                                                 args.max_length)]
        print(json.dumps(rows, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        max_len = longest_example(model, 1024)
        for n in args.smoke_steps:
            plan_ = planned(model, n, max_len, args.sharding)
            tag = f"{Path(model).name}-{args.sharding}-smoke{n}"
            print(f"[bench] {tag}: running ...", file=sys.stderr, flush=True)
            meas = measure(model, work / tag, n, extra_env, args.timeout, args.sharding)
            row = {"model": model, "sharding": args.sharding, "smoke_steps": n, "env": extra_env, "plan": plan_,
                   "measured": meas}
            for r in (0, 1):
                got = meas["ranks"].get(r, {}).get("VmHWM")
                row[f"ratio_rank{r}"] = round(got / plan_[f"rank{r}"], 3) if got else None
            results.append(row)
            print(f"[bench] {tag}: rc {meas['returncode']}, {meas['wall_s']} s, ratios "
                  f"{row['ratio_rank0']} / {row['ratio_rank1']}", file=sys.stderr, flush=True)
    out = Path(args.out or work / "results.json")
    out.write_text(json.dumps(results, indent=1))
    print("| model | sharding | params | smoke steps | max_length | rank | planned MiB | measured VmHWM MiB | "
          "measured / planned | run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        p, m = row["plan"], row["measured"]
        for r in (0, 1):
            got = m["ranks"].get(r, {}).get("VmHWM", 0)
            print(f"| {Path(row['model']).name} | {row.get('sharding', 'zero3')} | {p['params'] / 1e6:.1f}M "
                  f"| {row['smoke_steps']} | {p['max_length']} "
                  f"| {r} | {p[f'rank{r}'] / MiB:.0f} | {got / MiB:.0f} | {row[f'ratio_rank{r}']} "
                  f"| rc {m['returncode']}, {m['wall_s']} s, load avg {m.get('load_average_1min')} |")
    print(f"\nraw: {out}", file=sys.stderr)
    return 0 if all(r["measured"]["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
