"""Shared helpers: real multi-process launches on CPU, each in its own process group with a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpo_dist.runtime.distributed import free_port  # noqa: F401 - the tests' launches take their ports from here
from dpo_dist.runtime.process_tree import descendants, kill_tree  # noqa: F401 - tests import them from here

ROOT = Path(__file__).resolve().parents[1]

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_CUDA = False


# Test files that hold many launches, slowest first (measured with --durations on this 2-core machine). launch/test.sh
# runs the suite on 2 pytest-xdist workers, a file at a time each (--dist loadfile, shared module fixtures stay
# shared): starting the longest files first keeps one worker from being left with a long file at the end. Order only
# changes the wall time, never a result; a file not listed runs after these, in collection order.
LONGEST_FIRST = ("test_fsdp2.py", "test_fsdp2_train.py", "test_fsdp2_placements.py", "test_placements.py",
                 "test_placements_ranks.py",
                 "test_train.py", "test_deep_numerics.py", "test_faults.py", "test_kl_monitor.py",
                 "test_adversary_launch.py", "test_slurm_cluster.py", "test_adversary_checks.py",
                 "test_init_multiproc.py", "test_liveness.py", "test_silent_passes.py", "test_deep_numerics_matrix.py")


def _longest_first(item) -> int:
    name = Path(str(item.fspath)).name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_longest_first)  # stable: a file's own tests keep their order
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: select with -m slow")
    slow_selected = "slow" in (config.getoption("-m") or "")
    for item in items:
        # markers, not keywords: a keyword is also any folder name on the test's path (a checkout in .../gpu/ would
        # skip every test)
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("slow") and not slow_selected:
            item.add_marker(skip_slow)


@dataclass
class LaunchResult:
    returncode: int
    output: str  # what the terminal showed, then every rank's full log (<output_dir>/logs/rank<r>.log)
    report: dict | None
    terminal: str = ""  # what the terminal showed only


def run_process(argv: list[str], env_extra: dict[str, str], timeout: float, cwd: Path = ROOT,
                split_stderr: bool = False) -> tuple[int, str, str]:
    """Run in a new session; on timeout kill the whole process tree (no stray ranks survive a test). Returns (exit
    code, stdout, stderr); stderr is "" unless split_stderr (then it is not folded into stdout)."""
    env = {**os.environ, **env_extra}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            out, err = "(no output: a process kept the pipe open)", ""
        raise AssertionError(f"timed out after {timeout}s:\n{out[-4000:]}\n{(err or '')[-3000:]}") from None
    return proc.returncode, out, err or ""


def run_cmd(argv: list[str], env_extra: dict[str, str], timeout: float, cwd: Path = ROOT) -> tuple[int, str]:
    """Run with stderr folded into stdout: (exit code, output)."""
    code, out, _ = run_process(argv, env_extra, timeout, cwd)
    return code, out


def launch_init(output_dir: Path, *init_args: str, sharding: str = "zero3", nproc: int = 2,
                timeout: float = 300) -> LaunchResult:
    """`dpo-dist launch --cpu` exactly as a user runs it, on a free port."""
    argv = [sys.executable, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", str(nproc), "--sharding", sharding,
            "--port", str(free_port()), "--", "--output-dir", str(output_dir), *init_args]
    code, out = run_cmd(argv, {"PYTHONUNBUFFERED": "1"}, timeout)
    rep_path = output_dir / "report.json"
    report = json.loads(rep_path.read_text()) if rep_path.exists() else None
    logs = "".join(f"\n==> {p} <==\n{p.read_text(errors='replace')}" for p in
                   sorted((output_dir / "logs").glob("rank*.log")))
    return LaunchResult(code, out + logs, report, out)


def check_row(report: dict, name: str) -> dict:
    rows = [r for r in report["checks"] if r["check"] == name]
    assert rows, f"no check named {name!r} in {[r['check'] for r in report['checks']]}"
    return rows[0]


@pytest.fixture(scope="session")
def deep_checkpoint() -> Path:
    """A 24-layer Llama trained briefly on the embedded data (tests/deep_checkpoint.py), built once per cache."""
    from deep_checkpoint import cached

    return cached()


@pytest.fixture(scope="session")
def deep_checkpoint_other(deep_checkpoint) -> Path:
    """The deep checkpoint trained a few steps more: same config and tokenizer, other weights."""
    from deep_checkpoint import cached

    return cached("other", extra_steps=5)


# -- launches shared across tests (issue 24) ---------------------------------------------------------------------
# A launch costs 10-20 s on a 2-core machine. A test that only reads a run's result takes it from `launched(...)`:
# one launch per distinct set of arguments per session. Launch yourself when the test changes the run or its files.


@dataclass
class SharedLaunch(LaunchResult):
    stdout: str = ""  # the terminal's stdout and stderr apart (`terminal` folds them in order of arrival)
    stderr: str = ""
    output_dir: Path = ROOT


_LAUNCHED: dict[tuple, SharedLaunch] = {}
# The passing 2-rank zero3 run on the embedded checkpoint, as README command 1 runs it (launch/demo.sh, which writes
# runs/demo), with two smoke steps (the placement tests compare the first two losses).
PASSING_ZERO3 = ("--smoke-steps", "2")


def _shared_launch_dir() -> Path | None:
    """Under pytest-xdist (launch/test.sh runs the suite on 2 workers) the workers of one test run share one folder,
    so a launch several test files read is made once per run, not once per worker; None in a plain pytest run."""
    import tempfile

    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not uid:
        return None
    d = Path(tempfile.gettempdir()) / f"dpo-dist-launched-{uid}"
    d.mkdir(exist_ok=True)
    return d


def launched(*init_args: str, demo: bool = False, sharding: str = "zero3", nproc: int = 2,
             timeout: float = 600) -> SharedLaunch:
    """The result of `dpo-dist launch --cpu` with these init arguments, launched once per test run (across xdist
    workers too: the first worker to ask launches under a file lock, the others wait and read its result). The output
    dir exists before the launch and holds an earlier run's failed report (so the launcher holds the dir's lock, and
    `--overwrite` has something to replace). demo=True runs `bash launch/demo.sh` (README command 1; output runs/demo)
    instead of `dpo-dist launch`. Treat the result and its output dir as read-only: other tests share them."""
    import dataclasses
    import fcntl
    import hashlib

    key = (tuple(init_args), demo, sharding, nproc)
    if key in _LAUNCHED:
        return _LAUNCHED[key]
    shared = _shared_launch_dir()
    if shared is None:
        _LAUNCHED[key] = _launch_shared(key, None, timeout)
        return _LAUNCHED[key]
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"{name}.json"
        if done.exists():
            fields = json.loads(done.read_text())
            result = SharedLaunch(**{**fields, "output_dir": Path(fields["output_dir"])})
        else:
            result = _launch_shared(key, shared / name, timeout)
            done.write_text(json.dumps({**dataclasses.asdict(result), "output_dir": str(result.output_dir)}))
    _LAUNCHED[key] = result
    return result


def _launch_shared(key: tuple, folder: Path | None, timeout: float) -> SharedLaunch:
    import shutil
    import tempfile

    init_args, demo, sharding, nproc = key
    if demo:
        out = ROOT / "runs" / "demo"
    else:
        out = (folder or Path(tempfile.mkdtemp(prefix="dpo-dist-launched-"))) / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "report.json").write_text('{"passed": false}')  # an earlier run's, replaced under --overwrite
    port = str(free_port())
    if demo:  # demo.sh passes --overwrite itself; sharding and processes are the script's (zero3, 2)
        argv = ["bash", "launch/demo.sh", *init_args]
    else:
        argv = [sys.executable, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", str(nproc), "--sharding",
                sharding, "--port", port, "--", "--output-dir", str(out), "--overwrite", *init_args]
    code, stdout, stderr = run_process(argv, {"PYTHONUNBUFFERED": "1", "PORT": port}, timeout, split_stderr=True)
    rep_path = out / "report.json"
    report = json.loads(rep_path.read_text()) if rep_path.exists() else None
    logs = "".join(f"\n==> {p} <==\n{p.read_text(errors='replace')}" for p in sorted((out / "logs").glob("rank*.log")))
    return SharedLaunch(code, stdout + stderr + logs, report, stdout + stderr, stdout, stderr, out)


def passing_zero3_run() -> SharedLaunch:
    """README command 1's run (2 ranks, ZeRO-3, reference zero3, embedded checkpoint and data), shared."""
    return launched(*PASSING_ZERO3, demo=True)


