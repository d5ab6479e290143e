"""`dpo-dist init`: the run config, the memory plan, then the stages on this rank (dpo_dist.init.stages).

Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 bad input (one line); 3 the ranks never
all met; 4 an unexpected error (one line, the traceback with --debug); with --train, 5 training failed after a passed
gate (0: the gate passed and training finished).
"""

from __future__ import annotations

import argparse
import os
import sys

from dpo_dist.cli.common import add_config_args, add_voice_args, overrides, voice_mode
from dpo_dist.config.names import Placement


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    add_voice_args(p)
    p.add_argument("--dry-run", action="store_true", help="build everything on the meta device (no weights): "
                   "sharding, placement, config checks, trainer arguments, memory plan; --model may be a preset")
    p.add_argument("--force", action="store_true", help="run even if the memory plan says it cannot fit")
    p.add_argument("--print-config", action="store_true", help="print the run's fully resolved config (YAML: "
                   "defaults < --config < flags and --set) and exit 0")
    p.add_argument("--train", action="store_true", help="after a passed gate, train in the same processes with the "
                   "trainer it proved; exit 5 if training fails (docs/training.md)")
    from dpo_dist.plan.planner import parse_bytes

    for flag, kind, what in (("--nodes", int, "nodes"), ("--gpus-per-node", int, "ranks per node"),
                             ("--gpu-mem", parse_bytes, "memory per GPU, e.g. 80GB"),
                             ("--host-mem", parse_bytes, "host memory per node, e.g. 2TB")):
        p.add_argument(flag, type=kind, help=f"cluster for the plan: {what} (default: detected)")


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 bad input (one line);
    3 the ranks never all met; 4 an unexpected error (one line, the traceback with --debug)."""
    from dpo_dist.config.schema import ConfigError, load

    rank = int(os.environ.get("RANK", "0"))
    _FAILURE.clear()
    try:
        cfg = load(args.config, overrides(args))
    except ConfigError as e:  # no output dir yet, so no log: every rank read the same config, rank 0 says it
        if rank == 0:
            from dpo_dist.runtime.outcome import line

            print(line("config", [rank], e.one_line(), "correct that value in the run YAML or on the command line "
                       "(--set SECTION.KEY=VALUE)"), file=sys.stderr)
        elif "RANK" in os.environ:  # rank 0 says it; the launcher stops rank 0 once this rank ends: a moment first
            import time

            time.sleep(5)
        return 2
    if getattr(args, "print_config", False):
        from dpo_dist.config.docs import resolved_yaml

        print(resolved_yaml(cfg), end="")
        return 0
    if not args.dry_run:  # before anything is written there (the logs): is the output dir this run's to write?
        refused = _claim(cfg, rank)
        if refused:
            return refused
    if "RANK" in os.environ and not args.dry_run:  # launched: one voice on the terminal, every rank in its log
        from dpo_dist.runtime import console

        console.install(cfg.train.output_dir, rank, voice_mode(args))
    code = _run_config(args, cfg)
    if code and "RANK" in os.environ and not args.dry_run:
        _record(cfg.train.output_dir, rank, code)
        if code == 2 and rank != 0:
            _let_rank0_speak(cfg.train.output_dir, rank)
    return code


def _claim(cfg, rank: int) -> int:
    """0, or 2 after one line when the output dir is not this run's to write (someone else's files, a live run's
    dir, a finished run's report without --overwrite): then nothing was written there, no log, no record."""
    from dpo_dist.runtime.run_lock import OutputDirRefused, claim, release

    try:
        claim(cfg.train.output_dir, rank, bool(cfg.overwrite or cfg.train.resume_from))
    except OutputDirRefused as e:
        release(cfg.train.output_dir)
        if rank == 0 or not e.every_rank:
            print(_line("input checks", rank, str(e)), file=sys.stderr, flush=True)
        elif "RANK" in os.environ:  # rank 0 says it; the launcher would stop it once this rank ended: a moment first
            import time

            time.sleep(5)
        return 2
    return 0


def _let_rank0_speak(output_dir: str, rank: int, wait_s: float = 10.0) -> None:
    """Bad input is the same on every rank, and rank 0 says it. A rank that got there first waits (a few seconds)
    for rank 0's record before it exits, since the launcher stops every rank once one has ended; if rank 0 never
    fails the same way, this rank says it itself."""
    import time

    from dpo_dist.runtime import console, outcome

    record = outcome.log_dir(output_dir) / "rank0.failure.json"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if record.exists():
            return
        time.sleep(0.2)
    if console.ACTIVE is not None and "first" in _FAILURE:
        console.ACTIVE.say(_line(_FAILURE["first"][0], rank, _FAILURE["first"][1]))


def _line(stage: str, rank: int, message: str) -> str:
    from dpo_dist.runtime.outcome import line, split_hint

    return line(stage, [rank], *split_hint(message))


_FAILURE: dict = {}  # this rank's first failure: stage and message, for rank<r>.failure.json


def _fail(stage: str, message: str, code: int) -> int:
    """Our one line. Bad input (2) is the same on every rank, so rank 0 says it and the others only log it."""
    rank = int(os.environ.get("RANK", "0"))
    _FAILURE.setdefault("first", (stage, message))
    text = _line(stage, rank, message)
    stream = sys.stderr
    if rank != 0 and code == 2 and hasattr(stream, "log_only"):
        stream.log_only(text + "\n")
    else:
        print(text, file=stream, flush=True)
    return code


