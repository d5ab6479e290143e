"""Preference data: which of TRL's formats a dataset is in, every row validated on its Arrow columns (vectorized, in
chunks: seconds and bounded memory for a million rows), and the dataset handed to TRL in a form its DPOTrainer reads.

Formats (TRL's DPOTrainer documents them): standard (strings) or conversational (lists of {role, content}
messages), each with an explicit `prompt` or an implicit one (only `chosen`/`rejected`, the whole dialogue; TRL's
own `extract_prompt` takes the shared start as the prompt). Extra columns are ignored.

TRL 1.x's DPOConfig has no max_prompt_length; we keep the seed's limit for standard prompts and truncate them here,
keeping their end (the question a user asked is usually last), and report how many were cut. A conversational
prompt is not cut: a cut message list would be a conversation the template never renders; the chat-template stage
reports how many rendered prompts exceed the limit instead, and TRL cuts prompt+completion at max_length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_dist.data.sources import DataError, open_source

FIELDS = ("prompt", "chosen", "rejected")
KEEP = ("tools", "chat_template_kwargs")  # extra columns TRL's DPOTrainer itself reads: kept
ROLES = ("system", "user", "assistant", "tool", "developer")
SYSTEM, USER, ASSISTANT, TOOL, DEVELOPER = range(len(ROLES))
CHUNK_ROWS = 65536

__all__ = ["DataError", "DataFormat", "PreparedData", "load_split", "validate", "prepare", "keep_end"]


@dataclass
class DataFormat:
    conversational: bool
    explicit: bool
    columns: list[str]  # what TRL gets
    ignored: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kind = "conversational" if self.conversational else "standard"
        how = "explicit prompt" if self.explicit else "implicit prompt"
        extra = f", ignored columns: {', '.join(self.ignored)}" if self.ignored else ""
        return f"{kind}, {how}{extra}"


@dataclass
class PreparedData:
    dataset: object  # datasets.Dataset, memory-mapped
    fmt: DataFormat
    truncated_prompts: int
    identical_pairs: int
    moved_prompts: int = 0  # implicit prompts whose end split_implicit moved back to a token boundary

    @property
    def rows(self) -> int:
        return len(self.dataset)


def source_name(ds, spec: str) -> str:
    files = [f["filename"] for f in getattr(ds, "cache_files", [])]
    return spec if spec != "default" or not files else files[0]


def row_error(where: str, row: int | None, what: str, fix: str) -> DataError:
    """One line: what is wrong (which file, split and row): how to fix it."""
    at = where if row is None else f"{where} row {row}"
    return DataError(f"{what} ({at}): {fix}")


def first(mask: np.ndarray) -> int | None:
    hit = np.flatnonzero(mask)
    return int(hit[0]) if hit.size else None


def column_kind(ds, name: str, where: str) -> str:
    """'text' or 'messages', from the Arrow type of column `name`."""
    from datasets import Value

    feat = ds.features[name]
    if isinstance(feat, Value) and feat.dtype in ("string", "large_string"):
        return "text"
    typ = ds.data.table.schema.field(name).type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        item = typ.value_type
        if pa.types.is_struct(item):
            names = [item.field(i).name for i in range(item.num_fields)]
            missing = [k for k in ("role", "content") if k not in names]
            if missing:
                raise row_error(where, None, f"{name} messages lack {' and '.join(repr(k) for k in missing)} "
                                f"(their keys: {', '.join(names)})", "every message needs role and content")
            content = item.field(item.get_field_index("content")).type
            if not (pa.types.is_string(content) or pa.types.is_large_string(content)):
                raise bad_content(ds, name, where, str(content))
            return "messages"
        if isinstance(item, pa.BaseExtensionType):  # datasets' Json: messages whose keys differ from row to row
            raise odd_messages(ds, name, where)
    if type(feat).__name__ == "Json":  # datasets' type for a column mixing kinds of JSON values across rows
        raise mixed_column(ds, name, where)
    raise row_error(where, None, f"{name} must be non-empty strings or lists of messages, not {typ}",
                    "make it a string, or a list of {role, content} messages")


JSON_KINDS = {str: "a string", list: "a list", dict: "an object", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}


def mixed_column(ds, name: str, where: str) -> DataError:
    """A column whose rows hold different kinds of JSON values (datasets types it Json, each cell JSON-encoded): name
    the first row that is neither text nor a message list, or the first of each kind (a row-by-row scan, only on this
    failure path; issue 21, #26)."""
    seen: dict[str, int] = {}
    for base, batch in chunks(ds, [name]):
        for i, cell in enumerate(batch.column(name).to_pylist()):
            value = json.loads(cell) if isinstance(cell, str) else cell
            kind = JSON_KINDS.get(type(value), type(value).__name__)
            if not isinstance(value, (str, list)):
                shown = json.dumps(value)
                shown = shown if len(shown) <= 40 else shown[:39] + "…"
                return row_error(where, base + i, f"{name} is {kind} ({shown}), not text or a list of messages",
                                 f"make {name} a string, or a list of {{role, content}} messages")
            seen.setdefault(kind, base + i)
    rows = ", ".join(f"row {r} is {k}" for k, r in seen.items())
    return row_error(where, None, f"column {name} mixes strings and message lists across rows ({rows})",
                     "use one format per dataset: all strings, or all lists of {role, content} messages")


def bad_content(ds, name: str, where: str, arrow_type: str) -> DataError:
    """Message content that is not text in some row (a list of parts, a number, null): name the first such row and
    message (a row-by-row scan, only on this failure path), not the Arrow type of the column."""
    for base, batch in chunks(ds, [name]):
        for i, msgs in enumerate(batch.column(name).to_pylist()):
            for j, m in enumerate(msgs or []):
                value = (m or {}).get("content")
                value = json.loads(value) if arrow_type.startswith("extension") and isinstance(value, str) else value
                if not isinstance(value, str):
                    kind = JSON_KINDS.get(type(value), type(value).__name__)
                    return row_error(where, base + i, f"{name} message {j} content is {kind}, not text",
                                     "dpo-dist trains on text conversations: content must be a string")
    return row_error(where, None, f"{name} message content is {arrow_type}, not text",
                     "dpo-dist trains on text conversations: content must be a string")


def odd_messages(ds, name: str, where: str) -> DataError:
    """Messages whose keys differ between rows: find the first without role or content (a row-by-row scan, only on
    this failure path)."""
    for base, batch in chunks(ds, [name]):
        for i, msgs in enumerate(batch.column(name).to_pylist()):
            for j, m in enumerate(msgs or []):
                m = json.loads(m) if isinstance(m, str) else m  # Json cells arrive encoded
                m = m if isinstance(m, dict) else {}
                lacks = [k for k in ("role", "content") if not isinstance(m.get(k), str)]
                if lacks:
                    return row_error(where, base + i, f"{name} message {j} lacks {' and '.join(map(repr, lacks))}",
                                     "every message needs role and content (strings)")
    return row_error(where, None, f"{name} messages have different keys in different rows",
                     "keep role and content in every message (dpo-dist reads text conversations)")


def detect_format(ds, where: str) -> DataFormat:
    cols = list(ds.column_names)
    missing = [k for k in ("chosen", "rejected") if k not in cols]
    if missing:
        raise row_error(where, None, f"the data lacks {' and '.join(missing)} (columns: {', '.join(cols) or 'none'})",
                        "preference data needs chosen and rejected, and a prompt or whole dialogues in both")
    kinds = {k: column_kind(ds, k, where) for k in FIELDS if k in cols}
    if kinds["chosen"] != kinds["rejected"]:
        raise row_error(where, None, f"chosen is {kinds['chosen']} but rejected is {kinds['rejected']}",
                        "both must be strings, or both lists of messages")
    conversational = kinds["chosen"] == "messages"
    explicit = "prompt" in kinds and kinds["prompt"] == kinds["chosen"]
    if "prompt" in kinds and not explicit and not conversational:
        raise row_error(where, None, "prompt is a list of messages but chosen/rejected are strings",
                        "make chosen and rejected the assistant turns, as lists of messages too")
    used = [k for k in FIELDS if k in kinds and (k != "prompt" or explicit)] + [k for k in KEEP if k in cols]
    return DataFormat(conversational, explicit, used, [c for c in cols if c not in used])


# ------------------------------------------------------------------------------------------------ row checks


def blank(arr: pa.Array) -> np.ndarray:
    """Null or whitespace-only strings."""
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0)
    return np.asarray(pc.fill_null(pc.or_kleene(pc.is_null(arr), empty), True).to_numpy(zero_copy_only=False))


