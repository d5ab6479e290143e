"""Preference data tests: JSONL and `datasets` directories, every DataError cause, and prompt truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpo_dist.data import DataError, PreparedData, prepare, read_rows, to_dataset, validate

TINY_SFT = Path(__file__).resolve().parents[1] / "dpo_dist" / "default" / "tiny-sft"
WORDS = [f"w{i}" for i in range(30)]
ROWS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def write_jsonl(path: Path, rows: list, raw_lines: list[str] | None = None) -> Path:
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    """A real WordLevel tokenizer: one token per word, decode joins words with single spaces."""
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer shipped with the embedded tiny SFT model."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TINY_SFT / "tokenizer.json"))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- loading


def test_jsonl_rows_in_order_and_blank_lines_skipped(tmp_path):
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2])]
    p = write_jsonl(tmp_path / "d.jsonl", [], lines)
    assert read_rows(p) == ROWS


def test_jsonl_keeps_unicode(tmp_path):
    row = {"prompt": "Café? 日本語", "chosen": "oui", "rejected": "non"}
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_rows(p) == [row]


def test_datasets_directory(tmp_path):
    from datasets import Dataset

    d = tmp_path / "ds"
    Dataset.from_list(ROWS).save_to_disk(str(d))
    assert read_rows(d) == ROWS


def test_dataset_dict_takes_train_split(tmp_path):
    from datasets import Dataset, DatasetDict

    d = tmp_path / "dd"
    # 'train' is neither the first nor the last split, so taking any other split would show.
    splits = {"test": ROWS[2:], "train": ROWS[:2], "validation": ROWS[1:]}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(d))
    assert read_rows(d) == ROWS[:2]


def test_dataset_dict_without_train_is_refused(tmp_path):
    from datasets import Dataset, DatasetDict

    d = tmp_path / "dd"
    DatasetDict({"validation": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(str(d))
    with pytest.raises(DataError, match="no 'train'") as ei:
        read_rows(d)
    assert "validation" in str(ei.value) and "test" in str(ei.value)


def test_to_dataset_round_trip():
    ds = to_dataset(ROWS)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert [dict(r) for r in ds] == ROWS


# ---------------------------------------------------------------- DataError causes


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="does not exist") as ei:
        read_rows(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, word_tok, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match="train dataset is empty"):
        prepare(p, "train", word_tok, 8)


def test_invalid_json_names_the_line(tmp_path):
    # Line 3 is bad; the blank line 2 still counts, so the number is the one an editor shows.
    p = write_jsonl(tmp_path / "bad.jsonl", [], [json.dumps(ROWS[0]), "", '{"prompt": "x", "chosen": ', "{}"])
    with pytest.raises(DataError, match="is not valid JSON") as ei:
        read_rows(p)
    assert f"{p}:3 " in str(ei.value)


def test_row_not_an_object():
    with pytest.raises(DataError, match="eval row 1 is not an object"):
        validate([ROWS[0], ["a", "b", "c"]], "eval")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_row_lacking_a_field_names_it(field):
    bad = {k: v for k, v in ROWS[1].items() if k != field}
    with pytest.raises(DataError) as ei:
        validate([ROWS[0], bad], "train")
    msg = str(ei.value)
    assert f"train row 1 lacks {field}:" in msg
    assert all(f"lacks {other}" not in msg for other in ("prompt", "chosen", "rejected") if other != field)


def test_row_lacking_two_fields_names_both():
    with pytest.raises(DataError, match="row 0 lacks chosen, rejected:"):
        validate([{"prompt": "p"}], "train")


@pytest.mark.parametrize("value", [None, 3, ["a"], {"t": "x"}])
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_non_string_field(field, value):
    bad = {**ROWS[0], field: value}
    with pytest.raises(DataError, match=rf"train row 0: {field} must be non-empty strings"):
        validate([bad], "train")


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_empty_string_field(field, value):
    bad = {**ROWS[2], field: value}
    with pytest.raises(DataError, match=rf"train row 2: {field} must be non-empty strings"):
        validate([ROWS[0], ROWS[1], bad], "train")


def test_dataset_dir_with_null_field_is_refused(tmp_path, word_tok):
    from datasets import Dataset

    d = tmp_path / "ds"
    Dataset.from_list([ROWS[0], {"prompt": "p", "chosen": None, "rejected": "r"}]).save_to_disk(str(d))
    with pytest.raises(DataError, match="train row 1: chosen must be non-empty strings"):
        prepare(d, "train", word_tok, 8)


def test_valid_rows_pass_validation():
    validate(ROWS, "train")  # no exception


def test_chosen_equals_rejected_everywhere_is_refused(tmp_path, word_tok):
    rows = [{**r, "rejected": r["chosen"]} for r in ROWS]
    p = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(DataError, match="train dataset: chosen == rejected in every row"):
        prepare(p, "train", word_tok, 8)


def test_chosen_equals_rejected_in_some_rows_is_counted(tmp_path, word_tok):
    rows = [{**ROWS[0], "rejected": ROWS[0]["chosen"]}, ROWS[1], {**ROWS[2], "rejected": ROWS[2]["chosen"]}]
    p = write_jsonl(tmp_path / "some.jsonl", rows)
    got = prepare(p, "train", word_tok, 100)
    assert isinstance(got, PreparedData)
    assert got.identical_pairs == 2
    assert len(got.rows) == 3
    assert got.rows[0]["chosen"] == got.rows[0]["rejected"]


def test_no_identical_pairs(tmp_path, word_tok):
    got = prepare(write_jsonl(tmp_path / "d.jsonl", ROWS), "train", word_tok, 100)
    assert got.identical_pairs == 0


# ---------------------------------------------------------------- prompt truncation


def test_truncation_keeps_the_end_and_counts(tmp_path, word_tok):
    rows = [
        {"prompt": " ".join(WORDS[:10]), "chosen": "c0", "rejected": "r0"},  # 10 tokens -> cut to last 4
        {"prompt": " ".join(WORDS[10:14]), "chosen": "c1", "rejected": "r1"},  # exactly 4: untouched
        {"prompt": "w20  w21", "chosen": "c2", "rejected": "r2"},  # under: untouched, odd spacing kept
        {"prompt": " ".join(WORDS[:5]), "chosen": "c3", "rejected": "r3"},  # 5 tokens -> cut to last 4
    ]
    got = prepare(write_jsonl(tmp_path / "d.jsonl", rows), "train", word_tok, 4)
    assert got.truncated_prompts == 2
    assert [r["prompt"] for r in got.rows] == ["w6 w7 w8 w9", "w10 w11 w12 w13", "w20  w21", "w1 w2 w3 w4"]
    assert [(r["chosen"], r["rejected"]) for r in got.rows] == [(r["chosen"], r["rejected"]) for r in rows]
    assert all(n_tokens(word_tok, r["prompt"]) <= 4 for r in got.rows)


def test_prompts_at_or_under_limit_are_untouched(tmp_path, bpe_tok):
    rows = [{"prompt": "  Hello,\tworld!  What is up?\n", "chosen": "a", "rejected": "b"},
            {"prompt": "Tell me about 日本語 please.", "chosen": "a", "rejected": "c"}]
    limit = max(n_tokens(bpe_tok, r["prompt"]) for r in rows)
    got = prepare(write_jsonl(tmp_path / "d.jsonl", rows), "train", bpe_tok, limit)
    assert got.truncated_prompts == 0
    assert got.rows == rows


def test_bpe_truncation_keeps_the_end(tmp_path, bpe_tok):
    prompt = "Some long preamble that nobody needs to read. The question: what is two plus two?"
    total = n_tokens(bpe_tok, prompt)
    limit = 6
    assert total > limit
    rows = [{"prompt": prompt, "chosen": "Four.", "rejected": "Five."}]
    got = prepare(write_jsonl(tmp_path / "d.jsonl", rows), "train", bpe_tok, limit)
    assert got.truncated_prompts == 1
    cut = got.rows[0]["prompt"]
    assert prompt.endswith(cut)
    assert cut.endswith("two plus two?")
    assert not cut.startswith("Some")
    assert n_tokens(bpe_tok, cut) <= limit


def test_bpe_truncation_inside_multibyte_character(tmp_path, bpe_tok):
    prompt = "Tell me about 日本語 please"
    rows = [{"prompt": prompt, "chosen": "a", "rejected": "b"}]
    got = prepare(write_jsonl(tmp_path / "d.jsonl", rows), "train", bpe_tok, 5)
    cut = got.rows[0]["prompt"]
    assert "\ufffd" not in cut
    assert prompt.endswith(cut)
    assert n_tokens(bpe_tok, cut) <= 5
