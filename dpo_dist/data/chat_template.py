"""The chat-template stage: the rows TRL's DPOTrainer will tokenize, rendered the way it renders them, checked before
any model loads. Needs only the tokenizer.

Each sampled row goes through TRL 1.16's own steps (trl.data_utils: extract_prompt for an implicit prompt, EOS
appended to standard completions, `_tokenize` with the chat template, the completion starting at
`common_prefix_length`), so what is checked is what trains. Checked on a seeded sample (the first row always in it),
so the stage costs the same for a thousand rows as for a million; the exact lengths of every row come from TRL's
tokenized dataset once the trainer exists (check_tokenized).
"""

from __future__ import annotations

import json

import numpy as np

SAMPLE_ROWS = 512
SHOWN_CHARS = 160


def sample_indices(n: int, k: int = SAMPLE_ROWS, seed: int = 0) -> list[int]:
    """Row 0 and a seeded random sample of the others, in order."""
    if n <= k:
        return list(range(n))
    picked = np.random.default_rng(seed).choice(np.arange(1, n), size=k - 1, replace=False)
    return [0, *sorted(int(i) for i in picked)]


def trl_rows(example: dict, tok) -> dict:
    """One row as TRL's DPOTrainer._prepare_dataset makes it: prompt_ids, and prompt+chosen / prompt+rejected ids
    before it splits them at their common prefix."""
    from trl.data_utils import extract_prompt, is_conversational

    from dpo_dist.compat.trl import tokenize

    if "prompt" not in example:
        example = {**example, **extract_prompt(example)}
    conv = is_conversational(example)
    if not conv:  # TRL's add_eos step (a closure inside _prepare_dataset, so repeated here in its three lines)
        eos = tok.eos_token
        example = {**example, **{k: example[k] if example[k].endswith(eos) else example[k] + eos
                                 for k in ("chosen", "rejected")}}
    tools = example.get("tools")
    kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
              **(example.get("chat_template_kwargs") or {})}
    extra = kwargs if conv else {}
    prompt = tokenize(tok, example["prompt"], **({"add_generation_prompt": True, **extra} if conv else {}))
    out = {"example": example, "conversational": conv, "prompt_ids": list(prompt["input_ids"])}
    for k in ("chosen", "rejected"):
        out[k] = list(tokenize(tok, example["prompt"] + example[k], **extra)["input_ids"])
    return out


CHUNK_ROWS = 65536


def chunks(ds, columns: list[str]):
    """(first row index, pyarrow Table) over the dataset, CHUNK_ROWS at a time, memory-mapped (as prepare.chunks:
    prepare imports this module, so not the other way round)."""
    table = ds.select_columns(columns).with_format("arrow")
    for base in range(0, len(ds), CHUNK_ROWS):
        yield base, table[base:base + CHUNK_ROWS]


def shape_rows(ds, columns: list[str]) -> dict[tuple, int]:
    """The first row of each distinct sequence of turn roles (prompt, chosen, rejected), over every row: a template's
    control flow follows the roles (an unsupported role, roles out of order), so rendering one row per shape finds
    a row it refuses that a sample can miss, before the trainer stage fails on it naming no row (issue 21, #34). Reads
    only the role strings of each chunk: seconds for a million rows; a template that fails on content alone is not
    caught here."""
    cols = [c for c in ("prompt", "chosen", "rejected") if c in columns]
    first: dict[tuple, int] = {}
    for base, table in chunks(ds, cols):
        per_col = []
        for c in cols:
            col = table.column(c).combine_chunks()
            roles = col.flatten().field("role").to_pylist()
            offsets = col.offsets.to_pylist()  # of the unsliced values: flatten() starts at offsets[0]
            o = offsets[0]
            per_col.append([tuple(roles[offsets[i] - o:offsets[i + 1] - o]) for i in range(len(col))])
        for i, shape in enumerate(zip(*per_col, strict=True)):
            first.setdefault(shape, base + i)
    return first


