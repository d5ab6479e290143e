"""The `dpo-dist` command line. `--help` stays fast: torch, deepspeed and trl are imported inside the commands.

One module per subcommand (`dpo_dist.cli.<name>`: `add_arguments(parser)` and `run(args) -> exit code`).
"""

from __future__ import annotations

import argparse

from dpo_dist.cli import init, launch, plan, slurm

SUBCOMMANDS = (
    (init, "init", "load policy + reference, prove they start identical, build the DPOTrainer, write the "
     "quality-gate report (run under accelerate launch)"),
    (launch, "launch", "build (and run) the accelerate launch command for `init`"),
    (plan, "plan", "memory plan per strategy for a model and cluster, before you launch"),
    (slurm, "slurm", "write (and with --submit, submit) an sbatch script for N nodes x G GPUs"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-dist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module, name, text in SUBCOMMANDS:
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
