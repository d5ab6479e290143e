"""One run owns an output dir at a time (a flock held for the run's life, gone with the process), and the ranks agree
on one run id, the one report.json and reference_manifest.json carry (issue 13.7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, dpo_dist_cli, free_port

from dpo_dist.cli.main import main
from dpo_dist.runtime.run_lock import LOCK_NAME, RUN_ID_ENV

HOLD = ("import sys, time; from dpo_dist.runtime.run_lock import acquire; acquire(sys.argv[1]); "
        "print('held', flush=True); "
        "time.sleep(300)")


def hold(out: Path, run_id: str) -> subprocess.Popen:
    """Another live run: a process that holds the output dir's lock until it is killed."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, RUN_ID_ENV: run_id, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_run_owns_the_dir_and_a_crashed_one_does_not(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "out"
    other = hold(out, "run-A")
    try:
        (out / "report.json").write_text('{"passed": true}')  # the live run's report: --overwrite must not remove it
        code = main(["init", "--output-dir", str(out), "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"output dir {out} is in use by another run (run run-A, pid {other.pid} on " in err, err
        assert "choose another --output-dir" in err
        assert (out / "report.json").read_text() == '{"passed": true}'
    finally:
        other.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the kernel drops the flock
        other.wait()
    from dpo_dist.runtime.run_lock import acquire, release

    acquire(out)  # the stale lock file does not block
    try:
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["run_id"] == os.environ[RUN_ID_ENV]
    finally:
        release(out)


def test_launch_refuses_a_dir_another_run_holds(tmp_path):
    out = tmp_path / "out"
    other = hold(out, "run-B")
    try:
        r = dpo_dist_cli("launch", "--cpu", "--port", str(free_port()), "--", "--output-dir", str(out),
                         env={"PYTHONPATH": str(ROOT)})
    finally:
        other.kill()
        other.wait()
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().startswith("dpo-dist: output dir") and "(run run-B, pid" in r.stderr
    assert "accelerate" not in r.stdout  # refused before any rank was started


AGREE = """
import os, sys
from dpo_dist.runtime.distributed import DistContext
ctx = DistContext.from_env(timeout_s=60)
print("RUN_ID", ctx.rank, ctx.run_id, os.environ["DPO_DIST_RUN_ID"], flush=True)
ctx.teardown()
"""


@pytest.mark.multiproc
def test_ranks_of_separate_launchers_adopt_rank_0s_run_id():
    """Two ranks that start with different ids (one launcher per node) end with rank 0's, over a real gloo group."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0",
               RUN_ID_ENV: f"node{rank}-id"}
        procs.append(subprocess.Popen([sys.executable, "-c", AGREE], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0])
        finally:
            if p.poll() is None:
                p.kill()
    lines = sorted(ln for o in outs for ln in o.splitlines() if ln.startswith("RUN_ID"))
    assert lines == ["RUN_ID 0 node0-id node0-id", "RUN_ID 1 node0-id node0-id"], outs


@pytest.mark.multiproc
def test_report_manifest_and_every_rank_carry_one_run_id():
    from conftest import passing_zero3_run

    # the shared run's dir existed with an earlier run's report (replaced with --overwrite), so `dpo-dist launch`
    # held the lock while its ranks ran, and rank 0 accepted it as its own
    res = passing_zero3_run()
    out = res.output_dir
    assert res.returncode == 0, res.output[-4000:]
    rid = res.report["run_id"]
    assert rid and json.loads((out / "reference_manifest.json").read_text())["run_id"] == rid
    assert {f["rank_run_id"] for f in res.report["per_rank_facts"].values()} == {rid}
    assert json.loads((out / LOCK_NAME).read_text())["run_id"] == rid  # the launcher that held the dir: this run


def test_the_same_run_id_in_an_unrelated_process_does_not_share_the_dir(tmp_path, capsys, monkeypatch):
    """Only the launcher that started this rank (an ancestor process) may hold the dir for it: a leaked or copied
    DPO_DIST_RUN_ID does not let a second run in."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv(RUN_ID_ENV, "run-C")
    out = tmp_path / "out"
    other = hold(out, "run-C")
    try:
        code = main(["init", "--output-dir", str(out)])
    finally:
        other.kill()
        other.wait()
    assert code == 2 and "is in use by another run (run run-C" in capsys.readouterr().err
