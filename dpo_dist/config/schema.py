"""One typed config tree for a dpo-dist run, loaded strictly from YAML.

Frozen dataclasses per concern; unknown keys, wrong types and bad values are all collected and reported in one
`ConfigError` (torchtune/nanotron style), so a user fixes their YAML in one go. Precedence: CLI overrides > YAML >
defaults. Derived values (resolved paths, DeepSpeed dicts) live in functions elsewhere, not in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpo_dist.config.errors import ConfigError
from dpo_dist.config.names import PLACEMENT_ALIASES, Dtype, Placement, Sharding
from dpo_dist.config.value_checks import BETA_PRESETS, BETA_REASONS, check_values
from dpo_dist.config.yaml_text import merge_overrides, read_yaml

DEFAULT_PROMPTS = (
    "Explain machine learning in simple terms.",
    "What is a good way to learn a new language?",
    "Why is the sky blue?",
    "Give me one tip for writing clear code.",
)
# A plain answer to the first default prompt; its perplexity is measured as that prompt's reply.
DEFAULT_REFERENCE_TEXT = (
    "Machine learning is a way to teach computers by showing them examples instead of writing rules."
)

SHARDING_NAMES = Sharding.values()
PLACEMENTS = Placement.values()
IMPLEMENTED_PLACEMENTS = Placement.values()  # the planner marks a layout whose placement is not among these


@dataclass(frozen=True)
class ModelConfig:
    """The SFT checkpoint the policy (and by default the reference) is loaded from."""

    path: str = "default"  # a checkpoint directory; "default" = the embedded tiny SFT model
    dtype: Literal[Dtype.values()] = Dtype.BFLOAT16.value
    trust_remote_code: bool = False
    allow_pickle: bool = False  # safetensors only unless the user opts into pickle .bin files
    pad_policy: Literal["eos", "fail"] = "eos"  # no pad token: set pad = eos with a warning, or fail
    # How ZeRO-3 models are loaded. auto: dpo_dist.load.fastload (each rank reads only its own partition's bytes)
    # when the checkpoint allows it under ZeRO-3, else transformers' from_pretrained; fast: refuse to run if fastload
    # cannot be used; transformers: always from_pretrained.
    loader: Literal["auto", "fast", "transformers"] = "auto"


@dataclass(frozen=True)
class LoraSettings:
    """The policy's LoRA adapters for `reference.placement: lora` (the reference is the base, adapters off)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class ReferenceConfig:
    """Where the frozen reference comes from and where it lives."""

    path: str | None = None  # None = the policy's checkpoint
    placement: Literal[Placement.values()] = Placement.ZERO3.value  # `sharded` is read as zero3 (either backend)
    on_zero2: Literal["replica", "refuse"] = "replica"  # zero3 placement with a ZeRO-2 policy
    lora: LoraSettings = field(default_factory=LoraSettings)
    cache_dir: str | None = None  # precomputed log-probs; None = <train.output_dir>/ref_logps
    # placement ranks: the last `ranks` (K) of the launched processes hold the reference and serve it; the others train
    ranks: int = 1
    serve: Literal["online", "precompute"] = "online"  # ranks: log-probs per micro-batch, or all before training
    batch_requests: bool = True  # ranks: requests of equal length from the policy ranks served in one forward
    # ranks with batch_requests: pad micro-batches to a multiple (e.g. 64) so equal lengths, hence shared forwards, are
    # common; null keeps TRL's padding, bitwise the colocated run's (padding itself moves bf16 results slightly)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class Fsdp2Settings:
    """sharding.name fsdp2 (PyTorch FSDP2, `fully_shard`): how the policy and a sharded reference are wrapped."""

    reshard_after_forward: bool = True  # free each layer's gathered weights after its forward (ZeRO-3's behaviour)
    cpu_offload: bool = False  # the policy's shards, gradients and optimizer states in host memory
    # bf16: compute in bf16, gradients reduced in fp32, the trained policy's master copy fp32 (as accelerate does);
    # no: compute, reduce and keep everything in model.dtype
    mixed_precision: Literal["bf16", "no"] = "bf16"


