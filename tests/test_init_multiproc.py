"""The whole init path for real: accelerate launch, 2 processes, gloo, DeepSpeed's CPU accelerator, TRL DPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
from conftest import ROOT, check_row, launch_init, passing_zero3_run
from safetensors.torch import load_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.verify.fingerprint import fingerprint_hex, fingerprint_tensor

pytestmark = pytest.mark.multiproc


def single_process_fingerprints(ckpt) -> dict[str, str]:
    tensors = load_file(str(ckpt / "model.safetensors"))
    return {name: fingerprint_hex(fingerprint_tensor(t)) for name, t in tensors.items()}


def assert_proofs_passed(report: dict, stage: int) -> None:
    assert report["passed"], [r for r in report["checks"] if not r["ok"]]
    assert report["world_size"] == 2
    assert report["facts"]["zero_stage"] == stage
    # every check ran on both ranks and passed on both
    assert all(r["ok"] and not r["failed_ranks"] for r in report["checks"])
    kl = report["facts"]["initial_kl"]
    assert abs(kl["mean"]) < 1e-4 and kl["tokens"] > 0
    losses = report["facts"]["smoke_losses"]
    assert abs(losses[0] - math.log(2)) < 1e-4
    for name in ("every policy parameter moved", "no reference parameter moved", "weights: policy == reference",
                 "weights: policy == checkpoint files", "reference frozen",
                 "reference in eval mode", "policy trainable", "generation: not degenerate"):
        assert check_row(report, name)["ok"], name
    # the trainer's reference is the backend's wrapped one (DeepSpeed: a prepared engine; FSDP2: the sharded module)
    wrapped = [r for r in report["checks"] if r["check"].startswith("trainer reference is ")]
    assert len(wrapped) == 1 and wrapped[0]["ok"], wrapped


def test_readme_demo_job_zero3():
    """README command 1 (launch/demo.sh): ZeRO-3, 2 processes, embedded checkpoint, smoke steps (the shared run)."""
    res = passing_zero3_run()
    assert res.returncode == 0, res.output[-6000:]
    report = json.loads((res.output_dir / "report.json").read_text())
    assert res.output_dir == ROOT / "runs" / "demo" and report == res.report
    assert_proofs_passed(report, stage=3)
    assert "quality gate PASSED" in res.terminal
    assert report["facts"]["loader"] == "fast", report["facts"].get("loader_reason")  # model.loader auto, ZeRO-3
    # the policy is really partitioned: each rank holds about half of it, never a full copy
    full = sum(t.numel() * t.element_size() for t in load_file(str(DEFAULT_CHECKPOINT / "model.safetensors")).values())
    per_rank = [v for k, v in report["per_rank_facts"]["0"].items() if k.endswith("_policy_bytes")]
    assert per_rank and per_rank[0] < 0.75 * full
    # distributed fingerprints == the files' == a single-process computation over the whole tensors
    fps = report["facts"]["fingerprints"]
    single = single_process_fingerprints(DEFAULT_CHECKPOINT)
    assert fps["policy"] == fps["reference"] == fps["files"]
    assert fps["policy"] == {k: single[k] for k in fps["policy"]}
    assert set(fps["policy"]) == set(single)


def test_zero2_passes_every_check(tmp_path):
    res = launch_init(tmp_path / "out", "--smoke-steps", "1", sharding="zero2")
    assert res.returncode == 0, res.output[-6000:]
    assert_proofs_passed(res.report, stage=2)
