"""The world that formed against the world the launch declared (machines x processes per machine).

A multi-machine launch that goes wrong can still start: DeepSpeed's pdsh runner finding no hostfile runs the local
processes alone, and a second machine whose launcher bound its own port forms a world of its own (issue 21, #71). Each
such world passes every check on its own, so the gate compares its size with what the launcher was told:
`dpo-dist launch` exports the product (DPO_DIST_EXPECTED_WORLD); torchrun (any accelerate launch through it) exports
the machines that joined and the processes per machine (GROUP_WORLD_SIZE, LOCAL_WORLD_SIZE), which must multiply to
WORLD_SIZE. Pure Python.
"""

from __future__ import annotations

import os

EXPECTED_WORLD_ENV = "DPO_DIST_EXPECTED_WORLD"


def world_problem(world: int, env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(why a world of `world` processes is not the launch's, the fix), or None (also when nothing declared one)."""
    env = os.environ if env is None else env
    declared = env.get(EXPECTED_WORLD_ENV, "")
    if declared.isdigit() and int(declared) != world:
        return (f"world of {world} process(es), but the launch declared {declared} (machines x --num-processes): "
                "some machines did not join this world (each formed its own, or the launcher ran this machine alone)",
                "start `dpo-dist launch` with the same --main-process-ip and --port on every machine, "
                "--machine-rank 0 first")
    nodes, local = env.get("GROUP_WORLD_SIZE", ""), env.get("LOCAL_WORLD_SIZE", "")
    if nodes.isdigit() and local.isdigit() and int(nodes) * int(local) != world:
        return (f"world of {world} process(es), but torchrun formed {nodes} machine(s) x {local} processes: "
                "the machines were launched with different process counts",
                "give every machine the same "
                "--num-processes")
    return None
