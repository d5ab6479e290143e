"""One rank of a loading benchmark: load policy + reference one way, report memory and time as JSON.

Run under torchrun with 2 processes (bench_init.py does): each rank writes <out>/<mode>-rank<r>.json with
VmHWM (peak RSS) after imports and after each phase, RSS/PSS at the end, and seconds after imports.

Modes (every one ends with both models ZeRO-3 partitioned, no optimizer, nothing else alive):
  idle          imports + process group only: the runtime baseline of a rank
  naive         full policy and full reference loaded on every rank, then partitioned by deepspeed.initialize
                (the seed's snippets)
  transformers  transformers' ZeRO-3 from_pretrained (DeepSpeed config registered first): the product's path
  fastload      dpo_dist.load.fastload.load_partitioned (each rank reads its own byte ranges into its partitions)
  fastload-bcast  the same with zero.Init's broadcast of every new parameter kept (deepspeed's own Init)
  read          the I/O floor: each rank preads exactly the bytes fastload reads, into preallocated buffers
  fastload-cold, read-cold
                the same for one model (the policy) with the checkpoint's pages dropped from the page cache
                first (posix_fadvise POSIX_FADV_DONTNEED on the file by each node's first rank, then a barrier:
                only this file, not the machine's whole cache as `echo 3 > /proc/sys/vm/drop_caches` would; the
                pages still resident after it, per `fincore`, are recorded)

Each rank also records the size of every read request it made (`request_sizes`: fastload coalesces neighbouring
ranges of one file into one request, bench/README.md) and its own read seconds (a rank-0 hotspot would show there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


def status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rollup_kb() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, rest = line.partition(":")
        if k in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
            out[k] = int(rest.split()[0])
    return out


def drop_file_pages(path: Path) -> dict:
    """Evict `path`'s pages from the page cache (clean pages that no process maps); how many stayed, per fincore."""
    import subprocess

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, timeout=30)
        resident = int(res.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        resident = None
    return {"method": "posix_fadvise(POSIX_FADV_DONTNEED)", "resident_bytes_after": resident,
            "file_bytes": path.stat().st_size}


def request_stats(sizes: list[int]) -> dict:
    """Count, mean and a power-of-two histogram ("<=4KiB": n, ...) of read request sizes."""
    hist: dict[str, int] = {}
    for n in sizes:
        b = 4096
        while b < n:
            b *= 4
        label = f"<={b >> 20}MiB" if b >= 1 << 20 else f"<={b >> 10}KiB"
        hist[label] = hist.get(label, 0) + 1
    return {"count": len(sizes), "bytes": sum(sizes), "mean_bytes": sum(sizes) / len(sizes) if sizes else 0,
            "max_bytes": max(sizes, default=0), "histogram": hist}


def ds_config(world: int) -> dict:
    # The engine config TRL gives a frozen reference (probes.inference_ds_config) for hidden 1024: no optimizer.
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * 1024,
                                  "reduce_bucket_size": 1024 * 1024, "stage3_prefetch_bucket_size": 943718},
            "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "train_batch_size": world, "steps_per_print": 10**9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["idle", "naive", "transformers", "fastload", "fastload-bcast", "read",
                                     "fastload-cold", "read-cold"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--verify", action="store_true", help="after measuring: fingerprints == files (fastload)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=300), auto_mpi_discovery=False)
    phases = {"torch+deepspeed": status_kb("VmHWM")}
    # The code every loading path runs, weights aside: transformers' modeling runtime (AutoConfig alone pulls in
    # ~940 modules: accelerate, torch._dynamo, sympy...) and the model's class. Part of the runtime baseline.
    import torch._dynamo  # noqa: F401
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
    torch.distributed.barrier()
    phases["imports"] = status_kb("VmHWM")
    seconds = {"imports": time.perf_counter() - t_start}
    ds = ds_config(world)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    detail: dict = {}
    mode, cold = args.mode.removesuffix("-cold"), args.mode.endswith("-cold")
    if cold:
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            detail["cold"] = drop_file_pages(Path(args.model) / "model.safetensors")
        torch.distributed.barrier()
    t0 = time.perf_counter()
    models = []
    sizes: list[int] = []
    if mode == "naive":
        full = [AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16) for _ in range(2)]
        phases["full models"] = status_kb("VmHWM")
        for m in full:
            engine, *_ = deepspeed.initialize(model=m, config=ds)
            models.append(engine.module)
        del full
    elif mode == "transformers":
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers holds a weak reference)
        for role in ("policy", "reference"):
            models.append(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16))
            phases[role] = status_kb("VmHWM")
    elif mode.startswith("fastload"):
        from dpo_dist.load.fastload import load_partitioned, plan_load

        plan = plan_load(args.model, "bfloat16")
        for role in ("policy",) if cold else ("policy", "reference"):  # cold: one model, all of it from disk
            tim: dict = {}
            models.append(load_partitioned(args.model, "bfloat16", ds, plan=plan, timings=tim,
                                           skip_init_broadcast=mode == "fastload"))
            phases[role] = status_kb("VmHWM")
            sizes += tim.pop("request_sizes", [])
            detail[role] = {k: round(v, 3) for k, v in tim.items()}
    elif mode == "read":
        from dpo_dist.load.checkpoint import tensor_index
        from dpo_dist.load.fastload import _Reader

        index = tensor_index(args.model)
        reader = _Reader()
        for _ in range(1 if cold else 2):
            bufs = []
            for e in sorted(index.values(), key=lambda e: e.start):
                part = -(-e.numel // world)
                n = max(0, min(part, e.numel - rank * part))
                buf = torch.empty(part, dtype=e.dtype)
                reader.read(e, rank * part, buf[:n])
                bufs.append(buf)
            models.append(bufs)
        reader.close()
        sizes = reader.request_sizes
    seconds["own"] = time.perf_counter() - t0  # this rank's own work, before waiting for the other
    torch.distributed.barrier()
    seconds["load"] = time.perf_counter() - t0
    detail["requests"] = request_stats(sizes)
    phases["end"] = status_kb("VmHWM")
    held = 0
    for m in models:
        if isinstance(m, list):
            held += sum(t.numel() * t.element_size() for t in m)
            continue
        for p in m.parameters():
            ds_tensor = getattr(p, "ds_tensor", None)
            assert ds_tensor is not None, "not partitioned"
            held += ds_tensor.numel() * ds_tensor.element_size()
    result = {"mode": args.mode, "rank": rank, "world": world, "vmhwm_kb": phases, "seconds": seconds,
              "end_kb": rollup_kb(), "held_bytes": held, "detail": detail}
    if args.verify and mode.startswith("fastload"):
        from dpo_dist.runtime.distributed import DistContext
        from dpo_dist.verify import weights

        ctx = DistContext(rank, world)
        ff, missing = weights.file_fingerprints(Path(args.model), weights.param_meta(models[0]), ctx)
        ok = all(weights.model_fingerprints(m, ctx) == ff for m in models) and not missing
        result["verified_against_files"] = ok
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.mode}-rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
