"""Launch commands as data, and the fast --help of every subcommand."""

import json
import time

import pytest
import yaml
from conftest import dpo_dist_cli, heavy_imports, help_probe

from dpo_dist.config.resources import ds_config_path, launch_config_path, resolve_ds_config, zero_stage
from dpo_dist.launch.accelerate import LaunchSpec, build_launch


def test_single_node_cpu_command():
    argv, env = build_launch(LaunchSpec(sharding="zero3", num_processes=2, main_process_port=29600, cpu=True,
                                        init_args=("--smoke-steps", "1")))
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert argv[argv.index("--config_file") + 1].endswith("launch/zero3.yaml")
    assert argv[argv.index("--deepspeed_config_file") + 1].endswith("ds_configs/zero3.json")
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("--main_process_port") + 1] == "29600"
    assert argv[-6:] == ["dpo_dist", "init", "--sharding", "zero3", "--smoke-steps", "1"]
    assert env["DS_ACCELERATOR"] == "cpu" and "ACCELERATE_USE_CPU" not in env  # it would drop DeepSpeed
    assert env["HF_HUB_OFFLINE"] == "1"


def test_gpu_multinode_command_has_no_cpu_settings():
    argv, env = build_launch(LaunchSpec(sharding="zero2", num_processes=8, num_machines=4, machine_rank=3,
                                        main_process_ip="10.0.0.1"))
    assert argv[argv.index("--num_processes") + 1] == "32"  # accelerate counts processes over all machines
    assert argv[argv.index("--machine_rank") + 1] == "3"
    assert argv[argv.index("--main_process_ip") + 1] == "10.0.0.1"
    assert "DS_ACCELERATOR" not in env and "ACCELERATE_USE_CPU" not in env


@pytest.mark.parametrize("spec", [LaunchSpec(num_machines=2), LaunchSpec(machine_rank=1), LaunchSpec(sharding="z9")])
def test_bad_launch_specs_are_refused(spec):
    with pytest.raises(ValueError):
        build_launch(spec)


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_configs_resolve_by_name_and_agree(name, stage):
    ds = json.loads(ds_config_path(name).read_text())
    assert zero_stage(ds) == stage
    acc = yaml.safe_load(launch_config_path(name).read_text())
    assert acc["distributed_type"] == "DEEPSPEED"
    assert acc["deepspeed_config"]["deepspeed_config_file"] == f"ds_configs/{name}.json"
    assert acc.get("use_cpu") is False  # CPU-only comes from the environment, never from the shipped configs
    assert resolve_ds_config(name, None) == (name, ds)


def test_ds_config_from_accelerate_environment(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero2.json")
    label, ds = resolve_ds_config(None, None)
    assert label == "zero2" and zero_stage(ds) == 2
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert resolve_ds_config(None, None)[0] == "zero3"


@pytest.mark.parametrize("sub", [[], ["init"], ["launch"]])
def test_help_is_fast_and_imports_nothing_heavy(sub):
    code = help_probe([*sub, "--help"]) + "assert 'usage: dpo-dist' in buf.getvalue(), buf.getvalue()\n"
    t0 = time.time()
    assert heavy_imports(code) == []
    assert time.time() - t0 < 5


def test_launch_dry_run_prints_the_command():
    out = dpo_dist_cli("launch", "--cpu", "--dry-run", "--", "--smoke-steps", "1", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "DS_ACCELERATOR=cpu" in out.stdout and "-m dpo_dist init --sharding zero3 --smoke-steps 1" in out.stdout