def edited_checkpoint(tmp: Path, name: str = "edited", tensors: dict | None = None, config: dict | None = None,
                      src: Path | None = None) -> Path:
    """A copy of a checkpoint (default: the embedded one) under tmp/name with some tensors and config.json keys
    changed: tensors maps a tensor name to a function of the tensor, config a key to its new value."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    dest = tmp / name
    shutil.copytree(src or DEFAULT_CHECKPOINT, dest)
    if tensors:
        weights = load_file(str(dest / "model.safetensors"))
        for key, edit in tensors.items():
            weights[key] = edit(weights[key].clone())
        save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if config:
        conf = json.loads((dest / "config.json").read_text())
        conf.update(config)
        (dest / "config.json").write_text(json.dumps(conf))
    return dest


HEAVY = ("torch", "transformers", "deepspeed", "datasets", "trl", "matplotlib")


def heavy_imports(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The heavy libraries a fresh interpreter holds after running `code`: what a command or module pulls in at
    import time (a login-node command such as `plan --help` must stay light)."""
    import ast

    probe = f"{code}\nimport sys\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    code_, out, err = run_process([sys.executable, "-c", probe], {"PYTHONPATH": str(ROOT)}, 180, split_stderr=True)
    assert code_ == 0, err[-3000:]
    return ast.literal_eval(out.strip().splitlines()[-1])


def dpo_dist_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                 cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m dpo_dist <args>` in one process through run_process (own session, tree killed on timeout), stdout
    and stderr apart: for the tests that read a command's exit code and its one-line refusal."""
    argv = [sys.executable, "-m", "dpo_dist", *args]
    code, out, err = run_process(argv, {"PYTHONUNBUFFERED": "1", **(env or {})}, timeout, cwd, split_stderr=True)
    return subprocess.CompletedProcess(argv, code, out, err)


def init_single(out: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 600) -> tuple[int, str, dict | None]:
    """`dpo-dist init` as a world of one writing to `out`: (exit code, output with stderr folded in, report.json or
    None when none was written)."""
    code, log = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--output-dir", str(out), *args],
                        {"PYTHONUNBUFFERED": "1", **(env or {})}, timeout)
    rep = out / "report.json"
    return code, log, json.loads(rep.read_text()) if rep.exists() else None


def help_probe(argv: list[str]) -> str:
    """Code for heavy_imports: run `dpo-dist <argv>` (a --help) in-process, its stdout kept in `buf` for the caller's
    own asserts appended after it."""
    return ("import contextlib, io\nfrom dpo_dist.cli.main import main\nbuf = io.StringIO()\n"
            f"with contextlib.redirect_stdout(buf):\n    try:\n        main({argv!r})\n    except SystemExit:\n"
            "        pass\n")
