"""Issue 16 with real launches (2 CPU ranks): what a person sees on the terminal. A passing demo-sized run fits on a
screen with no known noise and one line per stage; every rank's full output, warnings included, is in its log; a
bad-data run ends with our one line and exit code 2, through `dpo-dist launch` and under a raw `accelerate launch`."""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, passing_zero3_run, run_process

from dpo_dist.launch.accelerate import LaunchSpec, build_launch

pytestmark = pytest.mark.multiproc
MAX_LINES = 60  # issue 16: a passing demo prints at most ~60 lines
STAGES = ("setup", "tokenizer", "load", "static proofs", "forward proofs", "data", "trainer", "smoke steps")
LINE = re.compile(r"^dpo-dist: .+ failed on rank\(s\) [\d,]+: .+\. Fix: .+$")


def run(argv: list[str], timeout: float = 240) -> tuple[int, str, str]:
    return run_process(argv, {"PYTHONUNBUFFERED": "1"}, timeout, split_stderr=True)


def launch(out: Path, *init_args: str) -> tuple[int, str, str]:
    return run([sys.executable, "-m", "dpo_dist", "launch", "--cpu", "--num-processes", "2", "--sharding", "zero3",
                "--port", str(free_port()), "--", "--output-dir", str(out), *init_args])


def screen_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar's redraws (carriage returns) end on one line."""
    return [ln.split("\r")[-1] for ln in text.splitlines() if ln.split("\r")[-1].strip()]


def bad_data(tmp_path: Path) -> Path:
    p = tmp_path / "bad.jsonl"
    rows = (ROOT / "dpo_dist" / "default" / "train.jsonl").read_text().splitlines()[:3]
    p.write_text("\n".join(rows + [json.dumps({"prompt": "hi", "chosen": "x"})]) + "\n")
    return p


def test_passing_run_fits_a_screen_and_every_rank_logs_everything():
    res = passing_zero3_run()  # the demo's run, shared
    out, code, stdout, stderr = res.output_dir, res.returncode, res.stdout, res.stderr
    assert code == 0, (stdout + stderr)[-6000:]
    lines = screen_lines(stdout) + screen_lines(stderr)
    shape = collections.Counter(re.sub(r"\d+", "N", ln)[:120] for ln in lines)
    assert len(lines) <= MAX_LINES, (
        f"the passing demo printed {len(lines)} lines (limit {MAX_LINES}); most repeated: "
        + "; ".join(f"{n}x {ln!r}" for ln, n in shape.most_common(5))
        + " - name new third-party noise in dpo_dist/runtime/console.py (by exact message and origin)")
    assert not [ln for ln in lines if "Warning" in ln or "deprecated" in ln], lines
    for stage in STAGES:
        assert any(re.match(rf"^\[dpo-dist\] {stage} +\d+\.\d s  ok$", ln) for ln in lines), (stage, lines)
    out_lines = screen_lines(stdout)
    assert out_lines[-2].startswith("[dpo-dist] quality gate PASSED; report: "), out_lines[-3:]
    assert out_lines[-1].startswith("[dpo-dist] logs: ") and "rank0.log .. rank1.log" in out_lines[-1]
    # the full output, one file per rank: rank 0's log holds every line its terminal showed (stages, table, verdict)
    # and rank 1's exists; that a rank's log also takes what only it wrote (warnings, C-level fd output) whatever
    # library writes it is tests/test_voice.py::test_a_silent_rank_logs_everything_it_writes
    logged = set(screen_lines((out / "logs" / "rank0.log").read_text()))
    rank0 = [ln for ln in out_lines if not ln.startswith("[dpo-dist] launching ")]  # that one is the launcher's
    assert [ln for ln in rank0 if ln not in logged] == [], sorted(logged)[:40]
    assert (out / "logs" / "rank1.log").is_file()
    report = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in report["timeline"]] == list(STAGES)
    assert all(set(row["ranks"]) == {"0", "1"} and all(r["seconds"] >= 0 for r in row["ranks"].values())
               for row in report["timeline"])


def test_bad_data_ends_with_our_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = launch(out, "--set", f"data.train={bad_data(tmp_path)}")
    assert code == 2, (stdout + stderr)[-4000:]
    last = screen_lines(stderr)[-1]
    # rank 0 names it; rank 1 too when it got to write its record before the launcher stopped it
    assert LINE.match(last) and re.match(r"dpo-dist: input checks failed on rank\(s\) 0(,1)?: rejected is empty",
                                         last), stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "ChildFailedError" not in stdout + stderr
    assert f"{out / 'logs' / 'rank0.log'}" in stdout and f"{out / 'logs' / 'rank1.log'}" in stdout
    assert len(screen_lines(stdout) + screen_lines(stderr)) <= 4, stdout + stderr


def test_a_bad_config_ends_with_our_line_and_exit_2(tmp_path):
    """No output dir can be read from a bad config, so no rank leaves a record: the ranks' own exit code (2) still
    comes out of dpo-dist launch, not torchrun's 1."""
    code, stdout, stderr = launch(tmp_path / "out", "--set", "train.betta=0.2")
    assert code == 2, (stdout + stderr)[-4000:]
    last = screen_lines(stderr)[-1]
    assert LINE.match(last) and "unknown key 'train.betta' (did you mean 'train.beta'?)" in last, last


def test_raw_accelerate_launch_says_the_cause_once_from_rank_0(tmp_path):
    out = tmp_path / "out"
    argv, env = build_launch(LaunchSpec(cpu=True, main_process_port=free_port(), init_args=(
        "--output-dir", str(out), "--set", f"data.train={bad_data(tmp_path)}")))
    code, stdout, stderr = run(["env", *(f"{k}={v}" for k, v in env.items()), *argv])
    assert code != 0
    said = [ln for ln in screen_lines(stdout + stderr) if ln.startswith("dpo-dist: input checks failed")]
    assert said == [said[0]] and "rank(s) 0:" in said[0], stdout + stderr
