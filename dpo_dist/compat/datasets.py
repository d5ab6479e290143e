"""The one private name of datasets that dpo-dist reads, in one place (tests/test_compat.py pins it)."""

from __future__ import annotations

PINNED = "5.2.0"


def fingerprint(dataset) -> str:
    """The dataset's content fingerprint (what its cache files are keyed on). Reads the private
    `Dataset._fingerprint` (datasets 5.2); can go if datasets makes the fingerprint public."""
    return dataset._fingerprint
