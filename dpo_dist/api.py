"""Python entry point for training scripts: run the gate, then train with the DPOTrainer it proved.

    from dpo_dist.api import prepare, train
    result = prepare("my_run.yaml")          # under accelerate launch, on every rank
    if result.passed:
        train(result)                        # exactly what `dpo-dist init --train` does after the gate

`train(result)` trains under the config's schedule, saves the trained policy into `<output_dir>/final` (Hugging Face
format, the tokenizer beside it) and adds the training's history to report.json; `result.trainer.train()` works too
(the trainer is handed back at the proven initial state, smoke steps undone, under the run's schedule) for a script
that wants its own loop around it.

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


def train(result, debug: bool = False) -> int:
    """Train a passed gate's trainer in these processes (dpo_dist.train.after_gate): 0 trained and saved, 5 training
    failed (a rank that fails says why and ends; the launcher stops the others). A failed gate is refused."""
    if not result.passed:
        raise ValueError("the quality gate failed: report.json says which check and what to do; nothing to train")
    from dpo_dist.config.sharding import train_refusal

    refused = train_refusal(result.cfg)
    if refused:
        raise ValueError(refused)
    from dpo_dist.train import after_gate

    s = result.state
    return after_gate.run(result.trainer, result.cfg, result.ctx, s.train_fields, s.kl_monitor, debug)


def gate_then_train(result, gate_code: int, debug: bool = False) -> int:
    """`dpo-dist init --train` after `finish`: train only if the gate passed; the exit code says which part failed,
    the gate's (1-4, dpo_dist.cli.init) or training's (5). Placement ranks: the reference ranks end with it."""
    remote = result.state.remote
    try:
        if gate_code != 0 or not result.passed:
            if result.ctx.is_main:
                print(f"[dpo-dist] not training: the quality gate did not pass (exit {gate_code or 1})", flush=True)
            return gate_code or 1
        return train(result, debug)
    finally:
        if remote is not None:
            remote.close(result.passed)
