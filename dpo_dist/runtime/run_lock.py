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
# `dpo-dist launch` on several machines: the rendezvous address every machine's launcher was given (one launch's
# machines share it, two live launches cannot), so ranks started by different launchers know their run's lock
RENDEZVOUS_ENV = "DPO_DIST_RENDEZVOUS"
LOCK_NAME = ".dpo-dist.lock"
# What a dpo-dist run leaves in its output dir: a dir holding none of these (and not empty) is someone else's
OURS = (LOCK_NAME, "report.json", "logs", "reference_manifest.json")

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
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **_launch_identity()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd
    return path


def release(output_dir: str | Path) -> None:
    """Give the output dir back before the process ends (the Python API; the CLI simply exits)."""
    fd = _held.pop(str(Path(output_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


class OutputDirRefused(ValueError):
    """This run may not write into the output dir: nothing may have been written there yet (exit 2). `every_rank`:
    every rank finds the same (rank 0 says it); else only this rank found it (it says it itself)."""

    def __init__(self, message: str, every_rank: bool = True):
        super().__init__(message)
        self.every_rank = every_rank


def _launch_identity() -> dict:
    """What the ranks of one launch share beyond the run id (which each machine's launcher makes on its own)."""
    out = {}
    if os.environ.get(RENDEZVOUS_ENV):
        out["rendezvous"] = os.environ[RENDEZVOUS_ENV]
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        out["master"] = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return out


def _same_launch(other: dict) -> bool:
    """The lock's holder belongs to this launch: same run id, same multi-machine rendezvous, or the same process
    group's store (a live store's address is one job's alone; a loopback address only on the same host)."""
    if other.get("run_id") and other.get("run_id") == os.environ.get(RUN_ID_ENV):
        return True
    mine = _launch_identity()
    if mine.get("rendezvous") and other.get("rendezvous") == mine["rendezvous"]:
        return True
    master = mine.get("master")
    if master and other.get("master") == master:
        host = master.rsplit(":", 1)[0]
        return host not in ("localhost", "127.0.0.1", "::1") or other.get("host") == socket.gethostname()
    return False


def holder(output_dir: str | Path) -> dict | None:
    """The lock's owner while a live process holds it (its JSON), None when nobody does."""
    path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _owner(fd)
        if not info:  # taken this instant: its owner writes who it is right after
            time.sleep(0.3)
            info = _owner(fd)
        return info or {"run_id": "?"}
    except OSError:
        return None
    finally:
        os.close(fd)  # drops a shared lock taken just now
    return None


def foreign(output_dir: str | Path) -> list[str]:
    """Entries of an existing, non-empty output dir that no dpo-dist run made, when nothing there is ours."""
    out = Path(output_dir)
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError:  # missing or unreadable: the run's own checks say so
        return []
    if not names or any(n in OURS or n.startswith("checkpoint-") for n in names):
        return []
    return names


def check_foreign(output_dir: str | Path) -> None:
    """Raise OutputDirRefused when the output dir holds someone else's files (and nothing of a dpo-dist run)."""
    names = foreign(output_dir)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise OutputDirRefused(f"output dir {output_dir} holds files that no dpo-dist run wrote ({shown}): choose an "
                               "empty or new --output-dir (a run never writes over files it does not own)")


def check_report(output_dir: str | Path, replace: bool) -> None:
    """Raise OutputDirRefused when a finished run's report is there and this run may not replace it."""
    if (Path(output_dir) / "report.json").exists() and not replace:
        raise OutputDirRefused(f"output dir {output_dir} already holds a report from another run: pass --overwrite "
                               "to replace it, or choose another --output-dir")


def check_holder(output_dir: str | Path) -> None:
    """Raise OutputDirRefused when a live run of another launch holds the output dir (a check, no lock taken)."""
    other = holder(output_dir)
    if other is not None and not _same_launch(other):
        raise OutputDirRefused(
            f"output dir {output_dir} is in use by another run (run {other.get('run_id', '?')}, pid "
            f"{other.get('pid', '?')} on {other.get('host', '?')}): wait for it to end, or choose another "
            "--output-dir", every_rank=False)


def claim(output_dir: str | Path, rank: int, replace: bool) -> None:
    """Before a rank writes anything into the output dir (its log, a failure record): raise OutputDirRefused unless
    the dir is this run's to write. Refused: a dir of someone else's files (not empty, nothing of a dpo-dist run),
    a dir a live other run holds, or a finished run's report without --overwrite (`replace`). Rank 0 takes the lock
    here; the other ranks only check that its holder, if any, is of their launch. So a refused run leaves the
    earlier run's logs and records as they were (issue 21, #72/#73)."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    check_foreign(out)
    check_report(out, replace)  # refused either way: before the lock file is rewritten
    if rank == 0:
        try:
            acquire(out)
        except OutputDirBusy as e:
            raise OutputDirRefused(str(e)) from None
        except OSError:  # not writable: preflight names it
            pass
    else:
        check_holder(out)
