"""One voice on the terminal: every rank's full output goes to `<output_dir>/logs/rank<r>.log`; the terminal gets rank
0's own lines (stages, the gate table, the verdict) and, from other ranks, only their failures.

How: the rank's file descriptors 1 and 2 point at its log (so C++/DeepSpeed output lands there too) and Python's
sys.stdout/sys.stderr become a `RankStream` that writes everything to the log and lets a line through to the
terminal (a dup of the original fd) only when this rank and mode say so. Known third-party noise is named below by
exact message and origin (NOISE_WARNINGS, NOISE_LINES): it goes to the log only; anything unknown still shows.
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.runtime import outcome

DEFAULT, QUIET, VERBOSE = "default", "quiet", "verbose"
# tqdm (datasets', TRL's, the trainer's bars) draws a bar only for work that takes longer than this; read from the
# environment when tqdm is imported
PROGRESS_DELAY_S = "3"


@dataclass(frozen=True)
class Noise:
    message: str  # regex, matched from the start of the warning's text
    category: type[Warning]
    origin: str  # regex on the file the warning is attributed to
    why: str


NOISE_WARNINGS = (
    Noise(r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated\. Please use "
          r"`torch\.distributed\.(reduce_scatter_single|all_gather_single)` instead\.", FutureWarning,
          r"torch/distributed/c10d_logger\.py$", "DeepSpeed ZeRO-3 calls the old collectives on every gather "
          "(~500 lines per demo)"),
    Noise(r"`is_gradient_checkpointing` is deprecated and will be removed in v\d+\. Use "
          r"`is_activation_checkpointing` instead\.", FutureWarning, r"transformers/modeling_utils\.py$",
          "TRL/DeepSpeed read the old attribute inside the trainer"),
    Noise(r"`gradient_checkpointing` is deprecated and will be removed in v\d+\. Use `activation_checkpointing` "
          r"instead\.", FutureWarning, r"transformers/training_args\.py$",
          "TRL's DPOConfig reads the old field when the arguments are built"),
)
# Lines (not warnings) that third-party code prints on rank 0, matched whole, with where they come from.
NOISE_LINES = (
    (r"\[RANK 0\] Gradient accumulation steps mismatch: GradientAccumulationPlugin has \d+, DeepSpeed config has "
     r"\d+\. Using DeepSpeed's value\.", "accelerate: DeepSpeed's config is the one dpo-dist checks"),
    (r"\{'(loss|train_runtime|eval_loss)': .*\}", "transformers' ProgressCallback: smoke losses are in the report"),
    (r"DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully",
     "DeepSpeed's CPU comm op loading"),
    (r"\[\S+ \S+\] \[(INFO|WARNING)\] \[(real_accelerator|config|engine|logging|comm|partition_parameters|"
     r"stage3|utils)\.py:\d+:\S+\] .*", "DeepSpeed's INFO/WARNING logger"),
)
_NOISE_LINES = [re.compile(p) for p, _ in NOISE_LINES]
# "[dpo-dist] loading policy ... ..." announces a stage's work; the stage's line with its duration replaces it
_ANNOUNCE = re.compile(r"^\[dpo-dist\] .* \.\.\.$")
_QUIET_KEEP = re.compile(r"^(\[dpo-dist\] quality gate |dpo-dist: )")
_OTHER_RANK_KEEP = re.compile(r"^dpo-dist: (rank \d+|.+ failed on rank\(s\) [\d,]+: )")  # a failure names its rank


def known_warning(message: str, category: type[Warning], filename: str) -> Noise | None:
    for n in NOISE_WARNINGS:
        if issubclass(category, n.category) and re.match(n.message, message) and re.search(n.origin, filename):
            return n
    return None


def known_line(text: str) -> bool:
    return any(p.fullmatch(text) for p in _NOISE_LINES)


def shows(text: str, rank: int, mode: str) -> bool:
    """Whether one complete line written by this rank reaches the terminal."""
    if mode == VERBOSE:
        return True
    if rank != 0:
        return bool(_OTHER_RANK_KEEP.match(text))
    if mode == QUIET:
        return bool(_QUIET_KEEP.match(text))
    return not (known_line(text) or _ANNOUNCE.match(text))


_BAR = {"open": False}  # rank 0's terminal line holds a progress bar that no newline has ended yet


class RankStream(io.TextIOBase):
    """sys.stdout/sys.stderr of a rank: everything to the log, whole lines to the terminal when `shows` says so;
    writes that draw a progress bar (carriage returns) go through at once, on rank 0 only."""

    def __init__(self, log_fd: int, term_fd: int, rank: int, mode: str, fileno: int):
        self.log_fd, self.term_fd, self.rank, self.mode, self._fileno = log_fd, term_fd, rank, mode, fileno
        self.pending = ""
        self.isatty_ = os.isatty(term_fd)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.isatty_

    def fileno(self) -> int:
        return self._fileno

    @property
    def encoding(self) -> str:
        return "utf-8"

    def write(self, s: str) -> int:
        data = s.encode("utf-8", "replace")
        _write_all(self.log_fd, data)
        if "\r" in s and not self.pending:  # a progress bar redrawing its line
            if self.rank == 0 and self.mode != QUIET:
                _write_all(self.term_fd, data)
                _BAR["open"] = not s.endswith("\n")
            return len(s)
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        out = [ln for ln in lines if shows(ln.rstrip("\r"), self.rank, self.mode)]
        if out and _BAR["open"]:  # end the bar's line first; a bar's own closing newline is that end
            _BAR["open"] = False
            if out[0] == "":
                out = out[1:]
            _write_all(self.term_fd, b"\n")
        if out:
            _write_all(self.term_fd, ("\n".join(out) + "\n").encode("utf-8", "replace"))
        return len(s)

    def log_only(self, s: str) -> None:
        _write_all(self.log_fd, s.encode("utf-8", "replace"))

    def flush(self) -> None:
        pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError:
            return
        data = data[n:]


@dataclass
class Console:
    rank: int
    mode: str
    log: Path
    term_out: int
    term_err: int

    def say(self, text: str) -> None:
        """A line for the terminal of this rank whatever the mode (and the log)."""
        stream = sys.stderr
        if isinstance(stream, RankStream):
            stream.log_only(text + "\n")
        _write_all(self.term_err, (text + "\n").encode("utf-8", "replace"))


def install(output_dir: str | Path, rank: int, mode: str = DEFAULT) -> Console | None:
    """Tee this rank into `<output_dir>/logs/rank<rank>.log` and route its terminal output; None if the log cannot
    be opened (then nothing changes: the run's own checks say why the output dir is unusable)."""
    os.environ.setdefault("TQDM_DELAY", PROGRESS_DELAY_S)
    path = outcome.rank_log(output_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    except OSError:
        return None
    outcome.clear(output_dir, rank)
    sys.stdout.flush()
    sys.stderr.flush()
    term_out, term_err = os.dup(1), os.dup(2)
    if mode != VERBOSE:  # C++ output too; --verbose leaves it on the terminal
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    global ACTIVE
    ACTIVE = Console(rank, mode, path, term_out, term_err)
    sys.stdout = RankStream(log_fd, term_out, rank, mode, 1)
    sys.stderr = RankStream(log_fd, term_err, rank, mode, 2)
    if mode != VERBOSE:
        install_warning_filter()
    if rank != 0 and mode != VERBOSE:
        os.environ.setdefault("TQDM_DISABLE", "1")  # nobody sees them; keep the log readable
    return ACTIVE


ACTIVE: Console | None = None  # this process's console, once `install` ran (a launched `dpo-dist init`)


def name_logs(world_size: int) -> None:
    """Rank 0, at the end: where every rank's full output is (nothing when no console was installed)."""
    if ACTIVE is None:
        return
    d = ACTIVE.log.parent
    names = f"rank0.log .. rank{world_size - 1}.log" if world_size > 1 else "rank0.log"
    print(f"[dpo-dist] logs: {os.path.relpath(d) if not d.is_absolute() else d}/{names}", flush=True)


def install_warning_filter() -> None:
    """Known noise (NOISE_WARNINGS) goes to the log only (nowhere in a process without a rank log: the launcher,
    `init --dry-run`); every other warning shows as Python would show it."""
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        stream = sys.stderr
        if known_warning(str(message), category, filename):  # a launched rank logs it; elsewhere it is dropped
            if isinstance(stream, RankStream):
                stream.log_only(warnings.formatwarning(message, category, filename, lineno, line))
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
