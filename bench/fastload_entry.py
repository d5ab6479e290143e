"""`python -m fastload_entry init ...` (with bench/ on PYTHONPATH): `dpo-dist init` with its ZeRO-3 loads done by
dpo_dist.fastload, falling back to from_pretrained when fastload refuses. What the proposed integration
(`model.loader: auto`, see bench/README.md) would do, for benchmarking it before it lands in dpo_dist/models.py.
"""

from __future__ import annotations

import os
import sys

from dpo_dist import models

_transformers_load = models.load_causal_lm


def load_causal_lm(path, dtype, trust_remote_code, allow_pickle, *args, **kwargs):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from dpo_dist.fastload import FastLoadRefused, load_partitioned

    if is_deepspeed_zero3_enabled():
        try:
            model = load_partitioned(path, dtype, trust_remote_code=trust_remote_code)
            print(f"[fastload_entry] {path}: loaded by dpo_dist.fastload", file=sys.stderr, flush=True)
            return model
        except FastLoadRefused as e:
            print(f"[fastload_entry] fastload refused ({e}): from_pretrained", file=sys.stderr, flush=True)
    return _transformers_load(path, dtype, trust_remote_code, allow_pickle, *args, **kwargs)


def _status() -> str:
    vals = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            vals[k] = int(v.split()[0]) // 1024
    return f"VmRSS {vals['VmRSS']} MiB, VmHWM {vals['VmHWM']} MiB"


def _trace_stages() -> None:
    """DPO_DIST_BENCH_STAGES=1: each rank prints its VmRSS/VmHWM after every stage (where does the peak come from?)."""
    from dpo_dist import run

    attempt = run.InitRun.attempt

    def traced(self, name, fn):
        ok = attempt(self, name, fn)
        print(f"[stage-memory] rank {self.ctx.rank} after {name}: {_status()}", file=sys.stderr, flush=True)
        return ok

    run.InitRun.attempt = traced


def _lean_proofs() -> None:
    """DPO_DIST_BENCH_LEAN_PROOFS=1: the proposed changes outside fastload. (1) dpo_dist/probes.py: the temporary
    inference engines of the forward proofs release each layer after use (stage3_max_live_parameters =
    stage3_max_reuse_distance = 0; the shipped zero3.json says 1e9, more than a 0.44B model, so from the second
    forward on DeepSpeed keeps the whole model gathered). (2) At the start of `dpo-dist init`: glibc's mmap threshold
    pinned at 1 MiB (fastload.pin_malloc_mmap_threshold), so freed large blocks go back to the OS instead of
    staying in the heap."""
    from dpo_dist import probes
    from dpo_dist.fastload import pin_malloc_mmap_threshold

    config = probes.inference_ds_config

    def lean_config(train_ds, hidden_size):
        cfg = config(train_ds, hidden_size)
        cfg["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
        return cfg

    if os.environ.get("DPO_DIST_BENCH_LEAN_CONFIG", "1") == "1":
        probes.inference_ds_config = lean_config
    if os.environ.get("DPO_DIST_BENCH_PIN_MALLOC", "1") == "1":
        pin_malloc_mmap_threshold()


def _trim_between_stages() -> None:
    """DPO_DIST_BENCH_TRIM=1: glibc's malloc_trim(0) after every stage (gives freed heap pages back to the OS)."""
    import ctypes

    from dpo_dist import run

    attempt = run.InitRun.attempt
    libc = ctypes.CDLL("libc.so.6")

    def trimmed(self, name, fn):
        ok = attempt(self, name, fn)
        libc.malloc_trim(0)
        return ok

    run.InitRun.attempt = trimmed


if os.environ.get("DPO_DIST_BENCH_TRIM") == "1":
    _trim_between_stages()
if os.environ.get("DPO_DIST_BENCH_LEAN_PROOFS") == "1":
    _lean_proofs()
if os.environ.get("DPO_DIST_BENCH_FASTLOAD", "1") == "1":
    models.load_causal_lm = load_causal_lm
if os.environ.get("DPO_DIST_BENCH_STAGES") == "1":
    _trace_stages()

if __name__ == "__main__":
    from dpo_dist.cli import main

    sys.exit(main())
