"""FSDP2 as a sharding backend (docs/fsdp2.md): the shipped launch, the config options, accelerate's FSDP branch on
CPU (compat.accelerate.fsdp_on_cpu), and the proofs on DTensor shards."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import ROOT, check_row, free_port, launch_init, run_cmd

from dpo_dist.config import schema
from dpo_dist.config.names import Backend
from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.config.sharding import backend_of, fsdp2_trainer_kwargs
from dpo_dist.launch.accelerate import LaunchSpec, build_launch


def test_fsdp2_launch_uses_the_shipped_fsdp_config_and_no_deepspeed_json():
    argv, env = build_launch(LaunchSpec(sharding="fsdp2", cpu=True, init_args=("--smoke-steps", "1")))
    cfg_file = argv[argv.index("--config_file") + 1]
    assert cfg_file.endswith("launch/fsdp2.yaml")
    text = open(cfg_file).read()
    assert "distributed_type: FSDP" in text and "fsdp_version: 2" in text
    assert "--deepspeed_config_file" not in argv
    assert argv[argv.index("init") + 1:argv.index("init") + 3] == ["--sharding", "fsdp2"]


def test_fsdp2_is_its_own_backend_and_its_options_reach_the_trainer_args():
    assert backend_of("fsdp2") == Backend.FSDP2 and backend_of("zero3") == Backend.DEEPSPEED
    cfg = schema.from_dict({"sharding": {"name": "fsdp2", "fsdp2": {"reshard_after_forward": False,
                                                                    "cpu_offload": True}}})
    kw = fsdp2_trainer_kwargs(cfg.sharding.fsdp2)
    assert kw["fsdp_config"]["version"] == 2 and kw["fsdp_config"]["reshard_after_forward"] is False
    assert kw["fsdp_config"]["cpu_offload"] is True
    with pytest.raises(schema.ConfigError, match="mixed_precision"):
        schema.from_dict({"sharding": {"fsdp2": {"mixed_precision": "fp8"}}})
    with pytest.raises(schema.ConfigError, match="ds_config"):
        schema.from_dict({"sharding": {"name": "fsdp2", "ds_config": "x.json"}})


def test_backend_of_an_fsdp_launch_without_a_name(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert backend_of(None) == Backend.FSDP2


@pytest.mark.multiproc
def test_accelerate_takes_its_fsdp_branch_on_cpu_only_with_the_compat_wrapper():
    """accelerate 1.15 on 2 CPU processes silently stays MULTI_CPU with an FSDP2 plugin; with fsdp_on_cpu it is FSDP
    (fsdp2). The plain run is the reason the wrapper exists: when it reads FSDP, the wrapper can go."""
    seen = {}
    for mode in ("plain", "patched"):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(ROOT / "tests" / "fsdp2_state_probe.py"), mode]
        code, out = run_cmd(argv, {"OMP_NUM_THREADS": "1"}, 180)
        assert code == 0, out[-3000:]
        seen[mode] = [line for line in out.splitlines() if line.startswith("STATE")]
    assert seen == {"plain": ["STATE MULTI_CPU fsdp2=False"], "patched": ["STATE FSDP fsdp2=True"]}


# -- the sharded placement under FSDP2, 2 CPU processes, real `dpo-dist launch --sharding fsdp2` -------------------
# (timeout 900 s: a launch takes 30-60 s alone, over 2 min on this shared 2-core machine under load)
def _full_bytes(ckpt) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(ckpt / "model.safetensors")).values())


def _per_rank(rep, key):
    facts = rep["per_rank_facts"]
    return [facts[r][f"rank_{r}_{key}"] for r in sorted(facts)]


def _assert_fsdp2_run_passed(res, ckpt):
    rep = res.report
    assert res.returncode == 0 and rep and rep["passed"], res.output[-4000:]
    assert all(r["ok"] and not r["failed_ranks"] for r in rep["checks"]), [r for r in rep["checks"] if not r["ok"]]
    assert rep["facts"]["backend"] == "fsdp2" and rep["facts"]["loader"] == "fast"
    for role in ("policy", "reference"):
        row = check_row(rep, f"{role} FSDP2 wrap")["value"]
        layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
        assert f"{layers}/{layers} decoder layers each its own, root wrapped" in row, row
        assert "reshard after forward: True" in row and "bfloat16 compute / float32 reduce" in row, row
    assert "accelerate FSDP" in check_row(rep, "trainer reference is the sharded one")["value"]
    assert abs(rep["facts"]["smoke_losses"][0] - math.log(2)) < 1e-4
    assert rep["facts"]["initial_kl"]["mean"] == 0.0
    for name in ("weights: policy == reference", "weights: policy == checkpoint files", "every policy parameter moved",
                 "no reference parameter moved", "step-0 DPO loss = ln 2"):
        assert check_row(rep, name)["ok"], name
    full = _full_bytes(ckpt)
    ref = _per_rank(rep, "reference_bytes")
    assert sum(ref) == full and all(b < 0.75 * full for b in ref)  # Shard(0) rows, no copy on any rank
    assert _per_rank(rep, "policy_bytes") == [2 * b for b in ref]  # the trained policy's fp32 master, bf16 reference


@pytest.mark.multiproc
def test_fsdp2_sharded_placement_passes_with_smoke_steps_and_the_adaptive_kl_monitor(tmp_path):
    """Two steps, the KL monitor measuring after each (its forwards through the FSDP2 modules between steps) and
    adaptive control acting on what it measured."""
    res = launch_init(tmp_path / "out", "--smoke-steps", "2", "--set", "kl.every_steps=1", "--set",
                      "kl.control=adaptive", sharding="fsdp2", timeout=900)
    _assert_fsdp2_run_passed(res, DEFAULT_CHECKPOINT)
    facts = res.report["facts"]
    assert [h["step"] for h in facts["kl_history"]] == [1, 2] and all(h["kl"] > 0 for h in facts["kl_history"])
    assert facts["beta_changes"], facts["kl_history"]


@pytest.mark.multiproc
def test_fsdp2_sharded_placement_passes_on_the_deep_trained_checkpoint(tmp_path, deep_checkpoint):
    res = launch_init(tmp_path / "out", "--model", str(deep_checkpoint), "--smoke-steps", "1", sharding="fsdp2",
                      timeout=900)
    _assert_fsdp2_run_passed(res, deep_checkpoint)


def _failed(res, name):
    row = check_row(res.report, name)
    assert res.returncode == 1 and not res.report["passed"] and not row["ok"], res.output[-3000:]
    return row


@pytest.mark.multiproc
def test_fsdp2_reference_shard_one_ulp_off_on_one_rank_and_a_layer_not_wrapped(tmp_path, monkeypatch):
    """Two faults, one launch (both are rows of the static proofs): rank 1's shard of one reference tensor one bf16
    step off, and the reference's decoder layer 2 left inside the root's unit."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "static proofs:1:ulp")
    monkeypatch.setenv("DPO_DIST_TEST_FSDP2_SKIP_LAYER", "reference:2")
    res = launch_init(tmp_path / "out", sharding="fsdp2", timeout=900)
    assert "1 differ" in _failed(res, "weights: policy == reference")["value"]
    wrap = _failed(res, "reference FSDP2 wrap")
    assert "model.layers.2" in wrap["value"] and "3/4 decoder layers" in wrap["value"], wrap
    assert check_row(res.report, "policy FSDP2 wrap")["ok"]


