"""Which checkpoint tensor becomes which model tensor: transformers' own key renaming, accounted both ways.

transformers 5 renames checkpoint keys while loading (legacy names kept in the files of whole model families:
`embed_out.` -> `lm_head.` for GPT-NeoX, `LayerNorm.gamma` -> `.weight`, prefix changes for multimodal wrappers) and
converts some (per-expert MoE weights stacked into one fused tensor, qkv split). The file proof and the fast loader
must see the files as `from_pretrained` sees them, so they ask transformers for the same list of transforms it applies
(`get_model_conversion_mapping`) and rename each file key with the same function (`rename_source_key`), instead of
assuming names match. That private API is reached through dpo_dist.compat.transformers (tests/test_compat.py pins
it).

`account` then says, for every tensor of the files, where it goes, and for every tensor of the model, where it comes
from: a file tensor that feeds no model tensor (a config.json with fewer layers than the files hold) and a model
tensor no file tensor feeds (not tied to one that is) are "unexplained", and the file proof fails naming them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from dpo_dist.compat.transformers import conversions, load_ignore_patterns, rename


@dataclass
class FileAccount:
    """Where every file tensor goes and where every model tensor comes from (model names are state-dict names)."""

    file_key_of: dict[str, str] = field(default_factory=dict)  # model name -> file key, bitwise the same values
    renamed: dict[str, str] = field(default_factory=dict)  # file key -> model name, where the two differ
    converted: dict[str, str] = field(default_factory=dict)  # file key -> model name: values transformed on load
    converted_targets: set[str] = field(default_factory=set)  # model names a converter fills (not bitwise)
    ignored: list[str] = field(default_factory=list)  # file keys the model class drops on load by its own patterns
    initialized: list[str] = field(default_factory=list)  # model buffers (or ignorable keys) the model computes itself
    tied: dict[str, str] = field(default_factory=dict)  # model name without a file key -> the tied name that has one
    unexplained_file: list[str] = field(default_factory=list)  # file keys that feed nothing
    unexplained_model: list[str] = field(default_factory=list)  # model tensors nothing feeds

    @property
    def complete(self) -> bool:
        return not self.unexplained_file and not self.unexplained_model

    def describe(self) -> str:
        """One line: the first unexplained tensors both ways, or what was explained."""
        if not self.complete:
            parts = []
            if self.unexplained_file:
                parts.append(f"{len(self.unexplained_file)} file tensor(s) loaded into nothing, first: "
                             f"{', '.join(self.unexplained_file[:3])}")
            if self.unexplained_model:
                parts.append(f"{len(self.unexplained_model)} model tensor(s) not in the files, first: "
                             f"{', '.join(self.unexplained_model[:3])}")
            return "; ".join(parts)
        extra = [f"{len(self.renamed)} renamed by transformers" if self.renamed else "",
                 f"{len(self.tied)} tied" if self.tied else "",
                 f"{len(self.converted)} converted by transformers (values transformed: not compared bitwise)"
                 if self.converted else "",
                 f"{len(self.ignored)} ignored by the model class" if self.ignored else ""]
        return ", ".join(e for e in extra if e) or "names match one to one"


def _converter_targets(renamed: str, converters: list) -> set[str]:
    """Every model name a converter fills from the key it renamed to its first target (qkv -> q, k, v)."""
    out = {renamed}
    for c in converters:
        targets = list(c.target_patterns)
        if len(targets) > 1 and targets[0] in renamed:
            out.update(renamed.replace(targets[0], t, 1) for t in targets[1:])
    return out


def state_names(model) -> dict[str, int]:
    """Every state-dict name of the model (parameters under each tied name, persistent buffers) -> the identity of
    its tensor, so tied names share one identity. keep_vars: no copy, no ZeRO-3 gather."""
    return {name: id(t) for name, t in model.state_dict(keep_vars=True).items()}


def account(model, file_keys: Iterable[str]) -> FileAccount:
    """Map every file key to the model the way from_pretrained would, and list what is left over both ways."""
    names = state_names(model)
    lookup = dict.fromkeys(names, True)
    renamings, converters = conversions(model)
    prefix = getattr(model, "base_model_prefix", None) or None
    unexpected_ok, missing_ok = load_ignore_patterns(model)
    ignore = [re.compile(p) for p in unexpected_ok]
    acc = FileAccount()
    fed: set[int] = set()
    for key in sorted(file_keys):
        target, converted = rename(key, renamings, converters, prefix, lookup)
        if converted:
            targets = {t for t in _converter_targets(target, converters) if t in names}
            if targets:
                acc.converted[key] = target
                acc.converted_targets.update(targets)
                fed.update(names[t] for t in targets)
                continue
        elif target in names:
            acc.file_key_of.setdefault(target, key)
            if target != key:
                acc.renamed[key] = target
            fed.add(names[target])
            continue
        if any(p.search(key) for p in ignore):
            acc.ignored.append(key)
        else:
            acc.unexplained_file.append(key)
    by_tensor: dict[int, list[str]] = {}
    for name, ident in names.items():
        by_tensor.setdefault(ident, []).append(name)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    may_miss = [re.compile(p) for p in missing_ok]
    for name, ident in names.items():
        if name in acc.file_key_of or name in acc.converted_targets:
            continue
        if ident in fed:  # tied to a name the files do hold
            acc.tied[name] = next(n for n in by_tensor[ident] if n in acc.file_key_of or n in acc.converted_targets)
        elif name not in params or any(p.search(name) for p in may_miss):
            acc.initialized.append(name)  # a persistent buffer, or a key the class says may be missing: not a weight
        else:
            acc.unexplained_model.append(name)
    return acc


def file_key_for(acc: FileAccount, model, param_name: str) -> str | None:
    """The file key holding a parameter's values bitwise (under any of its tied names), or None."""
    key = acc.file_key_of.get(param_name)
    if key is None and param_name in acc.tied:
        key = acc.file_key_of.get(acc.tied[param_name])
    return key
