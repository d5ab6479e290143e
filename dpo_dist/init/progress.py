"""Progress lines on rank 0's terminal for a stage that runs longer than a few seconds (issue 23.6): a 70B load
that takes minutes must not look hung. The rank logs keep the detail; this says only how far and how fast."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

EVERY_S = 5.0


def _read_bytes() -> int:
    """Bytes this process has read through read/pread so far (page-cache hits included): /proc/self/io rchar."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@contextlib.contextmanager
def reading(what: str, total: int, say, every: float = EVERY_S):
    """While the body runs, every `every` seconds `say` how many of about `total` bytes this rank has read and the
    rate. Silent for a body shorter than `every`, and where /proc/self/io does not exist."""
    start = _read_bytes()
    if start < 0 or total <= 0 or say is None:
        yield
        return
    done = threading.Event()
    t0 = time.perf_counter()

    def tick():
        while not done.wait(every):
            got = _read_bytes() - start
            rate = got / max(time.perf_counter() - t0, 1e-9)
            say(f"[dpo-dist] {what}: {got / 2**30:.2f} of ~{total / 2**30:.2f} GiB read on this rank "
                f"({rate / 2**20:.0f} MiB/s)")

    thread = threading.Thread(target=tick, name="dpo-dist-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1.0)
