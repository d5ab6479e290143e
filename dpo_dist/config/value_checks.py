"""The value rules of a run config, checked once the typed tree is built (config.schema.from_dict): every float's
allowed interval, the rules between keys, and the train.extra keys dpo-dist sets itself. Kept apart from the tree's
shape so each stays one concern; config.docs reads FLOAT_RANGES for the reference page."""

from __future__ import annotations

import difflib
from typing import Any

from dpo_dist.config.names import Placement, Sharding

BETA_PRESETS = {"conservative": 0.25, "standard": 0.1, "aggressive": 0.05}
BETA_REASONS = {
    "conservative": "0.2-0.3 keeps the policy close to the reference: for a strong SFT model or noisy preferences",
    "standard": "the usual DPO value",
    "aggressive": "lets the policy move further from the reference: for clean preferences and short runs",
}


# Every float field's allowed interval: (low, low included, high, high included); None = unbounded on that side.
FLOAT_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "train.beta": (0.0, False, None, False),
    "train.learning_rate": (0.0, False, None, False),
    "train.num_train_epochs": (0.0, False, None, False),
    "train.warmup_ratio": (0.0, True, 1.0, False),
    "verify.kl_max": (0.0, False, 1.0, False),
    "verify.smoke_learning_rate": (0.0, False, None, False),
    "verify.loss_tolerance": (0.0, False, None, False),
    "verify.cross_device_loss_tolerance": (0.0, False, None, False),
    "kl.limit": (0.0, False, None, False),
    "kl.warn_fraction": (0.0, False, 1.0, True),
    "kl.beta_min": (0.0, False, None, False),
    "kl.beta_max": (0.0, False, None, False),
    "kl.lr_scale_min": (0.0, True, 1.0, True),
    "reference.lora.dropout": (0.0, True, 1.0, False),
}


def _interval(lo: float | None, lo_in: bool, hi: float | None, hi_in: bool) -> str:
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _float_range_problems(cfg) -> list[str]:
    out = []
    for dotted, (lo, lo_in, hi, hi_in) in FLOAT_RANGES.items():
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if not isinstance(node, float):  # a beta preset name
            continue
        low_ok = lo is None or (node >= lo if lo_in else node > lo)
        high_ok = hi is None or (node <= hi if hi_in else node < hi)
        if not (low_ok and high_ok):
            extra = f" or one of {', '.join(BETA_PRESETS)}" if dotted == "train.beta" else ""
            out.append(f"'{dotted}' must be {_interval(lo, lo_in, hi, hi_in)}{extra}, got {node:g}")
    return out