def check_text(arr: pa.Array, name: str, base: int, where: str) -> None:
    bad = first(blank(arr))
    if bad is not None:
        raise row_error(where, base + bad, f"{name} is empty or missing", f"every row needs a non-empty {name}")


def check_messages(arr: pa.Array, name: str, base: int, where: str, starts: bool, ends: str) -> None:
    """`starts`: this list begins a dialogue (after an optional system turn, a user turn), else it is a completion
    (begins with the assistant). `ends`: the role the list must end with ('user' for a prompt, 'assistant' for a
    whole dialogue, '' for a completion)."""
    empty = np.asarray(pc.fill_null(pc.or_kleene(pc.is_null(arr), pc.equal(pc.list_value_length(arr), 0)), True)
                       .to_numpy(zero_copy_only=False))
    row = first(empty)
    if row is not None:
        raise row_error(where, base + row, f"{name} has no messages", "every row needs at least one turn")
    flat = arr.flatten()
    parents = np.asarray(pc.list_parent_indices(arr).to_numpy())
    offsets = np.concatenate([[0], np.cumsum(np.asarray(pc.list_value_length(arr).to_numpy()))])
    role, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")

    def fail(k: int, problem: str, fix: str):
        r = int(parents[k])
        raise row_error(where, base + r, f"{name} message {k - offsets[r]} {problem}", fix)

    for what, values in (("role", role), ("content", content)):
        k = first(np.asarray(pc.is_null(values).to_numpy(zero_copy_only=False)))
        if k is not None:
            fail(k, f"lacks {what!r}", "every message needs role and content")
    codes_arr = pc.index_in(role, value_set=pa.array(ROLES))
    k = first(np.asarray(pc.is_null(codes_arr).to_numpy(zero_copy_only=False)))
    if k is not None:
        fail(k, f"has role {role[k].as_py()!r}", f"roles are {', '.join(ROLES)}")
    codes = np.asarray(codes_arr.to_numpy(zero_copy_only=False))
    talk = (codes == USER) | (codes == ASSISTANT)
    k = first(talk & blank(content))
    if k is not None:
        fail(k, f"is an empty {ROLES[codes[k]]} turn", "drop the row or fill in the turn")
    system = (codes == SYSTEM) | (codes == DEVELOPER)
    same_row = parents[1:] == parents[:-1]
    repeat = same_row & (codes[1:] == codes[:-1]) & talk[1:]
    late_system = same_row & system[1:]
    k = first(repeat | late_system)
    if k is not None:
        k += 1
        fail(k, f"is '{ROLES[codes[k]]}' after '{ROLES[codes[k - 1]]}' (roles out of order)",
             "user and assistant turns alternate, after an optional system turn first")
    heads = offsets[:-1]
    lead = heads + (system[heads] & (offsets[1:] - heads > 1))  # the first turn after a leading system turn
    if starts:
        k = first(codes[lead] != USER)
        if k is not None:
            fail(int(lead[k]), f"is '{ROLES[codes[lead[k]]]}' (roles out of order)",
                 "a dialogue starts with a user turn (after an optional system turn)")
    else:
        k = first(codes[heads] != ASSISTANT)
        if k is not None:
            fail(int(heads[k]), f"is '{ROLES[codes[heads[k]]]}' (roles out of order)",
                 "a completion starts with the assistant's turn")
    if ends:
        tails = offsets[1:] - 1
        want = (codes[tails] == USER) | (codes[tails] == TOOL) if ends == "user" else codes[tails] == ASSISTANT
        k = first(~want)
        if k is not None:
            fail(int(tails[k]), f"is '{ROLES[codes[tails[k]]]}', the last turn (roles out of order)",
                 "a prompt ends with a user turn" if ends == "user" else
                 "a dialogue in chosen/rejected ends with the assistant's turn")