@dataclass(frozen=True)
class ShardingConfig:
    """How the policy is sharded: a shipped sharding by name (DeepSpeed's or FSDP2), or the user's own DeepSpeed
    JSON."""

    name: Literal[Sharding.values()] | None = None  # None: from the accelerate launch, else zero3
    ds_config: str | None = None  # a DeepSpeed JSON path; overrides `name`
    timeout_s: int = 600  # collective timeout: a mismatch fails after this, never after torch's 30 min default
    fsdp2: Fsdp2Settings = field(default_factory=Fsdp2Settings)  # read only with name fsdp2


@dataclass(frozen=True)
class VerifyConfig:
    """The proofs run before training: generation, fingerprints, initial KL, optional smoke steps. Each forward proof
    has its own switch; a proof switched off shows as a SKIPPED row. What each costs in full-model forwards:
    dpo_dist.plan.forwards (printed by `init --dry-run`)."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    reference_text: str = DEFAULT_REFERENCE_TEXT
    kl_max: float = 1e-4
    kl_chunk: int = 4096
    generation: bool = True  # greedy generation with a KV cache: max_new_tokens forwards
    max_new_tokens: int = 8  # 8: the degenerate-output rule (one token repeated in >80% of >= 8 tokens) still applies
    perplexity: bool = True  # the reference answer's perplexity against uniform (shares the verify pass)
    tokenizer_order: bool = True  # the verify texts in order vs shuffled (the verify pass + one shuffled pass)
    initial_kl: bool = True  # KL(policy || reference) on the verify pass's batch: one reference forward
    rows_per_forward: int = 32  # at most this many verify rows per forward (bounds the logits' memory)
    fingerprint_files: bool = True
    smoke_steps: int = 0
    smoke_learning_rate: float = 1e-2  # smoke steps only: large enough that every bf16 weight visibly moves
    loss_tolerance: float = 1e-4
    # cpu placement on an accelerator: the reference's forward runs on other hardware, so its bf16 sums differ
    # (seen on an H100: step-0 loss 0.692086, KL 4.2e-5/token with bitwise-equal weights)
    cross_device_loss_tolerance: float = 5e-3


@dataclass(frozen=True)
class DataConfig:
    """Preference data (dpo_dist.data.sources): a .jsonl/.json/.parquet/.csv/.arrow file, a `datasets` directory, or
    a dataset name in the local Hugging Face cache; the splits are chosen in a DatasetDict or a cached name."""

    # `default` is the embedded 16+64-row demo set, for the embedded model. An unset eval is no eval set (from_dict
    # keeps the demo's eval set only for the demo itself: model.path and data.train both `default`); a user's model on
    # the demo train set is said in the report and on the terminal (data.demo_note), not refused: a first run that
    # only proves policy == reference on a new checkpoint needs no data of its own.
    train: str = "default"
    eval: str | None = None
    train_split: str = "train"
    eval_split: str = "test"  # eval may name the same source as train: then this split of it


@dataclass(frozen=True)
class KLConfig:
    """The KL(policy || reference) budget during training: measured every `every_steps`, warned near the limit."""

    limit: float = 0.1
    warn_fraction: float = 0.8
    every_steps: int = 10
    # adaptive: beta rises near the limit, falls when learning stalls, and a learning-rate brake holds the KL under the
    # warning level (the scheduler's rate x a scale in [lr_scale_min, 1]; under Adam beta alone barely slows the drift)
    control: Literal["fixed", "adaptive"] = "fixed"
    beta_min: float = 0.01
    beta_max: float = 2.0
    lr_scale_min: float = 0.01  # brake floor in [0, 1] (at/past the warning level: 1% of the scheduled rate); 1: none
    prompts: tuple[str, ...] = ()  # held-out prompts; empty = verify.prompts


@dataclass(frozen=True)
class TrainConfig:
    """DPO arguments; the named ones and `extra` pass through to TRL's DPOConfig."""

    beta: float | Literal["conservative", "standard", "aggressive"] = 0.1
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_length: int = 1024
    max_prompt_length: int = 512  # TRL 1.x dropped it; we truncate prompts (keeping their end) in data prep
    logging_steps: int = 10
    save_steps: int = 100
    # the schedule of a real run (docs/training.md); transformers' own defaults differ: 3 epochs, linear, no warmup
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0: this many optimizer steps, whatever num_train_epochs says
    warmup_ratio: float = 0.1  # share of the steps that warm the learning rate up from 0
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                               "polynomial", "inverse_sqrt"] = "cosine"
    eval_strategy: Literal["auto", "no", "steps", "epoch"] = "auto"  # auto: every eval_steps when data.eval is given
    eval_steps: int | None = None  # None: save_steps (each checkpoint has an eval beside it)
    save_total_limit: int | None = 2  # checkpoints kept (oldest deleted); null keeps all (~1 TB each for 70B + Adam)
    output_dir: str = "runs/dpo-dist"
    seed: int = 42
    gradient_checkpointing: bool = False
    resume_from: str | None = None  # a trainer checkpoint: the reference is re-verified against the init manifest
    extra: dict[str, Any] = field(default_factory=dict)  # more DPOConfig fields, checked against DPOConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------------------------
