"""`dpo-dist slurm`: an sbatch script for N nodes x G processes per node, from the same run config as `dpo-dist init`.

The script is data first: `render_sbatch(SlurmSpec) -> str` is a pure function (tests assert on its text), and
`dpo_dist.cli.slurm` only loads the config, writes the resolved copy every rank reads, writes the script and, with
`--submit`, hands it to sbatch. One `srun` task per node runs `accelerate launch` (the argv `accelerate.build_launch`
builds), with
`--machine_rank` from `SLURM_NODEID`, the head node from `scontrol show hostnames`, a port derived from the job id and
c10d rendezvous. Values come from the Python config; the script never reads the YAML. After srun, the job's exit code
is the quality gate's verdict (`verdict`): 0 only if every rank exited 0 and rank 0 wrote a passing report in this job.

Imports stay light here (no torch, deepspeed or trl): `dpo-dist --help` imports this module.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.config.names import Placement, Sharding
from dpo_dist.config.sharding import uses_deepspeed_json

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
    sharding: str = Sharding.ZERO3.value
    placement: str = Placement.ZERO3.value  # for the header comment only: init reads it from the config
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
    train: bool = False  # gate, then train (`dpo-dist init --train`); the exit code says which part failed


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
    `python -m accelerate.commands.launch --machine_rank N`), and the environment, from
    `dpo_dist.launch.accelerate.build_launch`.

    What only the job knows is written as shell variables: the head node, the port, and the shipped accelerate and
    DeepSpeed configs (resolved by the job's own $PYTHON, since the nodes' install path may differ from this one's)."""
    from dpo_dist.launch.accelerate import LaunchSpec, build_launch
    from dpo_dist.runtime.world import EXPECTED_WORLD_ENV

    argv, env = build_launch(LaunchSpec(
        sharding=spec.sharding, num_processes=spec.procs_per_node, num_machines=spec.nodes, machine_rank=0,
        main_process_ip="HEAD_NODE", main_process_port=spec.port_base, cpu=spec.cpu, python=spec.python,
        init_args=("--config", spec.config_file, *spec.init_args, *(("--train",) if spec.train else ())),
        rdzv_timeout_s=spec.rdzv_timeout_s,
    ))
    env.pop(EXPECTED_WORLD_ENV)  # torchrun's c10d rendezvous waits for exactly `nodes` machines: nothing to compare
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
    # no restarts (a failure ends the job); per-rank prefixed output. The c10d rendezvous at HEAD_NODE:MASTER_PORT
    # (last) comes from build_launch (accelerate.multinode_args), as for `dpo-dist launch`.
    at = words.index("--rdzv_backend") if "--rdzv_backend" in words else len(words)
    words[at:at] = ["--max_restarts", "0", "--tee", "3"]
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
        f"# dpo-dist init{' --train' if spec.train else ''} on {spec.nodes} node(s) x {spec.procs_per_node} {unit} = "
        f"{world} rank(s), {spec.sharding}, reference placement {spec.placement}.",
        "# Written by `dpo-dist slurm` from the run config: regenerate it rather than edit it.",
        f"#   run config (resolved; every rank reads it): {spec.config_file}",
        f"#   quality-gate report (rank 0):              {spec.report}",
        f"#   log of every rank ('node: [rank r]: ...'):  {log_file} (an existing folder)",
        f"#   collective timeout {spec.timeout_s} s (sharding.timeout_s), rendezvous timeout {spec.rdzv_timeout_s} s",
        *(["# Exit code: 0 the gate passed and training finished; 5 training failed after a passed gate; any other:",
           "# the quality gate's (it failed, or a rank ended before it); the job log's last line names which."]
          if spec.train else ["# Exit code: the quality gate's verdict, 0 only if every rank passed every check."]),
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
    resolve = "'import dpo_dist.config.resources as r, sys; print(r.{}(sys.argv[1]))'"
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
        f"# accelerate's{' and DeepSpeed' + chr(39) + 's' if uses_deepspeed_json(spec.sharding) else ''} "
        f"{spec.sharding} config{'s' if uses_deepspeed_json(spec.sharding) else ''}, as shipped with the dpo-dist "
        "that $PYTHON runs",
        f'LAUNCH_CONFIG="$("$PYTHON" -c {resolve.format("launch_config_path")} {spec.sharding})"',
        *([f'DS_CONFIG="$("$PYTHON" -c {resolve.format("ds_config_path")} {spec.sharding})"']
          if uses_deepspeed_json(spec.sharding) else []),
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
        "exec \"$PYTHON\" -c 'import sys; from dpo_dist.launch.sbatch import verdict; "
        "sys.exit(verdict(*sys.argv[1:]))' \\",
        '  "$REPORT" "$SRUN_EXIT" "$BEFORE"' + (" train" if spec.train else ""),
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


TRAIN_FAILED = 5  # dpo_dist.train.after_gate.TRAIN_FAILED (not imported: this module stays free of torch)


def verdict(report: str, srun_exit: str | int, before: str, mode: str = "gate") -> int:
    """Run by the job after srun: print the verdict and return the job's exit code. 0 only if srun succeeded and rank 0
    wrote a passing report during this job (`before`: the report's stamp before srun; an older report is not this
    job's verdict). mode "train" (a gate-then-train job): a passed gate must also have its training in the report
    ("training", written when training finished), else exit 5 and a last line saying training failed."""
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
    if rep is not None and rep.get("passed") is True and mode == "train":
        trained = rep.get("training")
        if rc == 0 and trained:
            print(f"[dpo-dist] job {job}: quality gate PASSED, training done ({trained.get('steps')} steps); final "
                  f"policy {trained.get('final_dir')}; report {path}", flush=True)
            return 0
        print(f"[dpo-dist] job {job}: training FAILED after a passed gate (srun exit code {rc}; exit "
              f"{TRAIN_FAILED}): the failing rank's line is above; report {path}", flush=True)
        return TRAIN_FAILED
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
    from dpo_dist.runtime import outcome  # the ranks' own cause and exit code, as the job log's last line

    summary = outcome.conclude(path.parent)
    if summary is not None:
        logs = outcome.log_paths(path.parent)
        if logs:
            print(f"[dpo-dist] logs: {' '.join(logs)}", flush=True)
        print(summary[0], flush=True)
        return summary[1]
    return rc if 0 < rc < 256 else 1
