"""Checks that need no GPU, no process group and no model: run on every rank before anything is launched or loaded,
so bad input costs a second and one line, not a 70B load and a hung job.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .checkpoint import CheckpointError, preflight
from .config import RunConfig
from .data import DataError, load_split
from .manifest import MANIFEST
from .resources import resolve_ds_config, resolve_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PreflightError(ValueError):
    """Bad input found before launch, with the fix in the message."""


def check_checkpoint(path: Path, cfg: RunConfig, role: str) -> None:
    try:
        conf = preflight(path, cfg.model.allow_pickle)
    except CheckpointError as e:
        raise PreflightError(f"{role}: {e}") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise PreflightError(f"{role}: no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)}): save "
                             "the SFT tokenizer with tokenizer.save_pretrained into the checkpoint directory")
    from .models import needs_remote_code

    if needs_remote_code(conf) and not cfg.model.trust_remote_code:
        raise PreflightError(f"{role}: model_type {conf.get('model_type')!r} in {path} is not built into transformers "
                             "and needs remote code: set model.trust_remote_code: true only if you trust its source")


def check_output_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.train.output_dir)
    if (out / "report.json").exists() and not (cfg.overwrite or cfg.train.resume_from):
        raise PreflightError(f"output dir {out} already holds a report from another run: pass --overwrite to replace "
                             "it, or choose another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PreflightError(f"output dir {out} is not writable ({e.strerror}): choose a writable --output-dir") \
            from None
    return out


def run_preflight(cfg: RunConfig) -> None:
    """Raise PreflightError naming the first problem; clear a stale report so a failed run cannot look passed."""
    out = check_output_dir(cfg)
    try:
        resolve_ds_config(cfg.sharding.name, cfg.sharding.ds_config)
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(str(e)) from None
    if (cfg.overwrite or cfg.train.resume_from) and int(os.environ.get("RANK", "0")) == 0:
        (out / "report.json").unlink(missing_ok=True)  # first: whatever fails next, the old verdict is gone
    check_checkpoint(resolve_model_path(cfg.model.path), cfg, "model")
    if cfg.reference.path:
        check_checkpoint(resolve_model_path(cfg.reference.path), cfg, "reference")
    if cfg.train.resume_from and not Path(cfg.train.resume_from).is_dir():
        raise PreflightError(f"train.resume_from {cfg.train.resume_from} is not a directory: point it at a "
                             "checkpoint-N folder the trainer saved")
    if cfg.train.resume_from and not (out / MANIFEST).is_file():
        raise PreflightError(f"no {MANIFEST} in {out}: a resume re-verifies the reference against the manifest "
                             "that the original init wrote there; use that run's --output-dir")
    for role, value, split in (("train", cfg.data.train, cfg.data.train_split),
                               ("eval", cfg.data.eval, cfg.data.eval_split)):
        if value is not None:
            try:
                load_split(value, role, split)
            except DataError as e:
                raise PreflightError(str(e)) from None
