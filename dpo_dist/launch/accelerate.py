"""Launch commands as data: a pure `build_launch(spec) -> (argv, env)` that tests assert on.

Same idea as accelerate's `prepare_deepspeed_cmd_env`: nothing here runs anything, so the command a user would type and
the command the tests run are one and the same value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.config.names import Sharding
from dpo_dist.config.resources import ds_config_path, launch_config_path, resolve_ds_config, zero_stage
from dpo_dist.config.sharding import uses_deepspeed_json
from dpo_dist.runtime.world import EXPECTED_WORLD_ENV  # the world size the launch declared, for the gate

# Environment that keeps runs offline and quiet everywhere (no hub look-ups at run time).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# CPU-only machines: DeepSpeed's CPU accelerator (gloo), one thread per rank. Not ACCELERATE_USE_CPU: accelerate then
# silently drops the DeepSpeed plugin (AcceleratorState: `USE_DEEPSPEED and not cpu`) and nothing gets wrapped.
CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class LaunchSpec:
    sharding: str = Sharding.ZERO3.value
    num_processes: int = 2  # per machine
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    cpu: bool = False
    init_args: tuple[str, ...] = field(default_factory=tuple)  # passed to `dpo-dist init`
    python: str = sys.executable
    rdzv_timeout_s: int = 600  # multi-machine: how long the rendezvous waits for every machine to join
    ds_config: str | None = None  # the run's own DeepSpeed JSON (sharding.ds_config), in place of the shipped one


def multinode_args(num_machines: int, rdzv_timeout_s: int, deepspeed: bool = True) -> list[str]:
    """accelerate options that make the machines one world: torchrun on every machine ("standard") meeting in a c10d
    rendezvous at the head's address and port. Without them accelerate hands a multi-machine DeepSpeed launch to
    DeepSpeed's pdsh/hostfile runner, which needs a `deepspeed` binary on PATH and, finding no hostfile, runs this
    machine's processes as a world of their own (issue 21, #70/#71). Used by `dpo-dist launch` and the sbatch job."""
    if num_machines <= 1:
        return []
    return ["--rdzv_backend", "c10d", "--rdzv_conf", f"join_timeout={rdzv_timeout_s}",
            *(["--deepspeed_multinode_launcher", "standard"] if deepspeed else [])]


def build_launch(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch ... -m dpo_dist init ...` argv and the extra environment it needs."""
    if spec.num_processes < 1:
        raise ValueError(f"{spec.num_processes} processes per machine (--num-processes): launch at least 1")
    if spec.num_machines < 1:
        raise ValueError(f"{spec.num_machines} machines (--num-machines): launch on at least 1")
    if not 0 <= spec.machine_rank < spec.num_machines:
        raise ValueError(f"machine rank {spec.machine_rank} is outside 0..{spec.num_machines - 1} (--machine-rank): "
                         "number the machines from 0")
    if not 0 < spec.main_process_port < 65536:
        raise ValueError(f"port {spec.main_process_port} is not a TCP port (--port): choose one in 1..65535")
    if spec.num_machines > 1 and not spec.main_process_ip:
        raise ValueError("a multi-machine launch needs the first node's address (--main-process-ip): pass it")
    if spec.rdzv_timeout_s < 1:
        raise ValueError(f"rendezvous timeout {spec.rdzv_timeout_s} s (--rdzv-timeout): give at least 1 second")
    launch_name = spec.sharding
    ds_file = str(ds_config_path(spec.sharding)) if uses_deepspeed_json(spec.sharding) else None  # FSDP2: none
    if spec.ds_config:  # its stage picks the shipped accelerate config (ZeRO-3's init flag only for stage 3)
        _, ds = resolve_ds_config(None, spec.ds_config)
        launch_name = Sharding.ZERO3.value if zero_stage(ds) == 3 else Sharding.ZERO2.value
        ds_file = str(Path(spec.ds_config).expanduser().resolve())
    argv = [
        spec.python, "-m", "accelerate.commands.launch",
        "--config_file", str(launch_config_path(launch_name)),
        *(["--deepspeed_config_file", ds_file] if ds_file else []),
        "--num_processes", str(spec.num_processes * spec.num_machines),
        "--num_machines", str(spec.num_machines),
        "--machine_rank", str(spec.machine_rank),
        "--main_process_port", str(spec.main_process_port),
    ]
    if spec.main_process_ip:
        argv += ["--main_process_ip", spec.main_process_ip]
    argv += multinode_args(spec.num_machines, spec.rdzv_timeout_s, deepspeed=ds_file is not None)
    argv += ["-m", "dpo_dist", "init", "--sharding", spec.sharding, *spec.init_args]
    env = dict(OFFLINE_ENV)
    env[EXPECTED_WORLD_ENV] = str(spec.num_processes * spec.num_machines)
    if spec.cpu:
        env.update(CPU_ENV)
    return argv, env
