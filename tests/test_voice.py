"""Issue 16, the parts that need no launch: what reaches the terminal from which rank, the noise catalog (exact
message and origin), the failure line and exit code the launcher and the sbatch job end with, the timeline, and the
dry run's stated assumption on a machine without GPUs."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings

import pytest
from conftest import run_process

from dpo_dist.cli.main import main
from dpo_dist.runtime import console, outcome
from dpo_dist.verify.report import RankReport, build_report, failure_line, timed

LINE = re.compile(r"^dpo-dist: .+ failed on rank\(s\) [\d,]+: .+\. Fix: .+$")


def test_terminal_policy_per_rank_and_mode():
    assert console.shows("check   result", 0, console.DEFAULT)
    assert not console.shows("[dpo-dist] loading policy from x ...", 0, console.DEFAULT)  # the stage line says it
    assert not console.shows("check   result", 1, console.DEFAULT)  # other ranks are silent...
    assert console.shows("dpo-dist: rank 1 failed in stage 'load': boom (ending this rank)", 1, console.DEFAULT)
    assert console.shows("dpo-dist: rendezvous failed on rank(s) 1: x. Fix: y", 1, console.DEFAULT)
    assert console.shows("anything", 1, console.VERBOSE)
    assert console.shows("[dpo-dist] quality gate PASSED; report: r/report.json", 0, console.QUIET)
    assert console.shows("dpo-dist: data failed on rank(s) 0: x. Fix: y", 0, console.QUIET)
    assert not console.shows("[dpo-dist] setup   1.0 s  ok", 0, console.QUIET)


def test_known_noise_is_matched_by_exact_message_and_origin():
    msg = ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
           "`torch.distributed.reduce_scatter_single` instead.")
    origin = "/x/site-packages/torch/distributed/c10d_logger.py"
    assert console.known_warning(msg, FutureWarning, origin)
    assert not console.known_warning(msg, FutureWarning, "/x/site-packages/dpo_dist/verify/weights.py")
    assert not console.known_warning(msg, UserWarning, origin)
    assert not console.known_warning("`torch.distributed.broadcast` is deprecated.", FutureWarning, origin)
    assert console.known_line("[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, "
                              "DeepSpeed config has 4. Using DeepSpeed's value.")
    assert not console.known_line("WARNING: something new")


def test_rank_stream_logs_everything_and_lets_through_what_the_policy_says(tmp_path):
    log = tmp_path / "rank1.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    r, w = os.pipe()
    try:
        s = console.RankStream(log_fd, w, 1, console.DEFAULT, 1)
        s.write("noise from rank 1\n")
        s.write("dpo-dist: rank 1 failed in stage 'load': ")
        s.write("boom\n")
        os.close(w)
        assert os.read(r, 4096).decode() == "dpo-dist: rank 1 failed in stage 'load': boom\n"
    finally:
        os.close(r)
        os.close(log_fd)
    assert log.read_text() == "noise from rank 1\ndpo-dist: rank 1 failed in stage 'load': boom\n"


def test_known_warning_goes_to_the_log_only_and_an_unknown_one_shows(tmp_path):
    log_fd = os.open(tmp_path / "rank0.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    r, w = os.pipe()
    import sys

    saved_stream, saved_show = sys.stderr, warnings.showwarning
    try:
        sys.stderr = console.RankStream(log_fd, w, 0, console.DEFAULT, 2)
        # Python's own showwarning (pytest records warnings in its place)
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        console.install_warning_filter()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                                   "`torch.distributed.all_gather_single` instead.", FutureWarning,
                                   "/v/site-packages/torch/distributed/c10d_logger.py", 81)
            warnings.warn_explicit("a new warning nobody catalogued", FutureWarning, "/v/somewhere.py", 3)
    finally:
        sys.stderr, warnings.showwarning = saved_stream, saved_show
        os.close(w)
        os.close(log_fd)
    shown = os.read(r, 65536).decode()
    os.close(r)
    logged = (tmp_path / "rank0.log").read_text()
    assert "a new warning nobody catalogued" in shown and "all_gather_into_tensor" not in shown
    assert "all_gather_into_tensor" in logged and "a new warning nobody catalogued" in logged


def test_a_silent_rank_logs_everything_it_writes(tmp_path):
    """A rank other than 0, in a real process with console.install: print, a known and an unknown warning, and raw
    writes to fds 1 and 2 (C++/DeepSpeed output) all land in its log, and none reaches its terminal."""
    code = (
        "import os, sys, warnings\n"
        "from dpo_dist.runtime import console\n"
        f"console.install({str(tmp_path)!r}, 1)\n"
        "print('a print from rank 1', flush=True)\n"
        "warnings.warn_explicit('`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
        "`torch.distributed.all_gather_single` instead.', FutureWarning, '/v/torch/distributed/c10d_logger.py', 1)\n"
        "warnings.warn_explicit('a warning nobody catalogued', UserWarning, '/v/lib.py', 2)\n"
        "os.write(1, b'raw fd 1 from C\\n'); os.write(2, b'raw fd 2 from C\\n')\n")
    rc, shown, shown_err = run_process([sys.executable, "-c", code], {}, 60, split_stderr=True)
    assert rc == 0, shown + shown_err
    log = outcome.rank_log(tmp_path, 1).read_text()
    for text in ("a print from rank 1", "all_gather_into_tensor", "a warning nobody catalogued", "raw fd 1 from C",
                 "raw fd 2 from C"):
        assert text in log, (text, log)
    assert (shown, shown_err) == ("", "")  # rank 1 speaks only to name its own failure


def test_failure_records_become_one_line_naming_every_rank_and_keep_the_code(tmp_path):
    for rank in (1, 0):
        outcome.write_failure(tmp_path, outcome.Failure(rank, 2, "input checks", "rejected is empty (row 3)",
                                                        "every row needs a non-empty rejected"))
    text, code = outcome.summarize(outcome.read_failures(tmp_path))
    assert code == 2 and LINE.match(text), text
    assert text == ("dpo-dist: input checks failed on rank(s) 0,1: rejected is empty (row 3). Fix: every row needs "
                    "a non-empty rejected")


def test_a_rank_that_left_no_record_is_named_from_its_log(tmp_path):
    d = outcome.log_dir(tmp_path)
    d.mkdir()
    (d / "rank1.log").write_text("noise\ndpo-dist: rank 1 failed in stage 'load': RuntimeError: injected fault "
                                 "(ending this rank; the launcher stops the others)\n")
    text, code = outcome.summarize(outcome.read_failures(tmp_path))
    assert code == 1 and text.startswith("dpo-dist: load failed on rank(s) 1: RuntimeError: injected fault. Fix: ")


def test_a_rank_that_vanished_is_named_not_the_one_that_noticed(tmp_path):
    """Rank 1 died without a word (os._exit, SIGKILL, OOM killer); rank 0 then lost its connection: rank 1 is named."""
    d = outcome.log_dir(tmp_path)
    d.mkdir()
    (d / "rank1.log").write_text("[dpo-dist] rank 1: injected crash at stage 'load'\n")
    (d / "rank0.log").write_text("noise\ndpo-dist: rank 0 failed in stage 'load': RuntimeError: [gloo] Connection "
                                 "closed by peer [10.0.0.2]:1234 (ending this rank; the launcher stops the others)\n")
    text, code = outcome.conclude(tmp_path)
    assert code == 1 and text.startswith("dpo-dist: load failed on rank(s) 1: ended without a word"), text
    assert "logs/rank1.log" in text
    # a rank without a record is not blamed when the others failed for a cause of their own (bad input: torchrun
    # stopped rank 1 before it wrote)
    outcome.write_failure(tmp_path, outcome.Failure(0, 2, "input checks", "rejected is empty (row 3)", "fix row 3"))
    text, code = outcome.conclude(tmp_path)
    assert code == 2 and text.startswith("dpo-dist: input checks failed on rank(s) 0: rejected is empty"), text


def test_split_hint_keeps_the_fix_after_the_where():
    assert outcome.split_hint("model_type 'x' needs remote code (config.json auto_map): set "
                              "model.trust_remote_code: true") == (
        "model_type 'x' needs remote code (config.json auto_map)", "set model.trust_remote_code: true")
    assert outcome.split_hint("a. Fix: b") == ("a", "b")


def test_timeline_and_failure_line_name_the_stage_of_the_failing_check():
    ranks = []
    for rank in (0, 1):
        rr = RankReport(rank)
        timed(rr, "setup", lambda rr=rr: rr.add("configuration", True, "ok"))
        timed(rr, "data", lambda rr=rr, rank=rank: rr.add("datasets valid", rank == 0, "bad row 3", "fix row 3"))
        ranks.append(rr)
    rep = build_report(ranks, {})
    assert [row["stage"] for row in rep["timeline"]] == ["setup", "data"]
    assert set(rep["timeline"][1]["ranks"]) == {0, 1} and rep["timeline"][1]["ranks"][1]["ok"] is False
    assert json.loads(json.dumps(rep, default=str))["timeline"][0]["ranks"]["0"]["seconds"] >= 0
    assert failure_line(rep) == "dpo-dist: data failed on rank(s) 1: check 'datasets valid': bad row 3. Fix: fix row 3"


def test_sbatch_verdict_ends_with_the_ranks_cause_and_code(tmp_path, capsys):
    from dpo_dist.launch.sbatch import verdict

    outcome.write_failure(tmp_path, outcome.Failure(0, 2, "input checks", "bad row (data.train x row 3)", "fix it"))
    (outcome.log_dir(tmp_path) / "rank0.log").write_text("...")
    assert verdict(str(tmp_path / "report.json"), "1", "none") == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert LINE.match(last) and "rank(s) 0" in last, last


def _torch_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif("_torch_has_gpu()", reason="a GPU machine measures its GPUs")
def test_dry_run_on_a_login_node_plans_for_the_gpus_it_was_told_about(capsys, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert main(["init", "--dry-run", "--nodes", "8", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "world 64 = 8 node(s) x 8" in out and "per GPU" in out, out
    assert "assumed: 8 node(s) x 8 GPU(s) as given, with no GPU here to measure: 80 GB per GPU" in out, out
    main(["init", "--dry-run", "--nodes", "8"])
    out = capsys.readouterr().out
    assert "assumed: no GPU on this machine and no --gpus-per-node, so 8 node(s) x 1 cpu rank(s)" in out, out


def test_rank_0_names_every_rank_a_check_failed_on(tmp_path):
    """A gate failure: rank 0 writes the record for all (the launcher may stop rank 1 before it writes its own)."""
    outcome.write_failure(tmp_path, outcome.Failure(0, 1, "tokenizer", "injected fault", "see the log", [1]))
    assert outcome.summarize(outcome.read_failures(tmp_path)) == (
        "dpo-dist: tokenizer failed on rank(s) 1: injected fault. Fix: see the log", 1)
