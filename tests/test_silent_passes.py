"""Inputs that passed the gate silently (issue 13.1, 13.2): a config.json with fewer layers than the files hold, and
one non-finite weight element in a row no verify prompt uses. One real `dpo-dist init` (a world of one, ZeRO-3)
carries both faults; each must fail its own row, naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import check_row, init_single
from safetensors.torch import load_file, save_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.multiproc


def test_fewer_layers_and_a_nan_weight_fail_the_static_proofs(tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(DEFAULT_CHECKPOINT, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1  # the files still hold the last layer
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(ckpt / "model.safetensors"))
    emb = tensors["model.embed_tokens.weight"].clone()
    emb[cfg["vocab_size"] - 1, 7] = float("nan")  # the last token's row: no verify prompt uses it
    tensors["model.embed_tokens.weight"] = emb
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    code, log, report = init_single(tmp_path / "out", "--model", str(ckpt), "--smoke-steps", "0", "--set",
                                    "verify.generation=false")
    assert code == 1, log[-4000:]
    files = check_row(report, "checkpoint files == model tensors (both ways)")
    last = cfg["num_hidden_layers"]
    assert not files["ok"] and f"model.layers.{last}." in files["value"] and "config.json" in files["hint"]
    finite = check_row(report, "weights finite: policy")
    assert not finite["ok"] and "model.embed_tokens.weight (1)" in finite["value"]
    assert report["facts"]["nonfinite_policy"] == {"model.embed_tokens.weight": 1}
    assert "weights: policy == reference" in [r["check"] for r in report["checks"]]  # the rest of the stage ran
    last = log.strip().splitlines()[-1]  # the run ends on the first failed check, in one line
    assert last.startswith("dpo-dist: static proofs failed on rank(s) 0: check '") and \
        ("check 'weights finite: policy'" in last or "check 'checkpoint files" in last), last


def test_swapped_token_ids_fail_the_forward_proofs(tmp_path):
    """Issue 13.5 end to end: token ids swapped in tokenizer.json passed ("perplexity below uniform"). Here 10 pairs of
    ids the prompts use and the reference answer does not: the answer's perplexity stays far below uniform (1.7 vs
    512 measured), the order check sees the prompts read as a scramble."""
    from test_tokenizer_match import swapped

    ckpt = swapped(DEFAULT_CHECKPOINT, tmp_path / "swapped", 10, seed=0, spare_answer=True)
    code, log, report = init_single(tmp_path / "out", "--model", str(ckpt), "--smoke-steps", "0")
    assert code == 1, log[-4000:]
    row = check_row(report, "tokenizer matches the weights")
    assert not row["ok"] and "shuffled" in row["value"] and "tokenizer" in row["hint"]
    assert check_row(report, "perplexity below uniform")["ok"]  # the old bar, passed by the swapped tokenizer
    assert report["facts"]["tokenizer_order"]["ratio"] > 0.5
