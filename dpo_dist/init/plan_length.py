"""The memory plan at the length the run will really pad to, not `train.max_length` (issue 23.5).

The planner counts activations for 2 x micro-batch x length tokens. TRL's collator pads each batch to its longest
row, so a run whose longest prompt+completion is 82 tokens never holds activations for the configured 1024, and a
plan at 1024 refused layouts that fit (the 443M bench model: "34.0 GiB needed > 21.2 GiB usable", measured peak 6.3
GiB). Only when the plan at max_length refuses, the data's rows are tokenized as TRL will (chat_template.trl_rows)
and the layout is planned again at the longest one; the note says which length was used.
"""

from __future__ import annotations

import dataclasses

ALL_ROWS = 4096  # up to this many rows: every row is tokenized; beyond, the LONGEST rows by characters
LONGEST = 256


def longest_row_tokens(cfg) -> tuple[int, str]:
    """(tokens of the longest prompt+completion in train and eval, capped at train.max_length; how it was found)."""
    from dpo_dist.config.resources import resolve_model_path
    from dpo_dist.data.chat_template import trl_rows
    from dpo_dist.data.prepare import load_split
    from dpo_dist.load.models import load_tokenizer

    tok = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    longest, how = 0, []
    for role, spec, split in (("train", cfg.data.train, cfg.data.train_split),
                              ("eval", cfg.data.eval, cfg.data.eval_split)):
        if spec is None:
            continue
        ds, fmt, _, _ = load_split(spec, role, split)
        ds = ds.select_columns(fmt.columns)
        rows = ds.to_list() if len(ds) <= ALL_ROWS else _longest_rows(ds)
        how.append(f"{role}: {'every row' if len(ds) <= ALL_ROWS else f'the {LONGEST} longest rows by characters'}"
                   f" of {len(ds)}")
        for row in rows:
            r = trl_rows(row, tok)
            longest = max(longest, len(r["chosen"]), len(r["rejected"]))
    return min(longest, cfg.train.max_length), "; ".join(how)


def _longest_rows(ds) -> list[dict]:
    import json

    sizes = []
    for start in range(0, len(ds), 4096):
        for i, row in enumerate(ds.select(range(start, min(start + 4096, len(ds)))).to_list()):
            sizes.append((len(json.dumps(row, default=str)), start + i))
    keep = sorted(i for _, i in sorted(sizes, reverse=True)[:LONGEST])
    return ds.select(keep).to_list()


class MeasureError(RuntimeError):
    """The child could not measure the data's length (its exception's type name is the message)."""


def longest_row_tokens_in_subprocess(cfg) -> tuple[int, str]:
    """longest_row_tokens in a short child process: the libraries it imports (datasets, pyarrow: ~100 MiB per process)
    never enter a rank before the models load (issue 23.3), as the data check's child does (init.preflight)."""
    import json

    from dpo_dist.init.config_child import run_with_config

    res = run_with_config("from dpo_dist.init.plan_length import longest_row_tokens\n"
                          "try:\n    print(json.dumps(longest_row_tokens(cfg)))\n"
                          "except Exception as e:\n    print(json.dumps({'error': type(e).__name__}))\n", cfg)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:  # the child itself broke: measure here instead (correct, only heavier)
        return longest_row_tokens(cfg)
    out = json.loads(lines[-1])
    if isinstance(out, dict):
        raise MeasureError(out["error"])
    return int(out[0]), str(out[1])


def replan_at_data_length(cfg, cluster_args, problem: str) -> tuple[str | None, str]:
    """The refusal of the plan at the data's longest row (None: it fits there), and a line saying which length."""
    from dpo_dist.plan.refusal import plan_for, refusal

    try:
        length, how = longest_row_tokens_in_subprocess(cfg)
    except Exception as e:  # no tokenizer or data to measure (a config-only checkpoint): the refusal stands
        cause = str(e) if isinstance(e, MeasureError) else type(e).__name__
        return f"{problem} (planned at train.max_length {cfg.train.max_length}; the data's length could not be " \
               f"measured: {cause})", ""
    if length >= cfg.train.max_length:
        return f"{problem} (planned at train.max_length {cfg.train.max_length}: the data's longest row has " \
               f"{length}+ tokens)", ""
    at = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_length=length))
    again = refusal(*plan_for(at, cluster_args)[:2])
    where = f"{length} tokens, the data's longest tokenized row ({how}), not train.max_length " \
            f"{cfg.train.max_length}"
    if again:
        return f"{again} (planned at {where})", ""
    return None, f"[dpo-dist] memory plan: fits at {where} (a batch pads to its longest row)"
