"""Checks of the loaded models and tokenizers themselves: roles (reference frozen and in eval mode, policy
trainable), configs equal, tokenizers equal and fitting the embeddings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpo_dist.load.models import training_modules
from dpo_dist.verify import weights
from dpo_dist.verify.report import RankReport
from dpo_dist.verify.tolerances import BITWISE_FINGERPRINTS

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
    ok &= policy_trainable(policy, rr, prefix)
    ok &= rr.add(prefix + "policy and reference are distinct objects", policy is not reference,
                 "distinct" if policy is not reference else "same object",
                 "the reference must be a separate model loaded from the same checkpoint")
    return ok


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted((set(a) | set(b)) - CONFIG_IGNORED_KEYS)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def policy_trainable(policy, rr: RankReport, prefix: str = "") -> bool:
    n_train = sum(1 for p in policy.parameters() if p.requires_grad)
    n_all = sum(1 for _ in policy.parameters())
    return rr.add(prefix + "policy trainable", n_train > 0, f"{n_train}/{n_all} parameter tensors trainable",
                  "the policy has no trainable parameter: do not freeze it, or use a LoRA placement")


def configs_equal(policy_config: dict[str, Any], reference_config: dict[str, Any], rr: RankReport) -> bool:
    diffs = config_differences(policy_config, reference_config)
    return rr.add("configs equal", not diffs, "; ".join(diffs[:5]) or "identical",
                  "policy and reference configs differ: load both from the same SFT checkpoint")


def weights_equal(fp_policy: dict[str, str], fp_reference: dict[str, str], rr: RankReport, note: str = "",
                  gap: Callable[[str], float] | None = None) -> bool:
    """The bitwise row: policy and reference fingerprints equal. `gap(name)`, where the reference is at hand, gives
    the first differing tensor's max abs difference; `note` says where the reference was fingerprinted."""
    bad = weights.compare(fp_policy, fp_reference)
    differ = ""
    if bad:
        differ = f"{len(bad)} differ, first: {bad[0]}" + (f" (max abs diff {gap(bad[0]):.3g})" if gap else "")
    return rr.add("weights: policy == reference", not bad,
                  f"{len(fp_policy)} tensors bitwise equal{note}" if not bad else differ,
                  "policy and reference weights differ: re-initialize both from the same checkpoint "
                  f"(first differing tensor: {bad[0] if bad else ''})")


def reference_unmoved(before: dict[str, str], after: dict[str, str], rr: RankReport, where: str = "",
                      hint: str = "the reference changed during training: it must be frozen and outside the "
                      "optimizer") -> bool:
    """No reference tensor changed (fingerprints before and after training); `where` names the reference ranks."""
    moved = weights.compare(before, after)
    return rr.add("no reference parameter moved" + where, not moved,
                  f"{len(before)} reference tensors unchanged" if not moved else f"{len(moved)} changed, e.g. "
                  f"{moved[0]}", hint, 0.0, BITWISE_FINGERPRINTS)
