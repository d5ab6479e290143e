"""The tolerance arithmetic and the rebuilt precompute batching (no launch: pure functions)."""

from __future__ import annotations

import math
import random

import torch

from dpo_dist.config.schema import from_dict
from dpo_dist.verify.report import RankReport, merge, to_dict
from dpo_dist.verify.tolerances import (
    FP32_UNIT_ROUNDOFF,
    PrecomputeBatching,
    kl_tolerance,
    loss_bound,
    loss_tolerance,
    rounding_tolerance,
)


def test_loss_bound_holds_for_any_gaps():
    rng = random.Random(0)
    for _ in range(200):
        beta = rng.choice([0.01, 0.1, 1.0, 5.0])
        gaps = [rng.gauss(0, rng.choice([1e-4, 1e-2, 1.0])) for _ in range(rng.randint(1, 16))]
        loss = sum(-math.log(1 / (1 + math.exp(-beta * g))) for g in gaps) / len(gaps)
        assert abs(loss - math.log(2)) <= loss_bound(gaps, beta) + 1e-15


def test_loss_bound_is_zero_without_noise_and_first_order_tight():
    assert loss_bound([], 0.1) == 0.0 and loss_bound([0.0, 0.0], 0.1) == 0.0
    assert math.isclose(loss_bound([2e-3], 1.0), 1e-3 + 4e-6 / 8)


def test_float32_mean_of_identical_ln2_terms_stays_within_the_rounding_tolerance():
    for pairs in (1, 7, 32, 1000):
        per_pair = torch.full((pairs,), math.log(2), dtype=torch.float32)
        assert abs(per_pair.mean().item() - math.log(2)) <= rounding_tolerance(pairs).value
    assert rounding_tolerance(32).value == 36 * FP32_UNIT_ROUNDOFF * math.log(2)


def test_precompute_batching_follows_accelerates_sharding_and_gather_order():
    # 10 rows, batch 4, 2 processes: process 0 runs [0..3] then [8, 9, 0, 1] (padded from the start), process 1
    # [4..7] then [2..5]; gathered per iteration in process order, so row 0's value comes from the first batch
    b = PrecomputeBatching(10, 4, 2, even_batches=True, split_batches=False)
    assert b.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    assert b.where[0] == (0, 0) and b.where[9] == (2, 1) and b.where[5] == (1, 1)
    assert sorted(b.where) == list(range(10))


def test_tolerance_sources_default_user_and_cross_device():
    cfg = from_dict({})
    assert loss_tolerance(cfg, False, 8, None).source.startswith("float32 rounding")
    noise = {"bound": 1e-3, "pairs": 8, "mean_abs_gap": 2e-3, "beta": 1.0}
    t = loss_tolerance(cfg, False, 8, noise)
    assert t.source.startswith("batching noise") and t.value > 1e-3 and not t.user
    assert loss_tolerance(cfg, True, 8, None).source.startswith("verify.cross_device_loss_tolerance")
    user = from_dict({"verify": {"loss_tolerance": 0.02, "kl_max": 0.003}})
    assert (loss_tolerance(user, False, 8, noise).value, loss_tolerance(user, False, 8, noise).user) == (0.02, True)
    assert kl_tolerance(user, False, {"mean": 0.0}).source == "user: verify.kl_max"
    assert kl_tolerance(cfg, False, {"mean": 0.0}).value == 0.0
    assert kl_tolerance(cfg, False, {"mean": 1e-9}).value == 4e-9


def test_report_rows_carry_tolerance_only_for_numeric_checks():
    r0, r1 = RankReport(0), RankReport(1)
    r0.add("loss", True, "0.69", "", 1e-6, "float32 rounding")
    r1.add("loss", False, "0.70", "fix", 2e-6, "float32 rounding, rank 1")
    r0.add("plain", True, "ok")
    rows = merge([r0, r1])
    assert rows[0]["tolerance"] == 2e-6 and rows[0]["tolerance_source"] == "float32 rounding, rank 1"
    assert "tolerance" not in rows[1]
    assert to_dict(r0)["checks"][1] == {"name": "plain", "ok": True, "value": "ok", "hint": ""}


def test_initial_kl_on_cpu_is_bitwise_by_device_type_without_a_repeat_forward():
    """Issue 23: the self-noise repeat forward is skipped where forwards are deterministic; the source says so."""
    from dpo_dist.plan.forwards import deterministic_device

    cfg = from_dict({})
    t = kl_tolerance(cfg, False, None, deterministic=True)
    assert t.value == 0.0 and "device type" in t.source and "bitwise" in t.source
    assert deterministic_device("cpu") and not deterministic_device("cuda")
    assert kl_tolerance(cfg, True, None, deterministic=True).source.startswith("verify.kl_max")  # cross-device
