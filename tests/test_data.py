"""Preference data tests: every source (written with `datasets`' own writers), every TRL format, every bad-data case
as one line through the real CLI (preflight, exit 2), and standard prompt truncation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpo_dist.data.prepare import DataError, load_split, prepare

TINY_SFT = Path(__file__).resolve().parents[1] / "dpo_dist" / "default" / "tiny-sft"
WORDS = [f"w{i}" for i in range(30)]
ROWS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


def system(c):
    return {"role": "system", "content": c}


CONV = [{"prompt": [system("Be brief."), user(r["prompt"])], "chosen": [assistant(r["chosen"])],
         "rejected": [assistant(r["rejected"])]} for r in ROWS]
CONV_IMPLICIT = [{"chosen": [user(r["prompt"]), assistant(r["chosen"])],
                  "rejected": [user(r["prompt"]), assistant(r["rejected"])]} for r in ROWS]
# how UltraFeedback-binarized ships: a string prompt beside whole dialogues, plus score columns
ULTRAFEEDBACK = [{"prompt": r["prompt"], **c, "score_chosen": 8.0, "score_rejected": 3.5}
                 for r, c in zip(ROWS, CONV_IMPLICIT, strict=True)]
STANDARD_IMPLICIT = [{"chosen": f"Q: {r['prompt']} A: {r['chosen']}",
                      "rejected": f"Q: {r['prompt']} A: {r['rejected']}"} for r in ROWS]


@pytest.fixture(autouse=True)
def own_hf_cache(tmp_path, monkeypatch):
    """datasets' cache (JSON/CSV converted to Arrow, cached hub names) in this test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def write(tmp_path: Path, rows, kind: str, name: str = "d") -> Path:
    """Rows written the way users get such files: datasets' own writers."""
    p = tmp_path / f"{name}.{kind}"
    ds = dataset(rows)
    if kind == "jsonl":
        ds.to_json(str(p), lines=True)
    elif kind == "json":
        p.write_text(json.dumps(rows))  # a JSON array: datasets' to_json writes lines only
    elif kind == "parquet":
        ds.to_parquet(str(p))
    elif kind == "csv":
        ds.to_csv(str(p), index=False)
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / f"{name}-saved"))
        shutil.copy(next((tmp_path / f"{name}-saved").glob("*.arrow")), p)
    return p


def cache_hub_name(cache: Path, name: str, splits: dict[str, list]) -> None:
    """Lay out a dataset in datasets' cache as `load_dataset(name)` leaves it after a download: built by datasets'
    own Parquet builder, placed under <cache>/<owner>___<name>/default/0.0.0/<hash>/."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        files[split] = str(cache.parent / f"{split}.parquet")
        dataset(rows).to_parquet(files[split])
    short = name.split("/")[-1]
    builder = Parquet(cache_dir=str(cache.parent / "build"), dataset_name=short, data_files=files)
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, cache / name.replace("/", "___") / "default" / "0.0.0" / "0123456789abcdef")


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


def rows_of(ds) -> list[dict]:
    return ds.to_list()


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_every_file_kind_reads_the_same_rows(tmp_path, kind):
    ds, fmt, identical, _ = load_split(str(write(tmp_path, ROWS, kind)), "train", "train")
    assert rows_of(ds) == ROWS
    assert (fmt.conversational, fmt.explicit, identical) == (False, True, 0)


def test_arrow_file_is_memory_mapped_not_copied(tmp_path):
    p = write(tmp_path, ROWS, "arrow")
    ds, *_ = load_split(str(p), "train", "train")
    assert [f["filename"] for f in ds.cache_files] == [str(p)]


def test_datasets_directory(tmp_path):
    dataset(CONV).save_to_disk(str(tmp_path / "ds"))
    ds, fmt, *_ = load_split(str(tmp_path / "ds"), "train", "train")
    assert rows_of(ds) == CONV and fmt.conversational


def test_dataset_dict_splits_chosen_by_config(tmp_path):
    from datasets import DatasetDict

    d = tmp_path / "dd"
    # the chosen split is neither the first nor the last, so taking any other would show
    DatasetDict({"test": dataset(ROWS[2:]), "train_prefs": dataset(ROWS[:2]), "validation": dataset(ROWS[1:])}
                ).save_to_disk(str(d))
    assert rows_of(load_split(str(d), "train", "train_prefs")[0]) == ROWS[:2]
    assert rows_of(load_split(str(d), "eval", "validation")[0]) == ROWS[1:]


def test_dataset_dict_missing_split_names_the_splits(tmp_path):
    from datasets import DatasetDict

    d = tmp_path / "dd"
    DatasetDict({"validation": dataset(ROWS), "test": dataset(ROWS)}).save_to_disk(str(d))
    with pytest.raises(DataError, match="has no split 'train'") as ei:
        load_split(str(d), "train", "train")
    assert "validation" in str(ei.value) and "test" in str(ei.value) and "data.train_split" in str(ei.value)


def test_cached_hub_name_read_offline(tmp_path):
    import datasets

    cache_hub_name(Path(datasets.config.HF_DATASETS_CACHE), "someone/prefs", {"train": ROWS, "test": ROWS[1:]})
    assert rows_of(load_split("someone/prefs", "train", "train")[0]) == ROWS
    assert rows_of(load_split("someone/prefs", "eval", "test")[0]) == ROWS[1:]
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_split("someone/prefs", "eval", "validation")


def test_absent_hub_name_names_the_cache_path(tmp_path):
    import datasets

    with pytest.raises(DataError) as ei:
        load_split("someone/never-downloaded", "train", "train")
    assert str(Path(datasets.config.HF_DATASETS_CACHE) / "someone___never-downloaded") in str(ei.value)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("rows, conversational, explicit", [
    (ROWS, False, True), (STANDARD_IMPLICIT, False, False), (CONV, True, True), (CONV_IMPLICIT, True, False),
    (ULTRAFEEDBACK, True, False)], ids=["standard", "standard-implicit", "conversational",
                                        "conversational-implicit", "ultrafeedback"])
def test_every_trl_format(tmp_path, bpe_tok, rows, conversational, explicit):
    p = write(tmp_path, [{**r, "source": "x", "id": i} for i, r in enumerate(rows)], "parquet")
    got = prepare(str(p), "train", "train", bpe_tok, 512)
    assert (got.fmt.conversational, got.fmt.explicit) == (conversational, explicit)
    # extra columns ignored; a string prompt beside whole dialogues is dropped so TRL extracts the prompt itself
    want = (["prompt"] if explicit else []) + ["chosen", "rejected"]
    assert "source" in got.fmt.ignored and "id" in got.fmt.ignored
    if not explicit and not conversational:  # split here, once, at a token boundary (issue 21, #30/#31)
        assert sorted(got.dataset.column_names) == ["chosen", "prompt", "rejected"]
        assert [{k: r["prompt"] + r[k] for k in ("chosen", "rejected")} for r in rows_of(got.dataset)] == \
            [{k: r[k] for k in ("chosen", "rejected")} for r in rows]
        return
    assert got.dataset.column_names == want
    assert rows_of(got.dataset) == [{k: r[k] for k in want} for r in rows]


# ---------------------------------------------------------------- bad data: one line through the CLI, exit 2


def init_fails(tmp_path, capsys, *sets: str) -> str:
    from dpo_dist.cli.main import main

    code = main(["init", "--output-dir", str(tmp_path / "out"), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("dpo-dist: ") and "Traceback" not in err, err
    return err


def bad_case(tmp_path, capsys, rows, kind="jsonl") -> str:
    return init_fails(tmp_path, capsys, f"data.train={write(tmp_path, rows, kind)}")


def test_non_utf8_jsonl_names_the_line(tmp_path, capsys):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:2]) +
                  '{"prompt": "Caf\u00e9?", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    err = init_fails(tmp_path, capsys, f"data.train={p}")
    assert f"{p}:3 " in err and "UTF-8" in err


def test_invalid_json_names_the_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n' + json.dumps(ROWS[1]) + "\n")
    err = init_fails(tmp_path, capsys, f"data.train={p}")
    assert str(p) in err and "line 3 is not valid JSON" in err


def test_wrong_extension(tmp_path, capsys):
    p = tmp_path / "really-jsonl.parquet"
    shutil.copy(write(tmp_path, ROWS, "jsonl"), p)
    err = init_fails(tmp_path, capsys, f"data.train={p}")
    assert str(p) in err and "cannot be read as .parquet" in err and "extension" in err


def test_unknown_extension(tmp_path, capsys):
    p = tmp_path / "rows.txt"
    p.write_text("hello\n")
    err = init_fails(tmp_path, capsys, f"data.train={p}")
    assert "'.txt'" in err and ".jsonl" in err


def test_directory_that_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("x")
    err = init_fails(tmp_path, capsys, f"data.train={tmp_path / 'folder'}")
    assert "not a `datasets` directory" in err and "save_to_disk" in err


def test_empty_data_setting(tmp_path, capsys):
    err = init_fails(tmp_path, capsys, "data.train=")
    assert "data.train is empty. Fix: set it to a data file" in err


def test_missing_path(tmp_path, capsys):
    err = init_fails(tmp_path, capsys, f"data.train={tmp_path / 'nope.jsonl'}")
    assert "does not exist" in err and "nope.jsonl" in err


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_train_file(tmp_path, capsys, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    err = init_fails(tmp_path, capsys, f"data.train={p}")
    assert "empty" in err and str(p) in err


def test_empty_train_dataset(tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(tmp_path / "none.parquet"))
    err = init_fails(tmp_path, capsys, f"data.train={tmp_path / 'none.parquet'}")
    assert "the train dataset is empty" in err


def test_message_lacking_role(tmp_path, capsys):
    rows = [{**CONV[0], "prompt": [{"content": "hi"}]}]
    err = bad_case(tmp_path, capsys, rows)
    assert "prompt messages lack 'role'" in err


def test_message_lacking_content_names_the_row(tmp_path, capsys):
    rows = [CONV[0], {**CONV[1], "chosen": [{"role": "assistant"}]}, CONV[2]]
    err = bad_case(tmp_path, capsys, rows)
    assert "row 1)" in err and "chosen message 0 lacks 'content'" in err


@pytest.mark.parametrize("prompt, chosen, what", [
    ([user("a"), user("b")], [assistant("c")], "prompt message 1 is 'user' after 'user'"),
    ([user("a"), system("late"), user("b")], [assistant("c")], "prompt message 1 is 'system' after 'user'"),
    ([assistant("a"), user("b")], [assistant("c")], "prompt message 0 is 'assistant'"),
    ([user("a")], [user("c")], "chosen message 0 is 'user'"),
    ([user("a"), assistant("b")], [assistant("c")], "prompt message 1 is 'assistant', the last turn"),
], ids=["user-user", "late-system", "starts-with-assistant", "completion-starts-with-user", "prompt-ends-assistant"])
def test_roles_out_of_order(tmp_path, capsys, prompt, chosen, what):
    rows = [CONV[0], CONV[1], {"prompt": prompt, "chosen": chosen, "rejected": [assistant("x")]}]
    err = bad_case(tmp_path, capsys, rows, "parquet")
    assert what in err and "row 2)" in err and "roles out of order" in err


def test_implicit_dialogue_must_end_with_the_assistant(tmp_path, capsys):
    rows = [CONV_IMPLICIT[0], {"chosen": [*CONV_IMPLICIT[1]["chosen"], user("more?")],
                               "rejected": CONV_IMPLICIT[1]["rejected"]}]
    err = bad_case(tmp_path, capsys, rows)
    assert "row 1)" in err and "chosen message 2 is 'user', the last turn" in err


def test_empty_assistant_turn(tmp_path, capsys):
    rows = [CONV[0], {**CONV[1], "rejected": [assistant("  \n")]}]
    err = bad_case(tmp_path, capsys, rows)
    assert "rejected message 0 is an empty assistant turn" in err and "row 1)" in err


@pytest.mark.parametrize("rows", [ROWS, CONV], ids=["standard", "conversational"])
def test_chosen_equals_rejected_in_every_row(tmp_path, capsys, rows):
    same = [{**r, "rejected": r["chosen"]} for r in rows]
    err = bad_case(tmp_path, capsys, same)
    assert "chosen == rejected in every row" in err


def test_split_that_does_not_exist(tmp_path, capsys):
    from datasets import DatasetDict

    DatasetDict({"train": dataset(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    err = init_fails(tmp_path, capsys, f"data.train={tmp_path / 'dd'}", f"data.eval={tmp_path / 'dd'}",
                     "data.eval_split=test_prefs")
    assert "has no split 'test_prefs'" in err and "data.eval_split" in err


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_empty_string_field(tmp_path, capsys, field):
    err = bad_case(tmp_path, capsys, [ROWS[0], ROWS[1], {**ROWS[2], field: "  "}])
    assert f"{field} is empty or missing" in err and "row 2)" in err


def test_null_field_in_a_datasets_directory(tmp_path):
    dataset([ROWS[0], {"prompt": "p", "chosen": None, "rejected": "r"}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"chosen is empty or missing \(data.train .* row 1\)"):
        load_split(str(tmp_path / "ds"), "train", "train")


def test_missing_column(tmp_path):
    with pytest.raises(DataError, match="the data lacks rejected"):
        load_split(str(write(tmp_path, [{"prompt": "p", "chosen": "c"}], "parquet")), "train", "train")


def test_mixed_string_and_message_rows(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "prompt": [user("hi")]}) + "\n")
    with pytest.raises(DataError, match="mixes strings and message lists"):
        load_split(str(p), "train", "train")


def test_some_identical_pairs_are_counted(tmp_path, bpe_tok):
    rows = [{**CONV[0], "rejected": CONV[0]["chosen"]}, CONV[1], {**CONV[2], "rejected": CONV[2]["chosen"]}]
    got = prepare(str(write(tmp_path, rows, "parquet")), "train", "train", bpe_tok, 100)
    assert got.identical_pairs == 2 and got.rows == 3


# ---------------------------------------------------------------- prompt truncation (standard prompts)


def test_truncation_keeps_the_end_and_counts(tmp_path, word_tok):
    rows = [
        {"prompt": " ".join(WORDS[:10]), "chosen": "c0", "rejected": "r0"},  # 10 tokens -> cut to last 4
        {"prompt": " ".join(WORDS[10:14]), "chosen": "c1", "rejected": "r1"},  # exactly 4: untouched
        {"prompt": "w20  w21", "chosen": "c2", "rejected": "r2"},  # under: untouched, odd spacing kept
        {"prompt": " ".join(WORDS[:5]), "chosen": "c3", "rejected": "r3"},  # 5 tokens -> cut to last 4
    ]
    got = prepare(str(write(tmp_path, rows, "jsonl")), "train", "train", word_tok, 4)
    out = rows_of(got.dataset)
    assert got.truncated_prompts == 2
    assert [r["prompt"] for r in out] == ["w6 w7 w8 w9", "w10 w11 w12 w13", "w20  w21", "w1 w2 w3 w4"]
    assert [(r["chosen"], r["rejected"]) for r in out] == [(r["chosen"], r["rejected"]) for r in rows]


def test_prompts_at_or_under_limit_are_untouched(tmp_path, bpe_tok):
    rows = [{"prompt": "  Hello,\tworld!  What is up?\n", "chosen": "a", "rejected": "b"},
            {"prompt": "Tell me about 日本語 please.", "chosen": "a", "rejected": "c"}]
    limit = max(n_tokens(bpe_tok, r["prompt"]) for r in rows)
    got = prepare(str(write(tmp_path, rows, "parquet")), "train", "train", bpe_tok, limit)
    assert got.truncated_prompts == 0
    assert rows_of(got.dataset) == rows


def test_bpe_truncation_keeps_the_end(tmp_path, bpe_tok):
    prompt = "Some long preamble that nobody needs to read. The question: what is two plus two?"
    assert n_tokens(bpe_tok, prompt) > 6
    rows = [{"prompt": prompt, "chosen": "Four.", "rejected": "Five."}]
    got = prepare(str(write(tmp_path, rows, "jsonl")), "train", "train", bpe_tok, 6)
    cut = rows_of(got.dataset)[0]["prompt"]
    assert got.truncated_prompts == 1
    assert prompt.endswith(cut) and cut.endswith("two plus two?") and not cut.startswith("Some")
    assert n_tokens(bpe_tok, cut) <= 6


def test_bpe_truncation_inside_multibyte_character(tmp_path, bpe_tok):
    prompt = "Tell me about 日本語 please"
    got = prepare(str(write(tmp_path, [{"prompt": prompt, "chosen": "a", "rejected": "b"}], "jsonl")), "train",
                  "train", bpe_tok, 5)
    cut = rows_of(got.dataset)[0]["prompt"]
    assert "\ufffd" not in cut and prompt.endswith(cut) and n_tokens(bpe_tok, cut) <= 5


def test_conversational_prompts_are_not_cut(tmp_path, bpe_tok):
    got = prepare(str(write(tmp_path, CONV, "parquet")), "train", "train", bpe_tok, 2)
    assert got.truncated_prompts == 0 and rows_of(got.dataset) == CONV


def test_bad_row_past_the_first_chunk_is_named_exactly(tmp_path):
    """Rows are checked 65,536 at a time: a bad row in the second chunk keeps its own index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_dist.data.prepare import CHUNK_ROWS

    n, bad = CHUNK_ROWS + 5000, CHUNK_ROWS + 4321

    def msgs(role, texts):
        return pa.array([[{"role": role, "content": t}] for t in texts])

    rejected = [f"no {i}" for i in range(n)]
    rejected[bad] = " "
    pq.write_table(pa.table({"prompt": msgs("user", [f"q {i}" for i in range(n)]),
                             "chosen": msgs("assistant", [f"yes {i}" for i in range(n)]),
                             "rejected": msgs("assistant", rejected)}), tmp_path / "big.parquet")
    with pytest.raises(DataError, match=rf"rejected message 0 is an empty assistant turn \(data.train .* row {bad}\)"):
        load_split(str(tmp_path / "big.parquet"), "train", "train")


