"""`reference.placement: ranks`: one launched job of W processes split into two worlds before anything initializes.

The first P = W - K processes train the policy; the last K hold the reference and serve its log-probs. Why our own
split instead of DeepSpeed subgroups: ZeRO-3 over a subgroup of one world does not work in deepspeed 0.19.8 (stage 3
still calls world-group barriers while building the optimizer and a world broadcast at its first `reset_step`;
transformers' ZeRO-3 `from_pretrained` uses the world group). So each role gets its own default process group over a
`PrefixStore` of the launcher's TCP store, with RANK/WORLD_SIZE rewritten for the role: accelerate, ZeRO-3 and TRL then
run unmodified on the policy side, as if the job had P processes. A third group, the "bridge" (gloo, all W processes,
built as a process-group object and never the default group), carries requests and answers between the roles with
plain send/recv in a fixed order (no receive-from-any, so the same protocol would hold for NCCL).
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from dpo_dist.config.names import Placement

POLICY, REFERENCE = "policy", "reference"
# The bridge's own timeout bounds every transfer; waits that may legitimately last a training run (a reference rank
# idle while the policy trains) pass a longer one explicitly.
IDLE_WAIT = timedelta(days=30)
CHUNK_BYTES = 64 << 20  # large answers (the KL check's full logits) cross the bridge in pieces of this size


class BridgeError(RuntimeError):
    """The other role's rank died, hung past the timeout, or sent something unexpected."""


@dataclass
class Roles:
    """Where this process sits in the split job."""

    role: str
    global_rank: int
    world: int  # W
    policy_ranks: int  # P
    reference_ranks: int  # K
    bridge: Any  # a ProcessGroupGloo over all W processes
    timeout: timedelta

    @property
    def role_rank(self) -> int:
        return self.global_rank if self.role == POLICY else self.global_rank - self.policy_ranks

    def server_of(self, policy_rank: int) -> int:
        """The global rank of the reference rank that serves a policy rank (round-robin)."""
        return self.policy_ranks + policy_rank % self.reference_ranks

    def clients_of(self, reference_rank: int) -> list[int]:
        """The policy ranks a reference rank serves, in the fixed order it serves them."""
        return list(range(reference_rank, self.policy_ranks, self.reference_ranks))

    def describe(self, global_rank: int) -> str:
        if global_rank < self.policy_ranks:
            return f"policy rank {global_rank} (process {global_rank})"
        return f"reference rank {global_rank - self.policy_ranks} (process {global_rank})"

    # -- messages -----------------------------------------------------------------------------------------------
    def send(self, obj: Any, dst: int) -> None:
        """Pickle `obj` (tensors go to CPU first) and send it to global rank `dst`: a length, then the bytes in
        chunks of CHUNK_BYTES."""
        buf = io.BytesIO()
        pickle.dump(_to_cpu(obj), buf, protocol=pickle.HIGHEST_PROTOCOL)
        data = buf.getbuffer()
        try:
            self._wait(self.bridge.send([torch.tensor([len(data)], dtype=torch.int64)], dst, 0), self.timeout)
            for start in range(0, len(data), CHUNK_BYTES):
                piece = torch.frombuffer(data[start:start + CHUNK_BYTES], dtype=torch.uint8)
                self._wait(self.bridge.send([piece], dst, 0), self.timeout)
        except Exception as e:
            raise BridgeError(f"{self.describe(dst)} did not take a message ({_cause(e)})") from None

    def recv(self, src: int, wait: timedelta | None = None) -> Any:
        header = torch.zeros(1, dtype=torch.int64)
        try:
            self._wait(self.bridge.recv([header], src, 0), wait or self.timeout)
            data = bytearray(int(header.item()))
            for start in range(0, len(data), CHUNK_BYTES):
                n = min(CHUNK_BYTES, len(data) - start)
                piece = torch.empty(n, dtype=torch.uint8)
                self._wait(self.bridge.recv([piece], src, 0), self.timeout)
                data[start:start + n] = piece.numpy().tobytes()
        except Exception as e:
            raise BridgeError(f"{self.describe(src)} did not answer within "
                              f"{int((wait or self.timeout).total_seconds())} s or ended ({_cause(e)})") from None
        return pickle.loads(bytes(data))

    @staticmethod
    def _wait(work, timeout: timedelta) -> None:
        work.wait(timeout)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _cause(e: Exception) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


