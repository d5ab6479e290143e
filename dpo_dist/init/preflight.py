"""Checks that need no GPU, no process group and no model: run on every rank before anything is launched or loaded,
so bad input costs a second and one line, not a 70B load and a hung job.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dpo_dist.config.names import Backend
from dpo_dist.config.resources import resolve_ds_config, resolve_model_path
from dpo_dist.config.schema import RunConfig
from dpo_dist.config.sharding import backend_of, placement_refusal
from dpo_dist.config.trl_args import unknown_extra_problems
from dpo_dist.load.checkpoint import CheckpointError, preflight
from dpo_dist.runtime.run_lock import OutputDirBusy, acquire
from dpo_dist.verify.manifest import MANIFEST

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
    problem = model_type_problem(conf, path, cfg.model.trust_remote_code)
    if problem:
        raise PreflightError(f"{role}: {problem}")


def model_type_problem(conf: dict, path: Path, trust_remote_code: bool) -> str | None:
    """A model type transformers lacks is custom code (config.json's auto_map names it) or a typo: only the first is
    helped by trust_remote_code, so the second gets a did-you-mean from transformers' own list of types."""
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = conf.get("model_type")
    if model_type in CONFIG_MAPPING:
        return None
    if isinstance(conf.get("auto_map"), dict):
        if trust_remote_code:
            return None
        return (f"model_type {model_type!r} in {path} is not built into transformers and needs remote code "
                "(config.json auto_map): set model.trust_remote_code: true only if you trust its source")
    where = path / "config.json"
    if model_type is None:
        return f"no model_type ({where}): set it to the model's type, e.g. 'llama', or re-save with save_pretrained"
    close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (f"model_type {model_type!r} is not a model type transformers knows ({where}): {hint}correct model_type "
            "in config.json (a custom model would also need its code named in auto_map)")


def check_output_dir(cfg: RunConfig) -> Path:
    """Writable, owned by this run (rank 0 takes the lock, held until the process ends: run_lock), and holding no
    other run's report unless --overwrite/resume. The lock comes first: a live run's report is not "stale"."""
    out = Path(cfg.train.output_dir)
    if out.is_dir():
        _lock(out)
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
    _lock(out)
    return out


def _lock(out: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        acquire(out)
    except OutputDirBusy as e:
        raise PreflightError(str(e)) from None
    except OSError:  # not writable: the check above names it
        pass


def run_preflight(cfg: RunConfig, data: bool = True) -> None:
    """Raise PreflightError naming the first problem; clear a stale report so a failed run cannot look passed.
    data=False: the rows are validated elsewhere (check_data in a short subprocess, so the ranks do not import
    datasets and pyarrow before the models load)."""
    out = check_output_dir(cfg)
    unknown = unknown_extra_problems(cfg.train.extra)
    if unknown:
        raise PreflightError(unknown[0])  # one line: the first, with its fix
    try:
        if backend_of(cfg.sharding.name, cfg.sharding.ds_config) == Backend.DEEPSPEED:  # FSDP2 reads no JSON
            resolve_ds_config(cfg.sharding.name, cfg.sharding.ds_config)
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(str(e)) from None
    refused = placement_refusal(cfg)
    if refused:
        raise PreflightError(refused)
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
    if data:
        check_data(cfg)


def check_data(cfg: RunConfig) -> None:
    """Every row of data.train and data.eval valid (imports datasets and pyarrow)."""
    from dpo_dist.data.prepare import DataError, load_split

    for role, value, split in (("train", cfg.data.train, cfg.data.train_split),
                               ("eval", cfg.data.eval, cfg.data.eval_split)):
        if value is not None:
            try:
                load_split(value, role, split)
            except DataError as e:
                raise PreflightError(str(e)) from None


def check_data_in_subprocess(cfg: RunConfig) -> None:
    """check_data in a short child process: the libraries it imports (+83 MiB per process) never enter this rank."""
    from dpo_dist.init.config_child import run_with_config

    res = run_with_config("from dpo_dist.init.preflight import PreflightError, check_data\n"
                          "try:\n    check_data(cfg)\n"
                          "except PreflightError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n", cfg)
    if res.returncode == 2:
        raise PreflightError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "data check failed")
    if res.returncode != 0:  # the child itself broke: validate here instead (correct, only heavier)
        check_data(cfg)
