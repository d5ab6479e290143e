"""Preference data: load JSONL or a `datasets` directory, validate every row, truncate long prompts.

TRL 1.x's DPOConfig has no max_prompt_length; we keep the seed's limit and truncate prompts here, keeping their end
(the question a user asked is usually last), and report how many were cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """A dataset that cannot be trained on, with the fix in the message."""


@dataclass
class PreparedData:
    rows: list[dict[str, str]]
    truncated_prompts: int
    identical_pairs: int


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"dataset {path} does not exist: check data.train / data.eval")
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: take its train split
            if "train" not in ds:
                raise DataError(f"dataset directory {path} has splits {list(ds.keys())} but no 'train'")
            ds = ds["train"]
        return [dict(r) for r in ds]
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}): fix that line") from None
    return rows


def validate(rows: list[dict], name: str) -> None:
    if not rows:
        raise DataError(f"{name} dataset is empty: it needs rows with prompt, chosen and rejected")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{name} row {i} is not an object with prompt/chosen/rejected")
        missing = [k for k in FIELDS if k not in r]
        if missing:
            raise DataError(f"{name} row {i} lacks {', '.join(missing)}: every row needs prompt, chosen, rejected")
        bad = [k for k in FIELDS if not isinstance(r[k], str) or not r[k].strip()]
        if bad:
            raise DataError(f"{name} row {i}: {', '.join(bad)} must be non-empty strings")
    if all(r["chosen"] == r["rejected"] for r in rows):
        raise DataError(f"{name} dataset: chosen == rejected in every row, so there is no preference to learn")


def prepare(path: Path, name: str, tok, max_prompt_length: int) -> PreparedData:
    rows = read_rows(path)
    validate(rows, name)
    identical = sum(1 for r in rows if r["chosen"] == r["rejected"])
    out, cut = [], 0
    for r in rows:
        prompt = keep_end(tok, r["prompt"], max_prompt_length)
        cut += prompt != r["prompt"]
        out.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]})
    return PreparedData(out, cut, identical)


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def keep_end(tok, prompt: str, limit: int) -> str:
    """The longest end of `prompt` that tokenizes to at most `limit` tokens, cut at a token's character offset.

    Cutting by characters, not by decoding a token suffix: a byte-level BPE suffix can start inside a multi-byte
    character and decode to U+FFFD, which re-encodes to more tokens than the limit.
    """
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= limit:
        return prompt
    k = len(offsets) - limit
    while k < len(offsets):
        tail = prompt[offsets[k][0]:]
        if n_tokens(tok, tail) <= limit:
            return tail
        k += 1
    return ""


def to_dataset(rows: list[dict[str, str]]):
    from datasets import Dataset

    return Dataset.from_list(rows)
