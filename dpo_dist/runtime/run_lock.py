"""One run owns an output dir at a time, and everything a run writes there carries one run id.

Two runs writing into one directory make each other's verdict meaningless (one run's "FAILED" pointing at a report
that the other run rewrote as passed). The owner holds an exclusive `flock` on `<output_dir>/.dpo-dist.lock` for its
whole life; the kernel drops it when the process ends, however it ends, so a crashed run leaves no stale lock, only
the file, whose JSON (run id, pid, host, start time) names the owner for the next run's message.

The run id is made once, before launch (`dpo-dist launch` sets it in the environment of every rank it starts), and
rank 0's id is the one every rank adopts when the process group forms (`DistContext.from_env`), so ranks started by
separate launchers (one per node) still agree.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

RUN_ID_ENV = "DPO_DIST_RUN_ID"
LOCK_NAME = ".dpo-dist.lock"

_held: dict[str, int] = {}  # resolved output dir -> the open lock file descriptor (open for the process's life)


class OutputDirBusy(RuntimeError):
    """Another live run holds the output dir."""


def run_id() -> str:
    """This run's id: the launcher's (environment), else a new one, kept in the environment so it stays the same."""
    rid = os.environ.get(RUN_ID_ENV)
    if not rid:
        rid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
        os.environ[RUN_ID_ENV] = rid
    return rid


def _owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _ancestor(pid: object) -> bool:
    """`pid` is this process's parent, grandparent, ... (the `dpo-dist launch` that started this rank)."""
    me = os.getppid()
    while isinstance(pid, int) and me > 1:
        if me == pid:
            return True
        try:
            me = int(Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def acquire(output_dir: str | Path) -> Path:
    """Take the output dir for this run, or raise OutputDirBusy naming the run that holds it. A process that already
    holds it (or whose launcher holds it for the same run id) gets it again."""
    out = Path(output_dir)
    key = str(out.resolve())
    path = out / LOCK_NAME
    if key in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _owner(fd)
        os.close(fd)
        if other.get("run_id") == run_id() and _ancestor(other.get("pid")):  # our own launcher holds it for this run
            return path
        raise OutputDirBusy(
            f"output dir {out} is in use by another run (run {other.get('run_id', '?')}, pid {other.get('pid', '?')} "
            f"on {other.get('host', '?')}, started {other.get('started', '?')}; lock {path}): wait for it to end, "
            "or choose another --output-dir") from None
    except BaseException:
        os.close(fd)
        raise
    info = {"run_id": run_id(), "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd
    return path


def release(output_dir: str | Path) -> None:
    """Give the output dir back before the process ends (the Python API; the CLI simply exits)."""
    fd = _held.pop(str(Path(output_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock
