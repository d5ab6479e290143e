"""`dpo-dist init`: the run config, the memory plan, then the stages on this rank (dpo_dist.init.stages).

Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 bad input (one line); 3 the ranks never
all met; 4 an unexpected error (one line, the traceback with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys

from dpo_dist.cli.common import add_config_args, overrides
from dpo_dist.config.names import Placement


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    p.add_argument("--dry-run", action="store_true", help="build everything on the meta device (no weights): "
                   "sharding, placement, config checks, trainer arguments, memory plan; --model may be a preset")
    p.add_argument("--force", action="store_true", help="run even if the memory plan says it cannot fit")
    from dpo_dist.plan.planner import parse_bytes

    for flag, kind, what in (("--nodes", int, "nodes"), ("--gpus-per-node", int, "ranks per node"),
                             ("--gpu-mem", parse_bytes, "memory per GPU, e.g. 80GB"),
                             ("--host-mem", parse_bytes, "host memory per node, e.g. 2TB")):
        p.add_argument(flag, type=kind, help=f"cluster for the plan: {what} (default: detected)")


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 bad input (one line);
    3 the ranks never all met; 4 an unexpected error (one line, the traceback with --debug)."""
    from dpo_dist.config.schema import ConfigError, load

    try:
        cfg = load(args.config, overrides(args))
    except ConfigError as e:
        print(f"dpo-dist: {e.one_line()}", file=sys.stderr)
        return 2
    from dpo_dist.plan.refusal import ClusterArgs

    cluster_args = ClusterArgs(args.nodes, args.gpus_per_node, args.gpu_mem, args.host_mem)
    if args.dry_run:
        from dpo_dist.plan.refusal import dry_run

        try:
            return dry_run(cfg, cluster_args)
        except ValueError as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 2
    if cfg.reference.placement == Placement.RANKS:  # the split of the launched processes, before anything is loaded
        from dpo_dist.runtime.roles import check_counts

        problem = check_counts(int(os.environ.get("WORLD_SIZE", "1")), cfg.reference.ranks)
        if problem:
            print(f"dpo-dist: {problem}", file=sys.stderr)
            return 2
    from dpo_dist.runtime.run_lock import release

    try:
        return _init_owned(args, cfg, cluster_args)
    finally:
        release(cfg.train.output_dir)  # the process usually ends here anyway; in-process callers get the dir back


def _init_owned(args: argparse.Namespace, cfg, cluster_args) -> int:
    """Preflight (rank 0 takes the output dir there), the memory plan, then the run."""
    from dpo_dist.init.preflight import PreflightError, run_preflight

    try:
        run_preflight(cfg)
    except PreflightError as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    if not args.force:
        from dpo_dist.plan.refusal import plan_for, refusal

        try:
            problem = refusal(*plan_for(cfg, cluster_args)[:2])
        except (OSError, ValueError) as e:  # a config the planner cannot read: the run itself will say more
            problem = None
            print(f"dpo-dist: warning: no memory plan ({e})", file=sys.stderr)
        if problem:
            print(f"dpo-dist: {problem}", file=sys.stderr)
            return 2
    try:
        from dpo_dist.init.stages import InitRun, finish
        from dpo_dist.runtime.distributed import RendezvousError
        from dpo_dist.runtime.roles import REFERENCE, join

        try:
            ctx = join(cfg)
        except RendezvousError as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 3
        except ValueError as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 2
        if ctx.roles is not None and ctx.roles.role == REFERENCE:
            from dpo_dist.reference.rank_server import serve

            try:
                return serve(cfg, ctx, ctx.roles, debug=args.debug)
            finally:
                ctx.teardown()
        try:
            result = InitRun(cfg, ctx, debug=args.debug).run()
            return finish(result, ctx, cfg.train.output_dir)
        finally:
            ctx.teardown()
    except Exception as e:  # one line for the user; the traceback only when asked for
        if args.debug:
            raise
        print(f"dpo-dist: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 4
