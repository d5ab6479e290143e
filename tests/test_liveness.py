"""A collective timeout names the rank that went silent (issue 13: a stopped rank was reported as DeepSpeed's
"INFLIGHT ... expected to be released")."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from conftest import free_port, launch_init

from dpo_dist.runtime import liveness


def _timeout_under_cleanup() -> RuntimeError:
    """What a ZeRO-3 forward raises when a peer never answers: DeepSpeed's clean-up error on top of gloo's timeout."""
    try:
        try:
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv "
                               "operation to complete")
        finally:
            raise RuntimeError("{'id': 3, 'status': 'INFLIGHT', 'numel': 16384} expected to be released")
    except RuntimeError as e:
        return e


def test_a_timeout_is_found_under_the_error_raised_on_top_of_it(monkeypatch):
    monkeypatch.setattr(liveness, "_current", object())  # this rank beats
    assert liveness.is_timeout(_timeout_under_cleanup())
    assert not liveness.is_timeout(RuntimeError("{'status': 'INFLIGHT'} expected to be released"))
    assert not liveness.is_timeout(ValueError("bad value"))
    monkeypatch.setattr(liveness, "_current", None)  # no beats (placement ranks): errors keep their own words
    assert not liveness.is_timeout(_timeout_under_cleanup())


def test_stopped_and_stuck_ranks_are_told_apart_over_a_real_store():
    port = free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, 3, is_master=True, timeout=timedelta(seconds=10),
                                        wait_for_workers=False)

    def client():
        return torch.distributed.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=10))

    ranks = [liveness.Liveness(client(), r, 3) for r in range(3)]
    try:
        for r in ranks:
            r.stage("forward proofs")
        ranks[1].close()  # rank 1 frozen: no thread of it runs, so no beat
        ranks[2].stage("static proofs")  # rank 2 beats but is still in the stage before
        time.sleep(1.5 * liveness.BEAT_S)
        silent = ranks[0].silent()
    finally:
        for r in ranks:
            r.close()
        del master
    assert set(silent) == {1, 2}, silent
    assert silent[1].startswith("no sign of life for 3 s, in stage 'forward proofs'")
    assert silent[2] == "alive but still in stage 'static proofs'"


def test_without_a_store_the_message_still_names_the_timeout(monkeypatch):
    monkeypatch.setattr(liveness, "_current", None)
    text = liveness.explain(10)
    assert "within sharding.timeout_s (10 s)" in text and "stopped process" in text


@pytest.mark.multiproc
def test_a_stopped_rank_is_named_by_its_peers(tmp_path, monkeypatch):
    """Rank 1 is SIGSTOPped at the start of the forward proofs; rank 0's ZeRO-3 forward times out after
    sharding.timeout_s and says that rank 1 did not answer, not DeepSpeed's INFLIGHT error."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "forward proofs:1:stop")
    res = launch_init(tmp_path / "out", "--set", "sharding.timeout_s=10", "--set", "verify.generation=false",
                      timeout=300)
    assert res.returncode != 0 and res.report is None
    assert "rank 1: injected stop at stage 'forward proofs'" in res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("dpo-dist: rank 0 failed"))
    assert "rank 1 did not answer within sharding.timeout_s (10 s)" in line, line
    assert "no sign of life" in line and "expected to be released" not in line, line
    last = res.terminal.strip().splitlines()[-1]  # issue 21 #74: rank 0's diagnosis, not "killed ... out of memory"
    assert "failed on rank(s) 1: rank 1 did not answer within sharding.timeout_s (10 s)" in last, last
    assert "stopped or its node hung" in last and "out of memory" not in last and "OOM" not in last, last
    stage = last.split("dpo-dist: ", 1)[1].split(" failed on rank(s)")[0]
    assert not any(ln.startswith(stage + " ") and ln.rstrip().endswith("ok") for ln in res.terminal.splitlines()), \
        res.terminal  # the stage named as failed was not called ok just before


def test_new_process_groups_get_the_configured_timeout(monkeypatch):
    """Pins the torch default that DeepSpeed's new_group calls pick up (read at each call, not at import)."""
    from datetime import timedelta

    from torch.distributed import Backend, distributed_c10d

    from dpo_dist.runtime.distributed import timeout_new_groups

    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    monkeypatch.setattr(distributed_c10d, "default_pg_nccl_timeout", distributed_c10d.default_pg_nccl_timeout)
    assert distributed_c10d._get_default_timeout(Backend.GLOO) == timedelta(minutes=30)
    timeout_new_groups(17)
    assert distributed_c10d._get_default_timeout(Backend.GLOO) == timedelta(seconds=17)


@pytest.mark.multiproc
def test_a_rank_stuck_in_a_stage_is_named_as_alive_there(tmp_path, monkeypatch):
    """Rank 1 hangs (alive, beating) inside the tokenizer stage; rank 0 finished it and times out in the shared
    decision after sharding.timeout_s, naming rank 1 and the stage it is stuck in."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "tokenizer:1:hang")
    res = launch_init(tmp_path / "out", "--set", "sharding.timeout_s=10", timeout=300)
    assert res.returncode != 0 and res.report is None
    line = next(ln for ln in res.output.splitlines() if ln.startswith("dpo-dist: rank 0 failed"))
    assert "rank 1 did not answer within sharding.timeout_s (10 s) (rank 1: alive but still in stage 'tokenizer')" \
        in line, line
