"""A test hook for failure paths: make one rank fail, die, hang or corrupt a weight at the start of a stage, so the
tests can show that every rank stops promptly and the report names the rank (tests/test_faults.py,
tests/test_placements.py). Inert unless the environment variable is set."""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_ENV = "DPO_DIST_TEST_FAULT"


def inject_fault(stage: str, rank: int, state=None) -> None:
    """Test hook: DPO_DIST_TEST_FAULT="<stage>:<rank>[:mode]" acts on that rank at the start of that stage.
    Modes: raise (default: an error the stage reports), exit (the process dies at once, as a crashed or killed rank
    would), hang (alive but silent), stop (SIGSTOP: the whole process frozen, as on a hung node), perturb (this
    rank's copy of one reference weight changes, as a bad copy would), ulp (that weight's first element one
    floating-point step off), zeros (this rank's reference shards all zero: a broadcast never received), fp32 (the
    reference cast to float32), train_ref (the reference goes back to train mode,
    dropout active). `state`: the init stages' InitState (the last four modes act on its reference)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != stage or parts[1] not in (str(rank), "*"):
        return
    mode = parts[2] if len(parts) > 2 else "raise"
    if mode == "exit":
        print(f"[dpo-dist] rank {rank}: injected crash at stage '{stage}'", file=sys.stderr, flush=True)
        os._exit(17)
    if mode == "stop":  # the whole process stopped (SIGSTOP, a frozen node): no thread of it runs any more
        print(f"[dpo-dist] rank {rank}: injected stop at stage '{stage}'", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if mode == "hang":  # alive but silent, as a stuck rank would be
        print(f"[dpo-dist] rank {rank}: injected hang at stage '{stage}'", file=sys.stderr, flush=True)
        time.sleep(3600)
    if mode == "perturb":
        name, p = list(state.reference.named_parameters())[-2]
        local = _held(p).view(-1)
        if local.numel():
            local[0] += 1.0
        print(f"[dpo-dist] rank {rank}: injected perturbation of {name}", file=sys.stderr, flush=True)
        return
    if mode == "ulp":  # one element of that weight one floating-point step off: the subtlest bad copy
        import torch

        name, p = list(state.reference.named_parameters())[-2]
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
        forward_copy = p.to_local() if hasattr(p, "to_local") else p.data
        for t in {id(x): x for x in (forward_copy, _held(p))}.values():  # a ZeRO-3 persistent
            if t.numel():  # parameter's forward copy and its shard both
                t.data.view(-1)[:1].view(ints[t.element_size()]).add_(1)
        print(f"[dpo-dist] rank {rank}: injected one-ulp change of {name}", file=sys.stderr, flush=True)
        return
    if mode == "zeros":  # this rank's shards of the reference never filled: a broadcast that did not happen
        import torch

        with torch.no_grad():
            for p in state.reference.parameters():
                _held(p).zero_()
        print(f"[dpo-dist] rank {rank}: injected zeroed reference shards", file=sys.stderr, flush=True)
        return
    if mode == "fp32":  # the reference runs in another dtype (an unsharded reference: cpu placement)
        state.reference.float()
        return
    if mode == "train_ref":
        state.reference.train()
        return
    raise RuntimeError(f"injected fault at stage '{stage}' on rank {rank}")


def _held(p):
    """What this rank holds of a parameter as a plain tensor: a ZeRO-3 partition, an FSDP2 DTensor's local shard,
    else its data."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.data
    return p.to_local() if hasattr(p, "to_local") else p.data
