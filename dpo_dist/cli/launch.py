"""`dpo-dist launch`: build the `accelerate launch` command for `init` (dpo_dist.launch.accelerate) and run it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dpo_dist.cli import init as init_cli
from dpo_dist.cli.common import add_voice_args, overrides, voice_mode
from dpo_dist.config.names import Sharding


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sharding", choices=Sharding.values(),
                   help="default: the run config's sharding.name (also given after --), else zero3")
    p.add_argument("--num-processes", type=int, default=2, help="processes per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--main-process-ip")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--rdzv-timeout", type=int, default=600, metavar="S",
                   help="several machines: seconds the rendezvous waits for every machine to join")
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
    cfg = launch_config(init_args)
    # accelerate must be handed the DeepSpeed config the ranks will use: the run config's own (sharding.name, also
    # when given after --, or a custom sharding.ds_config), not a default that init would then refuse (#61/#62)
    sharding = args.sharding or (cfg.sharding.name if cfg is not None and cfg.sharding.name else None)
    ds_config = cfg.sharding.ds_config if cfg is not None and not args.sharding else None
    spec = LaunchSpec(sharding=sharding or Sharding.ZERO3.value, num_processes=args.num_processes,
                      num_machines=args.num_machines, machine_rank=args.machine_rank,
                      main_process_ip=args.main_process_ip, main_process_port=args.port, cpu=args.cpu,
                      init_args=tuple(init_args), rdzv_timeout_s=args.rdzv_timeout, ds_config=ds_config)
    try:
        argv, env = build_launch(spec)
    except (ValueError, FileNotFoundError) as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    from dpo_dist.runtime.run_lock import RENDEZVOUS_ENV, RUN_ID_ENV, run_id

    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv))
        return 0
    env[RUN_ID_ENV] = run_id()  # one id for every rank this launcher starts (rank 0's wins across launchers)
    if sys.stdout.isatty() and "COLUMNS" not in os.environ:  # the ranks' stdout is a pipe: tell them the width
        env["COLUMNS"] = str(os.get_terminal_size(sys.stdout.fileno()).columns)
    if spec.num_machines > 1:  # the machines of one launch share it: their ranks know each other's lock by it
        env[RENDEZVOUS_ENV] = os.environ[RENDEZVOUS_ENV] = f"{spec.main_process_ip}:{spec.main_process_port}"
    out = Path(cfg.train.output_dir) if cfg is not None else None
    refused = take_output_dir(out, spec.machine_rank, cfg is not None and bool(cfg.overwrite or cfg.train.resume_from))
    if refused:
        print(f"dpo-dist: {refused}", file=sys.stderr)
        return 2
    from dpo_dist.cli.relay import relay
    from dpo_dist.runtime.console import install_warning_filter

    install_warning_filter()

    if mode == "verbose":
        print(f"[dpo-dist] {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}", flush=True)
        from dpo_dist.cli.relay import wait_through_ctrl_c

        rc, interrupted = wait_through_ctrl_c(subprocess.Popen(argv, env={**os.environ, **env}))
        return 130 if interrupted else rc
    if mode != "quiet":
        where = "" if spec.num_machines == 1 else \
            f" of {spec.num_processes * spec.num_machines} (machine rank {spec.machine_rank} of {spec.num_machines})"
        print(f"[dpo-dist] launching {spec.num_processes} rank(s){where}, {spec.sharding}"
              f"{' on CPU' if spec.cpu else ''} (the full command: --verbose)", flush=True)
    return relay(argv, {**os.environ, **env}, out, spec)


def launch_config(init_args: list[str]):
    """The run config the launched `init` will read, or None if its arguments or config are bad (init says why)."""
    import contextlib
    import io

    from dpo_dist.config.schema import ConfigError, load

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser = argparse.ArgumentParser(prog="dpo-dist init")
            init_cli.add_arguments(parser)
            args = parser.parse_args(init_args)
        return load(args.config, overrides(args))
    except (SystemExit, ConfigError):
        return None


def take_output_dir(out: Path | None, machine_rank: int, replace: bool) -> str | None:
    """Before any rank starts: why this launch may not write into the output dir, or None. Machine rank 0's launcher
    holds the lock while its ranks run (rank 0 sees this run's id or rendezvous in it and goes on); another machine's
    only checks that no other launch holds it. A dir of someone else's files is refused before a lock file is put
    into it."""
    from dpo_dist.runtime.run_lock import (
        OutputDirBusy,
        OutputDirRefused,
        acquire,
        check_foreign,
        check_holder,
        check_report,
    )

    if out is None or not out.is_dir():
        return None
    try:
        check_foreign(out)
        check_report(out, replace)
        if machine_rank == 0:
            acquire(out)
        else:
            check_holder(out)
    except (OutputDirBusy, OutputDirRefused) as e:
        return str(e)
    except OSError:  # not writable: init's preflight says so
        pass
    return None
