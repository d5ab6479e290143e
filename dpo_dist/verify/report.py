"""The quality gate: every check's result on every rank, one table on rank 0, report.json, and the exit code.

A check passes only if it passed on every rank; the table shows which ranks failed and the hint says what to do.
The JSON is written to a temporary name and renamed, so a crash never leaves a half-written report behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    name: str
    ok: bool
    value: str = ""
    hint: str = ""  # what to do when it fails (empty when it passed)
    # numeric checks only: the bound the value was held to, and where it came from (measured noise, float rounding,
    # bitwise, or a user's verify.* setting); None for other checks, and then absent from the JSON
    tolerance: float | None = None
    tolerance_source: str | None = None
    skipped: bool = False  # a check switched off: shown as SKIPPED with the reason as its value, never absent

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if (k not in NUMERIC_KEYS or v is not None)
                and (k != "skipped" or v)}


NUMERIC_KEYS = ("tolerance", "tolerance_source")


@dataclass
class RankReport:
    """What one rank saw."""

    rank: int
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, ok: bool, value: Any = "", hint: str = "", tolerance: float | None = None,
            tolerance_source: str | None = None) -> bool:
        self.checks.append(Check(name, bool(ok), str(value), "" if ok else hint, tolerance, tolerance_source))
        return bool(ok)

    def skip(self, name: str, reason: str) -> bool:
        """A check that did not run: a SKIPPED row saying why (it does not fail the gate)."""
        self.checks.append(Check(name, True, f"skipped: {reason}", skipped=True))
        return True


def merge(rank_reports: list[RankReport]) -> list[dict[str, Any]]:
    """One row per check: passed on all ranks, the failing ranks, rank 0's value, the first failing rank's hint (and,
    for numeric checks, the tolerance and its source from the rank whose value is shown)."""
    rows: dict[str, dict[str, Any]] = {}
    for rr in rank_reports:
        for c in rr.checks:
            row = rows.get(c.name)
            if row is None:
                row = rows[c.name] = {"check": c.name, "ok": True, "failed_ranks": [], "value": c.value, "hint": ""}
                if c.skipped:
                    row["skipped"] = True
                row.update({k: getattr(c, k) for k in NUMERIC_KEYS if getattr(c, k) is not None})
            if not c.ok:
                row["ok"] = False
                row["failed_ranks"].append(rr.rank)
                if not row["hint"]:
                    row["hint"] = c.hint
                    row["value"] = c.value
                    for k in NUMERIC_KEYS:
                        row.pop(k, None)
                        if getattr(c, k) is not None:
                            row[k] = getattr(c, k)
    return list(rows.values())


def render_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """The gate table for the terminal. `width` is the value column's; None fits the terminal (its `COLUMNS`, else
    160 when the output is not a terminal, as in a rank's log). A value too long for its column is shortened in the
    middle, never at its tolerance: the part that decides the verdict stays on screen, and report.json keeps it whole.
    The hint (failing rows only) follows whole; the terminal wraps it."""
    name_w = max([len("check")] + [len(r["check"]) for r in rows])
    results = [("SKIPPED" if r.get("skipped") else "PASS" if r["ok"] else "FAIL")
               + (f" (ranks {','.join(map(str, r['failed_ranks']))})" if r["failed_ranks"] else "") for r in rows]
    res_w = max([len("result")] + [len(x) for x in results])
    if width is None:
        width = max(32, shutil.get_terminal_size((160, 24)).columns - name_w - res_w - 10)
    lines = [f"{'check'.ljust(name_w)}  {'result'.ljust(res_w)}  {'value'.ljust(width)}  hint",
             "-" * (name_w + res_w + width + 10)]
    for r, res in zip(rows, results, strict=True):
        value = fit_value(r["value"], width)
        lines.append(f"{r['check'].ljust(name_w)}  {res.ljust(res_w)}  {value.ljust(width)}  {r['hint']}".rstrip())
    return "\n".join(lines)


# "tolerance 1.49e-06", "tolerance 0.0001 set by the user": the bound a numeric row's verdict is decided against
_TOLERANCE = re.compile(r"tolerance [^\s:,;()]+(?: set by the user)?")


def fit_value(text: str, n: int) -> str:
    """`text` on one line in at most `n` characters. Too long: cut in the middle (the start holds the value, the end
    often the numbers that decide), and never inside the last `tolerance X`: what comes after it (where the tolerance
    comes from) is dropped before the tolerance itself is."""
    text = " ".join(text.split("\n"))
    if len(text) <= n:
        return text
    found = list(_TOLERANCE.finditer(text))
    if found:
        m = found[-1]
        if m.end() <= n - 1:  # the cut falls after the tolerance: keep everything up to the cut
            return text[: n - 1] + "…"
        tail, room, tol = text[m.start():], n - 1, m.end() - m.start()
        if tol + 1 >= room:  # too narrow for anything else
            return text[m.start():m.end()]
        head = min(max(room - len(tail), room // 2), room - tol - 1, m.start())
        if len(tail) > room - head:  # the tolerance whole, then as much of where it comes from as fits
            tail = tail[: room - head - 1] + "…"
        return text[:head] + "…" + tail
    head = (n - 1) * 2 // 3
    return text[:head] + "…" + text[len(text) - (n - 1 - head):]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report should be as readable as any file the user writes
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # "[Errno 28] No space left on device" names no file: say which
            from dpo_dist.runtime.disk_writes import named

            raise named(e, path) from e
        raise


def build_report(rank_reports: list[RankReport], config: dict[str, Any]) -> dict[str, Any]:
    rows = merge(rank_reports)
    return {
        "passed": all(r["ok"] for r in rows) and bool(rows),
        "world_size": len(rank_reports),
        "checks": rows,
        "facts": {k: v for k, v in rank_reports[0].facts.items() if k != TIMELINE} if rank_reports else {},
        "per_rank_facts": {rr.rank: {k: v for k, v in rr.facts.items() if k.startswith("rank_")} for rr in
                           rank_reports},
        "timeline": timeline(rank_reports),
        "config": config,
    }


# -- timeline: when each stage started and how long it took, per rank (a slow rank or stage shows) -------------
TIMELINE = "timeline"


def timed(rr: RankReport, stage: str, fn, say=None) -> bool:
    """Run one stage, note its start (wall clock) and duration in this rank's facts, and `say` one line for it."""
    t0, n = time.time(), len(rr.checks)
    ok = False
    try:
        ok = bool(fn())
        return ok
    finally:
        seconds = time.time() - t0
        rr.facts.setdefault(TIMELINE, []).append({"stage": stage, "start": round(t0, 3), "seconds": round(seconds, 3),
                                                  "ok": ok, "checks": [c.name for c in rr.checks[n:]]})
        if say is not None:
            say(f"[dpo-dist] {stage:<15} {seconds:7.1f} s  {'ok' if ok else 'FAILED'}")


