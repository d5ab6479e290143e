"""Options every subcommand that reads a run config shares (`init`, `slurm`), and how they become overrides."""

from __future__ import annotations

import argparse

from dpo_dist.config.names import Sharding


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run YAML (default: the embedded tiny SFT model and preference data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.beta=0.2")
    p.add_argument("--model", help="SFT checkpoint directory (model.path)")
    p.add_argument("--reference", help="reference checkpoint directory (reference.path; default: the model)")
    p.add_argument("--sharding", choices=Sharding.values(), help="policy sharding (sharding.name)")
    p.add_argument("--placement", help="reference placement (reference.placement)")
    p.add_argument("--output-dir", help="where report.json and trainer output go (train.output_dir)")
    p.add_argument("--smoke-steps", type=int, help="run N real training steps and check loss and parameter motion")
    p.add_argument("--overwrite", action="store_true", help="reuse an output dir that holds another run's report")


def overrides(args: argparse.Namespace):
    from dpo_dist.config.yaml_text import parse_override

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


def add_voice_args(p: argparse.ArgumentParser) -> None:
    """How much reaches the terminal (every rank's full output is in <output_dir>/logs/rank<r>.log either way)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--verbose", action="store_true", help="everything on the terminal: every rank, every warning, "
                   "third-party logs")
    g.add_argument("--quiet", action="store_true", help="only the verdict line with the report path (and a failure)")


def voice_mode(args: argparse.Namespace) -> str:
    from dpo_dist.runtime.console import DEFAULT, QUIET, VERBOSE

    return VERBOSE if getattr(args, "verbose", False) else QUIET if getattr(args, "quiet", False) else DEFAULT
