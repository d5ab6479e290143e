"""Files shipped with the package, resolved by name (`--sharding zero3`), plus the embedded default assets.

`launch/` and `ds_configs/` live at the repository top level for users to read and copy; the package reaches them
through `dpo_dist/resources/` (links to those folders), so an installed package and a checkout resolve the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpo_dist.config.names import Sharding
from dpo_dist.config.schema import SHARDING_NAMES
from dpo_dist.config.sharding import uses_deepspeed_json

PACKAGE_DIR = Path(__file__).resolve().parent.parent
RESOURCES = PACKAGE_DIR / "resources"
DEFAULT_DIR = PACKAGE_DIR / "default"
DEFAULT_CHECKPOINT = DEFAULT_DIR / "tiny-sft"


def ds_config_path(name: str) -> Path:
    if name not in SHARDING_NAMES:
        raise ValueError(f"unknown sharding '{name}': choose one of {', '.join(SHARDING_NAMES)}")
    if not uses_deepspeed_json(name):
        raise ValueError(f"sharding '{name}' has no DeepSpeed JSON (not a DeepSpeed sharding)")
    return RESOURCES / "ds_configs" / f"{name}.json"


def launch_config_path(name: str) -> Path:
    if name not in SHARDING_NAMES:
        raise ValueError(f"unknown sharding '{name}': choose one of {', '.join(SHARDING_NAMES)}")
    return RESOURCES / "launch" / f"{name}.yaml"


def resolve_model_path(path: str) -> Path:
    return DEFAULT_CHECKPOINT if path == "default" else Path(path).expanduser()


def resolve_data_path(path: str, split: str) -> Path:
    return DEFAULT_DIR / f"{split}.jsonl" if path == "default" else Path(path).expanduser()


def resolve_ds_config(name: str | None, path: str | None) -> tuple[str, dict]:
    """(label, DeepSpeed dict) from: an explicit JSON path > a shipped name > the accelerate launch's file > zero3.

    Under `accelerate launch --config_file launch/zeroN.yaml` the file reaches the workers as
    ACCELERATE_DEEPSPEED_CONFIG_FILE; if the user also named a different stage, that is an error (checked by caller).
    """
    if path:
        p = Path(path).expanduser()
        label = str(p)
    elif name:
        p, label = ds_config_path(name), name
    elif os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        p = Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        if not p.is_file() and (RESOURCES / "ds_configs" / p.name).is_file():
            p = RESOURCES / "ds_configs" / p.name  # the launch YAMLs name it relative to the repository
        label = p.stem if p.parent.resolve() == (RESOURCES / "ds_configs").resolve() else str(p)
    else:
        p, label = ds_config_path(Sharding.ZERO3), Sharding.ZERO3.value
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {p} does not exist: set sharding.name or sharding.ds_config")
    try:
        return label, json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {p} is not valid JSON ({e.msg}, line {e.lineno})") from None


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def launch_stage_conflict(ds: dict, label: str | None = None) -> str | None:
    """If accelerate was launched with a DeepSpeed JSON of another ZeRO stage than the one we resolved, say so, with
    a fix that exists: `dpo-dist launch` hands accelerate the run's own JSON, whatever its stage (no launch/zero1.yaml
    ships; a --sharding after `--` reaches init, and the launcher reads it from there)."""
    env_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not env_file:
        return None
    try:
        _, launched = resolve_ds_config(None, None)
    except (FileNotFoundError, ValueError):
        return None
    if zero_stage(launched) != zero_stage(ds):
        own = label if label is None or label not in SHARDING_NAMES else str(ds_config_path(label))
        same = f"--deepspeed_config_file {own}" if own else "the run's DeepSpeed JSON as --deepspeed_config_file"
        return (f"accelerate was launched with {env_file} (ZeRO-{zero_stage(launched)}) but the run config asks for "
                f"ZeRO-{zero_stage(ds)}: launch with `dpo-dist launch` (it hands accelerate the run's own DeepSpeed "
                f"config), or give accelerate launch {same}")
    return None


def batch_mismatch(ds: dict, cfg, world: int) -> str | None:
    """DeepSpeed needs train_batch_size = micro batch x gradient accumulation x world size. Numbers written in the
    DeepSpeed JSON (instead of "auto") must agree with the run config; say which do not, all at once."""
    t = cfg.train
    want = {"train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world}
    bad = [f"{k}={ds[k]} (run config gives {v})" for k, v in want.items() if isinstance(ds.get(k), int) and ds[k] != v]
    if not bad:
        return None
    return ("DeepSpeed config batch sizes do not divide as train_batch_size = per_device_train_batch_size x "
            f"gradient_accumulation_steps x world size ({t.per_device_train_batch_size} x "
            f"{t.gradient_accumulation_steps} x {world}): " + "; ".join(bad) + ". Set them to \"auto\" or fix the "
            "train section")