def check_counts(world: int, k: int) -> str | None:
    """The one-line problem with W processes and K reference ranks, or None."""
    if k < 1:
        return f"reference.ranks must be at least 1 (got {k})"
    if world - k < k:
        return (f"reference.placement ranks: {world} processes with reference.ranks {k} leaves {world - k} policy "
                f"rank(s); every reference rank needs a policy rank to serve: launch at least {2 * k} processes or "
                "lower reference.ranks")
    return None


def split_world(k: int, timeout_s: int) -> tuple[Any, Roles]:
    """Give this process its role's world (as the default process group) and the bridge; return (DistContext of the
    role's world, Roles). Must run before accelerate, DeepSpeed or transformers initialize anything distributed."""
    from dpo_dist.compat.deepspeed import timeout_new_groups
    from dpo_dist.runtime.distributed import (
        DistContext,
        accelerator_on,
        device_for,
        launched_world,
        rendezvous_failed,
    )

    rank, world, local_rank = launched_world()
    problem = check_counts(world, k)
    if problem:
        raise ValueError(problem)
    if "MASTER_ADDR" not in os.environ:
        raise ValueError("reference.placement ranks needs a launcher (dpo-dist launch, accelerate launch, torchrun or "
                         "srun): it splits the launched processes into policy and reference ranks")
    timeout = timedelta(seconds=timeout_s)
    try:
        # torch's own env:// rendezvous: connects to torchrun's agent store, or hosts the store on rank 0 (srun)
        store, _, _ = next(torch.distributed.rendezvous("env://", timeout=timeout))
    except Exception as e:
        raise rendezvous_failed(rank, world, timeout_s, _cause(e), "check that every node started its ranks") from None
    p = world - k
    role = POLICY if rank < p else REFERENCE
    role_rank, role_world = (rank, p) if role == POLICY else (rank - p, k)
    acc = accelerator_on(local_rank)
    prefix = torch.distributed.PrefixStore(f"dpo_dist/{role}/", store)
    torch.distributed.init_process_group(acc.communication_backend_name(), store=prefix, rank=role_rank,
                                         world_size=role_world, timeout=timeout)
    # What accelerate, DeepSpeed and transformers read: this role's world. LOCAL_RANK (the device) stays.
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(role_world),
                      LOCAL_WORLD_SIZE=str(min(role_world, int(os.environ.get("LOCAL_WORLD_SIZE", role_world)))))
    bridge = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("dpo_dist/bridge/", store), rank,
                                                world, IDLE_WAIT)
    import deepspeed

    timeout_new_groups(timeout_s)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), timeout=timeout,
                               auto_mpi_discovery=False)  # adopts the group made above
    ctx = DistContext(role_rank, role_world, local_rank, device_for(local_rank))
    ctx.roles = Roles(role, rank, world, p, k, bridge, timeout)
    return ctx, ctx.roles


def join(cfg) -> Any:
    """The DistContext of this process: its role's world for `reference.placement: ranks` (ctx.roles set), else the
    launched world. What `dpo-dist init` and `dpo_dist.api.prepare` both start with."""
    from dpo_dist.runtime.distributed import DistContext

    if cfg.reference.placement == Placement.RANKS:
        return split_world(cfg.reference.ranks, cfg.sharding.timeout_s)[0]
    return DistContext.from_env(cfg.sharding.timeout_s)


def die(message: str) -> None:
    """The other role is gone: say who in one line and end this process (its peers follow through the launcher)."""
    print(f"dpo-dist: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