def identical_rows(chosen: pa.Array, rejected: pa.Array, conversational: bool) -> int:
    if not conversational:
        return int(pc.sum(pc.fill_null(pc.equal(chosen, rejected), False)).as_py() or 0)
    same_len = pc.equal(pc.list_value_length(chosen), pc.list_value_length(rejected))
    c, r = pc.filter(chosen, same_len), pc.filter(rejected, same_len)
    if len(c) == 0:
        return 0
    fc, fr = c.flatten(), r.flatten()
    differ = pc.invert(pc.and_(pc.equal(pc.struct_field(fc, "role"), pc.struct_field(fr, "role")),
                               pc.equal(pc.struct_field(fc, "content"), pc.struct_field(fr, "content"))))
    parents = np.asarray(pc.list_parent_indices(c).to_numpy())
    rows_differing = np.bincount(parents[np.asarray(differ.to_numpy(zero_copy_only=False))], minlength=len(c))
    return int((rows_differing == 0).sum())


def validate(ds, where: str, role: str = "train") -> tuple[DataFormat, int]:
    """Check every row; return the format and how many rows have chosen == rejected. Raises DataError naming the
    first bad row."""
    if len(ds) == 0:
        raise row_error(where, None, f"the {role} dataset is empty", "it needs rows with chosen and rejected (and a "
                        "prompt)")
    fmt = detect_format(ds, where)
    identical = 0
    for base, batch in chunks(ds, fmt.columns):
        cols = {k: batch.column(k).combine_chunks() for k in FIELDS if k in fmt.columns}
        for name, arr in cols.items():
            if not fmt.conversational:
                check_text(arr, name, base, where)
            elif name == "prompt":
                check_messages(arr, name, base, where, starts=True, ends="user")
            elif fmt.explicit:
                check_messages(arr, name, base, where, starts=False, ends="")
            else:
                check_messages(arr, name, base, where, starts=True, ends="assistant")
        if fmt.conversational and not fmt.explicit:
            check_shared_start(cols["chosen"], cols["rejected"], base, where)
        identical += identical_rows(cols["chosen"], cols["rejected"], fmt.conversational)
    if identical == len(ds):
        raise row_error(where, None, "chosen == rejected in every row: there is no preference to learn",
                        "check that chosen and rejected name the preferred and the dispreferred answer")
    return fmt, identical


