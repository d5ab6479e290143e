"""Every placement under ZeRO-3 and ZeRO-2 on the deep checkpoint, one smoke step: no numeric check cries wolf.
Ten launches (~1 min each on 2 cores): marked slow (`pytest -m slow`); bench/deep_matrix.py runs the same."""

from __future__ import annotations

import math

import pytest
from conftest import check_row, launch_init

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
PROCESSES = {"zero3": 2, "cpu": 2, "lora": 2, "precomputed": 2, "ranks": 3}


@pytest.mark.parametrize("stage", [3, 2])
@pytest.mark.parametrize("placement", list(PROCESSES))
def test_placement_passes_every_numeric_check_on_the_deep_checkpoint(tmp_path, deep_checkpoint, placement, stage):
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--placement", placement, "--smoke-steps",
                      "1", "--set", "verify.generation=false", sharding=f"zero{stage}", nproc=PROCESSES[placement],
                      timeout=600)
    assert res.returncode == 0, res.output[-6000:]
    rep = res.report
    assert rep["passed"], [r for r in rep["checks"] if not r["ok"]]
    loss = check_row(rep, "step-0 DPO loss = ln 2")
    assert abs(rep["facts"]["smoke_losses"][0] - math.log(2)) <= loss["tolerance"]
    # same batch on both sides (cpu: a CPU-only box) -> float rounding; other batching -> measured noise
    want = "batching noise" if placement == "precomputed" else "float32 rounding"
    assert loss["tolerance_source"].startswith(want), loss
    assert check_row(rep, "initial KL < limit")["tolerance"] is not None
