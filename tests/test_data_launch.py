"""Every data source and TRL format through a real 2-process `dpo-dist init --smoke-steps 1` (ZeRO-3 on CPU, TRL's
DPOTrainer): three launches, each with a train and an eval dataset of different sources and formats."""

from __future__ import annotations

import json
import math

import pytest
from conftest import check_row, launch_init
from test_data import cache_hub_name, dataset, write

from dpo_dist.config.resources import DEFAULT_DIR

pytestmark = pytest.mark.multiproc

DEFAULT = [json.loads(line) for line in (DEFAULT_DIR / "train.jsonl").open()]


def turn(role, text):
    return {"role": role, "content": text.strip()}


def conversational(rows):
    return [{"prompt": [turn("system", "Answer briefly."), turn("user", r["prompt"])],
             "chosen": [turn("assistant", r["chosen"])], "rejected": [turn("assistant", r["rejected"])]} for r in rows]


def implicit(rows):
    return [{"chosen": [turn("user", r["prompt"]), turn("assistant", r["chosen"])],
             "rejected": [turn("user", r["prompt"]), turn("assistant", r["rejected"])]} for r in rows]


def ultrafeedback(rows):
    return [{"prompt": r["prompt"], **d, "score_chosen": 8.0, "score_rejected": 4.0, "prompt_id": str(i)}
            for i, (r, d) in enumerate(zip(rows, implicit(rows), strict=True))]


def standard_implicit(rows):
    # the shared start ends on a token boundary (a newline): see test_chat_template's mid-word case
    return [{"chosen": f"Question: {r['prompt']}\nGood answer:{r['chosen']}",
             "rejected": f"Question: {r['prompt']}\nBad answer:{r['rejected']}"} for r in rows]


def scenario(name, tmp_path, monkeypatch) -> tuple[list[str], dict[str, str]]:
    """(--set arguments, expected format per split) for one launch."""
    train, evald = DEFAULT, DEFAULT[:16]
    cache = tmp_path / "hf-cache"  # datasets' cache (Arrow conversions, cached hub names) of this test only
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    if name == "parquet+csv":
        return ([f"data.train={write(tmp_path, conversational(train), 'parquet', 'train')}",
                 f"data.eval={write(tmp_path, evald, 'csv', 'eval')}"],
                {"train": "conversational, explicit prompt", "eval": "standard, explicit prompt"})
    if name == "datasets-dir+arrow":
        from datasets import DatasetDict

        d = tmp_path / "ultrafeedback"
        DatasetDict({"train_prefs": dataset(ultrafeedback(train)), "test_prefs": dataset(ultrafeedback(evald))}
                    ).save_to_disk(str(d))
        return ([f"data.train={d}", "data.train_split=train_prefs",
                 f"data.eval={write(tmp_path, implicit(evald), 'arrow', 'eval')}"],
                {"train": "conversational, implicit prompt, ignored columns: prompt, score_chosen, score_rejected, "
                          "prompt_id", "eval": "conversational, implicit prompt"})
    # a dataset name in the local Hugging Face cache (offline), and a JSON array file
    cache_hub_name(cache, "someone/prefs", {"train": standard_implicit(train), "test": standard_implicit(evald)})
    return (["data.train=someone/prefs", f"data.eval={write(tmp_path, evald, 'json', 'eval')}"],
            {"train": "standard, implicit prompt", "eval": "standard, explicit prompt"})


@pytest.mark.parametrize("name", ["parquet+csv", "datasets-dir+arrow", "hub-cache+json"])
def test_sources_and_formats_through_init(tmp_path, monkeypatch, name):
    sets, formats = scenario(name, tmp_path, monkeypatch)
    res = launch_init(tmp_path / "out", "--smoke-steps", "1", *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 0 and res.report is not None, res.output[-6000:]
    rep = res.report
    assert rep["passed"], [r for r in rep["checks"] if not r["ok"]]
    facts = rep["facts"]
    assert facts["data_format"] == formats
    assert abs(facts["smoke_losses"][0] - math.log(2)) < 1e-4
    # TRL's tokenization ran once before the trainer (no rank waiting in a collective meanwhile), and the trainer's
    # own preparation found that cache instead of tokenizing again
    assert facts["tokenized_once"] is True
    assert [r.get("rank_1_tokenized_once") for r in rep["per_rank_facts"].values() if "rank_1_tokenized_once" in r] \
        == [True]
    for split in ("train", "eval"):
        for row in ("prompt is a token prefix", "no doubled BOS/EOS", "lengths fit max_length",
                    "no completion truncated away"):
            assert check_row(rep, f"{split}: {row}")["ok"]
        shown = facts["first_row_rendered"][split]["prompt+chosen"]
        assert shown.startswith("<|bos|>") and shown.endswith("<|eos|>") and shown.count("<|eos|>") == 1
        if formats[split].startswith("conversational"):
            assert check_row(rep, f"{split}: every turn rendered")["ok"]
            assert "<|user|>\nSay good morning.\n<|assistant|>\nGood morning!" in shown
        assert facts["lengths"][split]["dropped_by_trl"] == 0
    assert facts["lengths"]["train"]["rows"] == len(DEFAULT) and facts["lengths"]["eval"]["rows"] == 16
