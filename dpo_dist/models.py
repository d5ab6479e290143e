"""Load the tokenizer and the two models, and check their roles: reference frozen + eval, policy trainable.

Loading goes through transformers' DeepSpeed integration: the DeepSpeed state (our DPOConfig) exists before
`from_pretrained`, so under ZeRO-3 each rank only ever holds its partition (the other order loads a full copy per rank,
FAI-RL#66). Under ZeRO-3, by default (model.loader auto), `load_causal_lm` is given a dpo_dist.fastload plan instead:
each rank reads only its own partitions' bytes from the safetensors files, with no rank-0 copy (run.py decides, the
same on every rank). Nothing here gathers a parameter.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from .report import RankReport

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Keys of config.json that name where or by what a checkpoint was written, not what the model is.
CONFIG_IGNORED_KEYS = {"_name_or_path", "transformers_version", "name_or_path", "_commit_hash", "dtype", "torch_dtype"}


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def check_tokenizer(tok, model_config: dict, pad_policy: str, rr: RankReport, warn) -> bool:
    """The tokenizer must fit the embedding matrix and have usable special tokens; pad may be set to eos."""
    rows = int(model_config.get("vocab_size") or 0)
    ok = rr.add("tokenizer fits embeddings", len(tok) <= rows, f"{len(tok)} tokens, {rows} embedding rows",
                "the tokenizer is larger than the embedding matrix: use the tokenizer saved with this checkpoint, "
                "or resize the embeddings and re-save")
    bad = [(t, i) for t, i in zip(tok.all_special_tokens, tok.all_special_ids, strict=False)
           if i is None or not 0 <= i < rows]
    ok &= rr.add("special token ids in range", not bad, f"{len(tok.all_special_ids)} special ids" if not bad else
                 ", ".join(f"{t}={i}" for t, i in bad), "special token ids must be < vocab_size: fix the tokenizer")
    ok &= rr.add("eos token present", tok.eos_token_id is not None, f"eos={tok.eos_token!r} id={tok.eos_token_id}",
                 "the tokenizer has no eos token: set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:
        if pad_policy == "eos" and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
            warn(f"tokenizer has no pad token: set pad = eos ({tok.eos_token!r}); model.pad_policy: fail refuses")
            rr.add("pad token present", True, f"none: set to eos id {tok.eos_token_id}")
        else:
            ok &= rr.add("pad token present", False, "none", "the tokenizer has no pad token: add one, or set "
                         "model.pad_policy: eos to use eos as pad")
    else:
        rr.add("pad token present", True, f"pad={tok.pad_token!r} id={tok.pad_token_id}")
    return ok


def same_tokenizer(a, b) -> list[str]:
    """Differences between two tokenizers that would make reference log-probs meaningless."""
    diffs = []
    if a.get_vocab() != b.get_vocab():
        diffs.append(f"vocabularies differ ({len(a)} vs {len(b)} tokens)")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, attr) != getattr(b, attr):
            diffs.append(f"{attr} {getattr(a, attr)} vs {getattr(b, attr)}")
    return diffs


def load_causal_lm(path: Path, dtype: str, trust_remote_code: bool, allow_pickle: bool, plan=None):
    """from_pretrained under whatever DeepSpeed state exists (ZeRO-3: partitioned while loading), or, given a
    `fastload.plan_load` result, dpo_dist.fastload under the registered ZeRO-3 config: each rank reads only its own
    partition's bytes from the files (same parameters, bitwise, without a full copy on any rank)."""
    if plan is not None:
        import copy
        import dataclasses

        from . import fastload

        # a plan may serve two models (policy and reference): each gets its own config object, as from_pretrained
        # would give it
        plan = dataclasses.replace(plan, config=copy.deepcopy(plan.config))
        return fastload.load_partitioned(path, plan.dtype, trust_remote_code=trust_remote_code, plan=plan)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle
    )


def freeze(model) -> None:
    """Reference: no gradients, eval mode everywhere (dropout off)."""
    model.requires_grad_(False)
    model.eval()


def training_modules(model) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if m.training]


def check_roles(policy, reference, rr: RankReport, prefix: str = "") -> bool:
    ref_trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    seen = f"{len(ref_trainable)} trainable, e.g. {ref_trainable[0]}" if ref_trainable else "0 trainable parameters"
    ok = rr.add(prefix + "reference frozen", not ref_trainable, seen,
                "the reference has trainable parameters: call requires_grad_(False) on it (dpo-dist does; check "
                "custom code)")
    in_train = training_modules(reference)
    ok &= rr.add(prefix + "reference in eval mode", not in_train, "all modules eval" if not in_train else
                 f"{len(in_train)} modules in train mode, e.g. {in_train[0]}",
                 "the reference is in train mode (dropout active): call reference.eval()")
    n_train = sum(1 for p in policy.parameters() if p.requires_grad)
    n_all = sum(1 for _ in policy.parameters())
    ok &= rr.add(prefix + "policy trainable", n_train > 0, f"{n_train}/{n_all} parameter tensors trainable",
                 "the policy has no trainable parameter: do not freeze it, or use a LoRA placement")
    ok &= rr.add(prefix + "policy and reference are distinct objects", policy is not reference,
                 "distinct" if policy is not reference else "same object",
                 "the reference must be a separate model loaded from the same checkpoint")
    return ok


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted((set(a) | set(b)) - CONFIG_IGNORED_KEYS)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def read_config_json(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


@contextlib.contextmanager
def outside_zero3():
    """Build a model whole even while a ZeRO-3 DeepSpeed state exists. transformers decides whether to partition at
    construction from a module-level weakref to the DeepSpeed config; accelerate's
    `zero3_init_context_manager(enable=False)` re-registers the same stage-3 config, so it does not help here."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    held = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_ds.set_hf_deepspeed_config(held)


def load_cpu_shared(path: Path, dtype: str, trust_remote_code: bool):
    """An unsharded model in host memory whose weights are copy-on-write views of the safetensors files.

    Every rank on a node maps the same file pages (MAP_PRIVATE), so the weights are paid once per node in page cache,
    not once per rank (RSS counts them per rank; PSS shows the share). Any write would silently make a private copy,
    which a frozen reference never does. Falls back to a private copy (from_pretrained) when the file dtype differs
    from the wanted one. Returns (model, shared)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import tensor_index

    want = DTYPES[dtype]
    index = tensor_index(path)
    if any(e.dtype != want for e in index.values()):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=want, trust_remote_code=trust_remote_code)
        return model, False
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=want, trust_remote_code=trust_remote_code)
    storages = {}
    state = {}
    for name, e in index.items():
        if e.file not in storages:
            import os

            storages[e.file] = torch.UntypedStorage.from_file(e.file, shared=False, nbytes=os.path.getsize(e.file))
        item = torch.empty((), dtype=e.dtype).element_size()
        t = torch.empty(0, dtype=e.dtype)
        t.set_(storages[e.file], e.start // item, e.shape)
        state[name] = t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing {still_meta[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model, True


def shared_memory_kb() -> dict[str, int]:
    """This process's RSS and PSS (kB) from /proc: PSS splits shared file pages among the processes mapping them."""
    out = {}
    try:
        for line in open("/proc/self/smaps_rollup"):
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_File", "Private_Dirty"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out