@pytest.mark.multiproc
def test_fsdp2_a_rank_whose_reference_shards_are_zeros_fails(tmp_path, monkeypatch):
    """The failed-broadcast case (ranks other than 0 hold zeros_like weights: ms-swift #9982)."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "static proofs:1:zeros")
    res = launch_init(tmp_path / "out", sharding="fsdp2", timeout=900)
    assert "39 differ" in _failed(res, "weights: policy == reference")["value"]


@pytest.mark.multiproc
def test_fsdp2_reference_with_dropout_on_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "static proofs:*:train_ref")
    res = launch_init(tmp_path / "out", sharding="fsdp2", timeout=900)
    assert "train mode" in _failed(res, "reference in eval mode")["value"]


@pytest.mark.parametrize("placement", ["ranks"])
def test_placements_fsdp2_does_not_run_yet_are_refused_by_name_exit_2(tmp_path, placement):
    argv = [sys.executable, "-m", "dpo_dist", "init", "--sharding", "fsdp2", "--placement", placement,
            "--output-dir", str(tmp_path / "out")]
    # WORLD_SIZE 2: the ranks placement's split of the processes (checked first) then fits; the preflight refuses the
    # placement before any process group is started
    code, out = run_cmd(argv, {"WORLD_SIZE": "2"}, 120)
    lines = [ln for ln in out.splitlines() if ln.startswith("dpo-dist:")]
    assert code == 2 and len(lines) == 1, out[-2000:]
    assert f"reference.placement {placement} does not run under sharding backend fsdp2" in lines[0]
    assert "Traceback" not in out


def test_sbatch_for_fsdp2_launches_the_fsdp_config_and_no_deepspeed_file():
    from dpo_dist.launch.sbatch import SlurmSpec, render_sbatch

    text = render_sbatch(SlurmSpec(config_file="/x/c.yaml", report="/x/r.json", log_dir="/x/logs", workdir="/x",
                                   nodes=2, sharding="fsdp2"))
    assert "launch_config_path(sys.argv[1]))' fsdp2" in text and '--config_file "$LAUNCH_CONFIG"' in text
    assert "DS_CONFIG" not in text and "--deepspeed" not in text and "DS_ACCELERATOR" not in text


def test_fsdp2_reference_left_in_float32_fails_naming_its_dtype(tmp_path):
    """A world of one is enough (the row is local): the reference cast to float32 at the start of the static proofs."""
    argv = [sys.executable, "-m", "dpo_dist", "init", "--sharding", "fsdp2", "--output-dir", str(tmp_path / "out")]
    code, out = run_cmd(argv, {"DPO_DIST_TEST_FAULT": "static proofs:0:fp32", "OMP_NUM_THREADS": "1"}, 900)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    row = check_row(rep, "reference dtype")
    assert code == 1 and not row["ok"] and row["value"] == "held in float32", out[-3000:]
    assert not check_row(rep, "weights: policy == reference")["ok"]


def test_fsdp2_from_pretrained_fallback_passes_in_a_world_of_one(tmp_path):
    """Where the shard-by-shard reader is not used (model.loader transformers; auto when the checkpoint needs a cast
    or has tied tensors), every rank loads with from_pretrained and shards after: the same proofs pass. A world of
    one (a 1-rank mesh: the DTensor and wrap paths are the same)."""
    argv = [sys.executable, "-m", "dpo_dist", "init", "--sharding", "fsdp2", "--output-dir", str(tmp_path / "out"),
            "--smoke-steps", "1", "--set", "model.loader=transformers"]
    code, out = run_cmd(argv, {"OMP_NUM_THREADS": "1"}, 900)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0 and rep["passed"], out[-3000:]
    assert rep["facts"]["loader"] == "transformers" and rep["facts"]["backend"] == "fsdp2"
    assert "4/4 decoder layers each its own" in check_row(rep, "reference FSDP2 wrap")["value"]
    assert check_row(rep, "weights: policy == checkpoint files")["ok"]


@pytest.mark.multiproc
def test_fsdp2_checkpoint_needing_a_cast_loads_on_rank_0_and_broadcasts_with_one_warning(tmp_path):
    """A float32 checkpoint run in bf16 cannot be read shard by shard (a cast): rank 0 loads it, the others build on
    meta, and each keeps its rows of what rank 0 broadcasts; the loader says so once, and every proof passes."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "fp32"
    shutil.copytree(DEFAULT_CHECKPOINT, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    res = launch_init(tmp_path / "out", "--model", str(ckpt), "--smoke-steps", "1", sharding="fsdp2", timeout=900)
    rep = res.report
    assert res.returncode == 0 and rep and rep["passed"], res.output[-4000:]
    assert rep["facts"]["loader"] == "transformers" and "cast" in rep["facts"]["loader_reason"]
    assert res.terminal.count("fast loader not used") == 1, res.terminal
    assert _per_rank(rep, "reference_bytes") == [_full_bytes(DEFAULT_CHECKPOINT) // 2] * 2  # bf16 rows, not a copy
    for name in ("weights: policy == reference", "weights: policy == checkpoint files", "reference FSDP2 wrap"):
        assert check_row(rep, name)["ok"], name


def test_every_placement_backend_cell_runs_or_is_refused_by_name():
    """The 5 placements x 2 backends matrix (docs/fsdp2.md): every cell either runs (DeepSpeed: all, tests/
    test_placements.py; FSDP2: tests/test_fsdp2_placements.py) or is refused before loading, naming both."""
    from dpo_dist.config.names import Placement
    from dpo_dist.config.sharding import PLACEMENTS_OF, placement_refusal
    from dpo_dist.sharding.registry import BACKENDS

    assert set(BACKENDS) == set(Backend) == set(PLACEMENTS_OF)
    runs = {"deepspeed": set(Placement.values()), "fsdp2": {"zero3", "cpu", "precomputed", "lora"}}
    for backend, sharding in (("deepspeed", "zero3"), ("fsdp2", "fsdp2")):
        for placement in Placement.values():
            cfg = schema.from_dict({"sharding": {"name": sharding}, "reference": {"placement": placement}})
            refused = placement_refusal(cfg)
            if placement in runs[backend]:
                assert refused is None, (backend, placement)
            else:
                assert f"reference.placement {placement} does not run under sharding backend {backend}" in refused
