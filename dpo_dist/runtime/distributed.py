"""Rank logic in one small object, so the core never branches on rank itself.

Modelled on TRL's `DistributedBackend` and nanochat's `print0`: the process group is created here with a deliberate
timeout (accelerate's CPU path would otherwise leave torch's 30-minute default), failure flags are all-reduced so every
rank decides together (accelerate's set_trigger/check_trigger), and a single process works with no process group.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch

from dpo_dist.compat.deepspeed import timeout_new_groups


class RendezvousError(RuntimeError):
    """The ranks of the job never all met."""


class DistContext:
    """World facts plus the few collectives the verification needs; all no-ops for a single process."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 run_id: str | None = None):
        from dpo_dist.runtime.run_lock import run_id as this_run

        self.run_id = run_id or this_run()  # what the report and the manifest carry (rank 0's, see from_env)
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")
        self.roles = None  # placement ranks: this process's place in the split job (roles.Roles)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, timeout_s: int) -> DistContext:
        """Join the job started by accelerate/torchrun/srun (RANK, WORLD_SIZE, MASTER_ADDR set), or run alone."""
        rank, world, local_rank = launched_world()
        if "MASTER_ADDR" not in os.environ:
            # Run directly (`python -m dpo_dist init`, no launcher): a world of one on this host. DeepSpeed still needs
            # a process group (ZeRO-3 loading calls init_distributed, which would otherwise go looking for MPI).
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        import deepspeed

        timeout_new_groups(timeout_s)
        acc = accelerator_on(local_rank)
        if not torch.distributed.is_initialized():
            # DeepSpeed picks nccl on GPUs, gloo with its CPU accelerator (no oneCCL needed); we add the timeout.
            try:
                deepspeed.init_distributed(
                    dist_backend=acc.communication_backend_name(),
                    timeout=timedelta(seconds=timeout_s),
                    auto_mpi_discovery=False,
                )
            except Exception as e:  # torch: "Timed out after 11 seconds waiting for clients. 1/2 clients joined."
                cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise rendezvous_failed(rank, world, timeout_s, cause, "check that every node started its ranks and "
                                        "can reach that address, or raise sharding.timeout_s") from None
        ctx = cls(rank, world, local_rank, device_for(local_rank), agree_run_id())
        from dpo_dist.runtime.liveness import start

        start(rank, world, timeout_s)  # so a collective timeout can name the rank that went silent
        return ctx

    # -- facts --------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print0(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def warn(self, msg: str) -> None:
        """A warning printed once (rank 0)."""
        if self.is_main:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    # -- collectives --------------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        if not self.distributed:
            return torch.device("cpu")
        return torch.device("cpu") if torch.distributed.get_backend() == "gloo" else self.device

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce a copy of `t` and return it on t's device (int64 sums wrap modulo 2^64, as fingerprints need)."""
        if not self.distributed:
            return t.clone()
        x = t.detach().to(self._comm_device()).clone()
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(x, op=ops[op])
        return x.to(t.device)

    def all_ok(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank: the shared decision that keeps ranks in step."""
        return bool(self.all_reduce(torch.tensor([1 if ok else 0], dtype=torch.int64), "min").item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank (small things only: check results)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def teardown(self) -> None:
        """Barrier then destroy: without it gloo processes sometimes abort at exit (seen 4 in 10 runs)."""
        if self.distributed and torch.distributed.is_initialized():
            try:
                torch.distributed.barrier()
            finally:
                torch.distributed.destroy_process_group()


def launched_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as the launcher set them; a world of one when run without a launcher."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def rendezvous_failed(rank: int, world: int, timeout_s: int, cause: str, advice: str) -> RendezvousError:
    """The one-line error of a rendezvous that did not complete: who, where (MASTER_ADDR:MASTER_PORT), why, what
    to check."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return RendezvousError(f"rank {rank} of {world}: rendezvous at {where} failed within {timeout_s} s ({cause}): "
                           f"{advice}")


def accelerator_on(local_rank: int):
    """DeepSpeed's accelerator, set to this process's device (an accelerator's; the CPU one has none to set)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    return acc


def agree_run_id() -> str:
    """Rank 0's run id, adopted by every rank (ranks of separate launchers, one per node, start with their own)."""
    from dpo_dist.runtime.run_lock import RUN_ID_ENV, run_id

    box = [run_id()]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    os.environ[RUN_ID_ENV] = box[0]
    return box[0]


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it), for a rendezvous of our own or a test's launch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(local_rank: int) -> torch.device:
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)
