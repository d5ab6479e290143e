"""Architecture presets for `dpo-dist plan`, and model statistics computed by building the model on the meta device.

A preset is only a config.json: the public architectural numbers of a model family (hidden size, layers, heads,
vocabulary, experts). Nothing here is a parameter count: `model_stats` builds the model with
`AutoModelForCausalLM.from_config` under `torch.device("meta")` (no weights, no download; ~0.1 s even for 405B) and
counts what it finds, module by module, the way DeepSpeed's `model_to_params` does.

Module-level imports stay light (no torch/transformers) so `dpo-dist --help` is fast.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# config.json fields of public model families. Sources: the models' own config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                        max_position_embeddings=8192),
    "llama-3.1-405b": dict(model_type="llama", hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
                           tie_word_embeddings=False, max_position_embeddings=131072),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                        max_position_embeddings=32768),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=32768),
}
ALIASES = {"llama-3-405b": "llama-3.1-405b", "llama-3.1-8b": "llama-3-8b", "llama-3.1-70b": "llama-3-70b",
           "llama-3.3-70b": "llama-3-70b", "mixtral-8x7b-v0.1": "mixtral-8x7b"}

# Linear layers PEFT's LoRA targets by default here: every projection of a decoder layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def preset_name(name: str) -> str | None:
    """'Llama-3-70B', 'meta-llama/Meta-Llama-3-70B-Instruct' -> 'llama-3-70b'; None if it names no preset."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    for prefix in ("meta-",):
        key = key.removeprefix(prefix)
    for suffix in ("-instruct", "-hf", "-base"):
        key = key.removesuffix(suffix)
    key = ALIASES.get(key, key)
    return key if key in PRESETS else None


@dataclass(frozen=True)
class CheckpointFacts:
    """What the files of a checkpoint say about loading: total bytes and the largest file one rank maps at once."""

    total_bytes: int
    largest_file_bytes: int
    files: int


@dataclass(frozen=True)
class ModelSource:
    config: dict[str, Any]
    source: str  # "preset llama-3-70b", a config.json path or a checkpoint dir
    checkpoint: CheckpointFacts | None = None


def resolve_model(spec: str) -> ModelSource:
    """A preset name, a config.json file, or a checkpoint directory ('default' = the embedded tiny SFT model)."""
    name = preset_name(spec)
    p = Path(spec)
    if spec == "default":
        from dpo_dist.config.resources import DEFAULT_CHECKPOINT

        p = Path(DEFAULT_CHECKPOINT)
    elif name is not None and not p.exists():
        return ModelSource(dict(PRESETS[name]), f"preset {name}")
    if p.is_file():
        return ModelSource(json.loads(p.read_text()), str(p), _checkpoint_facts(p.parent))
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSource(json.loads((p / "config.json").read_text()), str(p), _checkpoint_facts(p))
    known = ", ".join(sorted(PRESETS))
    raise ValueError(f"--model {spec!r} is neither a checkpoint directory, a config.json, nor a preset ({known})")


def _checkpoint_facts(d: Path) -> CheckpointFacts | None:
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not files:
        return None
    sizes = [f.stat().st_size for f in files]
    return CheckpointFacts(sum(sizes), max(sizes), len(sizes))


@dataclass(frozen=True)
class ModelStats:
    """Counts taken from the model built on the meta device (unique parameters, tied weights once)."""

    model_type: str
    params: int  # Psi: unique parameters
    largest_layer_params: int  # largest sum of one module's own (non-recursive) parameters, as DeepSpeed counts it
    largest_layer_name: str
    largest_tensor_params: int
    embedding_params: int  # input embedding (vocab x hidden)
    lm_head_params: int  # output projection; 0 extra when tied
    tied_embeddings: bool
    lora_params_per_rank: int  # LoRA trainable params per unit of rank r (sum of in+out over target Linears)
    lora_target_modules: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int  # 1 for dense models
    experts_per_token: int
    build_seconds: float

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def model_stats(config: dict[str, Any]) -> ModelStats:
    """Build the model from its config on the meta device and count. Cached per config."""
    return _model_stats(config_key(config))


@functools.lru_cache(maxsize=32)
def _model_stats(key: str) -> ModelStats:
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(key)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("the model config has no model_type: cannot build it")
    for k in ("architectures", "transformers_version", "auto_map", "_name_or_path", "quantization_config"):
        fields.pop(k, None)
    t0 = time.perf_counter()
    cfg = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    largest, largest_name = 0, ""
    lora, lora_n = 0, 0
    for name, mod in model.named_modules():
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        if own > largest:
            largest, largest_name = own, name
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            lora += mod.in_features + mod.out_features
            lora_n += 1
    largest_tensor = max(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    text = cfg.get_text_config()
    heads = int(text.num_attention_heads)
    hd = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    stats = ModelStats(
        model_type=model_type, params=int(params), largest_layer_params=int(largest), largest_layer_name=largest_name,
        largest_tensor_params=int(largest_tensor), embedding_params=int(emb.weight.numel()),
        lm_head_params=0 if (head is None or tied) else int(head.weight.numel()), tied_embeddings=bool(tied),
        lora_params_per_rank=int(lora), lora_target_modules=lora_n, hidden_size=int(text.hidden_size),
        intermediate_size=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        num_layers=int(text.num_hidden_layers), num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=hd,
        vocab_size=int(text.vocab_size),
        num_experts=int(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1),
        experts_per_token=int(getattr(text, "num_experts_per_tok", None) or 1),
        build_seconds=round(time.perf_counter() - t0, 3))
    del model
    return stats
