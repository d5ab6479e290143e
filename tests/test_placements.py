"""Every reference placement end to end: accelerate launch, 2 CPU processes, DeepSpeed ZeRO-3, TRL DPOTrainer."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import PASSING_ZERO3, check_row, launch_init, passing_zero3_run
from safetensors.torch import load_file, save_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.multiproc

COMMON = ("--smoke-steps", "2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per placement (each ~15 s here), shared by the assertions below (the reference-ranks placement:
    tests/test_placements_ranks.py, a file of its own so the two run on two workers)."""
    out = {"zero3": passing_zero3_run()}  # README command 1's run, shared with other test files
    assert COMMON == PASSING_ZERO3 and out["zero3"].returncode == 0, out["zero3"].output[-6000:]
    for placement in ("cpu", "lora", "precomputed"):
        d = tmp_path_factory.mktemp(placement)
        res = launch_init(d / "out", "--placement", placement, *COMMON)
        assert res.returncode == 0, res.output[-6000:]
        out[placement] = res
    return out


@pytest.mark.parametrize("placement", ["zero3", "cpu", "lora", "precomputed"])
def test_every_check_passes_on_every_rank(runs, placement):
    rep = runs[placement].report
    assert rep["passed"] and rep["facts"]["placement"] == placement
    assert all(r["ok"] and not r["failed_ranks"] for r in rep["checks"]), [r for r in rep["checks"] if not r["ok"]]
    kl = rep["facts"]["initial_kl"]
    assert abs(kl["mean"]) < 1e-4 and kl["max_seq_mean"] < 1e-4 and kl["tokens"] > 0
    assert abs(rep["facts"]["smoke_losses"][0] - math.log(2)) < 1e-4
    for name in ("every policy parameter moved", "step-0 DPO loss = ln 2", "reference placement",
                 "weights: policy == checkpoint files"):
        assert check_row(rep, name)["ok"], name
    if placement != "precomputed":
        assert check_row(rep, "no reference parameter moved")["ok"]
    if placement != "lora":
        for name in ("reference frozen", "reference in eval mode", "weights: policy == reference"):
            assert check_row(rep, name)["ok"], name
    assert placement in check_row(rep, "reference placement")["value"]


def test_reference_bytes_per_rank_are_measured(runs):
    def per_rank(placement, key):
        facts = runs[placement].report["per_rank_facts"]
        return [facts[r][f"rank_{r}_{key}"] for r in sorted(facts)]

    full = sum(t.numel() * t.element_size() for t in load_file(str(DEFAULT_CHECKPOINT / "model.safetensors")).values())
    zero3 = per_rank("zero3", "reference_bytes_training")
    assert all(0 < b < 0.75 * full for b in zero3)  # a partition, not a copy
    assert per_rank("cpu", "reference_bytes_training") == [full, full]  # whole, unsharded (pages shared per node)
    assert runs["cpu"].report["facts"]["cpu_reference_shared_pages"] is True
    assert per_rank("lora", "reference_bytes_training") == [0, 0]  # the policy's own base
    assert per_rank("precomputed", "reference_bytes_after_free") == [0, 0]
    assert per_rank("precomputed", "reference_bytes") != [0, 0]  # it was there for the proofs


def test_losses_of_two_steps_agree_across_placements(runs):
    base = runs["zero3"].report["facts"]["smoke_losses"]
    assert len(base) == 2
    for placement in ("cpu", "precomputed"):
        losses = runs[placement].report["facts"]["smoke_losses"]
        assert max(abs(a - b) for a, b in zip(base, losses, strict=True)) < 1e-3, (placement, losses, base)
    # LoRA trains other parameters (adapters), so only its first step matches: ln 2
    assert abs(runs["lora"].report["facts"]["smoke_losses"][0] - base[0]) < 1e-4


def test_lora_checks_base_against_base_and_adapters_on_vs_off(runs):
    rep = runs["lora"].report
    assert check_row(rep, "only adapters trainable")["ok"]
    assert check_row(rep, "weights: reference base == checkpoint")["ok"]
    assert "adapters on vs off" in check_row(rep, "initial KL < limit")["value"]


def test_precomputed_cache_is_reused_and_invalidated(runs, tmp_path):
    first = runs["precomputed"].report
    cache_dir = first["facts"]["output_dir"] + "/ref_logps"
    assert first["facts"]["precompute_cache_hits"] == {"train": False, "eval": False}
    again = launch_init(tmp_path / "again", "--placement", "precomputed", "--set", f"reference.cache_dir={cache_dir}")
    assert again.returncode == 0, again.output[-4000:]
    assert again.report["facts"]["precompute_cache_hits"] == {"train": True, "eval": True}
    assert again.report["facts"]["precompute_key"] == first["facts"]["precompute_key"]
    # another checkpoint (one weight changed, policy and reference both from it): same data, new key, recomputed
    copy = tmp_path / "other-ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + torch.tensor(0.25, dtype=torch.bfloat16)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    other = launch_init(tmp_path / "other", "--placement", "precomputed", "--model", str(copy), "--set",
                        f"reference.cache_dir={cache_dir}", "--set", "verify.generation=false",
                        "--set", "data.eval=default")  # a model of its own: no eval set unless named (issue 21)
    assert other.returncode == 0, other.output[-4000:]
    assert other.report["facts"]["precompute_cache_hits"] == {"train": False, "eval": False}
    key_a, key_b = first["facts"]["precompute_key"], other.report["facts"]["precompute_key"]
    assert key_a["train_data"] == key_b["train_data"] and key_a["reference_weights"] != key_b["reference_weights"]


def test_zero3_placement_with_zero2_policy_can_be_refused(tmp_path):
    res = launch_init(tmp_path / "out", "--set", "reference.on_zero2=refuse", sharding="zero2")
    assert res.returncode == 1
    row = check_row(res.report, "sharding fits placement")
    assert not row["ok"] and row["failed_ranks"] == [0, 1] and "reference.on_zero2: replica" in row["hint"]
