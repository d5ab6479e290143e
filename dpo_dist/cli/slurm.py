"""`dpo-dist slurm`: load the run config, write the resolved copy every rank reads and the sbatch script
(`dpo_dist.launch.sbatch.render_sbatch`), and with `--submit` hand it to sbatch.

Imports stay light here (no torch, deepspeed or trl): `dpo-dist --help` imports this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpo_dist.cli.common import add_config_args, overrides
from dpo_dist.config.names import Sharding
from dpo_dist.launch.sbatch import SlurmSpec, render_sbatch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write an sbatch script that runs `dpo-dist init` on N nodes x G processes per node (one srun "
                     "task per node, each an `accelerate launch`), from the same run config; --submit submits it.")
    add_config_args(p)
    g = p.add_argument_group("SLURM")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    g.add_argument("--gpus-per-node", "--procs-per-node", dest="procs_per_node", type=int, default=8, metavar="G",
                   help="processes per node, one per GPU (default 8)")
    g.add_argument("--job-name", default="dpo-dist", help="job name, %%x in log names (default dpo-dist)")
    g.add_argument("--time", default="01:00:00", help="time limit, e.g. 30 or 02:00:00 (default 01:00:00)")
    g.add_argument("--partition", help="partition (default: the cluster's)")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--cpus-per-task", type=int,
                   help="CPUs for each node's task (default: all of the node's, with --exclusive)")
    g.add_argument("--shared", action="store_true", help="do not ask for whole nodes (no --exclusive)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="--NAME=VALUE",
                   help="one more #SBATCH option, e.g. --sbatch-arg=--qos=high (repeatable)")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export this in the job, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    g.add_argument("--cpu", action="store_true", help="CPU-only nodes: no GPU request, DeepSpeed CPU accelerator")
    g.add_argument("--log-dir", help="job log folder (default: <output_dir>/logs)")
    g.add_argument("--script", help="where to write the script (default: <output_dir>/<job-name>.sbatch)")
    g.add_argument("--workdir", help="where the job runs (default: the current directory)")
    g.add_argument("--python", default=sys.executable, help="python with dpo-dist installed, on every node "
                   "(default: this one)")
    g.add_argument("--port-base", type=int, default=20000, help="rendezvous port = base + job id %% 10000")
    g.add_argument("--rdzv-timeout", type=int, help="seconds the nodes may take to join (default: "
                   "sharding.timeout_s)")
    g.add_argument("--train", action="store_true", help="gate, then train in the same job (`dpo-dist init "
                   "--train`): exit 0 trained, 5 training failed after a passed gate, else the gate's")
    act = g.add_mutually_exclusive_group()
    act.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    act.add_argument("--submit", action="store_true", help="write the script and submit it with sbatch")
    g.add_argument("--force", action="store_true", help="replace an existing --script (or its .config.yaml) that "
                   "`dpo-dist slurm` did not write")
    g.add_argument("--wait", action="store_true", help="submit, wait for the job and exit with its exit code (the "
                   "quality gate's verdict)")


def _absolute(value: str | None, base: Path, keep: tuple[str, ...] = ("default",)) -> str | None:
    if value is None or value in keep:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _absolute_data(value: str | None, base: Path) -> str | None:
    """A data source: a path made absolute; a dataset name in the Hugging Face cache kept as it is."""
    from dpo_dist.data.sources import is_dataset_name

    return value if value and is_dataset_name(value, base) else _absolute(value, base)


def resolve_config(args: argparse.Namespace, workdir: Path):
    """The run config (YAML + flags, validated) with its paths made absolute against the job's workdir."""
    from dataclasses import replace

    from dpo_dist.config.schema import load

    cfg = load(args.config, overrides(args))
    m, r, s, d, t = cfg.model, cfg.reference, cfg.sharding, cfg.data, cfg.train
    return replace(
        cfg,
        model=replace(m, path=_absolute(m.path, workdir)),
        reference=replace(r, path=_absolute(r.path, workdir)),
        sharding=replace(s, ds_config=_absolute(s.ds_config, workdir)),
        data=replace(d, train=_absolute_data(d.train, workdir), eval=_absolute_data(d.eval, workdir)),
        train=replace(t, output_dir=_absolute(t.output_dir, workdir, keep=())),
    )