def _record(output_dir: str, rank: int, code: int) -> None:
    from dpo_dist.runtime.outcome import Failure, split_hint, write_failure

    if "first" in _FAILURE:
        stage, message = _FAILURE["first"]
        write_failure(output_dir, Failure(rank, code, stage, *split_hint(message)))
    elif "report" in _FAILURE:
        from dpo_dist.verify.report import first_failure

        stage, ranks, cause, hint = first_failure(_FAILURE["report"])
        if rank == 0 and stage:  # every rank holds the report; rank 0 writes it (the launcher may stop the others)
            write_failure(output_dir, Failure(rank, code, stage, cause, hint, ranks))


def _run_config(args: argparse.Namespace, cfg) -> int:
    from dpo_dist.plan.refusal import ClusterArgs

    if cfg.train.extra.get("sync_ref_model") and cfg.verify.smoke_steps > 0:  # issue 21, #79
        return _fail("input checks", "train.extra.sync_ref_model=true (TR-DPO) moves the reference every "
                     "ref_model_sync_steps, and the smoke steps check that it stays frozen: run the gate with "
                     "--smoke-steps 0 (the step-0 proofs still hold), or drop sync_ref_model", 2)

    if getattr(args, "train", False):
        from dpo_dist.config.sharding import train_refusal

        refused = train_refusal(cfg)
        if refused:
            return _fail("input checks", refused, 2)
    cluster_args = ClusterArgs(args.nodes, args.gpus_per_node, args.gpu_mem, args.host_mem)
    if args.dry_run:
        from dpo_dist.plan.refusal import dry_run
        from dpo_dist.runtime.console import install_warning_filter

        if voice_mode(args) != "verbose":
            install_warning_filter()

        try:
            return dry_run(cfg, cluster_args)
        except ValueError as e:
            return _fail("dry run", str(e), 2)
    if cfg.reference.placement == Placement.RANKS:  # the split of the launched processes, before anything is loaded
        from dpo_dist.runtime.roles import check_counts

        problem = check_counts(int(os.environ.get("WORLD_SIZE", "1")), cfg.reference.ranks)
        if problem:
            return _fail("placement ranks", problem, 2)
    from dpo_dist.runtime.run_lock import release

    try:
        return _init_owned(args, cfg, cluster_args)
    finally:
        release(cfg.train.output_dir)  # the process usually ends here anyway; in-process callers get the dir back


def _init_owned(args: argparse.Namespace, cfg, cluster_args) -> int:
    """Preflight (rank 0 takes the output dir there), the memory plan, then the run."""
    from dpo_dist.init.preflight import PreflightError, check_data_in_subprocess, run_preflight

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # rows validated once per node, outside the ranks
    try:
        run_preflight(cfg, data=not launched)
        if launched and os.environ.get("LOCAL_RANK", "0") == "0":
            check_data_in_subprocess(cfg)
    except PreflightError as e:
        return _fail("input checks", str(e), 2)
    if not args.force:
        from dpo_dist.plan.refusal import plan_for, refusal

        try:
            problem = refusal(*plan_for(cfg, cluster_args)[:2])
            if problem:  # planned at max_length: plan again at what the batches will really pad to
                from dpo_dist.init.plan_length import replan_at_data_length

                problem, note = replan_at_data_length(cfg, cluster_args, problem)
                if note and int(os.environ.get("RANK", "0")) == 0:
                    print(note, flush=True)
        except (OSError, ValueError) as e:  # a config the planner cannot read: the run itself will say more
            problem = None
            print(f"dpo-dist: warning: no memory plan ({e})", file=sys.stderr)
        if problem:
            return _fail("memory plan", problem, 2)
    try:
        from dpo_dist.init.stages import InitRun, finish
        from dpo_dist.runtime.distributed import RendezvousError
        from dpo_dist.runtime.roles import REFERENCE, join

        try:
            ctx = join(cfg)
        except RendezvousError as e:
            return _fail("rendezvous", str(e), 3)
        except ValueError as e:
            return _fail("rendezvous", str(e), 2)
        if ctx.roles is not None and ctx.roles.role == REFERENCE:
            from dpo_dist.reference.rank_server import serve

            try:
                return serve(cfg, ctx, ctx.roles, debug=args.debug)
            finally:
                ctx.teardown()
        try:
            train = getattr(args, "train", False)
            result = InitRun(cfg, ctx, debug=args.debug, keep_serving=train).run()
            _FAILURE["report"] = result.report
            code = finish(result, ctx, cfg.train.output_dir)
            if train:  # dpo_dist.train.after_gate: 0 trained, 5 training failed; a failed gate (1) trains nothing
                from dpo_dist.api import gate_then_train

                code = gate_then_train(result, code, args.debug)
            return code
        finally:
            ctx.teardown()
    except Exception as e:  # one line for the user; the traceback only when asked for
        if args.debug:
            raise
        from dpo_dist.runtime.roles import BridgeError

        if isinstance(e, BridgeError):  # placement ranks: the other role's rank went silent after the stages (#57)
            return _fail("reference ranks", str(e), 1)
        first = str(e).splitlines()[0] if str(e) else ""
        return _fail("init", f"unexpected {type(e).__name__}: {first}. Fix: rerun with --debug for the traceback", 4)
