"""The prepared device check (bench/gpu_check.py, issue 25) parses its arguments and knows its parts, so the run on a
lent GPU machine does not fail on its command line; the cross-device tolerance it derives is the loss bound the
other measured rows use. The run itself is a benchmark (bench/GPU.md), not a test."""

from __future__ import annotations

import math
import subprocess
import sys

from conftest import ROOT

from dpo_dist.verify import tolerances

SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ("env", "deep", "calibrate", "selfnoise", "placements", "load")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_help_and_list_name_every_part():
    help_ = run("--help")
    assert help_.returncode == 0, help_.stderr
    for flag in ("--out", "--cpu", "--only", "--list", "--budget", "--fetch-wheels"):
        assert flag in help_.stdout
    listed = run("--list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(PARTS)


def test_wrapper_lists_without_installing():
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--list"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "env" and "install" not in r.stdout


def test_bad_part_is_bad_input():
    r = run("--only", "nope", "--cpu")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_requirements_never_name_torch():
    # what gpu_check.sh hands pip: the machine's CUDA torch must never be replaced by the pinned one
    r = run("--requirements")
    assert r.returncode == 0
    names = [line.split("==")[0] for line in r.stdout.split()]
    assert "torch" not in names and {"deepspeed", "transformers", "trl"} <= set(names)


def test_cross_device_tolerance_is_the_loss_bound_of_the_measured_gaps():
    gaps = [0.3, -0.1, 0.05, -0.6]
    noise = {"kl_mean": 2e-5, "gap_mean_abs": sum(abs(g) for g in gaps) / len(gaps),
             "gap_mean_sq": sum(g * g for g in gaps) / len(gaps), "source": "a test"}
    loss, kl = tolerances.cross_device_tolerances(noise, beta=0.1, pairs=16)
    expected = tolerances.SELF_NOISE_MARGIN * tolerances.loss_bound(gaps, 0.1) + \
        tolerances.rounding_tolerance(16).value
    assert math.isclose(loss.value, expected, rel_tol=1e-12)
    assert math.isclose(kl.value, tolerances.SELF_NOISE_MARGIN * 2e-5)
    assert "a test" in loss.source and "a test" in kl.source and not loss.user
