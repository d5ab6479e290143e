"""The bridge between policy and reference ranks (placement ranks), with real processes and real gloo: messages of
any size arrive intact, and a peer that dies or hangs is named within the timeout, in both directions."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from dpo_dist.runtime.distributed import free_port
from dpo_dist.runtime.roles import POLICY, REFERENCE, BridgeError, Roles, check_counts

pytestmark = pytest.mark.multiproc


def _roles(rank: int, world: int, k: int, port: int, timeout_s: float) -> Roles:
    store = torch.distributed.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=30))
    bridge = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("dpo_dist/bridge/", store), rank, world,
                                                timedelta(days=1))
    role = POLICY if rank < world - k else REFERENCE
    return Roles(role, rank, world, world - k, k, bridge, timedelta(seconds=timeout_s))


def _worker(rank: int, port: int, scenario: str, q) -> None:
    import dpo_dist.runtime.roles as roles_mod

    roles_mod.CHUNK_BYTES = 1000  # force many chunks
    r = _roles(rank, 2, 1, port, timeout_s=3)
    try:
        if scenario == "roundtrip":
            if rank == 0:
                big = torch.arange(100_000, dtype=torch.float32).reshape(100, 1000).to(torch.bfloat16)
                r.send({"kind": "forward", "kwargs": {"x": big, "flag": True}}, 1)
                q.put(("ok", torch.equal(r.recv(1)["y"], big.float() * 2)))
            else:
                msg = r.recv(0)
                r.send({"y": msg["kwargs"]["x"].float() * 2}, 0)
            return
        victim = int(scenario.split(":")[1])
        if rank == victim:
            if scenario.startswith("die"):
                os._exit(3)
            time.sleep(30)  # hang: alive, never answers
            return
        t0 = time.perf_counter()
        try:
            r.recv(victim)
            q.put(("no error", 0.0))
        except BridgeError as e:
            q.put((str(e), time.perf_counter() - t0))
    finally:
        q.put(("done", rank))


def _run(scenario: str) -> list:
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, scenario, q)) for rank in range(2)]
    for p in procs:
        p.start()
    out = []
    deadline = time.time() + 60
    while time.time() < deadline and not any(isinstance(x, tuple) and x[0] not in ("done",) for x in out):
        try:
            out.append(q.get(timeout=1))
        except Exception:
            pass
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()
    return [x for x in out if x[0] != "done"]


def test_large_messages_cross_the_bridge_in_chunks_intact():
    assert _run("roundtrip") == [("ok", True)]


@pytest.mark.parametrize("scenario,named", [("die:1", "reference rank 0 (process 1)"),
                                            ("die:0", "policy rank 0 (process 0)")])
def test_a_dead_peer_is_named_at_once(scenario, named):
    (msg, waited), = _run(scenario)
    assert named in msg and waited < 3, (msg, waited)  # the closed connection is seen before the timeout


@pytest.mark.parametrize("scenario,named", [("hang:1", "reference rank 0 (process 1)"),
                                            ("hang:0", "policy rank 0 (process 0)")])
def test_a_hung_peer_is_named_after_the_timeout(scenario, named):
    (msg, waited), = _run(scenario)
    assert named in msg and "within 3 s" in msg and 2.5 < waited < 10, (msg, waited)


def test_counts_need_a_policy_rank_for_every_reference_rank():
    assert check_counts(3, 1) is None and check_counts(4, 2) is None
    assert "launch at least 4 processes" in check_counts(3, 2)
    assert "at least 1" in check_counts(3, 0)


def test_round_robin_serves_every_policy_rank_once():
    r = Roles(POLICY, 0, 10, 7, 3, None, timedelta(seconds=1))
    served = [p for k in range(3) for p in r.clients_of(k)]
    assert sorted(served) == list(range(7))
    assert all(r.server_of(p) - 7 == k for k in range(3) for p in r.clients_of(k))