def first_difference(a: list[int], b: list[int]) -> int:
    from trl.data_utils import common_prefix_length

    return common_prefix_length(a, b)


def shown(tok, ids: list[int]) -> str:
    """Text exactly as the model sees it: special tokens left in."""
    return tok.decode(ids, skip_special_tokens=False)


def token_name(tok, ids: list[int], i: int) -> str:
    return repr(tok.convert_ids_to_tokens(ids[i])) if i < len(ids) else "(end)"


def percentiles(values) -> str:
    values = np.asarray(values)
    if not values.size:
        return "-"
    p50, p95 = np.percentile(values, [50, 95])
    return f"p50 {p50:.0f}, p95 {p95:.0f}, max {values.max()}"


def check(run_rr, tok, prepared: dict, cfg) -> bool:
    """The rows of the chat-template stage, for each dataset in `prepared` ({"train": PreparedData, ...})."""
    rr, ok = run_rr, True
    for role, data in prepared.items():
        if data is None:
            continue
        ok &= check_one(rr, tok, role, data, cfg)
    return ok


def check_one(rr, tok, role: str, data, cfg) -> bool:
    max_len, max_prompt = cfg.train.max_length, cfg.train.max_prompt_length
    name = f"{role}: "
    if data.fmt.conversational and not getattr(tok, "chat_template", None):
        return rr.add(name + "chat template present", False, "the tokenizer has no chat_template",
                      "conversational data is rendered with the checkpoint's chat template: save the SFT template "
                      "into the checkpoint (tokenizer.chat_template, chat_template.jinja), or use standard (string) "
                      "data rendered as in SFT")
    if data.fmt.conversational:
        rr.add(name + "chat template present", True, f"{len(tok.chat_template)} characters")
    idx = sample_indices(len(data.dataset))
    if data.fmt.conversational:  # one row of each turn-role shape the sample missed: a template raising on it
        idx = sorted(set(idx) | set(shape_rows(data.dataset, data.fmt.columns).values()))  # names its row here
    rows = data.dataset.select(idx).to_list()
    bad_prefix, bad_bos, bad_eos, lost_turn, empty = [], [], [], [], []
    prompt_lens, completion_lens, over_prompt = [], [], 0
    bos, eos = tok.bos_token_id, tok.eos_token_id
    first = None
    for i, row in zip(idx, rows, strict=True):
        try:
            r = trl_rows(row, tok)
        except Exception as e:  # a template that raises (an unsupported role, say): this row cannot be trained on
            text = " ".join(str(e).split())[:200]
            return rr.add(name + "template renders the rows", False, f"row {i}: {type(e).__name__}: {text}",
                          "the chat template (or tokenizer) fails on this row: fix the row, or use the SFT "
                          "model's template that knows its roles")
        p = r["prompt_ids"]
        if first is None:
            first = r
        for k in ("chosen", "rejected"):
            full = r[k]
            n = first_difference(p, full)
            if n < len(p) and not bad_prefix:
                bad_prefix.append(f"row {i} {k}: token {n} is {token_name(tok, p, n)} in the prompt but "
                                  f"{token_name(tok, full, n)} in prompt+{k}")
            if eos is not None and len(full) >= 2 and full[-1] == full[-2] == eos and not bad_eos:
                bad_eos.append(f"row {i} {k} ends with {token_name(tok, full, len(full) - 1)} twice")
            completion_lens.append(len(full) - n)
            if n >= max_len and not empty:
                empty.append(f"row {i}: the prompt alone has {n} tokens >= max_length {max_len}")
        if bos is not None and len(p) >= 2 and p[0] == p[1] == bos and not bad_bos:
            bad_bos.append(f"row {i} starts with {token_name(tok, p, 0)} twice")
        prompt_lens.append(len(p))
        over_prompt += len(p) > max_prompt
        if r["conversational"] and not lost_turn:
            text = shown(tok, r["chosen"])
            ex = r["example"]
            for m in [*ex["prompt"], *ex["chosen"]]:
                if m["content"].strip() and m["content"].strip() not in text:
                    lost_turn.append(f"row {i}: the {m['role']} turn {m['content'][:40]!r} is not in the rendered "
                                     "text")
                    break
    n = len(idx)
    implicit = not data.fmt.explicit and not data.fmt.conversational
    moved = getattr(data, "moved_prompts", 0)
    if implicit:
        rr.facts.setdefault("implicit_prompts_moved", {})[role] = moved
    ok = rr.add(name + "prompt is a token prefix", not bad_prefix,
                f"{n} sampled rows: prompt tokens are a prefix of prompt+chosen and prompt+rejected"
                + (f"; {moved} of {data.rows} implicit prompts end earlier than TRL's extract_prompt would end them "
                   "(moved back to a token boundary)" if implicit else "")
                if not bad_prefix else bad_prefix[0],
                ("the template renders the prompt alone differently from the prompt followed by an answer, so TRL "
                 "cuts the prompt where they diverge and trains on a context the model never sees: use a "
                 "prefix-preserving chat template (the generation prompt must equal the start of the assistant "
                 "turn)") if data.fmt.conversational else
                ("tokens merge across the prompt/completion boundary (with an implicit prompt, TRL's extract_prompt "
                 "ends it where chosen and rejected first differ, often inside a word), so TRL cuts the prompt "
                 "there: end prompts on a token boundary (a newline), or give an explicit prompt column"))
    ok &= rr.add(name + "no doubled BOS/EOS", not (bad_bos or bad_eos),
                 f"{n} sampled rows: one BOS at the start, one EOS at the end" if not (bad_bos or bad_eos) else
                 "; ".join(bad_bos + bad_eos),
                 "a special token appears twice after TRL's processing: the template writes "
                 "bos_token/eos_token and the tokenizer (or TRL's EOS for standard data) adds it again; drop it from "
                 "the template, or save the tokenizer without add_bos/add_eos")
    if data.fmt.conversational:
        ok &= rr.add(name + "every turn rendered", not lost_turn,
                     f"{n} sampled rows: every message's content is in the rendered text" if not lost_turn else
                     lost_turn[0],
                     "the chat template drops a turn (often the system turn): use the SFT model's own template")
    lengths = (f"{n} sampled rows: prompt tokens {percentiles(prompt_lens)} (max_prompt_length {max_prompt}); "
               f"completion tokens {percentiles(completion_lens)} (max_length {max_len}); "
               f"{over_prompt} over max_prompt_length")
    ok &= rr.add(name + "lengths fit max_length", not empty, lengths if not empty else f"{empty[0]}; {lengths}",
                 "TRL drops rows whose prompt fills max_length (the completion would be truncated away): raise "
                 "train.max_length, or shorten those prompts")
    rr.facts.setdefault("first_row_rendered", {})[role] = {"prompt+chosen": shown(tok, first["chosen"]),
                                                           "prompt+rejected": shown(tok, first["rejected"])}
    rr.facts.setdefault("length_sample", {})[role] = {"rows": n, "prompt": percentiles(prompt_lens),
                                                      "completion": percentiles(completion_lens),
                                                      "over_max_prompt_length": int(over_prompt)}
    special = special_text(data.dataset, data.fmt.columns, tok)
    rr.facts.setdefault("special_token_text_checked", {})[role] = data.rows  # every row searched
    if special:  # a row only when found: the passing demo's table stays one screen (issue 16)
        rr.facts.setdefault("special_token_text", {})[role] = special
        rr.add(name + "special-token text in the data", True, f"WARNING: {special['rows']} row(s) hold special-token "
               f"text, first: row {special['row']} {special['column']} holds {special['token']!r}, which the "
               "tokenizer turns into that control token (intended only in pre-rendered text)")
    text = shown(tok, first["chosen"])
    rr.add(name + "first row as the model sees it", True,
           repr(text[:SHOWN_CHARS]) + ("…" if len(text) > SHOWN_CHARS else "") + " (in full: report facts)")
    return ok


