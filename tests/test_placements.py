"""Every reference placement end to end: accelerate launch, 2 CPU processes, DeepSpeed ZeRO-3, TRL DPOTrainer."""

from __future__ import annotations

import math
import shutil
import time

import pytest
import torch
from conftest import PASSING_ZERO3, check_row, launch_init, passing_zero3_run
from safetensors.torch import load_file, save_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.multiproc

COMMON = ("--smoke-steps", "2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per placement (each ~15 s here), shared by the assertions below."""
    out = {"zero3": passing_zero3_run()}  # README command 1's run, shared with other test files
    assert COMMON == PASSING_ZERO3 and out["zero3"].returncode == 0, out["zero3"].output[-6000:]
    for placement in ("cpu", "lora", "precomputed"):
        d = tmp_path_factory.mktemp(placement)
        res = launch_init(d / "out", "--placement", placement, *COMMON)
        assert res.returncode == 0, res.output[-6000:]
        out[placement] = res
    # placement ranks, P = 2 policy ranks as above: W=3 with K=1 serving online (and the KL monitor's full-logits
    # forwards between training steps), W=4 with K=2 (ZeRO-3 inference among them) precomputing before training
    for name, nproc, extra in (("ranks-online", 3, ("--set", "kl.every_steps=1")),
                               ("ranks-precompute", 4, ("--set", "reference.ranks=2", "--set",
                                                        "reference.serve=precompute"))):
        d = tmp_path_factory.mktemp(name)
        res = launch_init(d / "out", "--placement", "ranks", *COMMON, *extra, nproc=nproc)
        assert res.returncode == 0, res.output[-6000:]
        out[name] = res
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


@pytest.mark.parametrize("name,world,k", [("ranks-online", 3, 1), ("ranks-precompute", 4, 2)])
def test_reference_ranks_pass_every_check_with_no_reference_weights_on_policy_ranks(runs, name, world, k):
    rep = runs[name].report
    assert rep["passed"], [r for r in rep["checks"] if not r["ok"]]
    facts = rep["facts"]
    assert (facts["policy_ranks"], facts["reference_ranks"], facts["launched_processes"]) == (world - k, k, world)
    assert abs(facts["smoke_losses"][0] - math.log(2)) < 1e-4
    assert abs(facts["initial_kl"]["mean"]) < 1e-4 and facts["initial_kl"]["tokens"] > 0
    # the global batch counts the P policy ranks, not the W processes
    args = rep["config"]["train"]
    assert facts["global_batch"] == args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * (
        world - k)
    assert f"P={world - k} (of W={world}" in check_row(rep, "global batch counts policy ranks only")["value"]
    per = rep["per_rank_facts"]
    policy = [r for r in per if int(r) < world - k]
    reference = [r for r in per if int(r) >= world - k]
    assert len(policy) == world - k and len(reference) == k
    for r in policy:  # measured by scanning the process's live parameters, during proofs and once TRL is built
        assert per[r][f"rank_{r}_reference_bytes"] == 0 and per[r][f"rank_{r}_reference_bytes_training"] == 0
    full = sum(t.numel() * t.element_size() for t in load_file(str(DEFAULT_CHECKPOINT / "model.safetensors")).values())
    held = [per[r][f"rank_{r}_reference_bytes"] for r in reference]
    assert sum(held) >= full * 0.99 and (k == 1 or max(held) < 0.75 * full)  # whole on K=1, sharded among K=2
    for row in ("reference frozen and in eval mode (reference ranks)", "weights: policy == reference",
                "no reference weights on policy ranks", "no reference parameter moved (reference ranks)",
                "reference rank: frozen and in eval mode", "trainer reference served by reference ranks"):
        assert check_row(rep, row)["ok"], row
    served = [per[r][f"rank_{r}_served"] for r in reference]
    assert sorted(p for s in served for p in s["policy_ranks"]) == list(range(world - k))
    if name == "ranks-online":  # one or two forwards a round (equal-length requests of both policy ranks share one)
        assert 0 < served[0]["rounds"] <= served[0]["forwards"] <= 2 * served[0]["rounds"]
        assert len(facts["kl_history"]) == 2  # measured through the reference rank between training steps


def test_losses_of_two_steps_with_reference_ranks_match_colocated_zero3(runs):
    base = runs["zero3"].report["facts"]["smoke_losses"]
    for name in ("ranks-online", "ranks-precompute"):
        losses = runs[name].report["facts"]["smoke_losses"]
        assert len(losses) == 2 and max(abs(a - b) for a, b in zip(base, losses, strict=True)) < 1e-3, (name, losses)


def test_a_hung_reference_rank_stops_every_policy_rank_within_the_timeout_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "reference serve:2:hang")
    t0 = time.time()
    res = launch_init(tmp_path / "out", "--placement", "ranks", "--set", "sharding.timeout_s=10", nproc=3,
                      timeout=240)
    assert res.returncode != 0 and res.report is None
    for rank in (0, 1):
        assert f"dpo-dist: rank {rank} failed in stage 'forward proofs': rank 2 did not answer within " \
            "sharding.timeout_s (10 s) as reference rank 0 (process 2)" in res.output, res.output[-4000:]
    last = res.terminal.strip().splitlines()[-1]  # issue 21 #57: a named failure of the stage, exit 1, not a crash
    assert res.returncode == 1 and last.startswith("dpo-dist: forward proofs failed on rank(s) 2: rank 2 did not "
                                                   "answer"), res.terminal
    assert "unexpected" not in last and "--debug" not in last, last
    assert time.time() - t0 < 120
