"""The reference placements other than the sharded one under FSDP2 (docs/fsdp2.md: the placement x backend matrix):
each passes the same gate as under ZeRO, on 2 CPU processes through real `dpo-dist launch --cpu --sharding fsdp2`
(one launch per placement, several properties read from its report), plus the must-fail case a placement adds."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import check_row, launch_init, run_cmd
from safetensors.torch import load_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT


def _full_bytes(ckpt) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(ckpt / "model.safetensors")).values())


def _per_rank(rep, key):
    facts = rep["per_rank_facts"]
    return [facts[r][f"rank_{r}_{key}"] for r in sorted(facts)]


def _layers(ckpt) -> int:
    return json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]


def _passed(res, placement, ckpt=DEFAULT_CHECKPOINT) -> dict:
    """Every row passed on every rank, under FSDP2, with the gate's physics: the policy sharded per decoder layer,
    initial KL exactly 0, step-0 loss ln 2, every trainable parameter moved."""
    rep = res.report
    assert res.returncode == 0 and rep and rep["passed"], res.output[-6000:]
    assert all(r["ok"] and not r["failed_ranks"] for r in rep["checks"]), [r for r in rep["checks"] if not r["ok"]]
    facts = rep["facts"]
    assert facts["backend"] == "fsdp2" and facts["placement"] == placement and facts["world_size"] == 2
    n = _layers(ckpt)
    assert f"{n}/{n} decoder layers each its own, root wrapped" in check_row(rep, "policy FSDP2 wrap")["value"]
    assert facts["initial_kl"]["mean"] == 0.0 and facts["initial_kl"]["tokens"] > 0
    assert abs(facts["smoke_losses"][0] - math.log(2)) < 1e-4
    for name in ("step-0 DPO loss = ln 2", "every policy parameter moved", "weights: policy == checkpoint files"):
        assert check_row(rep, name)["ok"], name
    assert placement in check_row(rep, "reference placement")["value"]
    return rep


@pytest.mark.multiproc
def test_fsdp2_lora_policy_is_the_sharded_base_with_adapters_and_only_they_train(tmp_path):
    """The policy = the checkpoint + PEFT LoRA adapters, sharded together by FSDP2 (the adapters added on the meta
    model before fully_shard), the reference = the same base with adapters off: base == files bitwise under the
    checkpoint's names, initial KL exactly 0 (B = 0), step-0 loss ln 2, then every adapter tensor moved and no base
    tensor did."""
    res = launch_init(tmp_path / "out", "--placement", "lora", "--smoke-steps", "1", sharding="fsdp2", timeout=900)
    rep = _passed(res, "lora")
    n_base = len(load_file(str(DEFAULT_CHECKPOINT / "model.safetensors")))
    for name in ("trainer reference = base with adapters off", "only adapters trainable",
                 "weights: reference base == checkpoint", "no reference parameter moved"):
        assert check_row(rep, name)["ok"], name
    files = check_row(rep, "weights: policy == checkpoint files")["value"]
    assert f"{n_base} tensors match the safetensors files" in files, files
    assert "adapters on vs off" in check_row(rep, "initial KL < limit")["value"]
    assert "FSDPPeftModelForCausalLM" in check_row(rep, "trainer reference = base with adapters off")["value"]
    n_adapters = int(check_row(rep, "only adapters trainable")["value"].split()[0])
    assert n_adapters > 0
    assert f"{n_adapters} tensors changed" in check_row(rep, "every policy parameter moved")["value"]
    assert f"{n_base} reference tensors unchanged" in check_row(rep, "no reference parameter moved")["value"]


@pytest.mark.multiproc
def test_fsdp2_cpu_reference_passes_with_smoke_steps_and_the_kl_monitor(tmp_path):
    """The policy sharded per layer by FSDP2, the reference whole in host memory on every rank (not an FSDP module,
    not a DTensor): bitwise policy == reference == files, the KL monitor's forwards between steps (the CPU reference
    beside the sharded policy), and after two steps every policy parameter moved and no reference parameter did."""
    res = launch_init(tmp_path / "out", "--placement", "cpu", "--smoke-steps", "2", "--set", "kl.every_steps=1",
                      sharding="fsdp2", timeout=900)
    rep = _passed(res, "cpu")
    for name in ("weights: policy == reference", "no reference parameter moved", "reference dtype",
                 "trainer reference on CPU, unsharded"):
        assert check_row(rep, name)["ok"], name
    assert not [r for r in rep["checks"] if r["check"] == "reference FSDP2 wrap"]  # not sharded, so not audited
    full = _full_bytes(DEFAULT_CHECKPOINT)
    assert _per_rank(rep, "reference_bytes_training") == [full, full]  # whole on every rank (pages shared per node)
    assert _per_rank(rep, "policy_bytes") == [full, full]  # half the rows each, in the fp32 master: 2 x full / 2
    history = rep["facts"]["kl_history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["kl"] > 0 for h in history), history


def test_fsdp2_cpu_reference_one_element_off_fails_naming_the_tensor(tmp_path):
    """The cpu placement's own way to fail: its host copy is loaded apart from the sharded policy, so one bf16
    element one step off in it must fail the bitwise proof (a world of one: the row is the same on any world)."""
    argv = [sys.executable, "-m", "dpo_dist", "init", "--sharding", "fsdp2", "--placement", "cpu",
            "--output-dir", str(tmp_path / "out")]
    code, out = run_cmd(argv, {"DPO_DIST_TEST_FAULT": "static proofs:0:ulp", "OMP_NUM_THREADS": "1"}, 900)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    row = check_row(rep, "weights: policy == reference")
    assert code == 1 and not rep["passed"] and not row["ok"], out[-3000:]
    assert row["value"].startswith("1 differ, first: "), row


@pytest.mark.multiproc
def test_fsdp2_precomputed_reference_on_the_deep_checkpoint_is_sharded_proved_then_freed(tmp_path, deep_checkpoint):
    """On the deep trained checkpoint (24 layers, trained weights): the reference sharded per layer like the policy
    and proved bitwise, its log-probs precomputed by TRL through the sharded modules, then its storage gone on every
    rank before training (measured: nothing holds the module), the step-0 loss ln 2 from the cached log-probs, and
    the KL monitor replaying the reference logits recorded before the free."""
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--placement", "precomputed",
                      "--smoke-steps", "1", "--set", "kl.every_steps=1", sharding="fsdp2", timeout=900)
    rep = _passed(res, "precomputed", deep_checkpoint)
    n = _layers(deep_checkpoint)
    assert f"{n}/{n} decoder layers each its own" in check_row(rep, "reference FSDP2 wrap")["value"]
    for name in ("weights: policy == reference", "reference log-probs precomputed", "reference freed before training"):
        assert check_row(rep, name)["ok"], name
    full = _full_bytes(deep_checkpoint)
    held = _per_rank(rep, "reference_bytes")
    assert sum(held) == full and all(b < 0.75 * full for b in held)  # Shard(0) rows while proved
    assert _per_rank(rep, "reference_bytes_after_free") == [0, 0] == _per_rank(rep, "reference_bytes_training")
    assert rep["facts"]["precompute_cache_hits"] == {"train": False}  # the deep checkpoint's run has no eval set
    assert [h["step"] for h in rep["facts"]["kl_history"]] == [1]
