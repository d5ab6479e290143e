"""What the forward proofs cost in full-model forwards, predicted from the config alone (torch-free: `init --dry-run`
prints it from here, and dpo_dist.verify.forward_proofs runs exactly these forwards and records them).

Under ZeRO-3 every forward gathers every layer, so at scale the count, not the arithmetic, sets the proofs' cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo_dist.config.schema import DEFAULT_PROMPTS, DEFAULT_REFERENCE_TEXT

ORDER_SHUFFLES = 4  # random orders per text; their mean NLL is the "same tokens, no order" level


def deterministic_device(device_type: str) -> bool:
    """Forwards on CPU are bitwise deterministic (same kernels, same order), so the policy's run-to-run noise is 0
    without measuring it; on an accelerator it is measured."""
    return device_type == "cpu"


def forwards_for(rows: int, world: int, per_forward: int) -> int:
    """Forwards each rank runs for `rows` rows split over `world` ranks, at most `per_forward` rows per forward."""
    return math.ceil(math.ceil(rows / world) / per_forward) if rows else 0


@dataclass(frozen=True)
class Plan:
    """Forwards per proof on every rank (each a full gather of the model under ZeRO-3)."""

    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in self.counts.items() if v]
        return f"{self.total} full forwards per rank ({', '.join(parts) or 'none'})"


def planned_forwards(verify, world: int, deterministic: bool, n_texts: int | None = None,
                     n_shuffled: int | None = None) -> Plan:
    """The forward proofs' forwards per rank for a `verify` config section, without a tokenizer: texts of 3 tokens or
    more assumed (the run counts them exactly and records what it ran)."""
    if n_texts is None:
        builtin = 1 + len(DEFAULT_PROMPTS)
        same = list(verify.prompts) == list(DEFAULT_PROMPTS) and verify.reference_text == DEFAULT_REFERENCE_TEXT
        n_texts = 1 + len(verify.prompts) + (0 if same else builtin)
    if n_shuffled is None:
        n_shuffled = n_texts * ORDER_SHUFFLES
    per = verify.rows_per_forward
    shared = verify.perplexity or verify.tokenizer_order or verify.initial_kl
    texts = forwards_for(n_texts, world, per)
    counts = {
        "generation": verify.max_new_tokens if verify.generation else 0,
        "verify pass (policy: perplexity, tokenizer order, KL)": texts if shared else 0,
        "tokenizer order, shuffled (policy)": forwards_for(n_shuffled, world, per) if verify.tokenizer_order else 0,
        "initial KL (reference)": texts if verify.initial_kl else 0,
        "self-noise (policy, repeat)": texts if verify.initial_kl and not deterministic else 0,
    }
    return Plan(counts)
