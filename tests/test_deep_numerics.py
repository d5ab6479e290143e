"""The numeric checks on a deep, trained checkpoint (tests/deep_checkpoint.py): no false failure where bf16 forwards
move with batching, and a named failure for every way the reference can really differ."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import check_row, launch_init

pytestmark = pytest.mark.multiproc
QUIET = ("--set", "verify.generation=false")  # generation is not what these tests are about; it costs a forward pass
LN2 = math.log(2)


def assert_passed(res) -> dict:
    assert res.returncode == 0, res.output[-6000:]
    rep = res.report
    assert rep["passed"] and all(r["ok"] for r in rep["checks"]), [r for r in rep["checks"] if not r["ok"]]
    return rep


def assert_named(res, row_name: str, hint_has: str) -> dict:
    """The run failed, and that row (failing on every rank) names the cause, in the table and in one stderr line."""
    assert res.returncode == 1, res.output[-6000:]
    row = check_row(res.report, row_name)
    assert not row["ok"] and row["failed_ranks"] == [0, 1], row
    assert hint_has in row["hint"], row
    assert f"failed on rank(s) 0,1: check '{row_name}'" in res.output
    return row


def test_precomputed_deep_bf16_step0_loss_within_measured_batching_noise(tmp_path, deep_checkpoint):
    """The issue's false failure: precomputed log-probs come from other batches (other padding) than the training
    micro-batch. At beta 1 the deep checkpoint's bf16 batching noise moves the step-0 loss past the old constant
    tolerance (1e-4); the tolerance is now measured on the policy itself, and the cached log-probs are tied to the
    policy's own bitwise."""
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--placement", "precomputed",
                      "--smoke-steps", "1", "--set", "train.beta=1.0", *QUIET, timeout=420)
    rep = assert_passed(res)
    loss = check_row(rep, "step-0 DPO loss = ln 2")
    gap = abs(rep["facts"]["smoke_losses"][0] - LN2)
    assert gap > 1e-4, "the scenario no longer reproduces the batching gap the issue saw"
    assert gap <= loss["tolerance"] and loss["tolerance_source"].startswith("batching noise measured on the policy")
    assert f"{loss['tolerance']:.3g}" in loss["value"]
    tie = check_row(rep, "precomputed log-probs == policy's, same batching")
    noise = rep["facts"]["step0_batching_noise"]
    assert tie["tolerance"] == 0.0 and noise["equal"] == noise["pairs"] == 32  # 4 x 4 accumulation x 2 ranks
    assert noise["mean_abs_gap"] > 0  # the noise is real: the same rows under two batchings differ
    kl = check_row(rep, "initial KL < limit")
    assert kl["tolerance"] == 0.0 and kl["tolerance_source"].startswith("bitwise")


def test_zero3_placement_under_zero2_deep_step0_loss_at_float_rounding(tmp_path, deep_checkpoint):
    """Colocated: policy and reference see the same batch, so the loss is ln 2 up to float32 rounding of its mean."""
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--smoke-steps", "1", *QUIET,
                      sharding="zero2", timeout=420)
    rep = assert_passed(res)
    loss = check_row(rep, "step-0 DPO loss = ln 2")
    assert loss["tolerance_source"].startswith("float32 rounding") and loss["tolerance"] < 1e-5
    assert abs(rep["facts"]["smoke_losses"][0] - LN2) <= loss["tolerance"]
    assert check_row(rep, "initial KL < limit")["tolerance"] == 0.0 and rep["facts"]["initial_kl"]["mean"] == 0.0


# -- must fail on the deep checkpoint, each named in one line -------------------------------------------------------
def test_one_ulp_off_in_the_reference_after_the_static_proofs_fails_the_initial_kl(tmp_path, deep_checkpoint,
                                                                                    monkeypatch):
    """One bf16 element of one reference tensor one step off, past the fingerprints: the KL row (bitwise here) must
    not hide it (the old 1e-4 limit did: KL ~1e-8)."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "forward proofs:*:ulp")
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), *QUIET, timeout=300)
    row = assert_named(res, "initial KL < limit", "same checkpoint")
    assert row["tolerance"] == 0.0 and float(row["value"].split("mean ")[1].split("/")[0]) > 0


def test_one_ulp_off_in_the_precomputed_reference_fails_the_bitwise_tie(tmp_path, deep_checkpoint, monkeypatch):
    """Also (same launch): verify.* tolerances stay overridable, and the report says the user set them."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "trainer:*:ulp")
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--placement", "precomputed",
                      "--smoke-steps", "1", "--set", "verify.loss_tolerance=0.01", "--set", "verify.kl_max=0.001",
                      *QUIET, timeout=420)
    row = assert_named(res, "precomputed log-probs == policy's, same batching", "the reference differs")
    assert "pairs differ, first: row" in row["value"]
    loss = check_row(res.report, "step-0 DPO loss = ln 2")
    assert (loss["tolerance"], loss["tolerance_source"]) == (0.01, "user: verify.loss_tolerance")
    assert "set by the user" in loss["value"]
    assert check_row(res.report, "initial KL < limit")["tolerance_source"] == "user: verify.kl_max"
    assert "verify.loss_tolerance = 0.01 set by the user" in res.output


def test_dropout_left_on_in_the_reference_fails_the_initial_kl(tmp_path, deep_checkpoint, monkeypatch):
    d = tmp_path / "ckpt"
    shutil.copytree(deep_checkpoint, d)
    conf = json.loads((d / "config.json").read_text())
    conf["attention_dropout"] = 0.1  # a real checkpoint's dropout: only a reference in train mode applies it
    (d / "config.json").write_text(json.dumps(conf))
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "forward proofs:*:train_ref")
    res = launch_init(tmp_path / "out", "--model", str(d), *QUIET, timeout=300)
    row = assert_named(res, "initial KL < limit", "reference is in train mode")
    assert "dropout" in row["hint"]


def test_reference_in_another_dtype_fails_the_initial_kl_naming_the_dtypes(tmp_path, deep_checkpoint, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "forward proofs:*:fp32")
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--placement", "cpu", *QUIET, timeout=300)
    assert_named(res, "initial KL < limit", "the reference runs in float32, the policy in bfloat16")


def test_reference_from_another_checkpoint_with_the_same_config_is_named(tmp_path, deep_checkpoint,
                                                                         deep_checkpoint_other):
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--reference", str(deep_checkpoint_other),
                      *QUIET, timeout=300)
    row = assert_named(res, "weights: policy == reference", "policy and reference weights differ")
    assert "max abs diff" in row["value"]
    assert check_row(res.report, "configs equal")["ok"]  # same config: only the weights tell them apart
