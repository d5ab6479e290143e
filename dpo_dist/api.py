"""Python entry point for training scripts: run the init path, get the report and a ready DPOTrainer back.

    from dpo_dist.api import prepare
    result = prepare("my_run.yaml")          # under accelerate launch, on every rank
    if result.passed:
        result.trainer.train()

The process group stays up (the trainer needs it); the caller's process exit tears it down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig, load


def prepare(config: str | Path | RunConfig | None = None, overrides: list[tuple[list[str], Any]] | None = None,
            write_report: bool = True):
    """Load, prove and build, exactly as `dpo-dist init` does; returns an InitResult (report, trainer)."""
    from .distributed import DistContext
    from .run import InitRun, finish

    cfg = config if isinstance(config, RunConfig) else load(config, overrides)
    ctx = DistContext.from_env(cfg.sharding.timeout_s)
    result = InitRun(cfg, ctx).run()
    if write_report:
        finish(result, ctx, cfg.train.output_dir)
    return result
