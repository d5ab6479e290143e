"""Content keys: of a dataset (datasets' own fingerprint) and of a tokenizer (its vocabulary, merges, chat template
and special tokens). Caches and markers are named by them, so the same inputs find the same files in any run."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dpo_dist.compat import datasets as datasets_compat


def data_key(dataset, *extra: Any) -> str:
    """A key of a dataset's content: datasets' own fingerprint (of its Arrow files and the transforms applied),
    not a hash of every row read into Python. None = no dataset."""
    content = datasets_compat.fingerprint(dataset) if dataset is not None else None
    return hashlib.sha256(json.dumps([content, *extra], sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_key(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    text += json.dumps([getattr(tok, "chat_template", None), tok.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
