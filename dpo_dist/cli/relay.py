"""`dpo-dist launch` runs accelerate with the ranks' terminal output passing through it, minus torchrun's noise; when
the ranks failed it ends with our one line (dpo_dist.runtime.outcome) and the log paths, not torchrun's
ChildFailedError traceback, and exits with the ranks' own code (2 bad input, 1 a failed check, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from dpo_dist.runtime import outcome
from dpo_dist.runtime.console import known_line
from dpo_dist.runtime.process_tree import kill_tree

# torchrun's agent logs (e.g. "W1201 06:10:00.123000 4242 torch/distributed/elastic/...] Sending process ...") and
# the lines the ranks' cause is summarized from (printed once, last, by the launcher)
TORCHRUN_LOG = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ \d+ \S*torch/distributed/")
RANK_CAUSE = re.compile(r"^dpo-dist: (rank \d+ failed in stage |.+ failed on rank\(s\) [\d,]+: )")
# torchrun's failure report names each failed rank's exit code ("exitcode  : 2 (pid: 123)"); torchrun itself exits 1
EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(\d+)")


class Relay:
    """One child stream to one of ours, whole lines filtered; a traceback is held back until we know whether it is
    torchrun's (dropped: the ranks said why) or something else (shown)."""

    def __init__(self, src: int, dst, summarize: bool):
        self.src, self.dst, self.summarize = src, dst, summarize
        self.held: list[str] = []  # a traceback being held back
        self.named_logs = False  # rank 0 named the log files already
        self.causes: list[str] = []  # the ranks' cause lines held back for the summary (shown if no record says it)
        self.buf = ""

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.src, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.feed(chunk.decode("utf-8", "replace"))
        if self.buf:
            self.feed("\n")
        os.close(self.src)

    def feed(self, text: str) -> None:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for ln in lines:
            self.line(ln)
        if "\r" in self.buf and not self.held:  # a progress bar being drawn: at once
            self.dst.write(self.buf)
            self.dst.flush()
            self.buf = ""

    def line(self, ln: str) -> None:
        # a traceback, or the logging module's report of a handler that failed mid-shutdown (torchrun's, on Ctrl-C)
        if self.held or ln.startswith(("Traceback (most recent call last):", "--- Logging error ---")):
            self.held.append(ln)
            return
        if self.summarize and RANK_CAUSE.match(ln):
            self.causes.append(ln)
            return
        if TORCHRUN_LOG.match(ln) or known_line(ln):
            return
        self.named_logs |= ln.startswith("[dpo-dist] logs: ")
        self.dst.write(ln + "\n")
        self.dst.flush()

    def leftover(self) -> list[str]:
        """The held traceback, unless it is torchrun's ChildFailedError (the ranks' own lines name the cause)."""
        if any("ChildFailedError" in ln for ln in self.held):
            return []
        return self.held


def launcher_failure(relays: list[Relay], spec) -> tuple[str, int] | None:
    """One line and exit code for what failed in accelerate/torchrun itself, before any rank ran (their traceback
    held back): the machines never met (exit 3, as init's rendezvous), or the head's port is taken (exit 2)."""
    held = "\n".join(ln for r in relays for ln in r.held)
    if spec is None or not held:
        return None
    where = f"{spec.main_process_ip or '127.0.0.1'}:{spec.main_process_port}"
    who = f"dpo-dist: rendezvous failed on machine rank {spec.machine_rank}"
    if "RendezvousTimeoutError" in held:
        return (f"{who}: not all {spec.num_machines} machines joined the rendezvous at {where} within --rdzv-timeout "
                f"({spec.rdzv_timeout_s} s). Fix: start `dpo-dist launch` with the same --num-machines, "
                "--main-process-ip and --port on every machine, each with its own --machine-rank (0 on the head)"), 3
    if "RendezvousConnectionError" in held or "RendezvousError" in held:
        return (f"{who}: could not reach the rendezvous at {where}. Fix: check --main-process-ip (the head machine's "
                "address, reachable from this one) and --port, and start machine rank 0 first"), 3
    if "Tried to launch distributed communication on port" in held:
        return (f"dpo-dist: launch failed on machine rank {spec.machine_rank}: port {spec.main_process_port} is in "
                "use on this machine. Fix: choose a free --port (the same on every machine)"), 2
    return None