def check_values(cfg, problems: list[str], train_fields: set[str]) -> None:
    """Append every problem with a value of a built RunConfig (the ranges and the rules between keys) to problems;
    train_fields: the train section's keys (a train.extra key naming one is refused)."""
    t, v, k = cfg.train, cfg.verify, cfg.kl
    problems.extend(_float_range_problems(cfg))
    if k.every_steps < 1:
        problems.append(f"'kl.every_steps' must be >= 1, got {k.every_steps}")
    if k.beta_min >= k.beta_max:
        problems.append(f"'kl.beta_min' ({k.beta_min:g}) must be < 'kl.beta_max' ({k.beta_max:g})")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_length", "max_prompt_length", "logging_steps", "save_steps"):
        if getattr(t, name) < 1:
            problems.append(f"'train.{name}' must be >= 1, got {getattr(t, name)}")
    for name in ("eval_steps", "save_total_limit"):
        if getattr(t, name) is not None and getattr(t, name) < 1:
            problems.append(f"'train.{name}' must be >= 1 or null, got {getattr(t, name)}")
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"'train.max_steps' must be > 0, or -1 for num_train_epochs, got {t.max_steps}")
    if t.eval_strategy in ("steps", "epoch") and not cfg.data.eval:
        problems.append(f"'train.eval_strategy: {t.eval_strategy}' needs an eval set: set data.eval, or 'auto'/'no'")
    if t.max_prompt_length >= t.max_length:
        problems.append(
            f"'train.max_prompt_length' ({t.max_prompt_length}) must be < 'train.max_length' ({t.max_length}): "
            "no room would be left for the completion"
        )
    if v.kl_chunk < 1 or v.max_new_tokens < 1 or v.smoke_steps < 0 or v.rows_per_forward < 1:
        problems.append("'verify.kl_chunk', 'verify.max_new_tokens' and 'verify.rows_per_forward' must be >= 1, "
                        "'verify.smoke_steps' >= 0")
    if not v.reference_text.strip() and v.perplexity:
        problems.append("'verify.reference_text' is empty: it must hold an answer to the first verify prompt (its "
                        "perplexity is measured), or set 'verify.perplexity: false'")
    lo = cfg.reference.lora
    if lo.r < 1 or lo.alpha <= 0 or not lo.target_modules:
        problems.append("'reference.lora' needs r >= 1, alpha > 0 and at least one target module")
    if not v.prompts:
        problems.append("'verify.prompts' must hold at least one prompt")
    if cfg.sharding.ds_config and cfg.sharding.name == Sharding.FSDP2:
        problems.append("'sharding.ds_config' is a DeepSpeed JSON but 'sharding.name' is fsdp2: drop one of them")
    if cfg.sharding.timeout_s < 10:
        problems.append(f"'sharding.timeout_s' must be >= 10 seconds, got {cfg.sharding.timeout_s}")
    if cfg.reference.ranks < 1 or (cfg.reference.pad_to_multiple_of or 1) < 1:
        problems.append(f"'reference.ranks' and 'reference.pad_to_multiple_of' must be >= 1, got "
                        f"{cfg.reference.ranks} and {cfg.reference.pad_to_multiple_of}")
    if cfg.reference.placement not in Placement.values():
        problems.append(
            f"'reference.placement: {cfg.reference.placement}' is not available in this version "
            f"(available: {', '.join(Placement.values())})"
        )
    if "pad_to_multiple_of" in t.extra and cfg.reference.placement == Placement.RANKS and \
            cfg.reference.batch_requests and cfg.reference.pad_to_multiple_of:
        problems.append("'train.extra.pad_to_multiple_of' is set by dpo-dist itself under reference.placement ranks "
                        "(reference.pad_to_multiple_of): remove it from train.extra")
    for key in sorted(t.extra):
        owner = reserved_extra_key(key, train_fields)
        if owner:
            problems.append(f"'train.extra.{key}' is set by dpo-dist itself ({owner}): remove it from train.extra")
    loss = t.extra.get("loss_type")
    for lt in (loss if isinstance(loss, list) else [loss] if loss is not None else []):
        if lt not in TRL_LOSS_TYPES:
            close = difflib.get_close_matches(str(lt), TRL_LOSS_TYPES, n=2)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            problems.append(f"'train.extra.loss_type' {lt!r} is not a loss type of TRL 1.16: {hint}choose from "
                            f"{', '.join(TRL_LOSS_TYPES)}")


# DPOConfig arguments dpo-dist sets itself (config.trl_args.dpo_config_kwargs), and the key that controls each: an
# entry in train.extra would override it silently (issue 21, #55/#56). report_to and dataloader_num_workers are only
# defaults there (logging and input workers touch no proof), so train.extra may set them.
RESERVED_EXTRA = {
    "data_seed": "train.seed", "bf16": "model.dtype", "fp16": "model.dtype",
    "deepspeed": "sharding.name or sharding.ds_config", "ddp_timeout": "sharding.timeout_s",
    "use_cpu": "the launch: dpo-dist launch --cpu, or DS_ACCELERATOR=cpu",
    "disable_dropout": "always true: dropout would make policy and reference differ at step 0",
    "precompute_ref_log_probs": "reference.placement: precomputed",
    "max_prompt_length": "train.max_prompt_length", "resume_from_checkpoint": "train.resume_from",
    "warmup_steps": "train.warmup_ratio (dpo-dist passes it as warmup_steps, which transformers 5 reads as a ratio)",
}
# TRL 1.16 DPOTrainer._compute_loss's loss types (verify.tolerances.STEP0_LOSS gives each one's step-0 value)
TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def reserved_extra_key(key: str, train_fields: set[str]) -> str | None:
    """What controls a DPOConfig argument dpo-dist sets itself, or None if train.extra may set it (train_fields: the
    train section's keys, each set by its own key)."""
    if key in RESERVED_EXTRA:
        return RESERVED_EXTRA[key]
    if key == "output_dir":
        return "train.output_dir or --output-dir"
    if key in train_fields - {"extra"}:
        return f"train.{key}"
    return None
