"""Python entry point for training scripts: run the init path, get the report and a ready DPOTrainer back.

    from dpo_dist.api import prepare
    result = prepare("my_run.yaml")          # under accelerate launch, on every rank
    if result.passed:
        result.trainer.train()

The process group stays up (the trainer needs it); the caller's process exit tears it down. With
`reference.placement: ranks` the reference ranks never return from `prepare`: they serve the policy ranks until
those exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_dist.config.schema import RunConfig, load


def prepare(config: str | Path | RunConfig | None = None, overrides: list[tuple[list[str], Any]] | None = None,
            write_report: bool = True):
    """Load, prove and build, exactly as `dpo-dist init` does; returns an InitResult (report, trainer)."""
    from dpo_dist.init.stages import InitRun, finish
    from dpo_dist.runtime.roles import REFERENCE, join

    cfg = config if isinstance(config, RunConfig) else load(config, overrides)
    ctx = join(cfg)
    if ctx.roles is not None and ctx.roles.role == REFERENCE:  # serves until every policy rank is done; never returns
        from dpo_dist.reference.rank_server import serve

        raise SystemExit(serve(cfg, ctx, ctx.roles))
    result = InitRun(cfg, ctx, keep_serving=True).run()
    remote = result.state.remote
    if remote is not None:  # the reference ranks serve this process's training; they stop when it exits
        import atexit

        atexit.register(remote.close, result.passed)
    if write_report:
        finish(result, ctx, cfg.train.output_dir)
    return result