def check_shared_start(chosen: pa.Array, rejected: pa.Array, base: int, where: str) -> None:
    """Whole dialogues (implicit prompt): TRL's extract_prompt takes the turns both share as the prompt, so a row
    whose first turns differ has an empty prompt, which the chat template refuses in the trainer stage (or renders
    as no context). Vectorized: the first message of each side, compared."""
    a, b = pc.list_element(chosen, 0), pc.list_element(rejected, 0)
    same = pc.and_(pc.equal(pc.struct_field(a, "role"), pc.struct_field(b, "role")),
                   pc.equal(pc.struct_field(a, "content"), pc.struct_field(b, "content")))
    bad = first(~np.asarray(pc.fill_null(same, False)))
    if bad is not None:
        raise row_error(where, base + bad, "chosen and rejected start with different turns, so the implicit prompt "
                        "(the turns both share) is empty", "start both dialogues with the same prompt turns, or give "
                        "an explicit prompt column")


def chunks(ds, columns: list[str]):
    """(first row index, pyarrow Table) over the dataset, CHUNK_ROWS at a time, memory-mapped."""
    table = ds.select_columns(columns).with_format("arrow")
    for base in range(0, len(ds), CHUNK_ROWS):
        yield base, table[base:base + CHUNK_ROWS]


