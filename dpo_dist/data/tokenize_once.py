"""TRL's tokenization, once per node, with no collective while it runs.

TRL's DPOTrainer tokenizes its datasets inside `global_then_local_main_first()`: the main process maps, the others
wait in a process-group barrier, which times out (sharding.timeout_s) if tokenizing takes longer, as a million
conversational rows do on one core. So before the trainer exists, each node's local main process runs TRL's own
`DPOTrainer._prepare_dataset` (the same code, so the same datasets cache fingerprints), cached by datasets next to
the data's Arrow files, while the other ranks wait for a file, not a collective. Inside the trainer every rank then
finds the cached result and the barriers are short.

TRL's private surface used (DPOTrainer._prepare_dataset, its module-level global_then_local_main_first) is behind
dpo_dist.compat.trl.prepare_dataset (pinned by tests/test_compat.py); tests/test_data_launch.py fails if the trainer
stops reusing this cache.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from dpo_dist.compat import datasets as datasets_compat
from dpo_dist.compat import trl as trl_compat
from dpo_dist.runtime import liveness
from dpo_dist.runtime.disk_writes import write_text_atomic

POLL_S = 0.5


def marker(dataset, name: str, tok_key: str) -> Path:
    key = hashlib.sha256(f"{datasets_compat.fingerprint(dataset)}|{name}|{tok_key}".encode()).hexdigest()[:16]
    return Path(dataset.cache_files[0]["filename"]).parent / f"dpo-dist-tokenized-{key}"


def once_per_node(mark: Path, fn, local_main: bool, what: str, note=print, describe=lambda out: "done") -> str:
    """fn() on the node's local main process, which then writes describe(result) to `mark`.done (or the error to
    .failed); the other ranks wait for that file, polling: no collective, so no timeout however long fn takes while
    the local main lives. Its liveness beat is watched: one that stands still for sharding.timeout_s (a stopped
    process, a hung node) ends the wait with a TimeoutError naming that rank (issue 21, #77).
    Returns the .done file's text on every rank."""
    # .failed is per launch (the ranks of a node share their launcher's pid), so a failure left by an earlier run is
    # never read as this one's; a .done left by an earlier run means its cache is there already
    ok, failed = mark.with_suffix(".done"), mark.with_suffix(f".failed-{os.getppid()}")
    if local_main:
        try:
            out = fn()
        except Exception as e:
            write_text_atomic(failed, f"{type(e).__name__}: {e}")  # a waiter never reads it half-written
            raise
        text = describe(out)
        write_text_atomic(ok, text)
        return text
    t0, said = time.monotonic(), time.monotonic()
    main_rank = int(os.environ.get("RANK", "0")) - int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: contiguous
    watch = liveness.Watch(main_rank)
    while not ok.exists():
        if failed.exists():
            raise ValueError(f"{what} failed on this node's first rank: {failed.read_text()}")
        problem = watch.problem(what)
        if problem:
            raise TimeoutError(problem)
        if time.monotonic() - said > 60:
            said = time.monotonic()
            note(f"[dpo-dist] rank {os.environ.get('RANK', '?')} waiting for {what} ({time.monotonic() - t0:.0f} s)")
        time.sleep(POLL_S)
    return ok.read_text()


def tokenize_once(datasets: dict, tok, args, tok_key: str, local_main: bool, note=print) -> dict[str, str]:
    """TRL's preparation of each file-backed dataset on the local main process; the others wait for its done-file.
    Returns {name: cache file of TRL's tokenized dataset} on every rank, for the caller to check that the trainer
    reused it."""
    done: dict[str, str] = {}
    for name, ds in datasets.items():
        if ds is None or not ds.cache_files:
            continue  # in memory: nothing to share
        def run(ds=ds, name=name):
            return trl_compat.prepare_dataset(ds, tok, args, name)

        done[name] = once_per_node(marker(ds, name, tok_key), run, local_main, f"tokenizing the {name} dataset", note,
                                   lambda out: out.cache_files[0]["filename"] if out.cache_files else "")
    return done
