"""The prepared device check (issue 25): everything dpo-dist needs to have seen on a GPU, in one run of ~8 minutes.

    bash bench/gpu_check.sh --out DIR               # on a GPU machine: installs what is missing, then this
    python bench/gpu_check.py --cpu --out DIR       # the dry run on a CPU-only machine (small checkpoint)
    python bench/gpu_check.py --list                # the parts, their timeouts, what each measures
    python bench/gpu_check.py --only calibrate --out DIR     # rerun one part (the others' results are kept)

Parts (each a subprocess with its own timeout, inside one overall --budget, so one hang does not eat the rest):
  env         device, driver, installed versions against the pins in pyproject.toml
  deep        the deep trained test checkpoint (tests/deep_checkpoint.py), built here and timed
  calibrate   the cpu placement's cross-device tolerance, non-circular: reference-on-GPU vs policy-on-GPU bitwise,
              then reference-on-CPU vs reference-on-GPU on the same batches (the hardware noise), the tolerance
              derived from it (dpo_dist.verify.tolerances.cross_device_tolerances) -> cross_device_calibration.json
  selfnoise   the same forwards run repeatedly on the GPU: does the initial KL's self-noise margin (x4) hold
              against nondeterministic kernels?
  placements  every reference placement with one smoke step under ZeRO-3 (and FSDP2 when that sharding ships) on
              the embedded and the deep checkpoint; ranks as 2 processes on the one GPU
  load        a 1.3B bf16 checkpoint built here (bench/make_checkpoint.py): the product's load against floors
              measured in the same run (page cache -> pinned host, host -> device, safetensors load_file to the
              GPU), per-rank peak host and device memory against ideal, forward proofs against one training step
Under --out: summary.md (the table), results.json (every figure), cross_device_calibration.json, logs.tar.gz
(every launch's terminal, rank logs and report.json). Exit 0 only if no check failed and no part timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
SHIM_ENV = "DPO_DIST_GPU_CHECK_RANK"  # set in launched ranks: this file runs `dpo-dist init` with a memory tracer
MEM_ENV = "DPO_DIST_GPU_CHECK_MEM"
# part -> (timeout on a GPU, timeout on the CPU dry run, what it does); the order is the run order: the calibration
# (the one figure only a GPU can give) before the long matrix
PARTS = {
    "env": (60, 120, "device, driver, versions against the pins"),
    "deep": (150, 300, "build the deep trained test checkpoint (timed)"),
    "calibrate": (150, 300, "cross-device noise: ref-on-GPU == policy-on-GPU bitwise, ref-on-CPU vs ref-on-GPU"),
    "selfnoise": (90, 180, "the same forwards repeated on the GPU against the x4 self-noise margin"),
    "placements": (330, 1500, "every placement x {embedded, deep} x {zero3, fsdp2 if shipped}, one smoke step"),
    "load": (240, 400, "1.3B bf16: load vs floors, peak host/device memory vs ideal, proofs vs one step"),
}
PLACEMENTS = ("zero3", "cpu", "lora", "precomputed", "ranks")
BIG_GPU = ["--hidden", "2048", "--intermediate", "5632", "--layers", "24", "--heads", "16", "--kv-heads", "8"]
# the dry run: 3.5M parameters (a 32k vocabulary made one CPU smoke step take minutes on a busy 2-core box)
BIG_CPU = ["--hidden", "256", "--intermediate", "704", "--layers", "4", "--heads", "4", "--kv-heads", "2",
           "--vocab", "1024"]
MiB = 2**20


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def row(part: str, check: str, status: str, value: str = "", detail: str = "") -> dict:
    assert status in ("PASS", "FAIL", "SKIP", "INFO")
    return {"part": part, "check": check, "status": status, "value": value, "detail": detail}


def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **(extra or {})}


def run_tree(argv: list[str], env: dict, timeout: float, logfile: Path, cwd: Path = ROOT) -> tuple[int | None, float]:
    """Run in a session of its own, output to `logfile`; on timeout kill every descendant (torchrun's workers sit in
    sessions of their own). (exit code or None on timeout, seconds)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import kill_tree  # the tests' own process-tree cleanup

    t0 = time.perf_counter()
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            code = None
    return code, time.perf_counter() - t0


