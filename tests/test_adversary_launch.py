"""Issue 21, the launch and lifecycle half of the second adversarial pass: the multi-machine form forms one world (or
fails on the rendezvous in one line), the gate compares the world with the launch, and a refused run leaves the
earlier run's files as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, kill_tree, run_cmd

from dpo_dist.cli.main import main
from dpo_dist.launch.accelerate import LaunchSpec, build_launch
from dpo_dist.runtime.world import EXPECTED_WORLD_ENV, world_problem

ENV = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def launch_argv(*launch: str, init: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "dpo_dist", "launch", "--cpu", *launch, "--", *init]


# -- #70/#71: several machines are one world --------------------------------------------------------------------


def test_multi_machine_launch_uses_torchrun_on_every_machine_with_a_c10d_rendezvous():
    argv, env = build_launch(LaunchSpec(num_processes=8, num_machines=4, machine_rank=2, main_process_ip="10.0.0.1",
                                        rdzv_timeout_s=77))
    assert argv[argv.index("--deepspeed_multinode_launcher") + 1] == "standard"  # not pdsh: no `deepspeed` binary
    assert argv[argv.index("--rdzv_backend") + 1] == "c10d"
    assert argv[argv.index("--rdzv_conf") + 1] == "join_timeout=77"
    assert argv.index("--rdzv_backend") < argv.index("dpo_dist")  # accelerate's options, not init's
    assert env[EXPECTED_WORLD_ENV] == "32"
    one, env1 = build_launch(LaunchSpec(num_processes=2))
    assert "--rdzv_backend" not in one and env1[EXPECTED_WORLD_ENV] == "2"


def test_world_problem_compares_the_world_with_the_launch():
    assert world_problem(2, {EXPECTED_WORLD_ENV: "2"}) is None
    assert world_problem(1, {}) is None  # nothing declared (a single `dpo-dist init`)
    cause, fix = world_problem(1, {EXPECTED_WORLD_ENV: "2"})
    assert "world of 1 process(es), but the launch declared 2" in cause and "--machine-rank" in fix
    assert world_problem(3, {"GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) is not None  # raw torchrun
    assert world_problem(4, {"GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) is None


def test_gate_fails_a_world_smaller_than_the_launch_declared(tmp_path):
    """What #71 ran into (a world of 1 where 2 machines x 1 were declared), cheaply: one process told 2."""
    out = tmp_path / "out"
    code, text = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--output-dir", str(out)],
                         {**ENV, EXPECTED_WORLD_ENV: "2", "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert code == 1, text
    rows = {r["check"]: r for r in json.loads((out / "report.json").read_text())["checks"]}
    assert not rows["world matches the launch"]["ok"]
    assert "world of 1 process(es), but the launch declared 2" in rows["world matches the launch"]["value"]
    assert "world matches the launch" in text.strip().splitlines()[-1]


def _machine(port: int, rank: int, out: Path, rdzv_s: int) -> subprocess.Popen:
    argv = launch_argv("--num-processes", "1", "--num-machines", "2", "--machine-rank", str(rank),
                       "--main-process-ip", "127.0.0.1", "--port", str(port), "--rdzv-timeout", str(rdzv_s),
                       init=("--output-dir", str(out)))
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline, outs = time.monotonic() + timeout, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    return outs


@pytest.mark.multiproc
def test_two_emulated_machines_form_one_world_and_one_alone_fails_on_the_rendezvous(tmp_path):
    """The README's form, started on two "machines" (two launchers on this host, same head and port): one world of
    2, the gate passes. Machine rank 0 alone fails on the rendezvous in one line, exit 3, and never passes."""
    port = free_port()
    alone = _finish([_machine(port, 0, tmp_path / "alone", rdzv_s=5)], timeout=120)[0]
    assert alone[0] == 3, alone[1]
    last = alone[1].strip().splitlines()[-1]
    assert last.startswith("dpo-dist: rendezvous failed on machine rank 0: not all 2 machines joined"), alone[1]
    assert "Traceback" not in alone[1] and "PASSED" not in alone[1]

    port = free_port()
    out = tmp_path / "out"
    head = _machine(port, 0, out, rdzv_s=120)
    time.sleep(3)  # the head first: its launcher checks that the port is free
    (c0, t0), (c1, t1) = _finish([head, _machine(port, 1, out, rdzv_s=120)], timeout=420)
    assert (c0, c1) == (0, 0), t0 + "\n----\n" + t1
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and rep["world_size"] == 2
    assert "world 2" in [r for r in rep["checks"] if r["check"] == "configuration"][0]["value"]
    assert sorted(p.name for p in (out / "logs").glob("rank*.log")) == ["rank0.log", "rank1.log"]
    assert "quality gate PASSED" in t0 and "Traceback" not in t0 + t1


# -- #72/#73: a refused run touches nothing of the earlier run's ------------------------------------------------


def _earlier_run(out: Path) -> dict[str, str]:
    """A finished run's files: its report and its ranks' logs."""
    (out / "logs").mkdir(parents=True)
    files = {"report.json": '{"passed": true}', "logs/rank0.log": "A's rank 0 log\n",
             "logs/rank1.log": "A's rank 1 log\n", ".dpo-dist.lock": '{"run_id": "run-A"}'}
    for name, text in files.items():
        (out / name).write_text(text)
    return files


def _as_rank(rank: int, out: Path, *args: str) -> tuple[int, str]:
    """`dpo-dist init` as a launched rank would start (RANK set: its console writes into the output dir's logs)."""
    return run_cmd([sys.executable, "-m", "dpo_dist", "init", "--output-dir", str(out), *args],
                   {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}, timeout=120)


def test_a_refused_rerun_leaves_the_earlier_runs_logs_and_records_alone(tmp_path):
    out = tmp_path / "out"
    files = _earlier_run(out)
    for rank in (0, 1):
        code, text = _as_rank(rank, out)  # no --overwrite
        assert code == 2, text
        if rank == 0:
            assert text.strip().startswith("dpo-dist: input checks failed on rank(s) 0: output dir"), text
            assert "already holds a report from another run" in text and "--overwrite" in text
            assert len(text.strip().splitlines()) == 1
    assert {n: (out / n).read_text() for n in files} == files
    assert not list((out / "logs").glob("*.failure.json"))


def test_a_second_run_into_a_live_runs_dir_leaves_its_logs_alone(tmp_path):
    from test_run_lock import hold

    out = tmp_path / "out"
    files = _earlier_run(out)
    (out / "report.json").unlink()
    del files["report.json"], files[".dpo-dist.lock"]  # the live run holds the lock (and writes its own JSON)
    live = hold(out, "run-A")
    try:
        for rank in (0, 1):
            code, text = _as_rank(rank, out, "--overwrite")
            assert code == 2, text
            assert f"output dir {out} is in use by another run (run run-A, pid {live.pid}" in text, text
            assert len(text.strip().splitlines()) == 1
    finally:
        live.kill()
        live.wait()
    assert {n: (out / n).read_text() for n in files} == files
    assert not list((out / "logs").glob("*.failure.json"))


def test_an_output_dir_of_someone_elses_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, text = _as_rank(0, out, "--overwrite")
    assert code == 2, text
    assert "holds files that no dpo-dist run wrote (notes.txt)" in text and "choose an empty or new" in text, text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no logs/, no lock file
    r = subprocess.run(launch_argv("--port", str(free_port()), init=("--output-dir", str(out), "--overwrite")),
                       cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds files that no dpo-dist run wrote" in r.stderr, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["init", "--dry-run", "--output-dir", str(out)]) == 0  # a dry run writes nothing: not refused
