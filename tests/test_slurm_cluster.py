"""`dpo-dist slurm` on a real SLURM: Debian's slurmctld + 2 slurmd + munged, started on this machine for the session.

slurm/cluster.sh installs the packages when missing and starts the daemons under a temporary folder; each node's
slurmd has its own host name (node1, node2), loopback address and node-local folder, so the two "nodes" are different
hosts to the ranks. Every job runs the full init path (ZeRO-3, reference placement zero3, embedded checkpoint) via
`sbatch --wait`, under a hard timeout that cancels it. The cluster is stopped at the end of the session (also when a
test fails) and the last test checks that no daemon or rank is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / "slurm" / "cluster.sh"
JOB_TIMEOUT = 240  # seconds: a job past this is cancelled and the test fails (the job's own --time is 4 minutes)

pytestmark = pytest.mark.multiproc


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_ports(n: int, lo: int, hi: int) -> int:
    """The first of `n` consecutive free ports in [lo, hi) (random start, so sessions rarely collide)."""
    import random

    for _ in range(200):
        p = random.randrange(lo, hi - n)
        if all(_port_free(p + i) for i in range(n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports in {lo}..{hi}")


def _alive(pid: int) -> bool:
    """A live process; a zombie (exited, waiting for this machine's init to reap it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids_in_uts(ns: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "ns" / "uts") == ns and _alive(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def _pids_with_arg(text: str) -> list[int]:
    """Live processes whose command line holds `text` (a path unique to one test's job)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().decode(errors="replace") and _alive(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


class Cluster:
    def __init__(self, root: Path, ctld_port: int, job_port_base: int):
        self.root = root
        self.ctld_port = ctld_port
        self.job_port_base = job_port_base
        self.daemons: list[int] = []
        self.namespaces: set[str] = set()
        self.stopped = False

    def env(self, **extra: str) -> dict[str, str]:
        """The submitting environment: no outer SLURM's variables, no leftover fault injection."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DPO_DIST_TEST_FAULT"}
        env.update(SLURM_CONF=str(self.root / "slurm.conf"), CLUSTER_CTLD_PORT=str(self.ctld_port),
                   CLUSTER_NODE_PORT=str(self.ctld_port + 1), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def sh(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env(), start_new_session=True)

    def record_daemons(self) -> None:
        for f in (self.root / "run").glob("*.spawned"):
            pid = int(f.read_text())
            self.daemons.append(pid)
            try:
                self.namespaces.add(os.readlink(f"/proc/{pid}/ns/uts"))
            except OSError:
                pass
        self.namespaces.discard(os.readlink("/proc/self/ns/uts"))

    def left_behind(self) -> list[int]:
        """Our daemons, or any process in our nodes' namespaces (a job step, a rank), still alive."""
        return sorted({p for p in self.daemons if _alive(p)} | {p for ns in self.namespaces for p in _pids_in_uts(ns)})

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            out = self.sh("stop", str(self.root), timeout=90)
            assert out.returncode == 0, out.stdout + out.stderr
        finally:
            for pid in self.left_behind():  # cluster.sh failed or timed out: by pid, as a last resort
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        left = self.left_behind()
        assert not left, f"still alive after stopping the cluster: {left}"
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(request) -> Cluster:
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    root = Path(tempfile.mkdtemp(prefix="dpo-dist-slurm-"))  # under /tmp: munged must reach its socket folder
    cluster = Cluster(root, ctld_port=_free_ports(3, 16000, 19000), job_port_base=_free_ports(40, 21000, 29000))
    request.addfinalizer(cluster.stop)  # before starting: a half-started cluster is stopped too
    t0 = time.time()
    try:
        out = cluster.sh("start", str(root), "2", timeout=600)  # includes apt-get on a fresh machine
    except subprocess.TimeoutExpired as e:
        cluster.record_daemons()
        pytest.fail(f"starting SLURM timed out:\n{e.stdout}\n{e.stderr}")
    cluster.record_daemons()
    if out.returncode != 0:
        pytest.fail(f"could not start the test SLURM cluster (slurm/cluster.sh start):\n{out.stdout}\n{out.stderr}")
    print(f"\n[slurm] cluster up in {time.time() - t0:.1f} s under {root}")
    return cluster


@dataclass
class Job:
    returncode: int
    job_id: str
    log: str  # the job's log: every rank
    seconds: float
    marker_seconds: float | None  # when `marker` first appeared in the log, seconds after submission
    report: dict | None


def marker_seen(out_dir: Path, job_log: Path | None, marker: str) -> bool:
    """In the job's log, or in a rank's own log (other ranks than 0 write only there: one voice)."""
    logs = [job_log] if job_log is not None else []
    logs += sorted((out_dir / "logs").glob("rank*.log"))
    for path in logs:
        try:
            if marker in path.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def run_job(cluster: Cluster, argv: list[str], out_dir: Path, job_name: str = "dpo-dist", marker: str | None = None,
            **env: str) -> Job:
    """Run a submitting command (`sbatch --wait ...` or `dpo-dist slurm ... --submit --wait`); follow the job's log;
    past JOB_TIMEOUT cancel every job and fail."""
    console = out_dir / "submit.out"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(console, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=cluster.env(**env), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    job_id, log_path, seen = "", None, None
    while proc.poll() is None:
        if not job_id:
            m = re.search(r"Submitted batch job (\d+)", console.read_text())
            if m:
                job_id = m.group(1)
                log_path = out_dir / "logs" / f"{job_name}-{job_id}.out"
        if marker and seen is None and marker_seen(out_dir, log_path, marker):
            seen = time.time() - t0
        if time.time() - t0 > JOB_TIMEOUT:
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
            subprocess.run(["scancel", "--full", "--signal=KILL", f"--user={user}"], env=cluster.env(), timeout=10)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            tail = log_path.read_text()[-4000:] if log_path and log_path.exists() else console.read_text()
            pytest.fail(f"job {job_id} still running after {JOB_TIMEOUT} s (cancelled):\n{tail}")
        time.sleep(0.2)
    seconds = time.time() - t0
    text = console.read_text()
    m = re.search(r"Submitted batch job (\d+)", text)
    assert m, f"sbatch did not submit:\n{text}"
    job_id = m.group(1)
    log = (out_dir / "logs" / f"{job_name}-{job_id}.out").read_text()
    if marker and seen is None and marker_seen(out_dir, None, marker):
        seen = seconds
    rep = out_dir / "report.json"
    report = json.loads(rep.read_text()) if rep.exists() else None
    print(f"\n[slurm] job {job_id}: exit {proc.returncode} after {seconds:.1f} s")
    return Job(proc.returncode, job_id, log, seconds, seen, report)


def generate(cluster: Cluster, out_dir: Path, nodes: int, procs: int, *extra: str) -> Path:
    """`dpo-dist slurm` for this cluster's CPU nodes; returns the script."""
    argv = [sys.executable, "-m", "dpo_dist", "slurm", "--cpu", "--nodes", str(nodes), "--gpus-per-node", str(procs),
            "--sharding", "zero3", "--placement", "zero3", "--output-dir", str(out_dir), "--time", "4",
            "--port-base", str(cluster.job_port_base), "--set", "sharding.timeout_s=60", *extra]
    out = subprocess.run(argv, cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out_dir / "dpo-dist.sbatch"


def no_rank_left(out_dir: Path) -> list[int]:
    """Processes of this job still alive a few seconds after it ended (its config path is on their command line)."""
    end = time.time() + 5
    while (left := _pids_with_arg(str(out_dir / "dpo-dist.config.yaml"))) and time.time() < end:
        time.sleep(0.2)
    return left


def single_process_fingerprints() -> dict[str, str]:
    from safetensors.torch import load_file

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT
    from dpo_dist.verify.fingerprint import fingerprint_hex, fingerprint_tensor

    tensors = load_file(str(DEFAULT_CHECKPOINT / "model.safetensors"))
    return {name: fingerprint_hex(fingerprint_tensor(t)) for name, t in tensors.items()}


def assert_passing_report(job: Job) -> None:
    assert job.returncode == 0, job.log[-6000:]
    rep = job.report
    assert rep is not None and rep["passed"] is True
    assert rep["world_size"] == 2
    assert all(r["ok"] and not r["failed_ranks"] for r in rep["checks"])  # every check ran and passed on both ranks
    facts = rep["facts"]
    assert facts["zero_stage"] == 3 and facts["placement"] == "zero3" and facts["partitioned"] is True
    for name in ("weights: policy == reference", "weights: policy == checkpoint files", "initial KL < limit",
                 "trainer reference is a prepared engine"):
        assert any(r["check"] == name for r in rep["checks"]), name
    # the all-reduced fingerprints of both ranks' shards == the files' == one process over the whole tensors
    fps = facts["fingerprints"]
    single = single_process_fingerprints()
    assert fps["policy"] == fps["reference"] == fps["files"] == single
    # each rank holds about half of the policy: partitioned across the ranks, never a full copy
    full = sum(int(v) for k, v in rep["per_rank_facts"]["0"].items() if k.endswith("_policy_bytes")) + sum(
        int(v) for k, v in rep["per_rank_facts"]["1"].items() if k.endswith("_policy_bytes"))
    for r in ("0", "1"):
        held = [int(v) for k, v in rep["per_rank_facts"][r].items() if k.endswith("_policy_bytes")]
        assert held and held[0] < 0.75 * full
    assert "quality gate PASSED on all 2 ranks" in job.log


def test_two_nodes_one_process_each(slurm_cluster, tmp_path):
    """`dpo-dist slurm --submit --wait`: 2 nodes x 1 process, c10d rendezvous on node1, ranks on different hosts."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dpo_dist", "slurm", "--cpu", "--nodes", "2", "--gpus-per-node", "1",
            "--output-dir", str(out), "--time", "4", "--port-base", str(slurm_cluster.job_port_base),
            "--set", "sharding.timeout_s=60", "--submit", "--wait"]
    job = run_job(slurm_cluster, argv, out)
    assert_passing_report(job)
    assert "0: [dpo-dist] machine rank 0 on node1" in job.log
    assert "1: [dpo-dist] machine rank 1 on node2" in job.log
    # one voice: rank 0 speaks in the job log, rank 1 only in its own log
    assert re.search(r"^0: \[rank0\]: ", job.log, re.M) and not re.search(r"^1: \[rank1\]: ", job.log, re.M)
    assert (out / "logs" / "rank1.log").stat().st_size > 0  # rank 1's full output, there
    assert "rendezvous node1:" in job.log
    # each rank's own files too
    ranks_dir = out / "logs" / f"dpo-dist-{job.job_id}"
    files = list(ranks_dir.glob("node*/*/attempt_0/*/stdout.log"))
    assert {f.relative_to(ranks_dir).parts[0] for f in files} == {"node0", "node1"}
    assert not no_rank_left(out)


def test_one_node_two_processes(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    script = generate(slurm_cluster, out, 1, 2)
    job = run_job(slurm_cluster, ["sbatch", "--wait", str(script)], out)
    assert_passing_report(job)
    assert "0: [dpo-dist] machine rank 0 on node1" in job.log and "machine rank 1" not in job.log
    assert re.search(r"^0: \[rank0\]: ", job.log, re.M) and not re.search(r"^0: \[rank1\]: ", job.log, re.M)
    assert (out / "logs" / "rank1.log").stat().st_size > 0  # rank 1's full output, there
    assert not no_rank_left(out)


def test_gate_then_train_job(slurm_cluster, tmp_path):
    """`dpo-dist slurm --train`: 2 nodes x 1 process gate, then train 2 steps in the same job; the trained policy in
    <output_dir>/final and the job's last line saying both parts passed (exit 0; training's failure would be 5)."""
    out = tmp_path / "run"
    script = generate(slurm_cluster, out, 2, 1, "--train", "--set", "verify.generation=false",
                      "--set", "train.max_steps=2", "--set", "train.save_steps=2",
                      "--set", "train.per_device_train_batch_size=2", "--set", "train.gradient_accumulation_steps=1")
    assert " --train" in script.read_text()
    job = run_job(slurm_cluster, ["sbatch", "--wait", str(script)], out)
    assert job.returncode == 0, job.log[-6000:]
    assert job.report["passed"] is True and job.report["training"]["steps"] == 2
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert "quality gate PASSED, training done (2 steps)" in job.log.strip().splitlines()[-1]
    assert not no_rank_left(out)


def test_a_crashed_rank_ends_the_job_and_is_named(slurm_cluster, tmp_path):
    """Rank 1 (on node2) dies abruptly at the start of stage 'load': srun --kill-on-bad-exit ends node1's task."""
    out = tmp_path / "run"
    script = generate(slurm_cluster, out, 2, 1)
    job = run_job(slurm_cluster, ["sbatch", "--wait", str(script)], out, marker="injected crash",
                  DPO_DIST_TEST_FAULT="load:1:exit")
    assert job.returncode != 0
    assert "[dpo-dist] rank 1: injected crash at stage 'load'" in (out / "logs" / "rank1.log").read_text()
    # the job log ends on our line naming the rank that vanished, not the one that noticed
    assert job.log.strip().splitlines()[-1].startswith("dpo-dist: load failed on rank(s) 1: ended without a word"), \
        job.log[-2000:]
    root_cause = job.log[job.log.index("Root Cause"):]
    assert re.search(r"host\s*: node2", root_cause) and re.search(r"rank\s*: 1 \(local_rank: 0\)", root_cause)
    assert re.search(r"exitcode\s*: 17", root_cause)
    # srun names node2's task either as the first to fail, or as terminated after node1's rank 0 saw its peer's
    # connection close and failed first (both orders happen; torchrun's root cause above names the crash either way)
    assert re.search(r"srun: error: node2: task 1: (Exited with exit code 1|Terminated)", job.log), job.log[-3000:]
    assert "FAILED (srun exit code" in job.log
    assert job.marker_seconds is not None
    ended_after = job.seconds - job.marker_seconds
    print(f"[slurm] the job ended {ended_after:.1f} s after the crash")
    assert ended_after < 60
    assert not no_rank_left(out)


def assert_rank1_failed_by_name(job: Job, path: Path) -> None:
    """The job failed fast and says that rank 1 (on node2) failed over `path`: either the gate ran and rank 0's
    report names rank 1, or rank 1 refused its input before the ranks met, and its error and torchrun name it."""
    assert job.returncode != 0
    assert job.seconds < 60, f"the job took {job.seconds:.0f} s"
    if job.report is not None:
        assert job.report["passed"] is False
        failed = [r for r in job.report["checks"] if not r["ok"]]
        assert failed and all(r["failed_ranks"] == [1] for r in failed), failed
        assert any(str(path) in r["value"] for r in failed)
        assert re.search(rf"\[dpo-dist\] FAILED on rank\(s\) 1: .*{re.escape(str(path))}", job.log)
    else:
        assert re.search(rf"^1: \[rank1\]: dpo-dist: .*{re.escape(str(path))}", job.log, re.M), job.log[-3000:]
        root_cause = job.log[job.log.index("Root Cause"):]
        assert re.search(r"host\s*: node2", root_cause) and re.search(r"rank\s*: 1 \(local_rank: 0\)", root_cause)


def test_a_file_on_one_node_only_fails_that_rank_by_name(slurm_cluster, tmp_path):
    """sharding.ds_config in a node-local folder that only node1 holds: rank 1 fails, every rank stops, the job fails
    naming rank 1."""
    (slurm_cluster.root / "nodes" / "node1" / "ds-zero3.json").write_text(
        (ROOT / "ds_configs" / "zero3.json").read_text())
    local = slurm_cluster.root / "node-local" / "ds-zero3.json"
    out = tmp_path / "run"
    script = generate(slurm_cluster, out, 2, 1, "--set", f"sharding.ds_config={local}")
    job = run_job(slurm_cluster, ["sbatch", "--wait", str(script)], out)
    assert_rank1_failed_by_name(job, local)
    assert not no_rank_left(out)


def test_a_reference_on_one_node_only_fails_that_rank_by_name(slurm_cluster, tmp_path):
    """reference.path in a node-local folder that only node1 holds."""
    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    shutil.copytree(DEFAULT_CHECKPOINT, slurm_cluster.root / "nodes" / "node1" / "ref")
    ref = slurm_cluster.root / "node-local" / "ref"
    out = tmp_path / "run"
    script = generate(slurm_cluster, out, 2, 1, "--reference", str(ref))
    job = run_job(slurm_cluster, ["sbatch", "--wait", str(script)], out)
    assert_rank1_failed_by_name(job, ref)
    assert not no_rank_left(out)


def test_cluster_stops_leaving_no_daemon(slurm_cluster):
    """Last: the session's teardown, checked (it runs again, as a no-op, when the session ends)."""
    assert slurm_cluster.daemons and all(_alive(p) for p in slurm_cluster.daemons)
    assert len(slurm_cluster.namespaces) == 3  # slurmctld's and the two nodes'
    t0 = time.time()
    slurm_cluster.stop()
    print(f"\n[slurm] cluster stopped in {time.time() - t0:.1f} s")
    assert not slurm_cluster.left_behind()
    assert not slurm_cluster.root.exists()
