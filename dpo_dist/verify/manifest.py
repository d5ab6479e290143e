"""The reference manifest: what the reference was at init, so a resumed run re-verifies its reference against it.

Resuming from a trainer checkpoint restores a trained policy; checking the reference against that policy would fail
by design, and checking nothing lets a wrong reference slip in (NeMo-RL and open-instruct have taken the "reference"
from resumed weights). So init writes the reference's per-tensor fingerprints, and a resume compares with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_dist.verify.report import write_json_atomic

MANIFEST = "reference_manifest.json"


def write_manifest(output_dir: str | Path, *, checkpoint: str, placement: str, tokenizer: str,
                   fingerprints: dict[str, str], config: dict[str, Any],
                   lineage: dict[str, str] | None = None, run_id: str | None = None) -> Path:
    """lineage: the run identity (dpo_dist.verify.lineage) that every trainer checkpoint of this run is marked with;
    run_id: the id of the init that wrote it (also in report.json and the output dir's lock)."""
    path = Path(output_dir) / MANIFEST
    write_json_atomic(path, {"run_id": run_id, "checkpoint": checkpoint, "placement": placement,
                             "tokenizer": tokenizer, "reference_fingerprints": fingerprints, "config": config,
                             "lineage": lineage})
    return path


def read_manifest(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {output_dir}: a resume needs the output dir of the original "
                                "`dpo-dist init`, which wrote it")
    return json.loads(path.read_text())


def compare(manifest: dict[str, Any], fingerprints: dict[str, str], tokenizer: str) -> list[str]:
    """Differences between the manifest and the reference now: tensor names first, then the tokenizer."""
    want = manifest["reference_fingerprints"]
    diffs = [n for n in want if fingerprints.get(n) != want[n]] + [n for n in fingerprints if n not in want]
    if manifest.get("tokenizer") != tokenizer:
        diffs.append("tokenizer")
    return diffs
