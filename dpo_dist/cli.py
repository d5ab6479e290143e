"""The `dpo-dist` command line. `--help` stays fast: torch, deepspeed and trl are imported inside the commands."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run YAML (default: the embedded tiny SFT model and preference data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.beta=0.2")
    p.add_argument("--model", help="SFT checkpoint directory (model.path)")
    p.add_argument("--reference", help="reference checkpoint directory (reference.path; default: the model)")
    p.add_argument("--sharding", choices=["zero2", "zero3", "zero3_offload"], help="policy sharding (sharding.name)")
    p.add_argument("--placement", help="reference placement (reference.placement)")
    p.add_argument("--output-dir", help="where report.json and trainer output go (train.output_dir)")
    p.add_argument("--smoke-steps", type=int, help="run N real training steps and check loss and parameter motion")
    p.add_argument("--overwrite", action="store_true", help="reuse an output dir that holds another run's report")


def _overrides(args: argparse.Namespace):
    from .config import parse_override

    pairs = [parse_override(o) for o in args.overrides]
    named = {"model": "model.path", "reference": "reference.path", "sharding": "sharding.name",
             "placement": "reference.placement", "output_dir": "train.output_dir", "smoke_steps": "verify.smoke_steps"}
    for attr, key in named.items():
        val = getattr(args, attr, None)
        if val is not None:
            pairs.append((key.split("."), val))
    if getattr(args, "overwrite", False):
        pairs.append((["overwrite"], True))
    return pairs


def cmd_init(args: argparse.Namespace) -> int:
    """Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 bad input (one line);
    3 the ranks never all met; 4 an unexpected error (one line, the traceback with --debug)."""
    from .config import ConfigError, load

    try:
        cfg = load(args.config, _overrides(args))
    except ConfigError as e:
        print(f"dpo-dist: {e.one_line()}", file=sys.stderr)
        return 2
    from .gate import ClusterArgs

    cluster_args = ClusterArgs(args.nodes, args.gpus_per_node, args.gpu_mem, args.host_mem)
    if args.dry_run:
        from .gate import dry_run

        try:
            return dry_run(cfg, cluster_args)
        except ValueError as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 2
    if cfg.reference.placement == "ranks":  # the split of the launched processes, before anything is loaded
        from .roles import check_counts

        problem = check_counts(int(os.environ.get("WORLD_SIZE", "1")), cfg.reference.ranks)
        if problem:
            print(f"dpo-dist: {problem}", file=sys.stderr)
            return 2
    from .run_lock import release

    try:
        return _init_owned(args, cfg, cluster_args)
    finally:
        release(cfg.train.output_dir)  # the process usually ends here anyway; in-process callers get the dir back


def _init_owned(args: argparse.Namespace, cfg, cluster_args) -> int:
    """Preflight (rank 0 takes the output dir there), the memory plan, then the run."""
    from .preflight import PreflightError, run_preflight

    try:
        run_preflight(cfg)
    except PreflightError as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    if not args.force:
        from .gate import plan_for, refusal

        try:
            problem = refusal(*plan_for(cfg, cluster_args)[:2])
        except (OSError, ValueError) as e:  # a config the planner cannot read: the run itself will say more
            problem = None
            print(f"dpo-dist: warning: no memory plan ({e})", file=sys.stderr)
        if problem:
            print(f"dpo-dist: {problem}", file=sys.stderr)
            return 2
    try:
        from .distributed import RendezvousError
        from .roles import REFERENCE, join
        from .run import InitRun, finish

        try:
            ctx = join(cfg)
        except RendezvousError as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 3
        except ValueError as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 2
        if ctx.roles is not None and ctx.roles.role == REFERENCE:
            from .reference_ranks import serve

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


def cmd_launch(args: argparse.Namespace) -> int:
    from .launcher import LaunchSpec, build_launch

    init_args = list(args.init_args)
    if init_args and init_args[0] == "--":
        init_args = init_args[1:]
    spec = LaunchSpec(sharding=args.sharding, num_processes=args.num_processes, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                      main_process_port=args.port, cpu=args.cpu, init_args=tuple(init_args))
    try:
        argv, env = build_launch(spec)
    except ValueError as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    from .run_lock import RUN_ID_ENV, OutputDirBusy, acquire, run_id

    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv))
        return 0
    env[RUN_ID_ENV] = run_id()  # one id for every rank this launcher starts (rank 0's wins across launchers)
    out = _launch_output_dir(init_args) if spec.num_machines == 1 else None  # multi-node: rank 0 takes it
    if out is not None and out.is_dir():
        try:
            acquire(out)  # held while the ranks run; rank 0 sees this run's id in it and goes on
        except OutputDirBusy as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 2
        except OSError:  # not writable: init's preflight says so
            pass
    print(f"[dpo-dist] {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}", flush=True)
    return subprocess.call(argv, env={**os.environ, **env})


def _launch_output_dir(init_args: list[str]):
    """The output dir the launched `init` will use, or None if its arguments or config are bad (init says why)."""
    import contextlib
    import io
    from pathlib import Path

    from .config import ConfigError, load

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(["init", *init_args])
        return Path(load(args.config, _overrides(args)).train.output_dir)
    except (SystemExit, ConfigError):
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_init = sub.add_parser("init", help="load policy + reference, prove they start identical, build the "
                            "DPOTrainer, write the quality-gate report (run under accelerate launch)")
    _add_config_args(p_init)
    p_init.add_argument("--debug", action="store_true", help="print tracebacks")
    p_init.add_argument("--dry-run", action="store_true", help="build everything on the meta device (no weights): "
                        "sharding, placement, config checks, trainer arguments, memory plan; --model may be a preset")
    p_init.add_argument("--force", action="store_true", help="run even if the memory plan says it cannot fit")
    from .planner import parse_bytes

    for flag, kind, what in (("--nodes", int, "nodes"), ("--gpus-per-node", int, "ranks per node"),
                             ("--gpu-mem", parse_bytes, "memory per GPU, e.g. 80GB"),
                             ("--host-mem", parse_bytes, "host memory per node, e.g. 2TB")):
        p_init.add_argument(flag, type=kind, help=f"cluster for the plan: {what} (default: detected)")
    p_init.set_defaults(func=cmd_init)

    p_launch = sub.add_parser("launch", help="build (and run) the accelerate launch command for `init`")
    p_launch.add_argument("--sharding", default="zero3", choices=["zero2", "zero3", "zero3_offload"])
    p_launch.add_argument("--num-processes", type=int, default=2, help="processes per machine")
    p_launch.add_argument("--num-machines", type=int, default=1)
    p_launch.add_argument("--machine-rank", type=int, default=0)
    p_launch.add_argument("--main-process-ip")
    p_launch.add_argument("--port", type=int, default=29500)
    p_launch.add_argument("--cpu", action="store_true", help="CPU-only machine: DeepSpeed CPU accelerator + gloo")
    p_launch.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p_launch.add_argument("init_args", nargs=argparse.REMAINDER, help="-- then arguments for `dpo-dist init`")
    p_launch.set_defaults(func=cmd_launch)

    # Subcommands owned by their own modules; each module keeps heavy imports inside its run function.
    from . import plan_cli, slurm

    p_plan = sub.add_parser("plan", help="memory plan per strategy for a model and cluster, before you launch")
    plan_cli.add_arguments(p_plan)
    p_plan.set_defaults(func=plan_cli.run)

    p_slurm = sub.add_parser("slurm", help="write (and with --submit, submit) an sbatch script for N nodes x G GPUs")
    slurm.add_arguments(p_slurm)
    p_slurm.set_defaults(func=slurm.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
