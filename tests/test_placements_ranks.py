"""The reference-ranks placement end to end (its own file so it runs beside tests/test_placements.py on a second
worker): accelerate launch, 3 and 4 CPU processes, DeepSpeed ZeRO-3 on the policy ranks, TRL DPOTrainer."""

from __future__ import annotations

import math
import time

import pytest
from conftest import PASSING_ZERO3, check_row, launch_init, passing_zero3_run
from safetensors.torch import load_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """P = 2 policy ranks as README command 1's run (shared): W=3 with K=1 serving online (and the KL monitor's
    full-logits forwards between training steps), W=4 with K=2 (ZeRO-3 inference among them) precomputing before
    training."""
    out = {"zero3": passing_zero3_run()}
    assert out["zero3"].returncode == 0, out["zero3"].output[-6000:]
    for name, nproc, extra in (("ranks-online", 3, ("--set", "kl.every_steps=1")),
                               ("ranks-precompute", 4, ("--set", "reference.ranks=2", "--set",
                                                        "reference.serve=precompute"))):
        d = tmp_path_factory.mktemp(name)
        res = launch_init(d / "out", "--placement", "ranks", *PASSING_ZERO3, *extra, nproc=nproc)
        assert res.returncode == 0, res.output[-6000:]
        out[name] = res
    return out


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
