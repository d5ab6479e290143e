"""The config reference, generated from the typed config tree: `python -m dpo_dist.config.docs > docs/config.md`.

Types and defaults are read from the dataclasses in `schema.py`, float ranges from `value_checks.FLOAT_RANGES`; what
a key means (and the range of a non-float key, which `value_checks.check_values` enforces in code) is kept here, keyed
by dotted path, so schema.py stays the config's code and this module its words. tests/test_docs.py fails when a schema
key has no meaning here, when a meaning names a key the schema no longer has, or when docs/config.md is not what this
module prints.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any, Literal

import yaml

from dpo_dist.config import schema, value_checks

REGENERATE = "python -m dpo_dist.config.docs > docs/config.md"

# One line per key: what it means. A new key in schema.py needs its line here (tests/test_docs.py says which).
MEANINGS: dict[str, str] = {
    "model.path": "the SFT checkpoint directory (safetensors, tokenizer, config.json); `default` = the embedded "
                  "tiny one",
    "model.dtype": "the dtype both models are loaded and run in",
    "model.trust_remote_code": "allow a checkpoint whose model type needs code from the checkpoint itself",
    "model.allow_pickle": "allow pickle `.bin` weights (safetensors only otherwise)",
    "model.pad_policy": "no pad token: `eos` sets pad = eos with a warning, `fail` refuses",
    "model.loader": "ZeRO-3 loading: `fast` (each rank reads only its partition's bytes; refuses when it cannot), "
                    "`transformers` (`from_pretrained`), `auto` (fast when the checkpoint allows it, else "
                    "transformers)",
    "reference.path": "the reference checkpoint; null = the policy's",
    "reference.placement": "where the reference lives ([placements.md](placements.md))",
    "reference.on_zero2": "zero3 placement under a ZeRO-2 policy: a stage-0 `replica` on every rank, or `refuse`",
    "reference.lora.r": "lora placement: the adapters' rank",
    "reference.lora.alpha": "lora placement: the adapters' scaling alpha",
    "reference.lora.dropout": "lora placement: dropout on the adapters",
    "reference.lora.target_modules": "lora placement: the module names that get adapters",
    "reference.cache_dir": "precomputed reference log-probs; null = `<train.output_dir>/ref_logps`",
    "reference.ranks": "ranks placement: K, the last K launched processes hold and serve the reference",
    "reference.serve": "ranks placement: log-probs per micro-batch (`online`) or all before training (`precompute`)",
    "reference.batch_requests": "ranks placement: equal-length requests of the policy ranks share one forward",
    "reference.pad_to_multiple_of": "ranks placement: pad micro-batches to a multiple so more requests share a "
                                    "forward; null keeps TRL's padding (bitwise the colocated run)",
    "sharding.name": "a shipped sharding by name (zero2, zero3, zero3_offload: DeepSpeed; fsdp2: PyTorch FSDP2); "
    "null = the accelerate launch's, else zero3",
    "sharding.ds_config": "your own DeepSpeed JSON; overrides `sharding.name`",
    "sharding.timeout_s": "collective timeout in seconds: a rank that does not answer is named after this",
    "sharding.fsdp2.reshard_after_forward": "FSDP2: free each unit's gathered parameters after its forward (less "
    "memory, one more all-gather in the backward)",
    "sharding.fsdp2.cpu_offload": "FSDP2: keep the policy's sharded parameters, gradients and optimizer state in host "
    "memory",
    "sharding.fsdp2.mixed_precision": "FSDP2: `bf16` computes in bf16 and reduces in fp32 with an fp32 master copy of "
    "the policy; `no` keeps the checkpoint's dtype throughout",
    "verify.prompts": "prompts for the generation check and the initial KL",
    "verify.reference_text": "a plain answer to the first prompt; its perplexity must beat the uniform baseline",
    "verify.kl_max": "initial-KL limit on a CPU reference under an accelerator policy; set to anything but its "
                     "default, it replaces the tolerance the run derives "
                     "([gate.md](gate.md#tolerances-bitwise-or-measured))",
    "verify.kl_chunk": "vocabulary chunk of the KL's log-softmaxes (memory does not grow with the vocabulary)",
    "verify.generation": "run the greedy generation check (with a KV cache: max_new_tokens forwards)",
    "verify.perplexity": "measure the reference answer's perplexity against the uniform baseline (shares the verify "
    "pass); off: a SKIPPED row",
    "verify.tokenizer_order": "check the tokenizer matches the weights: the verify texts in order vs shuffled; off: a "
    "SKIPPED row",
    "verify.initial_kl": "measure KL(policy || reference) on the verify pass's batch (one reference forward); off: a "
    "SKIPPED row",
    "verify.rows_per_forward": "at most this many verify rows in one forward (bounds the logits' memory)",
    "verify.max_new_tokens": "tokens generated per prompt by the generation check",
    "verify.fingerprint_files": "also compare the weights with the checkpoint's safetensors files",
    "verify.smoke_steps": "real training steps after the checks (the step-0 loss, policy moved, reference did not)",
    "verify.smoke_learning_rate": "the smoke steps' learning rate, high enough that every bf16 weight visibly moves",
    "verify.loss_tolerance": "step-0 loss tolerance; set to anything but its default, it replaces the tolerance the "
                             "run derives",
    "verify.cross_device_loss_tolerance": "step-0 loss tolerance for a CPU reference under an accelerator policy "
                                          "(other kernels on other hardware)",
    "data.train": "training preference data: a file, a `datasets` directory or a cached dataset name "
                  "([data.md](data.md))",
    "data.eval": "evaluation preference data, as `data.train`; null = none (the embedded demo keeps its eval set "
    "only when model.path and data.train are both `default`)",
    "data.train_split": "the split of a DatasetDict directory or a cached dataset name for `data.train`",
    "data.eval_split": "the split for `data.eval` (which may name the same source as `data.train`)",
    "train.beta": "DPO beta, or a preset: `conservative` (0.25), `standard` (0.1), `aggressive` (0.05)",
    "train.learning_rate": "the optimizer's learning rate (DPOConfig)",
    "train.per_device_train_batch_size": "prompt pairs per rank per micro-batch",
    "train.per_device_eval_batch_size": "prompt pairs per rank per evaluation batch",
    "train.gradient_accumulation_steps": "micro-batches per optimizer step",
    "train.max_length": "tokens of prompt + completion; TRL truncates longer rows",
    "train.max_prompt_length": "tokens of a standard prompt, cut from its start by dpo-dist (TRL 1.x has no such "
                               "limit)",
    "train.logging_steps": "steps between TRL's log lines",
    "train.save_steps": "steps between checkpoints",
    "train.output_dir": "where report.json, the logs, the manifest and the checkpoints go",
    "train.seed": "the seed on every rank",
    "train.gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "train.resume_from": "a `checkpoint-N` of this run to resume from; the reference is re-verified first",
    "train.num_train_epochs": "passes over the train set (ignored when train.max_steps > 0)",
    "train.max_steps": "optimizer steps to train; -1: train.num_train_epochs decides",
    "train.warmup_ratio": "share of the training steps that warm the learning rate up from 0",
    "train.lr_scheduler_type": "the learning-rate schedule after warmup",
    "train.eval_strategy": "`auto`: evaluate the eval set every eval_steps when data.eval is given, else never",
    "train.eval_steps": "steps between evaluations (null: train.save_steps)",
    "train.save_total_limit": "checkpoints kept, the oldest deleted (null keeps all: ~1 TB each for 70B with Adam)",
    "train.extra": "any other DPOConfig field, checked against DPOConfig",
    "kl.limit": "the KL(policy || reference) budget during training",
    "kl.warn_fraction": "warn when the KL reaches this fraction of the limit",
    "kl.every_steps": "steps between KL measurements during training",
    "kl.control": "`fixed` beta, or `adaptive`: beta within bounds plus a learning-rate brake "
                  "([kl-control.md](kl-control.md))",
    "kl.beta_min": "adaptive control: the lowest beta",
    "kl.beta_max": "adaptive control: the highest beta",
    "kl.lr_scale_min": "adaptive control: the brake's floor on the learning rate's scale; 1 = no brake",
    "kl.prompts": "held-out prompts for the KL during training; empty = `verify.prompts`",
    "overwrite": "replace a report another run left in the output dir (`--overwrite`)",
}

# Ranges of keys that are not floats (floats: value_checks.FLOAT_RANGES), as value_checks.check_values enforces them.
RANGES: dict[str, str] = {
    "reference.lora.r": ">= 1",
    "reference.lora.alpha": "> 0",
    "reference.lora.target_modules": "at least one",
    "reference.ranks": ">= 1, < the launched processes / 2",
    "reference.pad_to_multiple_of": ">= 1",
    "sharding.timeout_s": ">= 10",
    "verify.prompts": "at least one",
    "verify.kl_chunk": ">= 1",
    "verify.max_new_tokens": ">= 1",
    "verify.rows_per_forward": ">= 1",
    "verify.smoke_steps": ">= 0",
    "train.per_device_train_batch_size": ">= 1",
    "train.per_device_eval_batch_size": ">= 1",
    "train.gradient_accumulation_steps": ">= 1",
    "train.max_length": ">= 1",
    "train.max_prompt_length": ">= 1, < train.max_length",
    "train.logging_steps": ">= 1",
    "train.save_steps": ">= 1",
    "train.max_steps": "-1, or >= 1",
    "train.eval_steps": "null, or >= 1",
    "train.save_total_limit": "null, or >= 1",
    "train.extra": "no key that has its own setting",
    "kl.every_steps": ">= 1",
}
RANGE_NOTES: dict[str, str] = {"kl.beta_min": "< kl.beta_max"}


def keys(cls: type = schema.RunConfig, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, type, default) of every leaf of the config tree, in the schema's order."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append((prefix + f.name, tp, default))
    return out


def describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "string"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in args))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return "list of strings"
    if origin is dict:
        return "mapping"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def literal_values(tp: Any) -> list[str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return [str(a) for a in args]
    if origin in (typing.Union, types.UnionType):
        return [v for a in args for v in literal_values(a)]
    return []


def allowed(key: str, tp: Any) -> str:
    parts = []
    choices = literal_values(tp)
    if choices:
        parts.append("one of " + ", ".join(f"`{c}`" for c in choices))
    if key in value_checks.FLOAT_RANGES:
        lo, lo_in, hi, hi_in = value_checks.FLOAT_RANGES[key]
        if hi is None:
            parts.append(f"{'>=' if lo_in else '>'} {lo:g}")
        else:
            parts.append(f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}")
    if key in RANGES:
        parts.append(RANGES[key])
    if key in RANGE_NOTES:
        parts.append(RANGE_NOTES[key])
    return "; ".join(parts)


def show_default(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"`{json.dumps(list(value))}`"
    if isinstance(value, float):
        return f"`{value!r}`"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def render() -> str:
    """docs/config.md: one table per section, every key with its type, default, allowed values and meaning."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from dpo_dist/config/schema.py and the meanings in",
        "dpo_dist/config/docs.py. Do not edit: tests/test_docs.py fails when this page and the schema disagree. -->",
        "",
        "One YAML file (`--config`), strictly validated: an unknown key gets a did-you-mean, a wrong type or a value "
        "out of range is named, every problem at once (exit 2). Flags and `--set section.key=value` win over the "
        "YAML, which wins over these defaults. `dpo-dist init --config my_run.yaml --print-config` prints a run's "
        "fully resolved config and exits 0. A full example: [examples/my_run.yaml](../examples/my_run.yaml).",
    ]
    section = None
    for key, tp, default in keys():
        head = key.split(".")[0] if "." in key else "top level"
        if head != section:
            section = head
            lines += ["", f"## {head}", ""]
            cls = _section_class(head)
            if cls is not None and cls.__doc__:
                lines += [" ".join(cls.__doc__.split()), ""]
            lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        meaning = MEANINGS.get(key, "")
        lines.append(f"| `{key}` | {describe_type(tp)} | {show_default(default)} | {allowed(key, tp)} | {meaning} |")
    return "\n".join(lines) + "\n"


def _section_class(head: str) -> type | None:
    hints = typing.get_type_hints(schema.RunConfig)
    tp = hints.get(head)
    return tp if dataclasses.is_dataclass(tp) else None


def missing_meanings() -> list[str]:
    return [k for k, _, _ in keys() if not MEANINGS.get(k)]


def stale_meanings() -> list[str]:
    known = {k for k, _, _ in keys()}
    return [k for k in MEANINGS if k not in known]


def resolved_yaml(cfg: schema.RunConfig) -> str:
    """A run's config as the run sees it (defaults < YAML < flags and --set), as YAML: `init --print-config`."""
    return yaml.safe_dump(schema.to_dict(cfg), sort_keys=False, width=120)


if __name__ == "__main__":
    missing = missing_meanings()
    if missing:
        print(f"dpo_dist/config/docs.py: no meaning for {', '.join(missing)}: add a line for each to MEANINGS",
              file=sys.stderr)
        sys.exit(1)
    sys.stdout.write(render())