def timeline(rank_reports: list[RankReport]) -> list[dict[str, Any]]:
    """One row per stage: each rank's start (seconds after the first rank's first stage) and duration."""
    entries = [(rr.rank, e) for rr in rank_reports for e in rr.facts.get(TIMELINE, [])]
    if not entries:
        return []
    origin = min(e["start"] for _, e in entries)
    rows: dict[str, dict[str, Any]] = {}
    for rank, e in entries:
        row = rows.setdefault(e["stage"], {"stage": e["stage"], "ranks": {}, "checks": []})
        row["ranks"][rank] = {"start": round(e["start"] - origin, 3), "seconds": e["seconds"], "ok": e["ok"]}
        row["checks"] += [c for c in e["checks"] if c not in row["checks"]]
    for row in rows.values():
        secs = [r["seconds"] for r in row["ranks"].values()]
        row["slowest_rank"] = max(row["ranks"], key=lambda r: row["ranks"][r]["seconds"])
        row["spread_seconds"] = round(max(secs) - min(secs), 3)
    return list(rows.values())


# A failed row whose cause a later failed row names more precisely: the last line names that one. Another model's
# tokenizer makes the text look like noise to the weights, so generation and perplexity fail too, and their hints
# (an untrained or wrongly loaded checkpoint) would send the user to the weights (issue 21, #40).
MORE_SPECIFIC = {
    "generation: not degenerate": ("tokenizer matches the weights",),
    "perplexity below uniform": ("tokenizer matches the weights",),
}


def first_failure(report: dict[str, Any]) -> tuple[str, list[int], str, str]:
    """(stage, failed ranks, cause, hint) of the report's first failing check; its stage from the timeline."""
    failed = [r for r in report.get("checks", []) if not r["ok"]]
    if not failed:
        return "", [], "", ""
    r = failed[0]
    names = {f["check"]: f for f in failed}
    r = next((names[m] for m in MORE_SPECIFIC.get(r["check"], ()) if m in names), r)
    stage = next((row["stage"] for row in report.get("timeline", [])
                  if row["stage"] == r["check"] or r["check"] in row.get("checks", [])), "checks")
    cause = r["value"] if stage == r["check"] else f"check '{r['check']}': {r['value']}"
    return stage, list(r["failed_ranks"]), cause, r["hint"]


def failure_line(report: dict[str, Any]) -> str:
    """`dpo-dist: <stage> failed on rank(s) R: <cause>. Fix: <hint>` for the report's first failing check."""
    from dpo_dist.runtime.outcome import line

    stage, ranks, cause, hint = first_failure(report)
    return line(stage, ranks, cause, hint)


def to_dict(rr: RankReport) -> dict[str, Any]:
    return {"rank": rr.rank, "checks": [c.as_dict() for c in rr.checks], "facts": rr.facts}