# strict construction


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) a YAML value against a field type. Returns (ok, value)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in args, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(
            value, (int, float)
        ) else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        ok = all(_type_ok(v, args[0])[0] for v in value)
        return ok, tuple(value)
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return "a list of strings"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"unknown key '{where}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.", problems)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            problems.append(f"'{where}' must be {_describe(tp)}, got {value!r}")
            continue
        bad = _non_finite(coerced, where)
        if bad:  # nan passes every `x <= 0` test and inf every `x > 0`: refuse both before any range check
            problems.append(f"'{bad[0]}' must be a finite number, got {bad[1]}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _non_finite(value: Any, where: str, seen: set[int] | None = None) -> tuple[str, float] | None:
    """The first nan/inf float in a value (nested in train.extra's mappings and lists too), with its dotted path.
    Each container once: YAML aliases share them, and nested aliases would make the walk exponential (#10)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    seen = set() if seen is None else seen
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:
            return None
        seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}", seen)
        if bad:
            return bad
    return None


def from_dict(data: dict[str, Any] | None, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig; raise one ConfigError naming every problem."""
    problems: list[str] = []
    cfg = _build(RunConfig, _placement_alias(data or {}), "", problems)
    if not problems:
        cfg = _demo_eval(cfg, data or {})
        check_values(cfg, problems, {f.name for f in dataclasses.fields(TrainConfig)})
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _placement_alias(data: dict[str, Any]) -> dict[str, Any]:
    """`reference.placement: sharded` is the default placement's name under either backend (config.names)."""
    ref = data.get("reference")
    if isinstance(ref, dict) and isinstance(ref.get("placement"), str) and ref["placement"] in PLACEMENT_ALIASES:
        return {**data, "reference": {**ref, "placement": PLACEMENT_ALIASES[ref["placement"]].value}}
    return data


def _demo_eval(cfg: RunConfig, data: dict[str, Any]) -> RunConfig:
    """The demo (model.path and data.train `default`) with data.eval unset evaluates on the demo's eval set; any other
    run with data.eval unset has no eval set (issue 21, #37: never the demo's rows beside a user's train set)."""
    section = data.get("data")
    unset = not isinstance(section, dict) or "eval" not in section
    if unset and cfg.model.path == "default" and cfg.data.train == "default":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval="default"))
    return cfg


def load(path: str | Path | None, overrides: list[tuple[list[str], Any]] | None = None) -> RunConfig:
    """Load YAML (None = all defaults), apply CLI overrides, validate strictly."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError([f"config file '{p}' does not exist: pass an existing YAML file with --config"], source)
        data = read_yaml(p, source) or {}
        if not isinstance(data, dict):
            raise ConfigError(["the top level must be a mapping of sections (model, reference, ...)"], source)
    if overrides:
        data = merge_overrides(data, overrides)
        source += " + command line"
    return from_dict(data, source)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain dict (YAML/JSON-safe) for the report and the resolved config file."""
    d = dataclasses.asdict(cfg)
    d["verify"]["prompts"] = list(d["verify"]["prompts"])
    d["reference"]["lora"]["target_modules"] = list(d["reference"]["lora"]["target_modules"])
    d["kl"]["prompts"] = list(d["kl"]["prompts"])
    return d


def resolve_beta(cfg: RunConfig) -> tuple[float, str]:
    """The beta value used and why: a number as given, or a preset's value and rationale."""
    b = cfg.train.beta
    if isinstance(b, str):
        return BETA_PRESETS[b], f"preset '{b}': {BETA_REASONS[b]}"
    return float(b), "set explicitly" if b != TrainConfig.beta else "default (the 'standard' preset)"
