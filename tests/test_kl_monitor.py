"""KL during training: measured like the initial check, logged through TRL, warned about, beta presets and adaptive
beta, and a resume that re-verifies the reference against the init manifest."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import check_row, launch_init
from safetensors.torch import load_file, save_file

from dpo_dist.config import ConfigError, load, parse_override, resolve_beta
from dpo_dist.kl_monitor import BETA_STATE, AdaptiveBeta
from dpo_dist.resources import DEFAULT_CHECKPOINT


@pytest.mark.parametrize("value, beta", [("conservative", 0.25), ("standard", 0.1), ("aggressive", 0.05),
                                         ("0.3", 0.3)])
def test_beta_presets(value, beta):
    b, why = resolve_beta(load(None, [parse_override(f"train.beta={value}")]))
    assert b == beta and why
    if not value[0].isdigit():
        assert value in why


def test_bad_beta_and_kl_settings_are_refused():
    with pytest.raises(ConfigError, match="train.beta"):
        load(None, [parse_override("train.beta=bold")])
    with pytest.raises(ConfigError, match="'kl' needs"):
        load(None, [parse_override("kl.beta_min=3"), parse_override("kl.beta_max=2")])


def test_adaptive_beta_rules():
    a = AdaptiveBeta(0.1, limit=0.1, warn_fraction=0.8, beta_min=0.05, beta_max=0.4, step=2.0)
    assert a.update(0.085, [1.0, 2.0], 1) == 0.2  # near the limit: up one step
    assert a.update(0.15, [2.0, 3.0], 2) == 0.4  # past it: up two steps, capped at beta_max
    assert a.update(0.5, [3.0, 4.0], 3) == 0.4  # stays within bounds
    assert a.update(0.01, [4.0, 5.0], 4) == 0.4  # far below, but preferences still learning: unchanged
    assert a.update(0.01, [5.0, 5.0], 5) == 0.2  # far below and the margin flat: down
    assert a.update(0.01, [5.0, 4.0], 6) == 0.1 and a.update(0.01, [4.0, 4.0], 7) == 0.05
    assert a.update(0.01, [4.0, 4.0], 8) == 0.05  # floor
    assert [c["step"] for c in a.changes] == [1, 2, 5, 6, 7]


pytestmark_multi = pytest.mark.multiproc
HOT = ("--set", "kl.every_steps=1", "--set", "verify.smoke_learning_rate=2e-3", "--set", "verify.generation=false",
       "--set", "train.extra.save_strategy=steps", "--set", "train.save_steps=4")


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixed") / "out"
    res = launch_init(out, "--smoke-steps", "8", *HOT)
    assert res.returncode == 0, res.output[-5000:]
    return out, res


@pytestmark_multi
def test_kl_is_measured_logged_and_warned(fixed_run):
    out, res = fixed_run
    facts = res.report["facts"]
    hist = facts["kl_history"]
    assert [h["step"] for h in hist] == list(range(1, 9))
    assert all(b["kl"] > a["kl"] for a, b in zip(hist, hist[1:], strict=False))  # a deliberately hot lr: it grows
    assert hist[0]["kl"] < 0.08 and hist[-1]["kl"] > 0.1  # fixed beta crosses the limit
    assert facts["kl_logged"] and facts["kl_logged"][-1] == pytest.approx(hist[-1]["kl"])  # in TRL's log lines
    warnings = facts["kl_warnings"]
    assert any("reached the warning" in w for w in warnings) and any("reached the limit" in w for w in warnings)
    assert "reached the limit" in res.output
    assert (out / "checkpoint-4" / BETA_STATE).is_file()
    assert (out / "reference_manifest.json").is_file()


@pytestmark_multi
def test_adaptive_beta_rises_is_logged_and_saved(tmp_path):
    out = tmp_path / "out"
    res = launch_init(out, "--smoke-steps", "8", "--set", "kl.control=adaptive", "--set", "kl.warn_fraction=0.5",
                      *HOT)
    assert res.returncode == 0, res.output[-5000:]
    changes = res.report["facts"]["beta_changes"]
    assert changes and all(c["to"] > c["from"] for c in changes)
    saved = json.loads((out / "checkpoint-8" / BETA_STATE).read_text())
    assert saved["beta"] == pytest.approx(changes[-1]["to"]) and saved["changes"] == changes
    assert "adaptive" in check_row(res.report, "beta")["value"]


@pytestmark_multi
def test_resume_reverifies_reference_against_the_manifest(fixed_run, tmp_path):
    out, first = fixed_run
    res = launch_init(out, "--smoke-steps", "8", "--set", f"train.resume_from={out / 'checkpoint-4'}", *HOT)
    assert res.returncode == 0, res.output[-5000:]
    assert check_row(res.report, "reference == init manifest")["ok"]
    assert "restored from" in check_row(res.report, "beta")["value"]
    before = first.report["facts"]["smoke_losses"][4:]
    after = res.report["facts"]["smoke_losses"]
    assert after == pytest.approx(before, abs=1e-4)  # the resumed run continues exactly where it left off
    # the same resume with another reference is refused, naming the tensor
    bad = tmp_path / "other-ref"
    shutil.copytree(DEFAULT_CHECKPOINT, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] += torch.tensor(1.0, dtype=torch.bfloat16)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    res = launch_init(out, "--smoke-steps", "8", "--reference", str(bad), "--set",
                      f"train.resume_from={out / 'checkpoint-4'}", *HOT)
    assert res.returncode == 1
    row = check_row(res.report, "reference == init manifest")
    assert not row["ok"] and "model.layers.2.mlp.up_proj.weight" in row["value"] and row["failed_ranks"] == [0, 1]