def check_tokenized(rr, trainer, prepared: dict, cfg) -> bool:
    """Every row's lengths from TRL's tokenized datasets (Arrow list lengths: no Python loop), and the rows TRL
    dropped because their prompt alone fills max_length."""
    import pyarrow.compute as pc

    ok = True
    sets = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    for role, data in prepared.items():
        ds = sets.get(role)
        if data is None or ds is None or "prompt_ids" not in ds.column_names:
            continue
        # the memory-mapped table itself, not ds[:]: TRL's filter leaves an indices mapping, through which a slice
        # would copy every token id into memory. Its rows are those before TRL dropped any (counted below).
        table = ds.data.table
        prompt, chosen, rejected = (np.asarray(pc.list_value_length(table[k]).to_numpy(zero_copy_only=False))
                                    for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        max_len = cfg.train.max_length
        cut = int(((prompt + chosen > max_len) | (prompt + rejected > max_len)).sum())
        dropped = data.rows - len(ds)
        rr.facts.setdefault("lengths", {})[role] = {
            "rows": len(ds), "dropped_by_trl": dropped, "truncated_to_max_length": cut,
            "prompt": percentiles(prompt), "completion": percentiles(np.concatenate([chosen, rejected]))}
        ok &= rr.add(f"{role}: no completion truncated away", dropped == 0 and bool(len(ds)),
                     f"{len(ds)} rows tokenized, {cut} cut to max_length {max_len}, {dropped} dropped"
                     f"; prompt tokens {percentiles(prompt)}",
                     f"TRL dropped {dropped} rows whose prompt alone has >= max_length {max_len} tokens (their "
                     "completions would be empty): raise train.max_length or shorten those prompts")
    return ok


def special_tokens(tok) -> list[str]:
    """The strings the tokenizer turns into special (control) tokens wherever they appear in text."""
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            found.add(str(t))
    return sorted(t for t in found if t)


def special_text(ds, columns: list[str], tok) -> dict | None:
    """Rows whose text holds a special token's string ("<|im_end|>", "</s>" typed in an answer): the tokenizer makes
    it the control token, so a completion could end a turn or the text mid-way, unnoticed (issue 21, item 2). Every
    row, with Arrow's substring search (no Python loop over rows). A warning, not a failure: standard data that is
    pre-rendered with the chat template holds these strings on purpose, and a check with no way past it would refuse
    such data outright. Returns {rows, row, column, token} of the first hit, or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tokens = special_tokens(tok)
    cols = [c for c in ("prompt", "chosen", "rejected") if c in columns]
    if not tokens or not cols:
        return None
    hits, first = np.zeros(len(ds), dtype=bool), None
    for base, table in chunks(ds, cols):
        for c in cols:
            col = table.column(c).combine_chunks()
            rows_of = None
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                offsets = np.asarray(col.offsets.to_numpy(zero_copy_only=False))
                rows_of, texts = offsets - offsets[0], col.flatten().field("content")
            else:
                texts = col
            for t in tokens:
                hit = pc.fill_null(pc.match_substring(texts, t), False)
                if rows_of is None and c != "prompt" and t == tok.eos_token:  # TRL's add_eos keeps a final EOS
                    once = pc.and_(pc.equal(pc.count_substring(texts, t), 1), pc.ends_with(texts, t))
                    hit = pc.and_(hit, pc.invert(pc.fill_null(once, False)))
                where = np.flatnonzero(np.asarray(hit))
                if not where.size:
                    continue
                rows = where if rows_of is None else np.searchsorted(rows_of, where, side="right") - 1
                hits[base + rows] = True
                r = int(base + rows[0])
                if first is None or r < first["row"]:
                    first = {"row": r, "column": c, "token": t}
    if first is None:
        return None
    return {**first, "rows": int(hits.sum())}