def load_split(spec: str, role: str, split: str):
    """(dataset, format, identical pairs, name for messages) of data.<role>, validated."""
    ds = open_source(spec, role, split)
    where = f"data.{role} {source_name(ds, spec)}" + (f" split {split!r}" if split_matters(ds) else "")
    fmt, identical = validate(ds, where, role)
    return ds, fmt, identical, where


def split_matters(ds) -> bool:
    return bool(getattr(ds, "split", None)) and str(ds.split) not in ("train", "None")


# ------------------------------------------------------------------------------------------------ for TRL


def prepare(spec: str, role: str, split: str, tok, max_prompt_length: int, local_main: bool = True) -> PreparedData:
    """The dataset TRL's DPOTrainer gets: the columns it reads (a string `prompt` beside whole dialogues is dropped,
    so TRL extracts the prompt from the dialogues, as its maybe_extract_prompt does), and standard prompts cut to
    max_prompt_length tokens (their end kept). Cached by datasets next to the source's Arrow files: the cut runs on
    the node's local main process (`local_main`) while the other ranks wait for its file, then read the cache."""
    ds, fmt, identical, _ = load_split(spec, role, split)
    ds = ds.select_columns(fmt.columns)
    cut = moved = 0
    if not fmt.explicit and not fmt.conversational:
        ds, moved = split_implicit(ds, tok, role, local_main)
    if fmt.explicit and not fmt.conversational:
        bound = tokens_within_bytes(ds, tok)
        longest = pc.max(pc.binary_length(ds.with_format("arrow")["prompt"])).as_py() or 0
        if not bound or longest + 1 > max_prompt_length:
            def cut_prompts(ds=ds):
                return ds.map(truncate_batch, batched=True, batch_size=4096,
                              fn_kwargs={"tok": tok, "limit": max_prompt_length, "bound": bound})

            if ds.cache_files:  # file-backed: cut once per node
                from dpo_dist.data.keys import tokenizer_key
                from dpo_dist.data.tokenize_once import marker, once_per_node

                once_per_node(marker(ds, f"cut{max_prompt_length}", tokenizer_key(tok)), cut_prompts, local_main,
                              f"cutting the {role} prompts to max_prompt_length")
            ds = cut_prompts()  # the local main: its cached result; the others: the cache it wrote
            cut = int(pc.sum(ds.with_format("arrow")["prompt_cut"]).as_py() or 0)
            ds = ds.remove_columns("prompt_cut")
    return PreparedData(ds, fmt, cut, identical, moved)


def split_implicit(ds, tok, role: str, local_main: bool) -> tuple[object, int]:
    """Standard data with an implicit prompt, split into prompt/chosen/rejected here, once, before TRL sees it (TRL
    then skips its own extract_prompt). TRL's extract_prompt ends the prompt where chosen and rejected first differ:
    inside a word when both answers start with the same letters (Anthropic-HH: "Assistant: Study..." and
    "Assistant: Studying..."), so the prompt's last token merges with the completion's first and TRL trains on a
    context the model never sees. Where TRL's cut is not a token boundary of both dialogues, the cut moves back to the
    start of an earlier whitespace run (where a word-initial token begins) at which the prompt's tokens are a prefix
    of both dialogues' tokens. Cached beside the source's Arrow files, like the prompt cut: once per node."""
    def split(ds=ds):
        return ds.map(split_batch, batched=True, batch_size=1024, fn_kwargs={"tok": tok})

    if ds.cache_files:
        from dpo_dist.data.keys import tokenizer_key
        from dpo_dist.data.tokenize_once import marker, once_per_node

        once_per_node(marker(ds, "implicit", tokenizer_key(tok)), split, local_main,
                      f"splitting the {role} implicit prompts at token boundaries")
    ds = split()
    moved = int(pc.sum(ds.with_format("arrow")["prompt_moved"]).as_py() or 0)
    return ds.remove_columns("prompt_moved"), moved


