"""`dpo-dist plan`: memory per GPU and per node for every strategy, before launching (to be written)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint dir, config.json, or a preset name")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("dpo-dist plan: not implemented yet")
