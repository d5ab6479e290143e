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
from conftest import ROOT, free_port, kill_tree, launch_init, run_cmd

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


# -- #77: a wait outside any collective has a deadline ----------------------------------------------------------


@pytest.mark.multiproc
def test_a_stopped_local_main_during_tokenization_ends_the_wait_naming_it(tmp_path, monkeypatch):
    """Rank 0 (this node's first rank, which tokenizes for the node) is stopped as the trainer stage starts; rank 1
    waits for its done-file. It no longer waits forever: once rank 0's beat stood still for sharding.timeout_s, the
    run ends on one line naming rank 0."""
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "trainer:0:stop")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hfcache"))  # nothing tokenized yet: rank 0 must do it
    t0 = time.monotonic()
    res = launch_init(tmp_path / "out", "--set", "sharding.timeout_s=10", "--set", "verify.generation=false",
                      timeout=300)
    assert res.returncode == 1 and res.report is None, res.output
    assert "rank 0: injected stop at stage 'trainer'" in res.output
    last = res.terminal.strip().splitlines()[-1]
    assert last.startswith("dpo-dist: trainer failed on rank(s) 0: rank 0 did not answer within "
                           "sharding.timeout_s (10 s) while tokenizing the train dataset"), res.terminal
    assert "stopped or its node hung" in last and "out of memory" not in last
    assert time.monotonic() - t0 < 240


# -- #75: Ctrl-C ends on one line, exit 130 -----------------------------------------------------------------------


@pytest.mark.multiproc
def test_ctrl_c_during_a_launch_ends_on_one_line_with_exit_130(tmp_path):
    import signal

    def as_a_terminal():  # Ctrl-C deliverable as in a user's shell, whatever the test runner's worker inherited
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    argv = launch_argv("--port", str(free_port()), init=("--output-dir", str(tmp_path / "out")))
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=as_a_terminal)
    seen = []
    try:
        for ln in proc.stdout:  # the first stage done: the ranks are running
            seen.append(ln)
            if ln.rstrip().endswith(" ok"):
                break
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=90)
    finally:
        kill_tree(proc.pid)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text
    assert time.monotonic() - t0 < 60
    assert text.strip().splitlines()[-1].startswith("dpo-dist: interrupted (Ctrl-C): every rank was stopped"), text
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest and "Logging error" not in rest, rest


# -- #9/#10/#19: one line, not a traceback or a hang ------------------------------------------------------------


def test_yaml_with_a_control_character_or_an_alias_bomb_is_one_line(tmp_path):
    ctrl = tmp_path / "ctrl.yaml"
    ctrl.write_bytes(b"model:\n  path: default\n\x07train:\n  beta: 0.1\n")
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    extra = tmp_path / "extra.yaml"  # the same under train.extra, which is free-form (walked for nan/inf)
    extra.write_text("train:\n  extra:\n" + "".join(f"    {ln}\n" for ln in lines))
    for path, needle in ((ctrl, "special characters are not allowed #x0007 on line 3"),
                         (bomb, "expands to 490,329,064 values through aliases"),
                         (extra, "values through aliases")):
        t0 = time.monotonic()
        code, text = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--dry-run", "--config", str(path)], ENV,
                             timeout=60)
        assert code == 2 and len(text.strip().splitlines()) == 1 and needle in text, text
        assert "Traceback" not in text and time.monotonic() - t0 < 30


def test_plan_plot_to_a_format_matplotlib_cannot_write_is_refused_first(tmp_path):
    code, text = run_cmd([sys.executable, "-m", "dpo_dist", "plan", "--plot", str(tmp_path / "plan.txt")], ENV,
                         timeout=120)
    assert code == 2, text
    assert len(text.strip().splitlines()) == 1 and "'txt' is not an image format matplotlib writes" in text, text
    assert ".png" in text and not (tmp_path / "plan.txt").exists()


# -- #61/#62: the sharding reaches accelerate, and the hint names a command that works ---------------------------


