"""Where reference log-probs computed once are cached, and under which keys (precomputed placement, and ranks with
serve: precompute): the data on disk, keyed by the reference's weights fingerprint and a hash of the rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dpo_dist.data.keys import data_key, tokenizer_key


def weights_digest(fingerprints: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(fingerprints.items())).encode()).hexdigest()[:16]


def disk_dataset(dataset, root: Path, ctx):
    """A dataset backed by files under `root/data-<hash>`, so TRL's precompute cache persists across runs and sits
    where every rank finds it (an in-memory dataset caches in a temporary dir, and other ranks then miss the file:
    FileNotFoundError seen on rank 1)."""
    from datasets import load_from_disk

    where = root / f"data-{data_key(dataset)}"
    if ctx.is_main and not (where / "state.json").exists():
        dataset.save_to_disk(str(where))
    ctx.barrier()
    return load_from_disk(str(where))


def precompute_keys(run, train_rows, eval_rows) -> tuple[Path, str, dict[str, str]]:
    """Where precomputed log-probs are cached, and under which keys: the reference's weights fingerprint, and a hash
    of the rows, the tokenizer, the length limits and the precompute batching (batch size, processes, padding
    multiple: bf16 log-probs move with padding, and the step-0 check compares them bitwise with the policy's under
    that batching). Same inputs, same key, in any output dir."""
    cfg, s = run.cfg, run.state
    root = Path(cfg.reference.cache_dir or Path(cfg.train.output_dir) / "ref_logps")
    digest = weights_digest(s.fp_reference)
    args = s.args
    batching = (args.precompute_ref_batch_size or args.per_device_train_batch_size, args.pad_to_multiple_of,
                run.ctx.roles.policy_ranks if run.ctx.roles is not None else run.ctx.world_size)
    limits = (tokenizer_key(s.tok), cfg.train.max_length, cfg.train.max_prompt_length, *batching)
    keys = {"train": data_key(train_rows, *limits), "eval": data_key(eval_rows, *limits)}
    run.rr.facts["precompute_key"] = {"reference_weights": digest, "train_data": keys["train"]}
    return root, digest, keys


def cached_datasets(run, train_rows, eval_rows) -> dict:
    """The trainer's keyword arguments for a precompute-cached dataset pair: the rows on disk and their keys."""
    root, digest, keys = precompute_keys(run, train_rows, eval_rows)
    return dict(train_dataset=disk_dataset(train_rows, root, run.ctx),
                eval_dataset=disk_dataset(eval_rows, root, run.ctx) if eval_rows else None,
                reference_digest=digest, data_keys=keys)


def check_precomputed_columns(trainer, rr, value: str) -> bool:
    cols = set(trainer.train_dataset.column_names)
    return rr.add("reference log-probs precomputed", {"ref_chosen_logps", "ref_rejected_logps"} <= cols, value,
                  "TRL did not add ref_chosen_logps/ref_rejected_logps to the dataset")