# -- the rank shim: `dpo-dist init` with per-stage peak memory, and one device for every rank --------------------
def rank_shim() -> int:
    """What each launched rank runs instead of `python -m dpo_dist`: the same `init`, plus (1) LOCAL_RANK 0 when the
    machine has one GPU and the launch has more processes (the ranks placement's reference rank shares it), and (2)
    each stage's peak host memory (VmHWM, reset per stage through /proc/self/clear_refs) and device memory (torch's
    allocator peak, reset per stage), written after every stage (init leaves with os._exit: no atexit)."""
    import torch

    rank = os.environ.get("RANK", "0")  # the launched rank (the ranks placement renames RANK to its role's rank)
    if torch.cuda.is_available() and torch.cuda.device_count() == 1:
        os.environ["LOCAL_RANK"] = "0"
    from dpo_dist.verify import report

    stages: list[dict] = []
    out = Path(os.environ[MEM_ENV]) / f"rank{rank}.json"
    inner = report.timed

    def status_kb(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def timed(rr, stage, fn, say=None):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: this stage's own peak
        except OSError:
            pass
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start_kb, start_dev = status_kb("VmRSS"), torch.cuda.memory_allocated() if cuda else 0
        try:
            return inner(rr, stage, fn, say)
        finally:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            stages.append({"stage": stage, "host_start_kb": start_kb, "host_peak_kb": status_kb("VmHWM"),
                           "host_end_kb": status_kb("VmRSS"), "dev_start": start_dev,
                           "dev_peak": torch.cuda.max_memory_allocated() if cuda else 0,
                           "dev_end": torch.cuda.memory_allocated() if cuda else 0,
                           "dev_reserved_peak": torch.cuda.max_memory_reserved() if cuda else 0})
            out.write_text(json.dumps({"rank": rank, "stages": stages}))

    report.timed = timed
    from dpo_dist.init import stages as stage_module

    stage_module.timed = timed
    from dpo_dist.cli.main import main

    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def launch(ctx: dict, name: str, ckpt: Path, placement: str, sharding: str, nproc: int, timeout: float,
           extra: tuple[str, ...] = ()) -> dict:
    """One `dpo-dist init` as `dpo-dist launch` builds it (dpo_dist.launch.accelerate.build_launch), each rank
    through the shim. Its report, per-rank memory per stage, wall time."""
    from dpo_dist.launch.accelerate import LaunchSpec, build_launch
    from dpo_dist.runtime.distributed import free_port

    work = Path(ctx["work"]) / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    mem = work / "mem"
    mem.mkdir(parents=True)
    args = ("--output-dir", str(work / "out"), "--model", str(ckpt), "--placement", placement, *extra)
    argv, env = build_launch(LaunchSpec(sharding=sharding, num_processes=nproc, main_process_port=free_port(),
                                        cpu=ctx["cpu"], init_args=args))
    i = max(k for k in range(len(argv) - 1) if argv[k] == "-m" and argv[k + 1] == "dpo_dist")
    argv[i : i + 2] = [str(HERE)]  # accelerate launch runs this file (a script) with the same `init ...` arguments
    code, wall = run_tree(argv, child_env({**env, SHIM_ENV: "1", MEM_ENV: str(mem)}), timeout, work / "terminal.log")
    rep_path = work / "out" / "report.json"
    report = json.loads(rep_path.read_text()) if rep_path.exists() else None
    ranks = {p.stem: json.loads(p.read_text())["stages"] for p in sorted(mem.glob("rank*.json"))}
    return {"name": name, "exit": code, "wall_s": round(wall, 1), "report": report, "mem": ranks,
            "log": str(work / "terminal.log")}


def stage_seconds(report: dict | None, stage: str) -> float | None:
    for r in (report or {}).get("timeline", []):
        if r["stage"] == stage:
            return max(v["seconds"] for v in r["ranks"].values())
    return None


def peaks(mem: dict, upto: str | None = None) -> dict[str, dict[str, float]]:
    """Per rank: the largest host VmHWM and device allocator peak over its stages (up to and including `upto`)."""
    out = {}
    for rank, stages in mem.items():
        sel = []
        for s in stages:
            sel.append(s)
            if s["stage"] == upto:
                break
        out[rank] = {"host_mib": max((s["host_peak_kb"] for s in sel), default=0) / 1024,
                     "dev_mib": max((s["dev_peak"] for s in sel), default=0) / MiB}
    return out


def pinned() -> dict[str, str]:
    """name -> version of every `name==version` in pyproject.toml's dependencies (no tomllib: Python 3.10 has none)."""
    import re

    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', deps))


# -- parts -----------------------------------------------------------------------------------------------------
def part_env(ctx: dict) -> list[dict]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    rows = []
    pins = pinned()
    have = {}
    for name, pin in pins.items():
        try:
            have[name] = version(name)
        except PackageNotFoundError:
            rows.append(row("env", f"{name} installed", "FAIL", "missing", f"pinned {pin}: bench/gpu_check.sh "
                            "installs it (from .whl on a machine without a registry)"))
            continue
        same = have[name].split("+")[0] == pin
        rows.append(row("env", f"{name} {pin}", "PASS" if same else "INFO", have[name],
                        "" if same else "not the pinned version: figures are for this one"))
    if ctx["cpu"]:
        rows.append(row("env", "device", "INFO", f"CPU dry run: {platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores", "GPU-only figures are reported as skipped"))
    else:
        ok = torch.cuda.is_available()
        rows.append(row("env", "CUDA torch sees the GPU", "PASS" if ok else "FAIL",
                        f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if ok else
                        f"torch {torch.__version__} (cuda {torch.version.cuda}) sees no GPU",
                        "" if ok else "install a CUDA build of torch (bench/gpu_check.sh keeps the one installed)"))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
            rows.append(row("env", "nvidia-smi", "INFO", q))
    rows.append(row("env", "python", "INFO", platform.python_version(), sys.executable))
    ctx["details"]["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, **have,
                                  "python": platform.python_version()}
    return rows


def deep_checkpoint(ctx: dict) -> tuple[Path, float | None, int]:
    """The deep trained checkpoint where the tests keep it (DPO_DIST_TEST_CACHE, else under --work): (path, seconds
    it took to build here or None when it was cached, training threads). Built with up to 8 threads (the tests use
    2): on a bare GPU machine its build is part of the budget; other threads round other bits, same model."""
    os.environ.setdefault("DPO_DIST_TEST_CACHE", str(Path(ctx["work"]) / "cache"))
    sys.path.insert(0, str(ROOT / "tests"))
    from deep_checkpoint import build, cache_root, source_key

    path = cache_root() / f"deep-ckpt-{source_key()}" / "base"
    if (path / "deep_checkpoint.json").exists():
        return path, None, 0
    threads = min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    build(path, threads=threads, quiet=True)
    return path, time.perf_counter() - t0, threads


def part_deep(ctx: dict) -> list[dict]:
    path, seconds, threads = deep_checkpoint(ctx)
    info = json.loads((path / "deep_checkpoint.json").read_text())
    how = f"built here in {seconds:.1f} s ({threads} threads)" if seconds is not None else \
        f"reused from the cache ({path})"
    ctx["details"]["deep_checkpoint"] = {"path": str(path), "build_seconds": seconds, **info}
    return [row("deep", "deep trained checkpoint", "PASS", how,
                f"{info['parameters'] / 1e6:.2f}M parameters, {info['layers']} layers, mean max prob "
                f"{info['after']['mean_max_prob']}")]


def checkpoints(ctx: dict) -> dict[str, Path]:
    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    return {"embedded": DEFAULT_CHECKPOINT, "deep": deep_checkpoint(ctx)[0]}


def pair_batches(tok, rows: list[dict], micro: int, device) -> list[dict]:
    """Preference pairs as TRL batches them: prompt + chosen and prompt + rejected in one batch of 2 x micro rows,
    right-padded, BOS first and EOS last; completion_mask marks the completion tokens."""
    import torch

    batches = []
    for k in range(0, len(rows), micro):
        seqs, comp = [], []
        group = rows[k : k + micro]
        for key in ("chosen", "rejected"):
            for r in group:
                p = [tok.bos_token_id] + tok(r["prompt"], add_special_tokens=False)["input_ids"]
                c = tok(r[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                seqs.append(p + c)
                comp.append([0] * len(p) + [1] * len(c))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        cmask = torch.zeros_like(ids)
        for i, (s, c) in enumerate(zip(seqs, comp, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            cmask[i, : len(c)] = torch.tensor(c)
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "completion": cmask})
    return batches


def seq_logps(logits, batch):
    """Sum of completion-token log-probs per sequence, fp32 (what TRL's reference log-probs are), on the CPU."""
    import torch

    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["input_ids"][:, 1:].to(lp.device)
    tok_lp = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    keep = batch["completion"][:, 1:].to(lp.device).bool()
    return (tok_lp * keep).sum(-1).double().cpu()


def load_models(path: Path, device, n: int):
    import torch
    from transformers import AutoModelForCausalLM

    out = []
    for _ in range(n):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(device).eval()
        out.append(m)
    return out


def forwards(model, kl_inputs: list[dict], batches: list[dict]) -> tuple[list, list]:
    import torch

    dev = next(model.parameters()).device
    with torch.no_grad():
        kl_logits = [model(**{k: v.to(dev) for k, v in e.items()}).logits for e in kl_inputs]
        pair_logits = [model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
                       for b in batches]
    return kl_logits, pair_logits


def kl_stats(pol_logits: list, ref_logits: list, kl_inputs: list[dict], device) -> dict:
    from dpo_dist.verify.kl import masked_kl_stats, token_kl

    s, n, mx = 0.0, 0, 0.0
    for lp, lr, enc in zip(pol_logits, ref_logits, kl_inputs, strict=True):
        st = masked_kl_stats(token_kl(lp, lr.to(lp.device)), enc["attention_mask"].to(lp.device))
        s += float(st.sum)
        n += int(st.count)
        mx = max(mx, float(st.max_seq_mean))
    return {"mean": s / max(n, 1), "max_seq_mean": mx, "tokens": n}


def calibration_inputs(tok, device, pairs: int = 32):
    from dpo_dist.config.schema import VerifyConfig
    from dpo_dist.default import build
    from dpo_dist.verify import probes

    kl_inputs = [probes.encode_batch(tok, [probes.render_prompt(tok, p)], "cpu") for p in VerifyConfig().prompts]
    rows = build.read_jsonl(build.HERE / "train.jsonl")[:pairs]
    return kl_inputs, pair_batches(tok, rows, 4, "cpu")


def part_calibrate(ctx: dict) -> list[dict]:
    """Non-circular: (1) policy and reference, two models loaded from the same files, on the GPU: their logits must be
    bitwise equal (so at step 0 any policy-vs-reference gap of the cpu placement can only come from the device);
    (2) the reference on the CPU vs the reference on the GPU, on the same batches: that gap is the hardware noise;
    the tolerance derives from (2) alone, never from a policy-vs-reference gap it will judge. The CPU side runs with
    torch's default threads and with 1 (a launched rank may get either)."""
    import torch
    from transformers import AutoTokenizer

    from dpo_dist.config.schema import VerifyConfig
    from dpo_dist.verify.tolerances import LN2, cross_device_tolerances

    dev = torch.device("cpu" if ctx["cpu"] else "cuda")
    rows, per_ckpt = [], {}
    threads = torch.get_num_threads()
    for name, path in checkpoints(ctx).items():
        tok = AutoTokenizer.from_pretrained(str(path))
        kl_inputs, batches = calibration_inputs(tok, dev, 16 if ctx["cpu"] else 32)  # CPU dry run: cheaper
        pol, ref = load_models(path, dev, 2)
        (ref_cpu,) = load_models(path, "cpu", 1)
        pk, pp = forwards(pol, kl_inputs, batches)
        rk, rp = forwards(ref, kl_inputs, batches)
        same = sum(torch.equal(a, b) for a, b in zip(pk + pp, rk + rp, strict=True))
        total = len(pk) + len(pp)
        rows.append(row("calibrate", f"{name}: reference == policy on {dev.type}, bitwise", "PASS" if same == total
                        else "FAIL", f"{same}/{total} forwards bitwise equal",
                        "" if same == total else "two loads of the same files differ on one device: nothing "
                        "cross-device can be calibrated until they agree"))
        res = {}
        for n_threads in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n_threads)
            ck, cp = forwards(ref_cpu, kl_inputs, batches)
            torch.set_num_threads(threads)
            kl = kl_stats(pk, ck, kl_inputs, dev)
            gaps = []
            for b, lg_dev, lg_cpu in zip(batches, pp, cp, strict=True):
                d, c = seq_logps(lg_dev, b), seq_logps(lg_cpu, b)
                half = d.shape[0] // 2
                gaps += ((d[:half] - c[:half]) - (d[half:] - c[half:])).tolist()
            res[f"cpu_threads_{n_threads}"] = {
                "kl_mean": kl["mean"], "kl_max_seq_mean": kl["max_seq_mean"], "kl_tokens": kl["tokens"],
                "pairs": len(gaps), "gap_mean_abs": sum(abs(g) for g in gaps) / len(gaps),
                "gap_mean_sq": sum(g * g for g in gaps) / len(gaps), "gap_max_abs": max(abs(g) for g in gaps)}
            r = res[f"cpu_threads_{n_threads}"]
            rows.append(row("calibrate", f"{name}: ref on CPU ({n_threads} thr) vs ref on {dev.type}", "INFO",
                            f"KL {r['kl_mean']:.3g}/token (max seq {r['kl_max_seq_mean']:.3g}); log-ratio gap "
                            f"mean {r['gap_mean_abs']:.3g}, max {r['gap_max_abs']:.3g} nats",
                            f"{r['kl_tokens']} tokens, {r['pairs']} pairs"))
        per_ckpt[name] = {"path": str(path), "bitwise_on_device": same == total, **res}
        del pol, ref, ref_cpu
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    worst = [v for c in per_ckpt.values() for k, v in c.items() if k.startswith("cpu_threads_")]
    versions = ctx["details"].get("versions") or {"torch": torch.__version__}
    device = "CPU (dry run: no cross-device gap exists here)" if ctx["cpu"] else torch.cuda.get_device_name(0)
    noise = {"kl_mean": max(w["kl_mean"] for w in worst), "gap_mean_abs": max(w["gap_mean_abs"] for w in worst),
             "gap_mean_sq": max(w["gap_mean_sq"] for w in worst),
             "source": f"bench/gpu_check.py on {device}, torch {versions['torch']}, {time.strftime('%Y-%m-%d')}: "
                       f"reference on CPU vs on the accelerator, checkpoints {', '.join(per_ckpt)}"}
    cfg = VerifyConfig()
    beta, pairs = 0.1, 16  # the defaults: train.beta 0.1 (standard), 4 x 4 pairs per step on one GPU
    loss_tol, kl_tol = cross_device_tolerances(noise, beta, pairs)
    cal = {"device": device, "cpu": platform.processor() or platform.machine(), "versions": versions,
           "date": time.strftime("%Y-%m-%d %H:%M"), "noise": noise, "checkpoints": per_ckpt,
           "derived": {"beta": beta, "pairs": pairs, "loss_tolerance": loss_tol.value,
                       "loss_source": loss_tol.source, "kl_tolerance": kl_tol.value, "kl_source": kl_tol.source},
           "settings": {"verify.cross_device_loss_tolerance": cfg.cross_device_loss_tolerance,
                        "verify.kl_max": cfg.kl_max}, "ln2": LN2}
    Path(ctx["out"]).mkdir(parents=True, exist_ok=True)
    (Path(ctx["out"]) / "cross_device_calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
    ctx["details"]["calibration"] = cal
    rows.append(row("calibrate", "derived step-0 loss tolerance (beta 0.1, 16 pairs)", "INFO",
                    f"{loss_tol.value:.3g} (setting verify.cross_device_loss_tolerance "
                    f"{cfg.cross_device_loss_tolerance:g})", loss_tol.source))
    rows.append(row("calibrate", "derived initial-KL tolerance", "INFO",
                    f"{kl_tol.value:.3g} (setting verify.kl_max {cfg.kl_max:g})", kl_tol.source))
    return rows


def part_selfnoise(ctx: dict) -> list[dict]:
    """The initial KL's gate takes its tolerance from one self-noise sample (the policy's logits run twice, x4) and
    judges another (policy vs reference). Run the same forwards `repeats` times: if every run is bitwise the first,
    the gate is bitwise here and the margin is never used; else every pairwise KL must stay within 4 x the smallest."""
    import torch
    from transformers import AutoTokenizer

    from dpo_dist.verify.tolerances import SELF_NOISE_MARGIN

    dev = torch.device("cpu" if ctx["cpu"] else "cuda")
    repeats = 3 if ctx["cpu"] else 8  # the CPU dry run only proves the code path
    rows = []
    for name, path in checkpoints(ctx).items():
        tok = AutoTokenizer.from_pretrained(str(path))
        kl_inputs, batches = calibration_inputs(tok, dev, 16 if ctx["cpu"] else 32)
        (pol,) = load_models(path, dev, 1)
        runs = [forwards(pol, kl_inputs, batches) for _ in range(repeats)]
        bitwise = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(r[0] + r[1], runs[0][0] + runs[0][1],
                                                                           strict=True))
        kls = [kl_stats(runs[i][0], runs[j][0], kl_inputs, dev)["mean"] for i in range(repeats)
               for j in range(i + 1, repeats)]
        ctx["details"].setdefault("selfnoise", {})[name] = {"repeats": repeats, "bitwise": bitwise,
                                                            "pairwise_kl": kls}
        if bitwise:
            rows.append(row("selfnoise", f"{name}: {repeats} runs of the same forwards on {dev.type}", "PASS",
                            "all bitwise equal", "deterministic kernels: the gate's tolerance is 0 (bitwise); the "
                            f"x{SELF_NOISE_MARGIN:g} margin is not exercised here"))
            continue
        lo, hi = min(kls), max(kls)
        ok = hi <= SELF_NOISE_MARGIN * lo if lo > 0 else False
        rows.append(row("selfnoise", f"{name}: {repeats} runs, pairwise KL within x{SELF_NOISE_MARGIN:g}",
                        "PASS" if ok else "FAIL",
                        f"KL {lo:.3g} .. {hi:.3g}/token (x{hi / lo if lo else float('inf'):.2g})",
                        "" if ok else "one self-noise sample does not bound another: the gate could fail a correct "
                        "run (raise SELF_NOISE_MARGIN from this measurement, or take the max of several samples)"))
        del pol
    return rows


def launch_row(part: str, label: str, res: dict) -> dict:
    rep = res["report"] or {}
    checks = {c["check"]: c for c in rep.get("checks", [])}
    failed = [c["check"] for c in rep.get("checks", []) if not c["ok"]]
    ok = res["exit"] == 0 and rep.get("passed") is True
    loss = checks.get("step-0 DPO loss = ln 2", {})
    kl = checks.get("initial KL < limit", {})
    val = []
    losses = rep.get("facts", {}).get("smoke_losses") or []
    if losses:
        val.append(f"loss {losses[0]:.6f} tol {loss.get('tolerance', float('nan')):.3g}")
    if "initial_kl" in rep.get("facts", {}):
        val.append(f"KL {rep['facts']['initial_kl']['mean']:.2g} tol {kl.get('tolerance', float('nan')):.3g}")
    fwd, smoke = stage_seconds(rep, "forward proofs"), stage_seconds(rep, "smoke steps")
    steps = rep.get("facts", {}).get("smoke_steps") or 1
    pk = peaks(res["mem"])
    detail = []
    if fwd is not None and smoke:
        detail.append(f"proofs {fwd:.1f} s vs step {smoke / steps:.1f} s")
    if pk:
        detail.append("peak host/dev MiB " + ", ".join(f"{r}: {v['host_mib']:.0f}/{v['dev_mib']:.0f}"
                                                       for r, v in pk.items()))
    detail.append(f"wall {res['wall_s']} s")
    if res["exit"] is None:
        val, detail = ["timed out"], [f"killed after {res['wall_s']} s; log {res['log']}"]
    elif not ok:
        val.insert(0, f"exit {res['exit']}, failed: {', '.join(failed) or '(no report)'}")
    return row(part, label, "PASS" if ok else "FAIL", "; ".join(val), "; ".join(detail))


def part_placements(ctx: dict) -> list[dict]:
    from dpo_dist.config.names import Sharding

    shardings = ["zero3"]
    rows = []
    if "fsdp2" in Sharding.values():
        shardings.append("fsdp2")
    else:
        rows.append(row("placements", "FSDP2", "SKIP", "not among the shipped shardings",
                        f"{', '.join(Sharding.values())}: add it here when Sharding has fsdp2 (detected, not listed)"))
    paths = checkpoints(ctx)
    # the CPU dry run proves the plumbing: every placement on the embedded checkpoint, the deep one under zero3 only
    # fsdp2, when it ships: on the deep checkpoint (the numerics), every placement; one it refuses is skipped
    jobs = [(c, s, p) for c in paths for s in shardings for p in PLACEMENTS
            if not (ctx["cpu"] and c == "deep" and p != "zero3") and not (s == "fsdp2" and c != "deep")]
    if ctx["cpu"]:
        rows.append(row("placements", "deep checkpoint: cpu, lora, precomputed, ranks", "SKIP", "CPU dry run",
                        "the GPU run does all of them (the same code path as the embedded ones here)"))
    timeout = 200 if not ctx["cpu"] else 600  # a shared 2-core box: 2-7 min a launch
    results: dict = {}
    lock = threading.Lock()

    partial = Path(ctx["work"]) / "parts" / "placements.partial.json"

    def work(item):
        c, s, p = item
        nproc = 2 if p == "ranks" else 1  # ranks: one policy and one reference process, on the same GPU
        res = launch(ctx, f"{c}-{s}-{p}", paths[c], p, s, nproc, timeout,
                     ("--smoke-steps", "1", "--set", "kl.every_steps=1"))
        with lock:  # what is done so far, for the driver should this part time out
            results[item] = res
            done = [launch_row("placements", f"{p_} on {c_} ({s_})", results[k]) for k in jobs if k in results
                    for c_, s_, p_ in [k]]
            partial.write_text(json.dumps({"rows": rows + done, "details": {}}))
        log(f"placements: {c} {s} {p}: exit {res['exit']} in {res['wall_s']} s")

    pending = list(jobs)

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                item = pending.pop(0)
            work(item)

    threads = [threading.Thread(target=worker) for _ in range(max(1, ctx["jobs"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {}
    for item in jobs:
        c, s, p = item
        res = results[item]
        label = f"{p} on {c} ({s}{', 2 processes' if p == 'ranks' else ''})"
        if s == "fsdp2" and res["exit"] == 2 and res["report"] is None:  # refused as bad input: not supported
            reason = Path(res["log"]).read_text(errors="replace").strip().splitlines()[-1:]
            rows.append(row("placements", label, "SKIP", "refused by init (exit 2)", " ".join(reason)[:200]))
        else:
            rows.append(launch_row("placements", label, res))
        rep = res["report"] or {}
        summary[f"{c}-{s}-{p}"] = {"exit": res["exit"], "wall_s": res["wall_s"], "passed": rep.get("passed"),
                                   "facts": {k: rep.get("facts", {}).get(k) for k in
                                             ("smoke_losses", "initial_kl", "initial_kl_policy_self", "load_seconds")},
                                   "checks": [{k: c_.get(k) for k in ("check", "ok", "value", "tolerance",
                                                                      "tolerance_source")}
                                              for c_ in rep.get("checks", [])],
                                   "timeline": {r["stage"]: max(v["seconds"] for v in r["ranks"].values())
                                                for r in rep.get("timeline", [])},
                                   "mem": res["mem"]}
    ctx["details"]["placements"] = summary
    return rows


def floors(ckpt: Path, gpu: bool) -> dict:
    """The load's floors on this machine, the file already in the page cache: read into a (pinned) host buffer, copy
    host -> device, and safetensors' own load_file straight to the device. Best of 2 each, GB/s = 1e9 bytes/s."""
    import torch
    from safetensors.torch import load_file

    f = ckpt / "model.safetensors"
    size = f.stat().st_size
    with open(f, "rb") as fh:  # warm the page cache
        while fh.read(64 * MiB):
            pass
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=gpu)
    out = {"bytes": size, "pinned": gpu}

    def best(fn):
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    def read():
        with open(f, "rb", buffering=0) as fh:
            view, n = memoryview(buf.numpy()), 0
            while n < size:
                n += fh.readinto(view[n:])

    out["read_host_s"] = best(read)
    if gpu:
        def h2d():
            buf.to("cuda", non_blocking=True)
            torch.cuda.synchronize()

        out["h2d_s"] = best(h2d)

        def lf():
            load_file(str(f), device="cuda:0")
            torch.cuda.synchronize()

        out["load_file_s"] = best(lf)
        torch.cuda.empty_cache()
    else:
        out["load_file_cpu_s"] = best(lambda: load_file(str(f), device="cpu"))
    return out


def part_load(ctx: dict) -> list[dict]:
    import subprocess as sp

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT
    from dpo_dist.load.checkpoint import tensor_index

    gpu = not ctx["cpu"]
    rows = []
    big = Path(ctx["work"]) / ("llama-1.3b" if gpu else "llama-small")
    t0 = time.perf_counter()
    built = not (big / "model.safetensors").exists()
    r = sp.run([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), "--out", str(big),
                *(BIG_GPU if gpu else BIG_CPU)], env=child_env(), capture_output=True, text=True)
    if r.returncode != 0:
        return [row("load", "build the checkpoint", "FAIL", f"exit {r.returncode}", r.stderr.strip()[-300:])]
    params = sum(e.numel for e in tensor_index(big).values())
    wbytes = 2 * params
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
    rows.append(row("load", "checkpoint built here", "INFO", f"{size} parameters, {wbytes / 2**30:.2f} GiB bf16",
                    f"{'built' if built else 'reused'} in {time.perf_counter() - t0:.1f} s (bench/make_checkpoint.py, "
                    "random weights)"))
    fl = floors(big, gpu)
    gbs = lambda s: f"{fl['bytes'] / s / 1e9:.1f} GB/s ({s:.2f} s)"  # noqa: E731
    rows.append(row("load", "floor: page cache -> pinned host" if gpu else "floor: page cache -> host (not pinned: "
                    "no CUDA)", "INFO", gbs(fl["read_host_s"]), "one file read into one preallocated buffer"))
    if gpu:
        rows.append(row("load", "floor: host -> device copy", "INFO", gbs(fl["h2d_s"]), "pinned buffer, one copy"))
        rows.append(row("load", "floor: safetensors load_file to the GPU", "INFO", gbs(fl["load_file_s"]), ""))
    else:
        rows.append(row("load", "floor: host -> device copy", "SKIP", "GPU only"))
        rows.append(row("load", "floor: safetensors load_file to the GPU", "SKIP", "GPU only",
                        f"to the CPU instead: {gbs(fl['load_file_cpu_s'])}"))
    # baseline: a launch on the embedded 1M checkpoint (no weights worth counting): the rank's runtime. The
    # placements part's zero3 run when it ran (its generation check on: a few MiB on that model), else one here.
    mem = Path(ctx["work"]) / "runs" / "embedded-zero3-zero3" / "mem"
    if list(mem.glob("rank*.json")):
        base = {"mem": {p.stem: json.loads(p.read_text())["stages"] for p in sorted(mem.glob("rank*.json"))}}
        base_how = "the placements part's embedded zero3 run"
    else:
        base = launch(ctx, "load-baseline", DEFAULT_CHECKPOINT, "zero3", "zero3", 1, 150 if gpu else 300,
                      ("--set", "verify.generation=false", "--smoke-steps", "1"))
        base_how = "the same launch on the embedded checkpoint"
    res = launch(ctx, "load-big", big, "zero3", "zero3", 1, 200 if gpu else 300,
                 ("--set", "verify.generation=false", "--smoke-steps", "1"))
    rows.append(launch_row("load", f"zero3 on {size}, 1 process, 1 smoke step", res))
    rep = res["report"] or {}
    load_s = (rep.get("facts") or {}).get("load_seconds")
    if load_s:
        floor_s = fl["load_file_s"] if gpu else fl["load_file_cpu_s"]
        pinned = fl["read_host_s"] + fl.get("h2d_s", 0.0)
        rows.append(row("load", "load stage vs floors (policy + reference: 2 x the file)", "INFO",
                        f"{load_s:.2f} s = {2 * fl['bytes'] / load_s / 1e9:.1f} GB/s; x{load_s / (2 * floor_s):.2f} "
                        f"load_file{' to the GPU' if gpu else ' (CPU)'}, x{load_s / (2 * pinned):.2f} "
                        f"{'pinned read + copy' if gpu else 'read'}", "facts.load_seconds of the report"))
    bp, rp = peaks(base["mem"], "trainer"), peaks(res["mem"], "trainer")
    if bp and rp:
        b, r0 = bp.get("rank0", {}), rp.get("rank0", {})
        host_ideal = b.get("host_mib", 0) + (0 if gpu else 2 * wbytes / MiB)  # on CPU the weights live in host RAM
        x = r0.get("host_mib", 0) / host_ideal if host_ideal else float("nan")
        rows.append(row("load", "rank 0 peak host memory through the trainer vs ideal", "PASS" if x <= 1.10 else
                        "FAIL", f"{r0.get('host_mib', 0):,.0f} MiB = x{x:.2f} ideal ({host_ideal:,.0f} MiB)",
                        f"ideal = {base_how} ({b.get('host_mib', 0):,.0f} MiB)"
                        f"{'' if gpu else ' + the two models in host memory'}; target <= 1.10 (README)"))
        if gpu:
            dev_ideal = 2 * wbytes / MiB
            rows.append(row("load", "rank 0 peak device memory through the trainer vs ideal", "INFO",
                            f"{r0.get('dev_mib', 0):,.0f} MiB = x{r0.get('dev_mib', 0) / dev_ideal:.2f} ideal "
                            f"({dev_ideal:,.0f} MiB)", "ideal = policy + reference weights (torch allocator peak; "
                            "the CUDA context is not counted)"))
            stages = {s["stage"]: s for s in res["mem"].get("rank0", [])}
            if "smoke steps" in stages:
                sm = stages["smoke steps"]["dev_peak"]
                rows.append(row("load", "device peak in the smoke step", "INFO", f"{sm / MiB:,.0f} MiB = "
                                f"{sm / (wbytes / 2):.1f} bytes/parameter", "weights, fp32 master, Adam, gradients"))
        else:
            rows.append(row("load", "rank 0 peak device memory vs ideal", "SKIP", "GPU only"))
    timeline = {r["stage"]: max(v["seconds"] for v in r["ranks"].values()) for r in rep.get("timeline", [])}
    ctx["details"]["load"] = {"params": params, "floors": fl, "load_seconds": load_s, "baseline_mem": base["mem"],
                              "mem": res["mem"], "timeline": timeline}
    return rows


# -- installing on a machine without a package registry (the lent GPU machines): wheels carried from here --------
# In the device image (/work/.library/device/KINDS.md) and too large to carry: pip uses the image's own.
IMAGE_BIG = {"numpy", "pandas", "pyarrow"}
# torch stays the machine's CUDA build: never carried, never replaced
NOT_CARRIED = ("torch", "triton", "nvidia-", "cuda-")


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def carried_closure(python_version: str) -> dict[str, str]:
    """name -> version: the pinned packages but torch and everything they need (for Linux x86-64 and that Python),
    at the versions installed here (the ones run together), less torch's own stack and the image's big ones."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
    todo = [n for n in pinned() if norm(n) != "torch"]
    out: dict[str, str] = {}
    while todo:
        name = norm(todo.pop())
        if name in out or name.startswith(NOT_CARRIED) or name in IMAGE_BIG:
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue  # not needed here (a marker excluded it on this Python): pip on the machine will say if it is
        for req in requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate(env):
                todo.append(r.name)
    return out


def fetch_wheels(dest: Path, python_version: str) -> int:
    """Here, with a registry: download the carried closure for the device (manylinux x86-64, CPython
    `python_version`) into `dest`; deepspeed as its source archive (it ships no wheel; built there against the
    machine's own CUDA torch with DS_BUILD_OPS=0)."""
    dest.mkdir(parents=True, exist_ok=True)
    plat = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
            "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]
    failed = []
    for name, ver in sorted(carried_closure(python_version).items()):
        if name == "deepspeed":
            cmd = ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), f"{name}=={ver}"]
        else:
            cmd = ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                   "--implementation", "cp", *plat, "-d", str(dest), f"{name}=={ver}"]
        r = subprocess.run([sys.executable, "-m", "pip", "-q", *cmd], capture_output=True, text=True)
        print(f"{'ok  ' if r.returncode == 0 else 'FAIL'} {name}=={ver}", flush=True)
        if r.returncode:
            failed.append(f"{name}=={ver}: {r.stderr.strip().splitlines()[-1:]}")
    size = sum(p.stat().st_size for p in dest.iterdir()) / MiB
    print(f"{dest}: {len(list(dest.iterdir()))} files, {size:.1f} MiB (a device call carries at most 64 MiB)")
    for f in failed:
        print(f"gpu_check: could not download {f}", file=sys.stderr)
    return 1 if failed else 0


def check_install() -> int:
    """0 when every pinned package but torch is installed at its pin and torch is a CUDA build; else the list."""
    from importlib.metadata import PackageNotFoundError, version

    bad = []
    for name, pin in pinned().items():
        if norm(name) == "torch":
            continue
        try:
            if version(name) != pin:
                bad.append(f"{name} {version(name)} (pinned {pin})")
        except PackageNotFoundError:
            bad.append(f"{name} missing (pinned {pin})")
    print("; ".join(bad) if bad else "every pinned package installed")
    return 1 if bad else 0


PART_FUNCS = {"env": part_env, "deep": part_deep, "calibrate": part_calibrate, "selfnoise": part_selfnoise,
              "placements": part_placements, "load": part_load}


# -- after all parts: the checks that read several parts -------------------------------------------------------
def cross_rows(results: dict, cpu: bool) -> list[dict]:
    """The product's own cpu-placement runs (placements) against the tolerance calibrated apart from them
    (calibrate); the forward proofs against one training step, every launch."""
    rows = []
    cal = results["details"].get("calibration")
    pl = results["details"].get("placements") or {}
    for key, r in pl.items():
        if not key.endswith("-cpu") or cal is None:
            continue
        losses = r["facts"].get("smoke_losses") or []
        kl = (r["facts"].get("initial_kl") or {}).get("mean")
        if not losses or kl is None:
            continue
        d = cal["derived"]
        gap = abs(losses[0] - cal["ln2"])
        ok = gap <= d["loss_tolerance"] and abs(kl) <= d["kl_tolerance"]
        rows.append(row("calibrate", f"{key.split('-')[0]} cpu-placement run within the measured tolerance",
                        "PASS" if ok else ("INFO" if cpu else "FAIL"),
                        f"|loss - ln 2| {gap:.3g} <= {d['loss_tolerance']:.3g}, KL {kl:.3g} <= "
                        f"{d['kl_tolerance']:.3g}" if ok else f"|loss - ln 2| {gap:.3g} vs {d['loss_tolerance']:.3g}, "
                        f"KL {kl:.3g} vs {d['kl_tolerance']:.3g}",
                        "the product's run (DeepSpeed engines, TRL's batches) against the noise measured apart"))
    for key, r in list(pl.items()) + ([("load-big", results["details"]["load"])] if "load" in
                                      results["details"] else []):
        tl = r.get("timeline") or {}
        if "forward proofs" in tl and tl.get("smoke steps"):
            rows.append(row("timing", f"forward proofs vs one step: {key}", "INFO",
                            f"{tl['forward proofs']:.1f} s vs {tl['smoke steps']:.1f} s "
                            f"(x{tl['forward proofs'] / tl['smoke steps']:.2f})", ""))
    return rows


def render(rows: list[dict], header: str) -> str:
    widths = [10, 58, 6, 70]
    out = [header, "", "| part | check | status | value | detail |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['part']} | {r['check']} | {r['status']} | {r['value']} | {r['detail']} |")
    del widths
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dpo-dist-gpu-check/out"),
                    help="summary.md, results.json, cross_device_calibration.json, logs.tar.gz (default %(default)s)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dpo-dist-gpu-check/work"),
                    help="checkpoints and launch outputs, never under --out (default: %(default)s)")
    ap.add_argument("--cpu", action="store_true", help="the dry run on a CPU-only machine: small checkpoint, "
                    "DeepSpeed's CPU accelerator, GPU-only figures skipped")
    ap.add_argument("--only", nargs="+", choices=list(PARTS), metavar="PART", help=f"run these parts only "
                    f"({', '.join(PARTS)}); the others' results in <out>/results.json are kept")
    ap.add_argument("--list", action="store_true", help="list the parts and their timeouts, then exit")
    ap.add_argument("--jobs", type=int, default=None, help="concurrent launches in the placements part (default: 3 "
                    "on a GPU, 1 on CPU)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts together (default 530 on a "
                    "GPU: with the install (~40 s), inside one 600 s device call; 2700 on CPU); a part gets "
                    "min(its timeout, what is left)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # internal: run one part in this process
    ap.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="here, with a package registry: download the "
                    "wheels a machine without one needs into DIR (gpu_check.sh installs from .whl), then exit")
    ap.add_argument("--python-version", default="3.12", help="the device's Python for --fetch-wheels (%(default)s)")
    ap.add_argument("--requirements", action="store_true", help="print the pins but torch (what gpu_check.sh "
                    "installs), then exit")
    ap.add_argument("--check-install", action="store_true", help="exit 0 if every pin but torch is installed")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels.resolve(), args.python_version)
    if args.requirements:
        print("\n".join(f"{n}=={v}" for n, v in pinned().items() if norm(n) != "torch"))
        return 0
    if args.check_install:
        return check_install()
    if args.list:
        for name, (tg, tc, what) in PARTS.items():
            print(f"{name:<11} timeout {tg:>4} s on a GPU, {tc:>4} s on CPU  {what}")
        return 0
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be at least 1")
    work = args.work.resolve()
    out = args.out.resolve()
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    ctx = {"cpu": args.cpu, "out": str(out), "work": str(work), "jobs": args.jobs or (1 if args.cpu else 3),
           "details": {}}
    if args.part:  # one part, in a subprocess of the driver below
        try:
            rows = PART_FUNCS[args.part](ctx)
        except Exception as e:  # a part that raises is one failed row, the others still run
            import traceback

            traceback.print_exc()
            rows = [row(args.part, f"part {args.part}", "FAIL", f"{type(e).__name__}: {e}"[:300], "see its log")]
        (work / "parts").mkdir(parents=True, exist_ok=True)
        (work / "parts" / f"{args.part}.json").write_text(json.dumps({"rows": rows, "details": ctx["details"]},
                                                                     default=str))
        return 0
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible to torch here: on a CPU-only machine run the dry run with --cpu",
                  file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    todo = args.only or list(PARTS)
    budget = args.budget or (2700 if args.cpu else 530)
    t_start = time.perf_counter()
    results = {"rows": [], "details": {}, "parts": {}}
    def write_outputs() -> str:
        """summary.md, results.json, logs.tar.gz from what ran so far: after every part, so a device call stopped at
        its limit still brings back the parts that finished."""
        results["rows"] = [r for name in PARTS if name in results["parts"] for r in results["parts"][name]["rows"]]
        results["rows"] += cross_rows(results, args.cpu)
        results["rows"].append(row("total", "wall time of the parts run now", "INFO",
                                   f"{time.perf_counter() - t_start:.0f} s",
                                   ", ".join(f"{n} {results['parts'][n]['seconds']} s" for n in todo
                                             if n in results["parts"]) + (f"; kept from the last run: "
                                             f"{', '.join(n for n in results['parts'] if n not in todo)}"
                                             if set(results["parts"]) - set(todo) else "")))
        v = results["details"].get("versions", {})
        header = (f"dpo-dist gpu_check {time.strftime('%Y-%m-%d %H:%M')} "
                  f"{'(CPU dry run)' if args.cpu else ''} on {platform.node()}: torch {v.get('torch', '?')} "
                  f"(CUDA {v.get('cuda')}), deepspeed {v.get('deepspeed', '?')}, transformers "
                  f"{v.get('transformers', '?')}, trl {v.get('trl', '?')}")
        table = render(results["rows"], header)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / "summary.md").write_text(table)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # every log and report, not the checkpoints
            for p in sorted(work.rglob("*")):
                logs = p.suffix in (".log", ".json") and "cache" not in p.parts
                if p.is_file() and logs and not p.name.startswith(("config", "tokenizer", "generation", "model")):
                    tar.add(p, arcname=str(p.relative_to(work)))
        return table

    for name in PARTS:
        if name not in todo:
            kept = work / "parts" / f"{name}.json"  # the last run of this part, kept
            if kept.exists():
                part = json.loads(kept.read_text())
                results["parts"][name] = {"rows": part["rows"], "seconds": part.get("seconds"), "kept": True}
                results["details"].update(part["details"])
            continue
        left = budget - (time.perf_counter() - t_start)
        limit = min(PARTS[name][1 if args.cpu else 0], left)
        if limit < 10:
            results["parts"][name] = {"rows": [row(name, f"part {name}", "FAIL", "not run: the budget was spent",
                                                   f"rerun: --only {name}")], "seconds": 0}
            continue
        log(f"part {name} (timeout {limit:.0f} s) ...")
        for stale in (f"{name}.json", f"{name}.partial.json"):
            (work / "parts" / stale).unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE), "--part", name, "--out", str(out), "--work", str(work)]
        cmd += ["--cpu"] if args.cpu else []
        cmd += ["--jobs", str(ctx["jobs"])]
        code, secs = run_tree(cmd, child_env(), limit, work / "logs" / f"{name}.log")
        pj = work / "parts" / f"{name}.json"
        if code is None:
            pp = work / "parts" / f"{name}.partial.json"  # what the part finished before it was stopped
            done = json.loads(pp.read_text())["rows"] if pp.exists() else []
            part = {"rows": done + [row(name, f"part {name}", "FAIL", f"timed out after {limit:.0f} s",
                                        f"log: {work / 'logs' / f'{name}.log'}; rerun: --only {name}")],
                    "details": {}}
        elif not pj.exists():
            tail = (work / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            part = {"rows": [row(name, f"part {name}", "FAIL", f"exit {code}, no result", " ".join(tail)[:300])],
                    "details": {}}
        else:
            part = json.loads(pj.read_text())
        results["parts"][name] = {"rows": part["rows"], "seconds": round(secs, 1)}
        # kept for a later --only run (a timed-out or failed part too: its rows say so)
        pj.write_text(json.dumps({**part, "seconds": round(secs, 1)}, default=str))
        results["details"].update(part["details"])
        write_outputs()
        log(f"part {name}: {round(secs, 1)} s, " + ", ".join(f"{r['status']} {r['check']}" for r in part["rows"]
                                                              if r["status"] == "FAIL") or "no failure")
    table = write_outputs()
    print(table)
    failed = [r for r in results["rows"] if r["status"] == "FAIL"]
    log(f"{len(failed)} check(s) failed; wrote {out}/summary.md, results.json, logs.tar.gz" if failed else
        f"no check failed; wrote {out}/summary.md, results.json, logs.tar.gz")
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get(SHIM_ENV) == "1":
        sys.path.insert(0, str(ROOT))
        rank_shim()
    sys.exit(main())