def test_launch_hands_accelerate_the_runs_own_deepspeed_config(tmp_path):
    def dry(*init: str) -> str:
        r = subprocess.run(launch_argv("--dry-run", init=init), cwd=ROOT, env={**os.environ, **ENV},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = dry("--sharding", "zero2")  # after --, where every other init flag goes
    assert "launch/zero2.yaml" in out and "ds_configs/zero2.json" in out and "zero3" not in out, out
    stage1 = tmp_path / "stage1.json"
    stage1.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}))
    out = dry("--set", f"sharding.ds_config={stage1}")
    assert f"--deepspeed_config_file {stage1}" in out and "launch/zero2.yaml" in out, out


def test_a_stage_conflict_names_a_fix_that_exists(monkeypatch):
    from dpo_dist.config.resources import RESOURCES, launch_stage_conflict

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero3.json")
    text = launch_stage_conflict({"zero_optimization": {"stage": 1}}, "/data/my_ds.json")
    assert "asks for ZeRO-1" in text and "zero1.yaml" not in text, text
    assert "`dpo-dist launch`" in text and "--deepspeed_config_file /data/my_ds.json" in text
    for name in ("zero2", "zero3", "zero3_offload"):  # every fix it could name ships
        assert (RESOURCES / "launch" / f"{name}.yaml").is_file()


# -- #93: a checkpoint this run started saving but never finished -----------------------------------------------


def test_a_half_written_checkpoint_of_this_run_is_named_an_interrupted_save(tmp_path):
    from dpo_dist.verify import lineage
    from dpo_dist.verify.manifest import write_manifest

    fp = {"a": "01" * 16}
    ident = lineage.new_identity(fp, fp)
    write_manifest(tmp_path, checkpoint="default", placement="zero3", tokenizer="t", fingerprints=fp, config={},
                   lineage=ident, run_id=ident["run_id"])
    ckpt = tmp_path / "checkpoint-2"  # weights and config, then the process was killed: no optimizer, no marker
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text("{}")
    problems = lineage.check_checkpoint(ckpt, ident, fp)
    assert problems == [f"{ckpt} was saved by this run but the save did not finish (it lacks optimizer state and "
                        f"trainer_state.json and the {lineage.MARKER} written last): the run was stopped while "
                        "saving; resume from the checkpoint-N before it"], problems
    other = lineage.new_identity({"a": "ff" * 16}, fp)  # another run's output dir: the old words hold
    assert "not saved by a dpo-dist run" in lineage.check_checkpoint(ckpt, other, fp)[0]


def test_sync_ref_model_with_smoke_steps_names_the_option(tmp_path, capsys, monkeypatch):
    """Issue 21 #79: TR-DPO's reference sync is the user's choice; the smoke steps' 'reference frozen' row would blame
    the reference for it. Refused before anything loads, naming the option."""
    monkeypatch.delenv("RANK", raising=False)
    code = main(["init", "--output-dir", str(tmp_path / "out"), "--smoke-steps", "2",
                 "--set", "train.extra.sync_ref_model=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "train.extra.sync_ref_model=true (TR-DPO)" in err and "--smoke-steps 0" in err


@pytest.mark.multiproc
def test_sigterm_to_the_launcher_stops_every_rank_and_ends_on_one_line(tmp_path):
    """Beyond the list: `kill <launcher>` (a scheduler's cancel) ended the launcher alone; the ranks ran on into the
    output dir. Now it is passed on, every rank stops, and the last line says so (exit 143)."""
    import signal

    out = tmp_path / "out"
    argv = launch_argv("--port", str(free_port()), init=("--output-dir", str(out)))
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for ln in proc.stdout:
            seen.append(ln)
            if ln.rstrip().endswith(" ok"):
                break
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only, not its group
        rest, _ = proc.communicate(timeout=90)
    finally:
        kill_tree(proc.pid)
    text = "".join(seen) + rest
    assert proc.returncode == 143, text
    assert text.strip().splitlines()[-1].startswith("dpo-dist: terminated (SIGTERM): every rank was stopped"), text
    time.sleep(2)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, str(out))]
    assert not left, left


def _cmdline_has(pid: str, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
