"""`dpo-dist slurm`: the sbatch script generator (a pure function), the job's verdict, and the command.

The script itself is also run here under bash with stand-ins for srun/scontrol/python, which checks what each node's
task really executes (per-node machine rank, head node, port from the job id). tests/test_slurm_cluster.py runs it on
a real SLURM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import dpo_dist_cli, heavy_imports, help_probe, run_process

from dpo_dist.config.resources import ds_config_path, launch_config_path
from dpo_dist.config.schema import load
from dpo_dist.launch.sbatch import SlurmSpec, check_spec, render_sbatch, report_stamp, verdict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "slurm" / "example-8x8.sbatch"
# The command that writes slurm/example-8x8.sbatch (the README's example): 8 nodes x 8 GPUs.
EXAMPLE_ARGS = ["slurm", "--nodes", "8", "--gpus-per-node", "8", "--sharding", "zero3", "--job-name", "dpo-8x8",
                "--time", "02:00:00", "--partition", "gpu", "--cpus-per-task", "96", "--workdir", "/shared/dpo-dist",
                "--python", "/shared/dpo-dist/.venv/bin/python", "--output-dir", "/shared/runs/dpo-8x8",
                "--set", "sharding.timeout_s=1800", "--dry-run"]


def spec(**kw) -> SlurmSpec:
    base = dict(config_file="/shared/run/job.config.yaml", report="/shared/run/report.json",
                log_dir="/shared/run/logs", workdir="/shared/code", nodes=8, procs_per_node=8,
                python="/shared/venv/bin/python")
    return SlurmSpec(**{**base, **kw})


def launch_line(text: str) -> str:
    """The srun command with its continuation lines joined."""
    return text[text.index("\nsrun "):text.index("SRUN_EXIT=")].replace("\\\n", " ")


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return dpo_dist_cli(*args, env=env, cwd=cwd)


# -- the generator ------------------------------------------------------------------------------------------------


def test_eight_by_eight_gpu_script():
    text = render_sbatch(spec(time="02:00:00", job_name="dpo-8x8", partition="gpu"))
    for line in ("#SBATCH --job-name=dpo-8x8", "#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gres=gpu:8", "#SBATCH --exclusive", "#SBATCH --time=02:00:00",
                 "#SBATCH --output=/shared/run/logs/%x-%j.out", "#SBATCH --chdir=/shared/code",
                 "#SBATCH --partition=gpu", "export PYTHON=/shared/venv/bin/python",
                 'NODES="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"   # not `| head -n 1`: SIGPIPE under '
                 'pipefail', "HEAD_NODE=\"${NODES%%$'\\n'*}\"",
                 "MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1"):
        assert line in text.splitlines(), line
    srun = launch_line(text)
    assert srun.startswith("\nsrun --kill-on-bad-exit=1 --wait=60 ")
    assert '--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1' in " ".join(srun.split())  # a task per node
    assert '--machine_rank "$SLURM_NODEID"' in srun  # expanded by each task (inside the single-quoted bash -c)
    words = " ".join(srun.split())
    for part in ("--num_processes 64 --num_machines 8", '--main_process_ip "$HEAD_NODE"',
                 '--main_process_port "$MASTER_PORT"', "--rdzv_backend c10d", "--rdzv_conf join_timeout=600",
                 "--deepspeed_multinode_launcher standard", "--max_restarts 0",
                 '--config_file "$LAUNCH_CONFIG" --deepspeed_config_file "$DS_CONFIG"',
                 "-m dpo_dist init --sharding zero3 --config /shared/run/job.config.yaml"):
        assert part in words, part
    assert "DS_ACCELERATOR" not in text  # GPU nodes: nothing of the CPU set-up


def test_the_script_never_reads_the_yaml():
    text = render_sbatch(spec())
    assert not re.search(r"\b(grep|awk|sed|yq|cut)\b", text)
    assert text.count("job.config.yaml") == 2  # the header comment and `--config`: passed on, never parsed


def test_pure_same_spec_same_text_and_nothing_touched(tmp_path):
    s = spec(config_file=str(tmp_path / "nope" / "c.yaml"), log_dir=str(tmp_path / "nope" / "logs"))
    assert render_sbatch(s) == render_sbatch(s)
    assert not (tmp_path / "nope").exists()


def test_cpu_and_single_node_variants():
    text = render_sbatch(spec(nodes=1, procs_per_node=2, cpu=True))
    assert "export DS_ACCELERATOR=cpu" in text and "export OMP_NUM_THREADS=1" in text
    assert "--gres" not in text
    words = " ".join(launch_line(text).split())
    # one node: no rendezvous across nodes, accelerate's static one on the node's own port
    assert "--num_processes 2 --num_machines 1" in words and "c10d" not in words
    assert "--main_process_ip" not in words and '--main_process_port "$MASTER_PORT"' in words


def test_options_reach_the_script():
    text = render_sbatch(spec(account="proj7", cpus_per_task=96, exclusive=False, port_base=31000, port_span=2000,
                              rdzv_timeout_s=900, kill_wait_s=30, sbatch_args=("--qos=high",),
                              env=(("NCCL_DEBUG", "WARN"),), init_args=("--smoke-steps", "1")))
    lines = text.splitlines()
    assert "#SBATCH --account=proj7" in lines and "#SBATCH --cpus-per-task=96" in lines
    assert "#SBATCH --qos=high" in lines and "#SBATCH --exclusive" not in lines
    assert "CPUS_PER_TASK=96" in lines and "MASTER_PORT=$((31000 + SLURM_JOB_ID % 2000))" in lines
    assert "export NCCL_DEBUG=WARN" in lines
    words = " ".join(launch_line(text).split())
    assert "--wait=30" in words and "join_timeout=900" in words and words.endswith("--smoke-steps 1")


def test_every_problem_reported_at_once():
    bad = spec(nodes=0, procs_per_node=0, time="2 hours", job_name="my job", log_dir="/a b", port_base=65000,
               sbatch_args=("qos=high",), env=(("1X", "y"),))
    problems = check_spec(bad)
    assert len(problems) == 8, problems
    with pytest.raises(ValueError, match="nodes must be >= 1.*time '2 hours'"):
        render_sbatch(bad)


@pytest.mark.parametrize("kw", [{}, {"nodes": 1, "cpu": True}, {"cpus_per_task": 4, "exclusive": False}])
def test_script_is_valid_bash_and_shellcheck_clean(tmp_path, kw):
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch(spec(**kw)))
    subprocess.run(["bash", "-n", str(path)], check=True)
    if not shutil.which("shellcheck"):  # a skip, not a silent pass: the lint half did not run
        pytest.skip("shellcheck is not installed: the script was checked with bash -n only")
    # SC2016: '$SLURM_NODEID' and '${rank}' are meant to reach the task and torchrun unexpanded
    out = subprocess.run(["shellcheck", "-e", "SC2016", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# -- the script, run under bash with stand-ins for SLURM ------------------------------------------------------------

FAKE_PYTHON = """#!{real}
# stands in for the nodes' python: `-c` snippets run for real; an `accelerate launch` is recorded (with the task's
# SLURM_NODEID) and rank 0 "writes" the report; FAKE_FAIL_NODE makes that node's launch fail
import json, os, sys
if sys.argv[1] == "-c":
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
node = os.environ["SLURM_NODEID"]
with open(os.environ["FAKE_DIR"] + "/calls.jsonl", "a") as f:
    f.write(json.dumps({{"node": node, "argv": sys.argv[1:]}}) + "\\n")
