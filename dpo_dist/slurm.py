"""`dpo-dist slurm`: an sbatch script for N nodes x G processes from the run config (to be written)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("dpo-dist slurm: not implemented yet")