def sharding_name(cfg) -> str:
    """The shipped launch config to use: the config's name, else the stage of its own DeepSpeed JSON, else zero3."""
    import json

    if cfg.sharding.name:
        return cfg.sharding.name
    if cfg.sharding.ds_config:
        stage = int(json.loads(Path(cfg.sharding.ds_config).read_text()).get("zero_optimization", {}).get("stage", 0))
        return Sharding.ZERO3.value if stage == 3 else Sharding.ZERO2.value
    return Sharding.ZERO3.value


SCRIPT_MARK = "# Written by `dpo-dist slurm`"  # render_sbatch's second comment line
CONFIG_MARK = "# resolved by `dpo-dist slurm`"  # the first line of the resolved config


def ours(path: Path) -> bool:
    """Nothing there, or a file an earlier `dpo-dist slurm` wrote (regenerating a job replaces it without --force);
    anything else is someone's file, never written over unasked (issue 21, #22)."""
    try:
        head = path.read_text(errors="replace")[:600]
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a file in the way fails the write, one line)
        return True
    except OSError:  # a directory, unreadable: not ours to replace
        return False
    return (head.startswith("#!/bin/bash\n") and SCRIPT_MARK in head) or head.startswith(CONFIG_MARK)


def run(args: argparse.Namespace) -> int:
    import subprocess

    import yaml

    from dpo_dist.config.schema import ConfigError, to_dict

    if args.wait and args.dry_run:
        print("dpo-dist: --wait submits the job: it cannot go with --dry-run", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or ".").expanduser().resolve()
    try:
        cfg = resolve_config(args, workdir)
        sharding = sharding_name(cfg)
    except ConfigError as e:
        print(f"dpo-dist: {e.one_line()}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"dpo-dist: cannot read sharding.ds_config: {e}", file=sys.stderr)
        return 2
    bad_env = [e for e in args.env if "=" not in e]
    if bad_env:
        print(f"dpo-dist: --env must look like NAME=VALUE, got {', '.join(bad_env)}", file=sys.stderr)
        return 2
    out = Path(cfg.train.output_dir)
    log_dir = Path(_absolute(args.log_dir, workdir) if args.log_dir else out / "logs")
    script = Path(_absolute(args.script, workdir) if args.script else out / f"{args.job_name}.sbatch")
    config_file = script.with_suffix(".config.yaml")
    spec = SlurmSpec(
        config_file=str(config_file), report=str(out / "report.json"), log_dir=str(log_dir), workdir=str(workdir),
        nodes=args.nodes, procs_per_node=args.procs_per_node, sharding=sharding, placement=cfg.reference.placement,
        job_name=args.job_name, time=args.time, partition=args.partition, account=args.account,
        cpus_per_task=args.cpus_per_task, exclusive=not args.shared, cpu=args.cpu, python=args.python,
        port_base=args.port_base, timeout_s=cfg.sharding.timeout_s,
        rdzv_timeout_s=args.rdzv_timeout or cfg.sharding.timeout_s, sbatch_args=tuple(args.sbatch_arg),
        env=tuple(tuple(e.split("=", 1)) for e in args.env), train=args.train,
    )
    try:
        text = render_sbatch(spec)
    except ValueError as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text, end="")
        return 0
    from dpo_dist.runtime.disk_writes import write_text_atomic

    taken = [str(p) for p in (script, config_file) if not (args.force or ours(p))]
    if taken:
        print(f"dpo-dist: {' and '.join(taken)} already exist(s) and were not written by `dpo-dist slurm`: choose "
              "another --script, or pass --force to replace", file=sys.stderr)
        return 2
    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
        script.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_file, f"{CONFIG_MARK}: the run config every rank of the job reads\n"
                          + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_text_atomic(script, text, 0o755)
    except OSError as e:
        where = e.filename or log_dir
        print(f"dpo-dist: could not write the job files ({where}: {e.strerror or e}): free space or choose another "
              "--output-dir / --script / --log-dir", file=sys.stderr)
        return 2
    print(f"[dpo-dist] wrote {script} (config {config_file}); logs: {log_dir}/{args.job_name}-<jobid>.out",
          flush=True)
    if not (args.submit or args.wait):
        print(f"[dpo-dist] submit with: sbatch {script}")
        return 0
    cmd = ["sbatch", *(["--wait"] if args.wait else []), str(script)]
    print(f"[dpo-dist] {' '.join(cmd)}", flush=True)
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        print("dpo-dist: sbatch not found: run this on a SLURM login node", file=sys.stderr)
        return 127