if os.environ.get("FAKE_FAIL_NODE") == node:
    sys.exit(3)
if node == "0":
    rep = sys.argv[sys.argv.index("--config") + 1].replace("job.config.yaml", "report.json")
    open(rep, "w").write(json.dumps({{"passed": True, "world_size": 16, "checks": []}}))
"""
FAKE_SRUN = """#!/bin/bash
# stands in for srun: records its options, then runs the command once per node as each node's task would
echo "$*" > "$FAKE_DIR/srun.args"
while [[ "$1" == -* ]]; do shift; done
rc=0
for n in 0 1; do SLURM_NODEID=$n SLURM_PROCID=$n "$@" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a07\\ngpu-a08\\n'
"""


def run_fake_job(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[dict], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", FAKE_PYTHON.format(real=sys.executable)), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    s = spec(nodes=2, config_file=str(run_dir / "job.config.yaml"), report=str(run_dir / "report.json"),
             log_dir=str(run_dir / "logs"), workdir=str(tmp_path), python=str(bin_dir / "python"))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(s))
    job_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dpo-dist", "SLURM_JOB_NODELIST": "gpu-a[07-08]",
               "SLURM_CPUS_ON_NODE": "24", "PYTHONPATH": str(ROOT), **env}
    code, stdout, stderr = run_process(["bash", str(script)], job_env, 60, split_stderr=True)
    out = subprocess.CompletedProcess(["bash", str(script)], code, stdout, stderr)
    calls_file = tmp_path / "calls.jsonl"
    calls = [json.loads(x) for x in calls_file.read_text().splitlines()] if calls_file.exists() else []
    srun_args = (tmp_path / "srun.args").read_text() if (tmp_path / "srun.args").exists() else ""
    return out, calls, srun_args


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_each_node_task_gets_its_machine_rank_and_the_job_values(tmp_path):
    out, calls, srun_args = run_fake_job(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [c["node"] for c in calls] == ["0", "1"]
    for c in calls:
        argv = c["argv"]
        assert argv[:2] == ["-m", "accelerate.commands.launch"]
        assert opt(argv, "--machine_rank") == c["node"]
        assert opt(argv, "--main_process_ip") == "gpu-a07"  # first host of the job's node list
        assert opt(argv, "--main_process_port") == str(20000 + 4242 % 10000)
        assert opt(argv, "--config_file") == str(launch_config_path("zero3"))  # resolved by the job's python
        assert opt(argv, "--deepspeed_config_file") == str(ds_config_path("zero3"))
        assert opt(argv, "--log_dir") == str(tmp_path / "run" / "logs" / "dpo-dist-4242" / f"node{c['node']}")
        assert argv[argv.index("-m", 2):] == ["-m", "dpo_dist", "init", "--sharding", "zero3", "--config",
                                              str(tmp_path / "run" / "job.config.yaml")]
    assert "--kill-on-bad-exit=1" in srun_args and "--cpus-per-task=24" in srun_args
    assert "[dpo-dist] machine rank 1 on" in out.stdout
    assert "quality gate PASSED on all 16 ranks" in out.stdout


def test_a_failing_node_fails_the_job(tmp_path):
    out, calls, _ = run_fake_job(tmp_path, FAKE_FAIL_NODE="1")
    assert out.returncode == 3
    assert "FAILED (srun exit code 3)" in out.stdout


# -- the verdict --------------------------------------------------------------------------------------------------


def write_report(path: Path, passed: bool, failed_ranks=()) -> None:
    checks = [{"check": "models loaded", "ok": True, "failed_ranks": [], "value": "", "hint": ""}]
    if not passed:
        checks.append({"check": "load", "ok": False, "failed_ranks": list(failed_ranks),
                       "value": "no config.json in /node-local/ref", "hint": ""})
    path.write_text(json.dumps({"passed": passed, "world_size": 2, "checks": checks}))


def test_verdict_passes_only_with_a_passing_report_from_this_job(tmp_path, capsys):
    rep = tmp_path / "report.json"
    before = report_stamp(rep)
    assert before == "none"
    assert verdict(str(rep), "0", before) == 1  # srun fine but no report: not a pass
    assert "no report was written in this job" in capsys.readouterr().out
    write_report(rep, True)
    assert verdict(str(rep), 0, before) == 0
    assert "quality gate PASSED on all 2 ranks" in capsys.readouterr().out
    old = report_stamp(rep)  # an older run's report, untouched by this job, is not this job's verdict
    assert verdict(str(rep), 0, old) == 1
    assert verdict(str(rep), 137, before) == 137  # a rank was killed: srun's failure stands


def test_report_stamp_matches_the_scripts_stat(tmp_path):
    rep = tmp_path / "report.json"
    write_report(rep, True)
    out = subprocess.run(["stat", "-c", "%i:%Y:%s", str(rep)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == report_stamp(rep)
    tmp = tmp_path / ".report-x.json"  # rank 0 writes a new file and renames it over the old one
    write_report(tmp, True)
    os.replace(tmp, rep)
    assert report_stamp(rep) != out.stdout.strip()


def test_verdict_names_the_failing_ranks(tmp_path, capsys):
    rep = tmp_path / "report.json"
    write_report(rep, False, failed_ranks=[1])
    assert verdict(str(rep), 1, "none") == 1
    out = capsys.readouterr().out
    assert "FAILED on rank(s) 1: load: no config.json in /node-local/ref" in out
    assert "quality gate FAILED" in out


# -- the command --------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    out = cli("slurm", "--nodes", "2", "--gpus-per-node", "4", "--output-dir", str(tmp_path / "run"), "--dry-run",
              "--set", "sharding.timeout_s=123")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2" in out.stdout and "--num_processes 8" in out.stdout
    assert "collective timeout 123 s" in out.stdout and "join_timeout=123" in out.stdout  # from the config
    assert not (tmp_path / "run").exists()


def test_writes_script_and_resolved_config_with_absolute_paths(tmp_path):
    user = tmp_path / "my_run.yaml"
    user.write_text(yaml.safe_dump({"train": {"output_dir": "runs/x", "beta": 0.2},
                                    "sharding": {"name": "zero2", "timeout_s": 300}}))
    out = cli("slurm", "--config", str(user), "--nodes", "2", "--gpus-per-node", "1", "--cpu",
              "--reference", "ckpt/ref", "--time", "10", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "x"
    script, resolved = run_dir / "dpo-dist.sbatch", run_dir / "dpo-dist.config.yaml"
    assert script.is_file() and os.access(script, os.X_OK) and (run_dir / "logs").is_dir()
    subprocess.run(["bash", "-n", str(script)], check=True)
    cfg = load(resolved)  # what every rank reads: the same config, paths made absolute against the workdir
    assert cfg.train.beta == 0.2 and cfg.sharding.name == "zero2" and cfg.sharding.timeout_s == 300
    assert cfg.train.output_dir == str(run_dir) and cfg.reference.path == str(tmp_path / "ckpt" / "ref")
    assert cfg.model.path == "default" and cfg.data.train == "default"
    text = script.read_text()
    assert f"--config {resolved}" in " ".join(launch_line(text).split())
    assert "--sharding zero2" in text and f"#SBATCH --chdir={tmp_path}" in text
    assert "#SBATCH --time=10" in text and "export DS_ACCELERATOR=cpu" in text


def test_invalid_config_is_refused_in_one_line(tmp_path):
    out = cli("slurm", "--set", "verify.bogus=1", "--dry-run")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "unknown key 'verify.bogus'" in out.stderr


def test_bad_slurm_options_are_refused(tmp_path):
    out = cli("slurm", "--nodes", "0", "--time", "soon", "--dry-run", "--output-dir", str(tmp_path))
    assert out.returncode == 2
    assert "nodes must be >= 1" in out.stderr and "time 'soon'" in out.stderr


def test_submit_without_sbatch_says_so(tmp_path):
    out = cli("slurm", "--cpu", "--output-dir", str(tmp_path / "run"), "--submit", env={"PATH": "/nonexistent"})
    assert out.returncode == 127 and "sbatch not found" in out.stderr


def test_help_is_fast_and_imports_nothing_heavy():
    code = help_probe(["slurm", "--help"]) + "import dpo_dist.launch.sbatch\n" + \
        "assert '--gpus-per-node' in buf.getvalue() and '--submit' in buf.getvalue(), buf.getvalue()\n"
    t0 = time.time()
    assert heavy_imports(code) == []
    assert time.time() - t0 < 5


# -- the checked-in example (the README's) ------------------------------------------------------------------------


def test_example_8x8_script_is_what_the_command_writes():
    out = cli(*EXAMPLE_ARGS)
    assert out.returncode == 0, out.stderr
    assert EXAMPLE.read_text() == out.stdout, (
        "slurm/example-8x8.sbatch is stale: regenerate it with\n  python -m dpo_dist " + " ".join(EXAMPLE_ARGS)
        + " > slurm/example-8x8.sbatch\nand paste it into docs/slurm.md")


def test_readme_section_shows_the_example():
    doc = (ROOT / "docs" / "slurm.md").read_text()
    assert EXAMPLE.read_text() in doc
    assert "dpo-dist slurm" in doc and "sbatch" in doc



def test_script_never_replaces_a_file_it_did_not_write(tmp_path):
    """Issue 21 #22: --script pointing at someone's file (or beside their <name>.config.yaml) is refused unless
    --force; regenerating our own script replaces it."""
    victim = tmp_path / "victim.yaml"
    victim.write_text("train: {beta: 0.1}\n")
    args = ("slurm", "--cpu", "--nodes", "1", "--gpus-per-node", "2", "--output-dir", str(tmp_path / "out"))
    out = cli(*args, "--script", str(victim))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"{victim} already exist(s) and were not written by `dpo-dist slurm`" in out.stderr
    assert "--force" in out.stderr and victim.read_text() == "train: {beta: 0.1}\n"
    assert not (tmp_path / "victim.config.yaml").exists()
    side = tmp_path / "job.config.yaml"
    side.write_text("mine\n")
    out = cli(*args, "--script", str(tmp_path / "job.sh"))
    assert out.returncode == 2 and str(side) in out.stderr and side.read_text() == "mine\n"
    assert not (tmp_path / "job.sh").exists()
    side.unlink()
    for _ in range(2):  # ours the second time: regenerated without --force
        out = cli(*args, "--script", str(tmp_path / "job.sh"))
        assert out.returncode == 0, out.stderr
    assert cli(*args, "--script", str(victim), "--force").returncode == 0
    assert victim.read_text().startswith("#!/bin/bash\n")
