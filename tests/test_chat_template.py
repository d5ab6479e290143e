"""The chat-template stage on purpose-built bad templates (not prefix-preserving, appending EOS itself, dropping the
system turn), a tokenizer without a template, doubled BOS, and truncation that empties a completion. The rows go
through TRL's own helpers, so these are the token sequences TRL's DPOTrainer would train on."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data import CONV, CONV_IMPLICIT, ROWS, TINY_SFT, write
from transformers import AutoTokenizer

from dpo_dist.config.schema import from_dict
from dpo_dist.data import chat_template
from dpo_dist.data.prepare import prepare
from dpo_dist.verify.report import RankReport

GOOD = (TINY_SFT / "chat_template.jinja").read_text()
LOOP = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}")
# the generation prompt ends in a newline, the assistant turn in a space: the prompt alone is not a prefix
NOT_PREFIX = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{{ '<|assistant|> ' + message['content'] + eos_token }}{% else %}"
              "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
EOS_ITSELF = "{{ bos_token }}" + LOOP + "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}" \
    "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
DROPS_SYSTEM = ("{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
                "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}{% if message['role'] == 'assistant' %}"
                "{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture(autouse=True)
def own_hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def tokenizer(template: str | None):
    tok = AutoTokenizer.from_pretrained(str(TINY_SFT))
    tok.chat_template = template
    return tok


def run_stage(tmp_path: Path, rows, template: str | None = GOOD, **train) -> tuple[bool, dict[str, object]]:
    tok = tokenizer(template)
    cfg = from_dict({"train": train} if train else {})
    data = prepare(str(write(tmp_path, rows, "parquet")), "train", "train", tok, cfg.train.max_prompt_length)
    rr = RankReport(0)
    ok = chat_template.check(rr, tok, {"train": data, "eval": None}, cfg)
    return ok, {c.name.removeprefix("train: "): c for c in rr.checks} | {"facts": rr.facts}


@pytest.mark.parametrize("rows", [CONV, CONV_IMPLICIT, ROWS], ids=["conversational", "implicit", "standard"])
def test_good_template_passes_and_shows_the_first_row(tmp_path, rows):
    ok, rows_by_name = run_stage(tmp_path, rows)
    assert ok, [(c.name, c.value) for k, c in rows_by_name.items() if k != "facts" and not c.ok]
    shown = rows_by_name["facts"]["first_row_rendered"]["train"]["prompt+chosen"]
    if rows is CONV:
        assert shown == "<|bos|><|system|>\nBe brief.\n<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.<|eos|>"
    elif rows is ROWS:  # standard: the tokenizer's BOS, TRL's EOS
        assert shown == "<|bos|>What is two plus two?Four.<|eos|>"


def test_not_prefix_preserving_names_row_and_token(tmp_path):
    ok, got = run_stage(tmp_path, CONV, NOT_PREFIX)
    row = got["prompt is a token prefix"]
    assert not ok and not row.ok
    assert row.value.startswith("row 0 chosen: token ") and "'Ċ' in the prompt but 'ĠF' in prompt+chosen" in row.value
    assert "prefix-preserving" in row.hint


def test_template_appending_eos_itself_is_doubled_eos(tmp_path):
    ok, got = run_stage(tmp_path, CONV, EOS_ITSELF)
    row = got["no doubled BOS/EOS"]
    assert not ok and not row.ok and "ends with '<|eos|>' twice" in row.value


def test_template_dropping_the_system_turn(tmp_path):
    ok, got = run_stage(tmp_path, CONV, DROPS_SYSTEM)
    row = got["every turn rendered"]
    assert not ok and not row.ok and "the system turn 'Be brief.'" in row.value
    assert got["prompt is a token prefix"].ok  # consistent, so only this check sees it


def test_conversational_data_needs_a_template(tmp_path):
    ok, got = run_stage(tmp_path, CONV, None)
    assert not ok and not got["chat template present"].ok and "chat_template" in got["chat template present"].hint


def test_standard_data_needs_no_template(tmp_path):
    ok, got = run_stage(tmp_path, ROWS, None)
    assert ok and "chat template present" not in got


def test_doubled_bos(tmp_path):
    rows = [{**r, "prompt": "<|bos|>" + r["prompt"]} for r in ROWS]  # the tokenizer adds its BOS too
    ok, got = run_stage(tmp_path, rows)
    assert not ok and "row 0 starts with '<|bos|>' twice" in got["no doubled BOS/EOS"].value


def test_truncation_that_empties_a_completion(tmp_path):
    long = [dict(CONV[0]), {**CONV[1], "prompt": [{"role": "user", "content": "word " * 40}]}, CONV[2]]
    ok, got = run_stage(tmp_path, long, max_length=30, max_prompt_length=25)
    row = got["lengths fit max_length"]
    assert not ok and not row.ok and row.value.startswith("row 1: the prompt alone has")
    assert "1 over max_prompt_length" in row.value


def test_sample_is_seeded_and_keeps_row_zero():
    picked = chat_template.sample_indices(1_000_000)
    assert picked == chat_template.sample_indices(1_000_000)
    assert picked[0] == 0 and len(picked) == chat_template.SAMPLE_ROWS and picked == sorted(set(picked))
    assert chat_template.sample_indices(5) == [0, 1, 2, 3, 4]


def test_rows_trl_drops_fail_the_gate(tmp_path):
    """After TRL's own preparation (its _prepare_dataset, run as dpo-dist's tokenize-once does), every row's
    lengths are read from the tokenized dataset, and the row TRL dropped (prompt alone >= max_length) fails."""
    from types import SimpleNamespace

    from trl import DPOConfig

    from dpo_dist.compat.trl import prepare_dataset

    tok = tokenizer(GOOD)
    rows = [CONV[0], {**CONV[1], "prompt": [{"role": "user", "content": "word " * 40}]}, CONV[2]]
    data = prepare(str(write(tmp_path, rows, "parquet")), "train", "train", tok, 20)
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=30, use_cpu=True, report_to="none")
    tokenized = prepare_dataset(data.dataset, tok, args, "train")
    assert len(tokenized) == 2  # TRL dropped the long row
    rr = RankReport(0)
    ok = chat_template.check_tokenized(rr, SimpleNamespace(train_dataset=tokenized, eval_dataset=None),
                                       {"train": data}, from_dict({"train": {"max_length": 30,
                                                                             "max_prompt_length": 20}}))
    row = rr.checks[0]
    assert not ok and row.name == "train: no completion truncated away" and "1 dropped" in row.value
    assert rr.facts["lengths"]["train"]["dropped_by_trl"] == 1


def test_template_that_raises_names_the_row(tmp_path):
    tool_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "calling"},
                 {"role": "tool", "content": "42"}]
    rows = [CONV[0], CONV[1], {**CONV[2], "prompt": tool_turn}]
    ok, got = run_stage(tmp_path, rows)  # the embedded template raises on roles other than system/user/assistant
    row = got["template renders the rows"]
    assert not ok and row.value.startswith("row 2: ") and "Only system, user and assistant" in row.value


def test_standard_implicit_prompt_split_inside_a_word_moves_back_to_a_token_boundary(tmp_path):
    """TRL's extract_prompt ends a string prompt where chosen and rejected first differ, here inside a word ("...
    Answer: T"): the prompt's last token would merge with the completion's first. The data stage moves the cut back
    to the last whitespace where the tokens agree, and says how many rows moved (issue 21, #30/#31)."""
    rows = [{"chosen": "Question: capital of Japan? Answer: The capital is Tokyo.",
             "rejected": "Question: capital of Japan? Answer: Tokyo Tokyo Tokyo"},  # shared: "... Answer: T"
            {"chosen": "Question: color of the sky? Answer: Blue.",
             "rejected": "Question: color of the sky? Answer: Green."}]  # TRL's own cut is a token boundary
    ok, got = run_stage(tmp_path, rows)
    row = got["prompt is a token prefix"]
    assert ok and "1 of 2 implicit prompts end earlier than TRL's extract_prompt" in row.value, row.value
    assert got["facts"]["implicit_prompts_moved"] == {"train": 1}
    shown = got["facts"]["first_row_rendered"]["train"]["prompt+chosen"]
    assert shown == "<|bos|>Question: capital of Japan? Answer: The capital is Tokyo.<|eos|>"  # nothing lost


def test_implicit_prompt_with_no_token_boundary_still_fails(tmp_path):
    """No whitespace before the difference: no boundary to move to, TRL's cut is kept and the check names the row."""
    rows = [{"chosen": "Q:capital-of-Japan?A:The", "rejected": "Q:capital-of-Japan?A:Tokyo"}]
    ok, got = run_stage(tmp_path, rows)
    row = got["prompt is a token prefix"]
    assert not ok and row.value.startswith("row 0 chosen: token ") and "token boundary" in row.hint
