"""Report tests: merging per-rank checks, the pass verdict, the table, and the atomic JSON write."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dpo_dist.verify.report import Check, RankReport, build_report, merge, render_table, to_dict, write_json_atomic


def rank(r: int, *checks: tuple, **facts) -> RankReport:
    rr = RankReport(r, facts=dict(facts))
    for c in checks:
        rr.add(*c)
    return rr


def row(rows: list[dict], name: str) -> dict:
    (found,) = [r for r in rows if r["check"] == name]
    return found


def temp_files(d) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".report-")]


# ---------------------------------------------------------------- RankReport.add


def test_add_returns_ok_and_drops_hint_on_pass():
    rr = RankReport(0)
    assert rr.add("a", True, 1.5, "ignored") is True
    assert rr.add("b", 0, ["x"], "do this") is False
    assert rr.checks == [Check("a", True, "1.5", ""), Check("b", False, "['x']", "do this")]
    assert to_dict(rr) == {"rank": 0, "facts": {}, "checks": [
        {"name": "a", "ok": True, "value": "1.5", "hint": ""},
        {"name": "b", "ok": False, "value": "['x']", "hint": "do this"}]}


# ---------------------------------------------------------------- merge


def test_merge_all_pass_keeps_rank0_value():
    rows = merge([rank(0, ("a", True, "v0")), rank(1, ("a", True, "v1"))])
    assert rows == [{"check": "a", "ok": True, "failed_ranks": [], "value": "v0", "hint": ""}]


def test_merge_fails_if_any_rank_failed():
    reports = [rank(r, ("a", True, "fine"), ("b", r != 2, f"val{r}", f"hint{r}")) for r in range(4)]
    rows = merge(reports)
    assert [r["check"] for r in rows] == ["a", "b"]
    assert row(rows, "a")["ok"] is True
    b = row(rows, "b")
    assert b["ok"] is False
    assert b["failed_ranks"] == [2]
    assert b["value"] == "val2"
    assert b["hint"] == "hint2"


def test_merge_failing_ranks_in_order_first_failing_rank_wins():
    reports = [rank(r, ("x", r in (1, 3, 4), f"v{r}", f"h{r}")) for r in range(6)]
    (x,) = merge(reports)
    assert x["ok"] is False
    assert x["failed_ranks"] == [0, 2, 5]
    assert (x["value"], x["hint"]) == ("v0", "h0")


def test_merge_only_last_rank_fails():
    reports = [rank(r, ("x", r != 7, f"v{r}", "fix rank 7")) for r in range(8)]
    (x,) = merge(reports)
    assert (x["ok"], x["failed_ranks"], x["value"], x["hint"]) == (False, [7], "v7", "fix rank 7")


def test_merge_check_seen_on_some_ranks_only():
    rows = merge([rank(0, ("a", True)), rank(1, ("a", True), ("late", False, "boom", "h"))])
    assert [r["check"] for r in rows] == ["a", "late"]
    assert row(rows, "late")["failed_ranks"] == [1]


def test_merge_empty():
    assert merge([]) == []
    assert merge([RankReport(0), RankReport(1)]) == []


# ---------------------------------------------------------------- build_report


def test_build_report_passed():
    rep = build_report([rank(0, ("a", True), rank_mem=1, model="m"), rank(1, ("a", True), rank_mem=2, other=3)],
                       {"k": 1})
    assert rep["passed"] is True
    assert rep["world_size"] == 2
    assert rep["facts"] == {"rank_mem": 1, "model": "m"}
    assert rep["per_rank_facts"] == {0: {"rank_mem": 1}, 1: {"rank_mem": 2}}
    assert rep["config"] == {"k": 1}


def test_build_report_fails_if_any_check_failed():
    rep = build_report([rank(0, ("a", True), ("b", True)), rank(1, ("a", True), ("b", False, "", "h"))], {})
    assert rep["passed"] is False
    assert [r["ok"] for r in rep["checks"]] == [True, False]


def test_build_report_no_checks_is_not_a_pass():
    rep = build_report([RankReport(0), RankReport(1)], {})
    assert rep["passed"] is False
    assert rep["checks"] == []


def test_build_report_is_json_serialisable(tmp_path):
    rep = build_report([rank(0, ("a", False, 3, "h"), rank_x=1)], {"path": tmp_path})
    write_json_atomic(tmp_path / "r.json", rep)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["passed"] is False
    assert back["per_rank_facts"] == {"0": {"rank_x": 1}}
    assert back["config"] == {"path": str(tmp_path)}


# ---------------------------------------------------------------- render_table


def test_render_table_pass_and_fail():
    rows = merge([rank(r, ("weights identical", True, "42 tensors"), ("kl small", r == 0, f"kl={r}", "lower lr"))
                  for r in range(3)])
    out = render_table(rows)
    lines = out.splitlines()
    assert lines[0].startswith("check")
    assert "result" in lines[0] and "hint" in lines[0]
    assert set(lines[1]) == {"-"}
    (ok_line,) = [ln for ln in lines if ln.startswith("weights identical")]
    (bad_line,) = [ln for ln in lines if ln.startswith("kl small")]
    assert "PASS" in ok_line and "FAIL" not in ok_line and "42 tensors" in ok_line
    assert "FAIL (ranks 1,2)" in bad_line and "kl=1" in bad_line and bad_line.endswith("lower lr")
    assert "PASS" not in bad_line


def test_render_table_cuts_long_values_and_newlines():
    rows = [{"check": "c", "ok": False, "failed_ranks": [0], "value": "line1\nline2" + "x" * 200, "hint": "h"}]
    out = render_table(rows, width=20)
    assert len(out.splitlines()) == 3  # header, rule, one row: the newline in the value was flattened
    line = out.splitlines()[2]
    assert "line1 line2" in line and "…" in line and "x" * 20 not in line


def test_render_table_keeps_the_tolerance_of_a_long_value():
    """Issue 24: the step-0 loss row read 'tolerance 1.49e-…' on screen. However narrow the value column, the
    tolerance that decides the verdict stays whole; report.json (build_report) keeps the full value."""
    value = ("0.693147 (target 0.693147, |diff| 1.9e-09, tolerance 1.49e-06: float32 rounding of the loss mean: "
             "(pairs + 4) x 2^-24 x ln 2, policy and reference see the same micro-batch)")
    rr = RankReport(0)
    rr.add("step-0 DPO loss = ln 2", True, value, tolerance=1.49e-06, tolerance_source="float32 rounding")
    report = build_report([rr], {})
    for width in (30, 45, 60, 80, 120):
        (line,) = [ln for ln in render_table(report["checks"], width=width).splitlines() if ln.startswith("step-0")]
        shown = line.split("PASS", 1)[1].strip()
        assert len(shown) <= width, (width, shown)
        assert "tolerance 1.49e-06" in shown, (width, shown)
        assert shown.startswith("0.69"), (width, shown)
    assert report["checks"][0]["value"] == value  # the JSON keeps it whole


def test_render_table_user_set_tolerance_and_kl_row_stay_whole():
    kl = ("policy vs reference: mean 0.000e+00/token, max seq 0.000e+00 over 412 tokens (tolerance 0.0001 set by the "
          "user: user: verify.kl_max)")
    rows = [{"check": "initial KL < limit", "ok": False, "failed_ranks": [0, 1], "value": kl, "hint": "check dropout"}]
    line = render_table(rows, width=50).splitlines()[2]
    assert "tolerance 0.0001 set by the user" in line and line.endswith("check dropout")
    assert "FAIL (ranks 0,1)" in line


def test_render_table_fits_the_terminal_width(monkeypatch):
    value = "x" * 300 + " tolerance 3e-06: measured noise"
    rows = [{"check": "step-0 DPO loss = ln 2", "ok": True, "failed_ranks": [], "value": value, "hint": ""}]
    for cols in (100, 140, 200):
        monkeypatch.setenv("COLUMNS", str(cols))
        lines = render_table(rows).splitlines()
        assert all(len(ln) <= cols for ln in lines), (cols, [len(ln) for ln in lines])
        assert "tolerance 3e-06" in lines[2]


def test_render_table_middle_cut_keeps_both_ends_without_a_tolerance():
    value = "1 differ, first: model.layers.0.mlp.down_proj.weight" + " (detail)" * 20 + " (max abs diff 0.00989)"
    rows = [{"check": "weights: policy == reference", "ok": False, "failed_ranks": [0], "value": value, "hint": "h"}]
    line = render_table(rows, width=60).splitlines()[2]
    assert "1 differ, first" in line and "0.00989)" in line and "…" in line


def test_render_table_no_rows():
    out = render_table([])
    assert len(out.splitlines()) == 2
    assert "PASS" not in out and "FAIL" not in out


# ---------------------------------------------------------------- write_json_atomic


def test_write_json_atomic_valid_json_no_temp(tmp_path):
    target = tmp_path / "sub" / "dir" / "report.json"  # parents are created
    data = {"passed": True, "checks": [{"check": "a", "ok": True}], "n": 3, "set": {1}}
    write_json_atomic(target, data)
    back = json.loads(target.read_text())
    assert back == {"passed": True, "checks": [{"check": "a", "ok": True}], "n": 3, "set": "{1}"}
    assert temp_files(target.parent) == []
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_write_json_atomic_overwrites(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"v": 1})
    write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert temp_files(tmp_path) == []


def circular() -> dict:
    d: dict = {"passed": True, "big": ["x" * 100] * 2000}  # enough to flush partial output before the failure
    d["self"] = d
    return d


def test_write_json_atomic_failure_creates_nothing(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(ValueError, match="[Cc]ircular"):
        write_json_atomic(target, circular())
    assert not target.exists()
    assert temp_files(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_failure_keeps_old_report(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"old": True})
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_json_atomic(target, circular())
    assert target.read_bytes() == before
    assert temp_files(tmp_path) == []


def test_write_json_atomic_failure_in_default(tmp_path):
    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    target = tmp_path / "report.json"
    with pytest.raises(RuntimeError, match="no str for you"):
        write_json_atomic(target, {"a": 1, "b": Boom()})
    assert not target.exists()
    assert temp_files(tmp_path) == []


def test_write_json_atomic_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "report.json"
        write_json_atomic(target, {"a": 1})
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old)
