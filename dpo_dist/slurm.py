"""`dpo-dist slurm`: an sbatch script for N nodes x G processes per node, from the same run config as `dpo-dist init`.

The script is data first: `render_sbatch(SlurmSpec) -> str` is a pure function (tests assert on its text), and
`run(args)` only loads the config, writes the resolved copy every rank reads, writes the script and, with `--submit`,
hands it to sbatch. One `srun` task per node runs `accelerate launch` (the argv `launcher.build_launch` builds), with
`--machine_rank` from `SLURM_NODEID`, the head node from `scontrol show hostnames`, a port derived from the job id and
c10d rendezvous. Values come from the Python config; the script never reads the YAML. After srun, the job's exit code
is the quality gate's verdict (`verdict`): 0 only if every rank exited 0 and rank 0 wrote a passing report in this job.

Imports stay light here (no torch, deepspeed or trl): `dpo-dist --help` imports this module.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

# SLURM time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Set in every job: a timed-out NCCL collective aborts its rank (the job then ends via srun --kill-on-bad-exit)
# instead of leaving it hanging; Python output reaches the log as it is printed.
JOB_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


@dataclass(frozen=True)
class SlurmSpec:
    """Everything the sbatch script says. Paths should be absolute: the job runs on other machines."""

    config_file: str  # the resolved run YAML every rank reads (`dpo-dist init --config`)
    report: str  # <train.output_dir>/report.json, written by rank 0
    log_dir: str  # the job's log (every rank, labelled) and the per-rank files
    workdir: str  # the job runs here (relative paths in the config resolve against it)
    nodes: int = 1
    procs_per_node: int = 8  # one per GPU
    sharding: str = "zero3"
    placement: str = "zero3"  # for the header comment only: init reads it from the config
    job_name: str = "dpo-dist"
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # None: the whole node's CPUs (SLURM_CPUS_ON_NODE) with --exclusive
    exclusive: bool = True
    cpu: bool = False  # CPU-only nodes: no GPU request, DeepSpeed's CPU accelerator with gloo
    python: str = sys.executable
    port_base: int = 20000  # rendezvous port = port_base + job id % port_span
    port_span: int = 10000
    timeout_s: int = 600  # sharding.timeout_s: the collective timeout (shown; init reads it from the config)
    rdzv_timeout_s: int = 600  # how long the c10d rendezvous waits for every node to join
    kill_wait_s: int = 60  # srun --wait: after one task ended, how long the others may still run
    sbatch_args: tuple[str, ...] = ()  # more `#SBATCH` options, e.g. "--qos=high"
    env: tuple[tuple[str, str], ...] = ()  # more exports
    init_args: tuple[str, ...] = ()  # more `dpo-dist init` arguments, after --config


def check_spec(spec: SlurmSpec) -> list[str]:
    """Every problem with a spec (empty list: fine)."""
    problems = []
    if spec.nodes < 1:
        problems.append(f"nodes must be >= 1, got {spec.nodes}")
    if spec.procs_per_node < 1:
        problems.append(f"processes per node must be >= 1, got {spec.procs_per_node}")
    if not _TIME_RE.match(spec.time):
        problems.append(f"time '{spec.time}' is not a SLURM time (minutes, HH:MM:SS, D-HH:MM:SS, ...)")
    if not _NAME_RE.match(spec.job_name):
        problems.append(f"job name '{spec.job_name}' may only hold letters, digits, '.', '_' and '-'")
    for what, val in (("partition", spec.partition), ("account", spec.account)):
        if val is not None and not _NAME_RE.match(val):
            problems.append(f"{what} '{val}' may only hold letters, digits, '.', '_' and '-'")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        problems.append(f"cpus per task must be >= 1, got {spec.cpus_per_task}")
    if not (1024 <= spec.port_base and spec.port_base + spec.port_span <= 65536 and spec.port_span >= 1):
        problems.append(f"ports {spec.port_base}..{spec.port_base + spec.port_span - 1} must lie in 1024..65535")
    for what, val in (("log dir", spec.log_dir), ("workdir", spec.workdir)):
        if not val or re.search(r"[\s%\"'\\]", val):  # #SBATCH lines are not shell: no quoting there
            problems.append(f"{what} '{val}' must be non-empty, without whitespace, quotes, '\\' or '%'")
    for a in spec.sbatch_args:
        if not a.startswith("--") or "\n" in a:
            problems.append(f"sbatch option '{a}' must look like --name=value")
    for k, _ in spec.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            problems.append(f"environment name '{k}' is not a shell variable name")
    for what, val in (("rendezvous timeout", spec.rdzv_timeout_s), ("srun --wait", spec.kill_wait_s)):
        if val < 1:
            problems.append(f"{what} must be >= 1 second, got {val}")
    return problems


def node_launch(spec: SlurmSpec) -> tuple[list[str], list[str], dict[str, str]]:
    """One node's `accelerate launch` options and its `-m dpo_dist init ...`, as shell words (what follows
    `python -m accelerate.commands.launch --machine_rank N`), and the environment, from `launcher.build_launch`.

    What only the job knows is written as shell variables: the head node, the port, and the shipped accelerate and
    DeepSpeed configs (resolved by the job's own $PYTHON, since the nodes' install path may differ from this one's)."""
    from .launcher import LaunchSpec, build_launch

    argv, env = build_launch(LaunchSpec(
        sharding=spec.sharding, num_processes=spec.procs_per_node, num_machines=spec.nodes, machine_rank=0,
        main_process_ip="HEAD_NODE", main_process_port=spec.port_base, cpu=spec.cpu, python=spec.python,
        init_args=("--config", spec.config_file, *spec.init_args),
    ))
    if argv[1:3] != ["-m", "accelerate.commands.launch"]:
        raise ValueError(f"unexpected launch command: {argv[:3]}")
    opts = argv[3:]
    end = opts.index("-m")  # accelerate's own options end where the module to run starts
    launch, init = opts[:end], opts[end:]
    runtime = {"--config_file": '"$LAUNCH_CONFIG"', "--deepspeed_config_file": '"$DS_CONFIG"',
               "--main_process_port": '"$MASTER_PORT"', "--machine_rank": None,  # given per node by each task
               "--main_process_ip": '"$HEAD_NODE"' if spec.nodes > 1 else None}
    words: list[str] = []
    i = 0
    while i < len(launch):
        if launch[i] in runtime:
            if runtime[launch[i]] is not None:
                words += [launch[i], runtime[launch[i]]]
            i += 2
            continue
        words.append(_q(launch[i]))
        i += 1
    words += ["--max_restarts", "0", "--tee", "3"]  # no restarts (a failure ends the job); per-rank prefixed output
    if spec.nodes > 1:
        # c10d rendezvous at HEAD_NODE:MASTER_PORT (accelerate's --same_network would use the static one instead).
        words += ["--rdzv_backend", "c10d", "--rdzv_conf", f"join_timeout={spec.rdzv_timeout_s}",
                  "--deepspeed_multinode_launcher", "standard"]
    return words, [_q(w) for w in init], env


def _q(s: str) -> str:
    return shlex.quote(str(s))


def _option_lines(words: list[str], indent: str = "    ", width: int = 116) -> list[str]:
    """Shell words as continued lines, an option and its value never split, at most `width` characters a line."""
    groups: list[str] = []
    for w in words:
        if groups and not w.startswith("-") and groups[-1].startswith("-") and " " not in groups[-1]:
            groups[-1] += " " + w
        else:
            groups.append(w)
    lines, cur = [], ""
    for g in groups:
        if cur and len(indent) + len(cur) + 1 + len(g) > width - 2:
            lines.append(indent + cur)
            cur = g
        else:
            cur = f"{cur} {g}" if cur else g
    lines.append(indent + cur)
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def render_sbatch(spec: SlurmSpec) -> str:
    """The sbatch script for `spec`: pure (same spec, same text; nothing is read or written)."""
    problems = check_spec(spec)
    if problems:
        raise ValueError("invalid SLURM spec: " + "; ".join(problems))
    launch, init, env = node_launch(spec)
    env = {**env, **JOB_ENV, **dict(spec.env)}
    world = spec.nodes * spec.procs_per_node
    unit = ("process" if spec.procs_per_node == 1 else "processes") if spec.cpu else \
        ("GPU" if spec.procs_per_node == 1 else "GPUs")
    log_file = f"{spec.log_dir}/%x-%j.out"
    head = [
        "#!/bin/bash",
        f"# dpo-dist init on {spec.nodes} node(s) x {spec.procs_per_node} {unit} = {world} rank(s), {spec.sharding}, "
        f"reference placement {spec.placement}.",
        "# Written by `dpo-dist slurm` from the run config: regenerate it rather than edit it.",
        f"#   run config (resolved; every rank reads it): {spec.config_file}",
        f"#   quality-gate report (rank 0):              {spec.report}",
        f"#   log of every rank ('node: [rank r]: ...'):  {log_file} (an existing folder)",
        f"#   collective timeout {spec.timeout_s} s (sharding.timeout_s), rendezvous timeout {spec.rdzv_timeout_s} s",
        "# Exit code: the quality gate's verdict, 0 only if every rank passed every check.",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if not spec.cpu:
        head.append(f"#SBATCH --gres=gpu:{spec.procs_per_node}")
    if spec.cpus_per_task is not None:
        head.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    if spec.exclusive:
        head.append("#SBATCH --exclusive")
    head += [f"#SBATCH --time={spec.time}", f"#SBATCH --output={log_file}", f"#SBATCH --chdir={spec.workdir}"]
    if spec.partition:
        head.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        head.append(f"#SBATCH --account={spec.account}")
    head += [f"#SBATCH {a}" for a in spec.sbatch_args]
    resolve = "'import dpo_dist.resources as r, sys; print(r.{}(sys.argv[1]))'"
    cpus = str(spec.cpus_per_task) if spec.cpus_per_task is not None else "${SLURM_CPUS_ON_NODE:-1}"
    body = [
        "set -euo pipefail",
        "",
        f"export PYTHON={_q(spec.python)}",
        f"NNODES={spec.nodes}",
        f"PROCS_PER_NODE={spec.procs_per_node}",
        f"REPORT={_q(spec.report)}",
        "# Each rank's own stdout/stderr files, by torchrun: $RANK_LOGS/node<n>/<run>/attempt_0/<local rank>/.",
        f'export RANK_LOGS={_q(spec.log_dir)}/"$SLURM_JOB_NAME-$SLURM_JOB_ID"',
        "# The head node (machine rank 0, hosting the c10d store) and a port from the job id (jobs sharing a node",
        "# differ); the CPUs of each node's task (srun does not inherit sbatch's --cpus-per-task).",
        'NODES="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"   # not `| head -n 1`: SIGPIPE under pipefail',
        "HEAD_NODE=\"${NODES%%$'\\n'*}\"",
        f"MASTER_PORT=$(({spec.port_base} + SLURM_JOB_ID % {spec.port_span}))",
        f"CPUS_PER_TASK={cpus}",
        f"# accelerate's and DeepSpeed's {spec.sharding} configs, as shipped with the dpo-dist that $PYTHON runs",
        f'LAUNCH_CONFIG="$("$PYTHON" -c {resolve.format("launch_config_path")} {spec.sharding})"',
        f'DS_CONFIG="$("$PYTHON" -c {resolve.format("ds_config_path")} {spec.sharding})"',
        *(f"export {k}={_q(v)}" for k, v in sorted(env.items())),
        "# In the job's log a line of rank r reads '<node>: [rank<r>]: ...'.",
        "export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]: '",
        f"cd {_q(spec.workdir)}",
        'mkdir -p "$RANK_LOGS"',
        "",
        f'echo "[dpo-dist] job $SLURM_JOB_ID ($SLURM_JOB_NAME): $NNODES node(s) x $PROCS_PER_NODE {unit}" \\',
        '  "[$SLURM_JOB_NODELIST], rendezvous $HEAD_NODE:$MASTER_PORT, report $REPORT"',
        "# The report as it is now (none, or an older run's): the verdict only counts one written in this job.",
        'BEFORE="$(stat -c %i:%Y:%s "$REPORT" 2>/dev/null || echo none)"',
        "set +e",
        "# One task per node, each an accelerate launch of its node's ranks. A task that fails ends the others",
        "# (--kill-on-bad-exit); after one ends, the others get --wait seconds. Each task expands $SLURM_NODEID",
        "# itself; the rest is expanded here.",
        f"srun --kill-on-bad-exit=1 --wait={spec.kill_wait_s} --label \\",
        '    --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" \\',
        "  bash -c 'echo \"[dpo-dist] machine rank $SLURM_NODEID on $(hostname)\"",
        "    exec \"$PYTHON\" -m accelerate.commands.launch --machine_rank \"$SLURM_NODEID\" \\",
        "      --log_dir \"$RANK_LOGS/node$SLURM_NODEID\" \"$@\"' node-launch \\",
    ]
    launch_lines = _option_lines(launch)
    launch_lines[-1] += " \\"
    body += launch_lines + _option_lines(init)
    body += [
        "SRUN_EXIT=$?",
        "set -e",
        "# The job's exit code: srun's failure, or the verdict of rank 0's report written in this job.",
        "exec \"$PYTHON\" -c 'import sys; from dpo_dist.slurm import verdict; sys.exit(verdict(*sys.argv[1:]))' \\",
        '  "$REPORT" "$SRUN_EXIT" "$BEFORE"',
        "",
    ]
    return "\n".join(head + body)


def report_stamp(report: str | Path) -> str:
    """What the job notes about the report before srun (`stat -c %i:%Y:%s`, or "none"): rank 0 writes a new file and
    renames it over the old one, so a report written in this job has another stamp. Compared, not clocks: the
    report's file server and the batch node need not agree on the time."""
    try:
        st = Path(report).stat()
    except OSError:
        return "none"
    return f"{st.st_ino}:{int(st.st_mtime)}:{st.st_size}"


def verdict(report: str, srun_exit: str | int, before: str) -> int:
    """Run by the job after srun: print the verdict and return the job's exit code. 0 only if srun succeeded and rank 0
    wrote a passing report during this job (`before`: the report's stamp before srun; an older report is not this
    job's verdict)."""
    import json
    import os

    rc, path = int(srun_exit), Path(report)
    rep = None
    if report_stamp(path) not in ("none", before.strip()):
        try:
            rep = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"[dpo-dist] report {path} unreadable: {e}", flush=True)
    job = os.environ.get("SLURM_JOB_ID", "?")
    if rep is not None:
        for row in rep.get("checks", []):
            if not row.get("ok"):
                ranks = ",".join(map(str, row.get("failed_ranks") or [])) or "?"
                print(f"[dpo-dist] FAILED on rank(s) {ranks}: {row.get('check')}: {row.get('value')}", flush=True)
    if rc == 0 and rep is not None and rep.get("passed") is True:
        print(f"[dpo-dist] job {job}: quality gate PASSED on all {rep.get('world_size', '?')} ranks; report {path}",
              flush=True)
        return 0
    if rep is None:
        why = (f"no report was written in this job ({path}): a rank ended before the gate; its error is above "
               "(torchrun names the failed rank, srun the node and task)")
    else:
        why = f"quality gate FAILED; report {path}"
    print(f"[dpo-dist] job {job}: FAILED (srun exit code {rc}): {why}", flush=True)
    return rc if 0 < rc < 256 else 1


# ---------------------------------------------------------------------------------------------------------------
# the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_config_args

    p.description = ("Write an sbatch script that runs `dpo-dist init` on N nodes x G processes per node (one srun "
                     "task per node, each an `accelerate launch`), from the same run config; --submit submits it.")
    _add_config_args(p)
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
    act = g.add_mutually_exclusive_group()
    act.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    act.add_argument("--submit", action="store_true", help="write the script and submit it with sbatch")
    g.add_argument("--wait", action="store_true", help="submit, wait for the job and exit with its exit code (the "
                   "quality gate's verdict)")


def _absolute(value: str | None, base: Path, keep: tuple[str, ...] = ("default",)) -> str | None:
    if value is None or value in keep:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _absolute_data(value: str | None, base: Path) -> str | None:
    """A data source: a path made absolute; a dataset name in the Hugging Face cache kept as it is."""
    from .data_sources import is_dataset_name

    return value if value and is_dataset_name(value, base) else _absolute(value, base)


def resolve_config(args: argparse.Namespace, workdir: Path):
    """The run config (YAML + flags, validated) with its paths made absolute against the job's workdir."""
    from dataclasses import replace

    from .cli import _overrides
    from .config import load

    cfg = load(args.config, _overrides(args))
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
        return "zero3" if stage == 3 else "zero2"
    return "zero3"


def run(args: argparse.Namespace) -> int:
    import subprocess

    import yaml

    from .config import ConfigError, to_dict

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
        env=tuple(tuple(e.split("=", 1)) for e in args.env),
    )
    try:
        text = render_sbatch(spec)
    except ValueError as e:
        print(f"dpo-dist: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text, end="")
        return 0
    from .disk_writes import write_text_atomic

    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
        script.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_file, "# resolved by `dpo-dist slurm`: the run config every rank of the job reads\n"
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
