"""The world that formed against the world the launch declared (machines x processes per machine).

A multi-machine launch that goes wrong can still start: DeepSpeed's pdsh runner finding no hostfile runs the local
processes alone, and a second machine whose launcher bound its own port forms a world of its own (issue 21, #71). Each
such world passes every check on its own, so the gate compares its size with what the launcher was told:
`dpo-dist launch` exports the product (DPO_DIST_EXPECTED_WORLD). A raw `accelerate launch` exports nothing of
--num_machines to the ranks; there torchrun's own rendezvous (c10d or static, with --nnodes) is what waits for every
machine, and DeepSpeed's pdsh runner (accelerate's default for several machines) is not checked. Pure Python.
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
    return None
