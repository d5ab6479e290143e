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

import yaml

from dpo_dist.config.names import PLACEMENT_ALIASES, Dtype, Placement, Sharding

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
IMPLEMENTED_PLACEMENTS = Placement.values()


class ConfigError(ValueError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")

    def one_line(self) -> str:
        return f"invalid {self.source}: " + "; ".join(self.problems)


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


BETA_PRESETS = {"conservative": 0.25, "standard": 0.1, "aggressive": 0.05}
BETA_REASONS = {
    "conservative": "0.2-0.3 keeps the policy close to the reference: for a strong SFT model or noisy preferences",
    "standard": "the usual DPO value",
    "aggressive": "lets the policy move further from the reference: for clean preferences and short runs",
}


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


def _float_range_problems(cfg: RunConfig) -> list[str]:
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


def _check_values(cfg: RunConfig, problems: list[str]) -> None:
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
    if cfg.reference.placement not in IMPLEMENTED_PLACEMENTS:
        problems.append(
            f"'reference.placement: {cfg.reference.placement}' is not available in this version "
            f"(available: {', '.join(IMPLEMENTED_PLACEMENTS)})"
        )
    if "pad_to_multiple_of" in t.extra and cfg.reference.placement == Placement.RANKS and \
            cfg.reference.batch_requests and cfg.reference.pad_to_multiple_of:
        problems.append("'train.extra.pad_to_multiple_of' is set by dpo-dist itself under reference.placement ranks "
                        "(reference.pad_to_multiple_of): remove it from train.extra")
    for key in sorted(t.extra):
        owner = reserved_extra_key(key)
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


def reserved_extra_key(key: str) -> str | None:
    """What controls a DPOConfig argument dpo-dist sets itself, or None if train.extra may set it."""
    if key in RESERVED_EXTRA:
        return RESERVED_EXTRA[key]
    if key == "output_dir":
        return "train.output_dir or --output-dir"
    if key in {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}:
        return f"train.{key}"
    return None


def from_dict(data: dict[str, Any] | None, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig; raise one ConfigError naming every problem."""
    problems: list[str] = []
    cfg = _build(RunConfig, _placement_alias(data or {}), "", problems)
    if not problems:
        cfg = _demo_eval(cfg, data or {})
        _check_values(cfg, problems)
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


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError([f"override '{item}' must look like section.key=value"], "command line")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override '{item}': the value is not valid YAML ({_yaml_cause(e)}): close the "
                           "bracket or brace, or quote a value meant as text"], "command line") from None
    return key.strip().split("."), value


def _yaml_cause(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    return problem if problem else str(e).splitlines()[0]


def _duplicates(node: yaml.Node, prefix: str, out: list[str], seen_nodes: set[int] | None = None) -> None:
    """Keys given twice in one mapping, with both lines: PyYAML keeps the later value silently (two `train:` sections
    would drop the first one's settings). Each node once: an alias is the node it names, so nested aliases (a
    "billion laughs" file) would otherwise be walked exponentially often (#10)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` overrides on purpose
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                out.append(f"duplicate key '{prefix}{key}' (lines {seen[key]} and {line}): keep one, the later one "
                           "would silently win")
            else:
                seen[key] = line
            _duplicates(value_node, f"{prefix}{key}.", out, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{prefix}{i}.", out, seen_nodes)


MAX_YAML_VALUES = 100_000  # a run config holds hundreds; every later copy of it (to_dict, the report) walks them all


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values the document holds once every alias is copied out (what to_dict and the report would walk),
    counted in linear time: an alias is its node, counted once and reused."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    children = [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    memo[id(node)] = 1 + sum(_expanded_size(c, memo) for c in children)
    return memo[id(node)]


def read_yaml(p: Path, source: str) -> Any:
    """Parse a YAML file strictly: UTF-8 text, valid YAML, no key given twice in one mapping."""
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError([f"not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}): save the file as UTF-8"],
                          source) from None
    except OSError as e:
        raise ConfigError([f"cannot read it ({e.strerror or e}): check its permissions"], source) from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # inside the try: its reader refuses control characters right here (#9)
        node = loader.get_single_node()
        if node is None:
            return None
        dups: list[str] = []
        _duplicates(node, "", dups)
        if dups:
            raise ConfigError(dups, source)
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise ConfigError([f"expands to {size:,} values through aliases (*name), more than {MAX_YAML_VALUES:,}: "
                               "a run config is never that large (an alias bomb?): write the values out"], source)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise ConfigError([f"not a YAML text file: {e.reason} #x{e.character:04x} on line {line}: remove it, or pass "
                           "the run YAML, not another file"], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {str(e).splitlines()[0]}"], source) from None
    finally:
        if loader is not None:
            loader.dispose()


def merge_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Apply dotted overrides on a nested dict (CLI wins over YAML)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for keys, value in overrides:
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


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