def relay(argv: list[str], env: dict[str, str], output_dir: Path | None, spec=None) -> int:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    summarize = output_dir is not None
    relays = [Relay(proc.stdout.fileno(), sys.stdout, summarize), Relay(proc.stderr.fileno(), sys.stderr, summarize)]
    for r in relays:
        r.src = os.dup(r.src)
    proc.stdout.close()
    proc.stderr.close()
    threads = [threading.Thread(target=r.run, daemon=True) for r in relays]
    for t in threads:
        t.start()
    terminated = forward_sigterm(proc)
    rc, interrupted = wait_through_ctrl_c(proc)
    for t in threads:
        t.join(timeout=10)
    if interrupted or terminated:  # the ranks' and torchrun's words about the signal are noise: the user knows why
        what = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
        print(f"dpo-dist: {what}: every rank was stopped{'' if rc == 0 else ' (no report)'}; rerun the "
              "same command to start again", file=sys.stderr, flush=True)
        return 143 if terminated else 130
    if rc == 0:
        return 0
    summary = outcome.conclude(output_dir) if output_dir is not None else None
    if summary is None:
        summary = launcher_failure(relays, spec)
        if summary is not None:
            print(summary[0], file=sys.stderr, flush=True)
            return summary[1]
    if summary is None:  # no record (the config itself was bad, or another node's output dir): what the ranks printed
        for r in relays:
            if r.causes:
                r.dst.write("\n".join(dict.fromkeys(r.causes)) + "\n")
        for r in relays:
            if r.leftover():
                r.dst.write("\n".join(r.leftover()) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        return ranks_exit_code(relays) or rc
    text, code = summary
    logs = outcome.log_paths(output_dir)
    if logs and not any(r.named_logs for r in relays):
        print(f"[dpo-dist] logs: {' '.join(logs)}", flush=True)
    print(text, file=sys.stderr, flush=True)
    return code


def forward_sigterm(proc: subprocess.Popen) -> list[bool]:
    """A SIGTERM to the launcher (`kill`, a scheduler's cancel) goes on to accelerate, whose torchrun stops the ranks,
    instead of ending the launcher alone and leaving the ranks running into the output dir. Returns a flag list that
    is [True] once it happened."""
    import signal

    seen: list[bool] = []

    def on_term(signum, frame):
        seen.append(True)
        try:
            proc.send_signal(signal.SIGTERM)
        except OSError:
            pass

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (an embedding caller): keep the default
        pass
    return seen


def wait_through_ctrl_c(proc: subprocess.Popen, grace_s: float = 30.0) -> tuple[int, bool]:
    """(exit code, whether Ctrl-C was pressed). Ctrl-C reaches accelerate too (one process group), and torchrun
    stops its ranks on it: wait for that rather than leave with a traceback while they still write to our pipes
    (issue 21, #75). A second Ctrl-C, or ranks still running after `grace_s`, kills the launcher."""
    import time

    interrupted, deadline = False, None
    while True:
        try:
            if deadline is None:
                return proc.wait(), interrupted
            left = deadline - time.monotonic()
            if left <= 0:
                kill_tree(proc.pid)
                return proc.wait(), True
            try:
                return proc.wait(timeout=min(left, 1.0)), True
            except subprocess.TimeoutExpired:
                continue
        except KeyboardInterrupt:
            if interrupted:  # the second one: do not wait any longer
                deadline = time.monotonic()
            else:
                interrupted, deadline = True, time.monotonic() + grace_s


def ranks_exit_code(relays: list[Relay]) -> int | None:
    """The first failed rank's own exit code from torchrun's held-back report (2 bad input, 1 a failed check, ...),
    where no record says it; None when torchrun named none (a signal gives a negative code: not one of ours)."""
    for r in relays:
        for ln in r.held:
            m = EXITCODE.match(ln)
            if m and 0 < int(m.group(1)) < 128:
                return int(m.group(1))
    return None