# earlier whitespace runs tried per row before TRL's cut is kept (then the chat-template check names the row)
BOUNDARY_TRIES = 8


def split_batch(batch: dict, tok) -> dict:
    from trl.data_utils import extract_prompt

    chosen, rejected = batch["chosen"], batch["rejected"]
    cuts = [len(extract_prompt({"chosen": c, "rejected": r})["prompt"]) for c, r in zip(chosen, rejected, strict=True)]
    full_c, full_r = tok(chosen)["input_ids"], tok(rejected)["input_ids"]  # TRL's _tokenize: tok(text), specials on
    prompts = tok([c[:k] for c, k in zip(chosen, cuts, strict=True)])["input_ids"]
    out = {"prompt": [], "chosen": [], "rejected": [], "prompt_moved": []}
    for c, r, k, p, fc, fr in zip(chosen, rejected, cuts, prompts, full_c, full_r, strict=True):
        j = k if fc[:len(p)] == p and fr[:len(p)] == p else boundary(tok, c, k, fc, fr)
        out["prompt"].append(c[:j])
        out["chosen"].append(c[j:])
        out["rejected"].append(r[j:])
        out["prompt_moved"].append(j != k)
    return out


def boundary(tok, text: str, cut: int, full_c: list[int], full_r: list[int]) -> int:
    """The latest start of a whitespace run before `cut` whose prefix tokenizes to a prefix of both dialogues'
    tokens; `cut` itself when none of the last BOUNDARY_TRIES does."""
    j, tries = cut, 0
    while tries < BOUNDARY_TRIES:
        j -= 1
        while j > 0 and not (text[j].isspace() and not text[j - 1].isspace()):
            j -= 1
        if j <= 0:
            return cut
        p = tok(text[:j])["input_ids"]
        if full_c[:len(p)] == p and full_r[:len(p)] == p:
            return j
        tries += 1
    return cut


def tokens_within_bytes(ds, tok, sample: int = 512) -> bool:
    """Whether prompts tokenize to at most (UTF-8 bytes + 1) tokens, checked on a sample: every token of a byte-level
    BPE, WordPiece or SentencePiece vocabulary covers at least one byte (+1: a prepended word marker). When it holds,
    only prompts longer than max_prompt_length - 1 bytes need tokenizing, so a million short prompts cost an Arrow
    length computation, not a million tokenizer calls; when it does not (an expanding normalizer), all are
    tokenized."""
    from dpo_dist.data.chat_template import sample_indices

    prompts = ds.select(sample_indices(len(ds), sample)).to_dict()["prompt"]
    counts = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    return all(n <= len(p.encode()) + 1 for p, n in zip(prompts, counts, strict=True))


def truncate_batch(batch: dict, tok, limit: int, bound: bool) -> dict:
    prompts = batch["prompt"]
    need = [i for i, p in enumerate(prompts) if not bound or len(p.encode()) + 1 > limit]
    counts = dict(zip(need, (len(ids) for ids in tok([prompts[i] for i in need], add_special_tokens=False)
                             ["input_ids"]) if need else [], strict=True))
    cut = [counts.get(i, 0) > limit for i in range(len(prompts))]
    return {"prompt": [keep_end(tok, p, limit) if c else p for p, c in zip(prompts, cut, strict=True)],
            "prompt_cut": cut}


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
