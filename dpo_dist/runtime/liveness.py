"""Which rank went silent, when a collective times out.

A stopped rank (SIGSTOP, a hung node) makes its peers' next collective time out after sharding.timeout_s with gloo's
"Timed out waiting 10000ms for recv operation" or NCCL's watchdog text, which names no rank; inside a ZeRO-3 forward
DeepSpeed's clean-up then raises "... expected to be released" on top, which points at DeepSpeed instead. So every
rank beats a counter in the job's rendezvous store from a daemon thread and records the stage it is in; a rank whose
collective timed out compares the counters over a few beats: a rank whose counter stood still is stopped, one that
beats but sits in another stage is alive but stuck there. Counters, not timestamps: node clocks need not agree.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

BEAT_S = 1.0  # one beat a second; a rank is called stopped after 3 beats without one
PREFIX = "dpo_dist/live"
# What torch says when a collective or a group's set-up runs past the timeout: gloo on CPU, NCCL's watchdog, and the
# store wait of a new group's rendezvous (DeepSpeed creates groups inside deepspeed.initialize).
TIMEOUT_TEXTS = ("Timed out waiting", "Watchdog caught collective operation timeout", "wait timeout after",
                 "Socket Timeout")


class Liveness:
    """Beats and stage marks of this rank, read back for every rank when something timed out."""

    def __init__(self, store: Any, rank: int, world: int, timeout_s: int = 600):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self._stop = threading.Event()
        store.set(f"{PREFIX}/stage/{rank}", "start")
        store.add(f"{PREFIX}/beat/{rank}", 1)
        self._thread = threading.Thread(target=self._beat, name="dpo-dist-liveness", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(f"{PREFIX}/beat/{self.rank}", 1)
            except Exception:  # the store is gone (the job is ending): nothing left to tell
                return

    def stage(self, name: str) -> None:
        try:
            self.store.set(f"{PREFIX}/stage/{self.rank}", name)
        except Exception:
            pass

    def close(self) -> None:
        self._stop.set()

    def silent(self) -> dict[int, str]:
        """{rank: what it is doing} for every other rank that is stopped or stuck in another stage than this one."""
        ranks = [r for r in range(self.world) if r != self.rank]
        try:
            first = {r: int(self.store.add(f"{PREFIX}/beat/{r}", 0)) for r in ranks}
            time.sleep(3 * BEAT_S)
            second = {r: int(self.store.add(f"{PREFIX}/beat/{r}", 0)) for r in ranks}
            stages = {r: self.store.get(f"{PREFIX}/stage/{r}").decode() for r in [self.rank, *ranks]}
        except Exception:  # the store itself is unreachable (it lived in the stopped rank): say nothing wrong
            return {}
        out = {}
        for r in ranks:
            if second[r] == first[r]:
                out[r] = f"no sign of life for {3 * BEAT_S:g} s, in stage '{stages[r]}': stopped or its node hung"
            elif stages[r] != stages[self.rank]:
                out[r] = f"alive but still in stage '{stages[r]}'"
        return out


_current: Liveness | None = None


def start(rank: int, world: int, timeout_s: int) -> Liveness | None:
    """Begin beating (a separate client of the job's rendezvous store, so the beats never queue behind the process
    group's own traffic). None when there is no store to use (a single process, or no env:// rendezvous)."""
    global _current
    if world < 2 or "MASTER_ADDR" not in os.environ:
        return None
    import torch

    try:
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                           is_master=False, timeout=timedelta(seconds=min(timeout_s, 30)))
        _current = Liveness(store, rank, world, timeout_s)
    except Exception:  # no store to reach: timeouts keep the backend's own words
        _current = None
    return _current


def beat(rank: int) -> int | None:
    """`rank`'s beat counter now, or None when there is nothing to read (no beats in this process, no store)."""
    if _current is None:
        return None
    try:
        return int(_current.store.add(f"{PREFIX}/beat/{rank}", 0))
    except Exception:
        return None


def stage_of(rank: int) -> str:
    try:
        return _current.store.get(f"{PREFIX}/stage/{rank}").decode() if _current is not None else "?"
    except Exception:
        return "?"


def timeout_s(default: int = 600) -> int:
    """sharding.timeout_s, as the beats were started with (waits outside collectives use it too)."""
    return _current.timeout_s if _current is not None else default


class Watch:
    """A wait outside any collective (a file another rank writes) with a deadline: it ends when `rank` has shown no
    sign of life (its beat stood still) for sharding.timeout_s, however long that rank's work takes while it beats.
    Without beats to read (no store) the deadline is plain: `fallback_s` from the start."""

    def __init__(self, rank: int, fallback_s: float = 3600.0):
        self.rank, self.limit = rank, float(timeout_s())
        self.fallback_s = fallback_s if _current is None else None
        self.t0 = self.since = time.monotonic()
        self.last = beat(rank)

    def problem(self, what: str) -> str | None:
        """None while `rank` lives; else the one line naming it."""
        now = time.monotonic()
        if self.fallback_s is not None:
            if now - self.t0 > self.fallback_s:
                return (f"rank {self.rank} did not finish {what} within {self.fallback_s:.0f} s (no liveness beats to "
                        "tell whether it still runs): check that it is running")
            return None
        b = beat(self.rank)
        if b is not None and b != self.last:
            self.last, self.since = b, now
            return None
        if now - self.since <= self.limit:
            return None
        return (f"rank {self.rank} did not answer within sharding.timeout_s ({self.limit:g} s) while {what} (rank "
                f"{self.rank}: no sign of life for {now - self.since:.0f} s, in stage '{stage_of(self.rank)}': "
                "stopped or its node hung)")


def mark(stage: str) -> None:
    if _current is not None:
        _current.stage(stage)


def is_timeout(e: BaseException) -> bool:
    """A collective that ran past the process group's timeout, anywhere in the exception's chain, while this rank
    beats (placement ranks' bridge errors, which name their peer already, are left as they are: no beats there)."""
    return _current is not None and _timeout_in_chain(e)


def _timeout_in_chain(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(t in str(cur) for t in TIMEOUT_TEXTS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def explain(timeout_s: int) -> str:
    """One line for a collective timeout: which rank did not answer and what it is doing, when that can be told."""
    silent = _current.silent() if _current is not None else {}
    if not silent:
        return (f"a collective got no answer within sharding.timeout_s ({timeout_s} s) from some rank: check that "
                "every rank is still running (a stopped process, a hung node)")
    who = "; ".join(f"rank {r}: {what}" for r, what in sorted(silent.items()))
    ranks = ",".join(str(r) for r in sorted(silent))
    return f"rank {ranks} did not answer within sharding.timeout_s ({timeout_s} s) ({who})"
