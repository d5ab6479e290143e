"""How a run ends, in one line: `dpo-dist: <stage> failed on rank(s) R: <cause>. Fix: <hint>`.

Each failing rank leaves `<output_dir>/logs/rank<r>.failure.json` (its stage, cause, hint and exit code); the
launcher (`dpo-dist launch`, the sbatch job) reads them after the ranks are gone and prints the line LAST, with the
log paths, instead of torchrun's traceback. Pure Python: the launcher imports it without torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

LOG_DIR = "logs"
# a rank that ends inside a collective stage (dpo_dist.init.stages.abandon) has no time to write a record: its line
ABANDON = re.compile(r"^dpo-dist: rank (\d+) failed in stage '([^']+)': (.*?)(?: \(ending this rank;.*)?$")
# what a rank says when a peer vanished under it (gloo, NCCL, our liveness check): then the vanished peer is the cause
LOST_PEER = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|did not answer within|"
                       r"remote worker|NCCL (error|communicator was aborted)|Socket Timeout", re.I)


# the liveness diagnosis (runtime.liveness.explain / Watch): it names the rank that went silent and what it was doing
NAMED_SILENT = re.compile(r"^rank ([\d,]+) did not answer within .*(stopped or its node hung|alive but)")


@dataclass(frozen=True)
class Failure:
    rank: int
    code: int  # the rank's exit code: 2 bad input, 1 a failed check, 3 the ranks never met, 4 unexpected
    stage: str
    cause: str
    hint: str
    ranks: list[int] | None = None  # the ranks it failed on, when the writer knows (rank 0 from the gathered report)


def log_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOG_DIR


def rank_log(output_dir: str | Path, rank: int) -> Path:
    return log_dir(output_dir) / f"rank{rank}.log"


def split_hint(message: str) -> tuple[str, str]:
    """'<what> (<where>): <fix>' -> (what, fix): our one-line messages end in what to do after their last ': '."""
    if " Fix: " in message:
        cause, hint = message.split(" Fix: ", 1)
        return cause.rstrip(". "), hint
    if "): " in message:  # the fix follows the "(<where>)"
        head, tail = message.split("): ", 1)
        return head + ")", tail
    head, sep, tail = message.rpartition(": ")
    if sep and head and tail:
        return head, tail
    return message, "correct what the message names and run again"


def line(stage: str, ranks: list[int], cause: str, hint: str) -> str:
    who = ",".join(map(str, sorted(set(ranks)))) or "?"
    return f"dpo-dist: {stage} failed on rank(s) {who}: {cause.rstrip('. ')}. Fix: {hint}"


def write_failure(output_dir: str | Path, failure: Failure) -> None:
    """Best effort: a rank that cannot write its record is still named by the launcher (from its log)."""
    try:
        d = log_dir(output_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{failure.rank}.failure.json").write_text(json.dumps(asdict(failure)))
    except OSError:
        pass


def clear(output_dir: str | Path, rank: int) -> None:
    """A new run on this rank: an older run's record must not speak for it."""
    try:
        (log_dir(output_dir) / f"rank{rank}.failure.json").unlink(missing_ok=True)
    except OSError:
        pass


def read_failures(output_dir: str | Path) -> list[Failure]:
    """Records of this run's failing ranks; for a rank that left none, its log's abandon line (exit code 1)."""
    d = log_dir(output_dir)
    found: dict[int, Failure] = {}
    for f in sorted(d.glob("rank*.failure.json")) if d.is_dir() else []:
        try:
            data = json.loads(f.read_text())
            found[int(data["rank"])] = Failure(**data)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for f in sorted(d.glob("rank*.log")) if d.is_dir() else []:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for ln in reversed(text.splitlines()):
            m = ABANDON.match(ln)
            if m and int(m.group(1)) not in found:
                found[int(m.group(1))] = Failure(int(m.group(1)), 1, m.group(2), m.group(3),
                                                 "see this rank's log; the others were stopped by the launcher")
                break
    return [found[r] for r in sorted(found)]


def summarize(failures: list[Failure]) -> tuple[str, int] | None:
    """The one line for the first cause (rank order; every rank with that same cause named) and the exit code."""
    if not failures:
        return None
    first = failures[0]
    same = [r for f in failures if (f.stage, f.cause) == (first.stage, first.cause) for r in (f.ranks or [f.rank])]
    return line(first.stage, same, first.cause, first.hint), first.code


def log_paths(output_dir: str | Path) -> list[str]:
    d = log_dir(output_dir)
    if not d.is_dir():
        return []
    return [os.path.relpath(p) if not Path(output_dir).is_absolute() else str(p)
            for p in sorted(d.glob("rank*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))]


def conclude(output_dir: str | Path) -> tuple[str, int] | None:
    """The line and exit code a launcher ends with. A rank that left a log but no word (killed, crashed, out of
    memory: os._exit, SIGKILL) while the others failed only because a peer vanished is named as the cause, rather
    than the rank that noticed."""
    failures = read_failures(output_dir)
    if not failures:
        return None
    d = log_dir(output_dir)
    logged = {int(m.group(1)) for p in d.glob("rank*.log") if (m := re.fullmatch(r"rank(\d+)", p.stem))}
    silent = sorted(logged - {f.rank for f in failures} - {r for f in failures for r in (f.ranks or [])})
    if silent and all(LOST_PEER.search(f.cause) for f in failures):
        for f in failures:  # a rank that beat-checked its peers named the silent one and why: its words (#74)
            m = NAMED_SILENT.match(f.cause)
            named = {int(r) for r in m.group(1).split(",")} if m else set()
            if named and named <= set(silent):
                logs = ", ".join(f"{LOG_DIR}/rank{r}.log" for r in sorted(named))
                return line(f.stage, sorted(named), f.cause, "a process that is stopped (SIGSTOP, a debugger, a "
                            f"suspended shell job) or a hung node: see {logs} and that node; raise "
                            "sharding.timeout_s only if it was merely slow"), 1
        noticed = ",".join(str(f.rank) for f in failures)
        logs = ", ".join(f"{LOG_DIR}/rank{r}.log" for r in silent)
        return line(failures[0].stage, silent, f"ended without a word (killed, crashed or out of memory); rank(s) "
                    f"{noticed} then lost the connection", f"see {logs} and that node's kernel log (OOM killer)"), 1
    return summarize(failures)
