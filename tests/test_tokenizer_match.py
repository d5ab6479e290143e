"""Tokenizer/weights mismatch (issue 13.5): 20 token-id pairs swapped in tokenizer.json passed the gate ("perplexity
below uniform"). The order check separates a matched tokenizer from a swapped one on the embedded checkpoint and on
the deep trained one alike."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings

import pytest
import torch

from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.config.schema import DEFAULT_PROMPTS, DEFAULT_REFERENCE_TEXT, VerifyConfig
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.verify import forward_proofs, probes
from dpo_dist.verify.report import RankReport

ROW = "tokenizer matches the weights"


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval(), \
            AutoTokenizer.from_pretrained(str(path))


def swapped(src, dst, pairs: int, seed: int, spare_answer: bool = False):
    """A copy whose tokenizer.json swaps `pairs` pairs of token ids, drawn from the ids the verify texts use (the
    swaps a text can reveal; a swap of ids the texts never use changes nothing any text-based check can see).
    spare_answer: only ids the reference answer does not use, so the old perplexity-of-the-answer bar still passes."""
    shutil.copytree(src, dst)
    _, tok = load(src)
    texts = [probes.render_prompt(tok, DEFAULT_PROMPTS[0]) + DEFAULT_REFERENCE_TEXT] + \
        [probes.render_prompt(tok, p) for p in DEFAULT_PROMPTS]
    used = {i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]} - set(tok.all_special_ids)
    if spare_answer:
        used -= set(tok(DEFAULT_REFERENCE_TEXT, add_special_tokens=False)["input_ids"])
    used = sorted(used)
    ids = random.Random(seed).sample(used, 2 * pairs)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    by_id = {v: k for k, v in vocab.items()}
    for a, b in zip(ids[::2], ids[1::2], strict=True):
        vocab[by_id[a]], vocab[by_id[b]] = b, a
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def order_row(path, tok_path=None, **verify):
    """The order row as `init` computes it: the shared verify pass and the shuffled pass, then the row."""
    model, tok = load(path)
    if tok_path is not None:
        _, tok = load(tok_path)
    rr = RankReport(0)
    vcfg = dataclasses.replace(VerifyConfig(), **verify)
    vp = forward_proofs.run_passes(model, model, tok, vcfg, DistContext(0, 1), forward_proofs.Counter(), True)
    facts = forward_proofs.order_row(vp, rr)
    row = [c for c in rr.checks if c.name == ROW][0]
    return row, facts


@pytest.mark.parametrize("which", ["embedded", "deep"])
def test_matched_passes_and_twenty_swapped_pairs_fail(which, tmp_path, request):
    src = DEFAULT_CHECKPOINT if which == "embedded" else request.getfixturevalue("deep_checkpoint")
    ok_row, ok = order_row(src)
    assert ok_row.ok, ok_row.value
    bad_row, bad = order_row(src, swapped(src, tmp_path / "swapped", 20, seed=0))
    assert not bad_row.ok, bad_row.value
    assert "tokenizer" in bad_row.hint
    spare_row, spare = order_row(src, swapped(src, tmp_path / "spare", 10, seed=0, spare_answer=True))
    assert not spare_row.ok, spare_row.value
    print(f"{which}: 10 swapped pairs outside the answer: ratio {spare['ratio']:.3f}")
    print(f"{which}: matched ratio {ok['ratio']:.3f} ({ok['in_order']:.3f} vs {ok['shuffled']:.3f}), 20 swapped "
          f"pairs ratio {bad['ratio']:.3f} ({bad['in_order']:.3f} vs {bad['shuffled']:.3f})")


@pytest.mark.parametrize("which", ["embedded", "deep"])
def test_short_user_prompts_pass_with_the_matched_tokenizer_and_a_swapped_one_still_fails(which, tmp_path, request):
    """Issue 21 #52: three short prompts and a short answer (~40 tokens) failed a real 135M chat model with its own
    tokenizer (ratio 0.51); on the embedded model they read 0.69. The probe now scores the built-in texts beside the
    user's, so short prompts cannot starve it; a swapped tokenizer still fails with the same short prompts."""
    src = DEFAULT_CHECKPOINT if which == "embedded" else request.getfixturevalue("deep_checkpoint")
    short = dict(prompts=("Hi", "Thanks!", "Ok"), reference_text="Hi there!")
    ok_row, ok = order_row(src, **short)
    assert ok_row.ok, ok_row.value
    assert ok["tokens"] > 100 and ok_row.tolerance == forward_proofs.ORDER_BAR
    assert "shuffled" in ok_row.tolerance_source
    bad_row, _ = order_row(src, swapped(src, tmp_path / "swapped", 20, seed=0), **short)
    assert not bad_row.ok, bad_row.value
    spare_row, spare = order_row(src, swapped(src, tmp_path / "spare", 10, seed=0, spare_answer=True), **short)
    assert not spare_row.ok, spare_row.value
    print(f"{which}: short prompts: matched ratio {ok['ratio']:.3f} +-{ok['ratio_noise']:.3f}, 10 swapped pairs "
          f"{spare['ratio']:.3f}")
