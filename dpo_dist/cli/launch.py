"""`dpo-dist launch`: build the `accelerate launch` command for `init` (dpo_dist.launch.accelerate) and run it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from dpo_dist.cli import init as init_cli
from dpo_dist.cli.common import add_voice_args, overrides, voice_mode
from dpo_dist.config.names import Sharding


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sharding", default=Sharding.ZERO3.value, choices=Sharding.values())
    p.add_argument("--num-processes", type=int, default=2, help="processes per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--main-process-ip")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--cpu", action="store_true", help="CPU-only machine: DeepSpeed CPU accelerator + gloo")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    add_voice_args(p)
    p.add_argument("init_args", nargs=argparse.REMAINDER, help="-- then arguments for `dpo-dist init`")


def run(args: argparse.Namespace) -> int:
    from dpo_dist.launch.accelerate import LaunchSpec, build_launch

    init_args = list(args.init_args)
    if init_args and init_args[0] == "--":
        init_args = init_args[1:]
    mode = voice_mode(args)
    for flag in ("--verbose", "--quiet"):  # the ranks speak as the launcher was told
        if getattr(args, flag[2:]) and flag not in init_args:
            init_args.append(flag)
    if "--debug" in init_args or "--verbose" in init_args:
        mode = "verbose"
    elif "--quiet" in init_args:
        mode = "quiet"
    spec = LaunchSpec(sharding=args.sharding, num_processes=args.num_processes, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                      main_process_port=args.port, cpu=args.cpu, init_args=tuple(init_args))
    try:
        argv, env = build_launch(spec)
    except ValueError as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    from dpo_dist.runtime.run_lock import RUN_ID_ENV, OutputDirBusy, acquire, run_id

    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv))
        return 0
    env[RUN_ID_ENV] = run_id()  # one id for every rank this launcher starts (rank 0's wins across launchers)
    if sys.stdout.isatty() and "COLUMNS" not in os.environ:  # the ranks' stdout is a pipe: tell them the width
        env["COLUMNS"] = str(os.get_terminal_size(sys.stdout.fileno()).columns)
    out = launch_output_dir(init_args) if spec.num_machines == 1 else None  # multi-node: rank 0 takes it
    if out is not None and out.is_dir():
        try:
            acquire(out)  # held while the ranks run; rank 0 sees this run's id in it and goes on
        except OutputDirBusy as e:
            print(f"dpo-dist: {e}", file=sys.stderr)
            return 2
        except OSError:  # not writable: init's preflight says so
            pass
    from dpo_dist.cli.relay import relay
    from dpo_dist.runtime.console import install_warning_filter

    install_warning_filter()

    if mode == "verbose":
        print(f"[dpo-dist] {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}", flush=True)
        return subprocess.call(argv, env={**os.environ, **env})
    if mode != "quiet":
        print(f"[dpo-dist] launching {spec.num_processes * spec.num_machines} rank(s), {spec.sharding}"
              f"{' on CPU' if spec.cpu else ''} (the full command: --verbose)", flush=True)
    return relay(argv, {**os.environ, **env}, out)


def launch_output_dir(init_args: list[str]):
    """The output dir the launched `init` will use, or None if its arguments or config are bad (init says why)."""
    import contextlib
    import io
    from pathlib import Path

    from dpo_dist.config.schema import ConfigError, load

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser = argparse.ArgumentParser(prog="dpo-dist init")
            init_cli.add_arguments(parser)
            args = parser.parse_args(init_args)
        return Path(load(args.config, overrides(args)).train.output_dir)
    except (SystemExit, ConfigError):
        return None