def test_once_per_node_passes_the_first_ranks_failure_to_the_others(tmp_path):
    """The other ranks wait on a file, not a collective; when the node's first rank fails they stop with its error,
    and a failure left by an earlier launch is not read as this one's."""
    import os
    import threading

    from dpo_dist.data.tokenize_once import once_per_node

    mark = tmp_path / "work"
    (tmp_path / f"work.failed-{os.getppid() + 1}").write_text("old run")  # another launcher's pid: ignored
    got = {}

    def waiter():
        try:
            once_per_node(mark, None, False, "the work")
        except ValueError as e:
            got["error"] = str(e)

    t = threading.Thread(target=waiter)
    t.start()

    def boom():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        once_per_node(mark, boom, True, "the work")
    t.join(timeout=30)
    assert got["error"] == "the work failed on this node's first rank: RuntimeError: disk full"
    assert (tmp_path / f"work.failed-{os.getppid()}").exists()
    assert once_per_node(tmp_path / "ok", lambda: 7, True, "x", describe=str) == "7"
    assert once_per_node(tmp_path / "ok", None, False, "x") == "7"  # a waiter reads the result's description


def test_slurm_keeps_dataset_names_and_makes_data_paths_absolute(tmp_path):
    """`dpo-dist slurm` makes config paths absolute against the job's workdir: a data file or directory is a path, a
    dataset name in the Hugging Face cache must stay a name."""
    import argparse

    from dpo_dist.cli.slurm import resolve_config

    (tmp_path / "local").mkdir()  # an existing relative directory is a path even though it looks like a name
    args = argparse.Namespace(config=None, overrides=["data.train=someone/prefs", "data.eval=local"], model=None,
                              reference=None, sharding=None, placement=None, output_dir=None, smoke_steps=None,
                              overwrite=False)
    cfg = resolve_config(args, tmp_path)
    assert cfg.data.train == "someone/prefs" and cfg.data.eval == str(tmp_path / "local")
    args.overrides = ["data.train=data/train.parquet"]
    assert resolve_config(args, tmp_path).data.train == str(tmp_path / "data" / "train.parquet")
