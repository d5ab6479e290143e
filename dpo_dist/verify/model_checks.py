"""Checks of the loaded models and tokenizers themselves: roles (reference frozen and in eval mode, policy
trainable), configs equal, tokenizers equal and fitting the embeddings."""

from __future__ import annotations

from typing import Any

from dpo_dist.load.models import training_modules
from dpo_dist.verify.report import RankReport

# Keys of config.json that name where or by what a checkpoint was written, not what the model is.
CONFIG_IGNORED_KEYS = {"_name_or_path", "transformers_version", "name_or_path", "_commit_hash", "dtype", "torch_dtype"}


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
