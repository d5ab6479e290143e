"""The checkpoint, data and check-side cases of the second adversarial pass (issue 21): each reproduces the
adversary's input (/work/shared/notes/adversary-2026-12.md) and asserts what a user expects."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import check_row, run_cmd
from safetensors.torch import load_file, save_file

from dpo_dist.cli.main import main
from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.load.checkpoint import INDEX_NAME, SINGLE_NAME, read_elements, tensor_index, weight_files


def one_line_exit(argv: list[str], capsys, code: int = 2) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("dpo-dist"), err
    return lines[0]


def add_index(d: Path, noise: float) -> None:
    """The adversary's ck/stale_index: model.safetensors intact, plus an index and two shards holding the same
    tensors with `noise` * N(0, 1) added (0: an identical second copy)."""
    ts = load_file(str(d / SINGLE_NAME))
    g = torch.Generator().manual_seed(0)
    names = sorted(ts)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fname = f"model-0000{i}-of-00002.safetensors"
        shard = {n: (ts[n].float() + noise * torch.randn(ts[n].shape, generator=g)).to(ts[n].dtype) for n in part}
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------------------------------------------- #41 / #42

def test_stale_index_beside_model_safetensors_is_refused_naming_both_sets(tmp_path, capsys):
    d = tmp_path / "stale_index"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.02)
    out = tmp_path / "out"
    line = one_line_exit(["init", "--model", str(d), "--output-dir", str(out)], capsys)
    assert "two different weight sets" in line and SINGLE_NAME in line and INDEX_NAME in line, line
    assert "model-00001-of-00002.safetensors" in line and "remove the stale set" in line, line
    assert not (out / "report.json").exists()


def test_weight_set_is_the_one_from_pretrained_loads(tmp_path):
    """Pins transformers' order: with both sets present, from_pretrained loads model.safetensors, and so do the
    fast loader and the file fingerprint (both read tensor_index, i.e. weight_files)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "both"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.02)
    assert weight_files(d) == [d / SINGLE_NAME]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    e = tensor_index(d)["model.embed_tokens.weight"]
    ours = torch.frombuffer(bytearray(read_elements(e, 0, e.numel)), dtype=e.dtype).float().reshape(e.shape)
    assert torch.equal(model.model.embed_tokens.weight.detach(), ours)


def test_identical_second_copy_is_accepted(tmp_path, capsys):
    """A re-sharded copy kept beside the single file holds the same weights: nothing is ambiguous."""
    from dpo_dist.load.checkpoint import competing_sets
    d = tmp_path / "same"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.0)
    assert competing_sets(d) is None


def test_config_transformers_weights_is_followed_first(tmp_path):
    """transformers loads config.json's `transformers_weights` before any default name; so must every loader here."""
    d = tmp_path / "explicit"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.02)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_weights": INDEX_NAME}))
    assert [f.name for f in weight_files(d)] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]


# ---------------------------------------------------------------------------------------------------- #37

def test_unset_eval_is_no_eval_set_except_for_the_demo(tmp_path):
    from dpo_dist.config.schema import load
    from dpo_dist.config.yaml_text import parse_override

    def cfg(*sets: str):
        return load(None, [parse_override(s) for s in sets]).data

    assert (cfg().train, cfg().eval) == ("default", "default")  # the demo: embedded model, data unset
    assert cfg("data.train=my.jsonl").eval is None  # never the demo's eval rows beside a user's train set
    assert cfg(f"model.path={tmp_path}").eval is None
    assert cfg(f"model.path={tmp_path}", "data.train=my.jsonl").eval is None
    assert cfg("data.eval=null").eval is None
    assert cfg("data.train=my.jsonl", "data.eval=default").eval == "default"  # said explicitly: kept


def test_demo_note_names_a_user_model_on_the_demo_data():
    from dpo_dist.data.sources import demo_note

    assert demo_note("default", "default") is None
    assert demo_note("/ckpt", "my.jsonl") is None
    note = demo_note("/ckpt", "default")
    assert note and "demo" in note and "data.train" in note


# ---------------------------------------------------------------------------------------------------- #55 / #56 / #11

ALL_CONSTANT_LOSSES = ["sigmoid", "ipo", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


@pytest.mark.multiproc
def test_every_loss_type_passes_step0_and_a_user_model_on_demo_data_is_said(tmp_path):
    """One real init (a world of one, a real TRL step) with every loss_type TRL 1.16 offers whose step-0 value is a
    constant, weighted: the logged loss must equal the weighted sum of the formulas in verify.tolerances. The same run
    is a user's model (a copy of the embedded one) with data unset: it runs on the demo train set, says so, and has
    no eval set (#37)."""
    ckpt = tmp_path / "mine"
    shutil.copytree(DEFAULT_CHECKPOINT, ckpt)
    out = tmp_path / "out"
    weights = [1, 0.5, 2, 1, 1, 1, 1, 0.25, 1, 1, 1, 1, 1, 3]
    code, log = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--model", str(ckpt), "--output-dir", str(out),
                         "--smoke-steps", "1", "--set", f"train.extra.loss_type={ALL_CONSTANT_LOSSES}",
                         "--set", f"train.extra.loss_weights={weights}", "--set", "train.extra.label_smoothing=0.1"],
                        {"PYTHONUNBUFFERED": "1"}, 600)
    assert code == 0, log[-4000:]
    rep = json.loads((out / "report.json").read_text())
    row = check_row(rep, "step-0 DPO loss at policy == reference")
    assert row["ok"] and "1/(4 beta^2) (ipo)" in row["value"] and "SKIPPED" not in row["value"], row
    target = rep["facts"]["step0_loss_target"]["value"]
    b, e = 0.1, 0.1
    expect = (math.log(2) * (1 + 1 + 1 + 1 + 3) + 0.5 / (4 * b * b) + 2 + (-math.log(2) - math.log(e * (1 - e)) / 2)
              + 4 * math.log(2) + 0.25 / (2 * b * b) + 2 + (math.log(2) + 1) / 2)
    assert target == pytest.approx(expect, rel=1e-12)
    assert rep["facts"]["smoke_losses"][0] == pytest.approx(expect, abs=row["tolerance"])
    # #37: the demo's train set under a user's model is said; no eval set from the demo
    assert "WARNING: data.train is the embedded 64-row demo set" in log
    assert check_row(rep, "datasets valid")["value"].startswith("DEMO DATA: ")
    assert rep["facts"]["demo_train_data"] is True and rep["facts"]["data_format"]["eval"] is None


def test_step0_target_formulas_and_skips():
    from types import SimpleNamespace as NS

    from dpo_dist.verify.tolerances import step0_target

    def args(types, **kw):
        return NS(loss_type=types, loss_weights=kw.get("w"), label_smoothing=kw.get("e", 0.0),
                  use_weighting=kw.get("wpo", False))

    assert step0_target(args(["sigmoid"]), 0.1).value == pytest.approx(math.log(2))
    assert step0_target(args(["ipo"]), 0.1).value == pytest.approx(25.0)  # the adversary's #55
    assert step0_target(args(["ipo"]), 0.1).noise_scale is None  # no batching-noise bound derived: skipped there
    assert step0_target(args(["sppo_hard"]), 0.5).value == pytest.approx(2.0)
    assert step0_target(args(["robust"], e=0.2), 0.1).noise_scale == pytest.approx(1 / 0.6)
    t = step0_target(args(["sigmoid", "sft"], w=[1.0, 1.0]), 0.1)
    assert t.value is None and "sft" in t.formula  # the policy's own NLL: not a constant, a reported skip
    assert step0_target(args(["sigmoid"], wpo=True), 0.1).value is None
    assert step0_target(args(["sigmoid"]), 0.1, aux_loss=True).value is None


def test_every_trl_loss_type_is_known_to_the_step0_check():
    """Pins TRL's list: a loss_type TRL adds must get a formula or a reason to skip here."""
    import inspect

    from trl.trainer.dpo_trainer import DPOTrainer

    from dpo_dist.config.value_checks import TRL_LOSS_TYPES
    from dpo_dist.verify.tolerances import STEP0_LOSS, STEP0_UNKNOWN

    src = inspect.getsource(DPOTrainer._compute_loss)
    trl_types = set(re.findall(r'loss_type == "(\w+)"', src))
    assert trl_types == set(TRL_LOSS_TYPES) == set(STEP0_LOSS) | set(STEP0_UNKNOWN)


@pytest.mark.parametrize("sets, cause", [
    (["train.extra.precompute_ref_log_probs=true"],
     "'train.extra.precompute_ref_log_probs' is set by dpo-dist itself (reference.placement: precomputed)"),
    (["train.extra.disable_dropout=false"], "'train.extra.disable_dropout' is set by dpo-dist itself"),
    (["train.extra.beta=0.5"], "'train.extra.beta' is set by dpo-dist itself (train.beta)"),
    (["train.extra.output_dir=/tmp/x"], "(train.output_dir or --output-dir)"),
    (["train.extra.seed=3"], "(train.seed)"),
    (["train.extra.loss_type=ipoo"], "'train.extra.loss_type' 'ipoo' is not a loss type of TRL 1.16: did you mean "
                                     "'ipo'?"),
    (["train.extra.rpo_alpha=1.0"], "'train.extra.rpo_alpha' is not a DPOConfig field of TRL 1.16. Fix: TRL 1.x "
                                    "has no rpo_alpha: RPO is loss_type: [sigmoid, sft]"),
    (["train.extra.warmup_ration=0.1"], "Fix: did you mean 'warmup_steps'?"),
])
def test_train_extra_cannot_override_or_misspell(sets, cause, tmp_path, capsys):
    out = tmp_path / "out"
    line = one_line_exit(["init", "--output-dir", str(out), *[a for s in sets for a in ("--set", s)]], capsys)
    assert cause in line, line
    assert not (out / "report.json").exists()


def test_report_to_and_workers_stay_settable():
    """Logging and input workers touch no proof: train.extra may set them (dpo-dist's values are only defaults)."""
    from dpo_dist.config.schema import load
    from dpo_dist.config.yaml_text import parse_override

    cfg = load(None, [parse_override("train.extra.report_to=wandb"),
                      parse_override("train.extra.dataloader_num_workers=2")])
    assert cfg.train.extra == {"report_to": "wandb", "dataloader_num_workers": 2}


# ---------------------------------------------------------------------------------------------------- #40 / #50

def test_failure_line_names_the_tokenizer_before_the_weights():
    from dpo_dist.verify.report import failure_line

    def row(name, ok, hint=""):
        return {"check": name, "ok": ok, "failed_ranks": [] if ok else [0], "value": f"{name} value", "hint": hint}

    timeline = [{"stage": "forward proofs", "checks": ["generation: not degenerate", "perplexity below uniform",
                                                       "tokenizer matches the weights"]}]
    report = {"checks": [row("generation: not degenerate", True),
                         row("perplexity below uniform", False, "the checkpoint looks untrained or wrongly loaded"),
                         row("tokenizer matches the weights", False, "another model's tokenizer")],
              "timeline": timeline}
    line = failure_line(report)
    assert "check 'tokenizer matches the weights'" in line and "another model's tokenizer" in line, line
    report["checks"][2]["ok"] = True  # perplexity alone: its own hint
    assert "untrained or wrongly loaded" in failure_line(report)


@pytest.mark.multiproc
def test_fp16_overflow_names_the_dtype_not_a_corrupt_checkpoint(tmp_path):
    """The adversary's ck/big_values: one weight 99,840 (exact in bf16, beyond float16's 65,504) under model.dtype
    float16. The files are finite, so the last line must say float16 overflowed and name bfloat16."""
    ckpt = tmp_path / "big_values"
    shutil.copytree(DEFAULT_CHECKPOINT, ckpt)
    ts = load_file(str(ckpt / SINGLE_NAME))
    name = "model.layers.1.post_attention_layernorm.weight"
    w = ts[name].clone()
    w[3] = 99840.0
    ts[name] = w
    save_file(ts, str(ckpt / SINGLE_NAME), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, log = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--model", str(ckpt), "--output-dir", str(out),
                         "--set", "model.dtype=float16"], {"PYTHONUNBUFFERED": "1"}, 600)
    assert code == 1, log[-4000:]
    last = log.strip().splitlines()[-1]
    assert "check 'weights finite: policy'" in last and "the checkpoint files hold no inf/NaN" in last, last
    assert "set model.dtype: bfloat16" in last and "corrupt" not in last, last


# ---------------------------------------------------------------------------------------------------- #25 / #26 / #27

def rows_file(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def good_rows(n: int = 10) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": f" No {i}."} for i in range(n)]


@pytest.fixture
def own_hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_a_number_where_chosen_should_be_text_names_the_row_and_type(tmp_path, capsys, own_hf_cache):
    rows = good_rows()
    rows[7]["chosen"] = 12345
    p = rows_file(tmp_path, "chosen_number.jsonl", [json.dumps(r) for r in rows])
    line = one_line_exit(["init", "--output-dir", str(tmp_path / "o"), "--set", f"data.train={p}"], capsys)
    assert "chosen is a number (12345), not text or a list of messages" in line and "row 7" in line, line
    assert "mixes" not in line


def test_a_json_line_that_is_an_array_names_the_line_and_datasets_stays_quiet(tmp_path, capsys, own_hf_cache):
    lines = [json.dumps(r) for r in good_rows()]
    lines[3] = "[1,2,3]"
    p = rows_file(tmp_path, "row_array.jsonl", lines)
    line = one_line_exit(["init", "--output-dir", str(tmp_path / "o"), "--set", f"data.train={p}"], capsys)
    assert "line 4 is an array, not a JSON object" in line, line  # one_line_exit: datasets' ERROR line is gone


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs sysfs, where no process may create a directory")
def test_an_unwritable_datasets_cache_is_named_not_the_data_file(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", "/sys/dpo-dist-no-such-cache")
    p = rows_file(tmp_path, "ok.jsonl", [json.dumps(r) for r in good_rows()])
    line = one_line_exit(["init", "--output-dir", str(tmp_path / "o"), "--set", f"data.train={p}"], capsys)
    assert "the datasets cache /sys/dpo-dist-no-such-cache cannot be written ([Errno" in line, line
    assert "HF_DATASETS_CACHE" in line and "cannot be read as" not in line, line


# ---------------------------------------------------------------------------------------------------- #34

def test_a_row_the_template_refuses_outside_the_sample_is_named_in_the_data_stage(tmp_path, own_hf_cache):
    from transformers import AutoTokenizer

    from dpo_dist.config.schema import from_dict
    from dpo_dist.data import chat_template
    from dpo_dist.data.prepare import prepare
    from dpo_dist.verify.report import RankReport

    def msg(role, text):
        return {"role": role, "content": text}

    rows = [{"prompt": [msg("user", f"Question {i}?")], "chosen": [msg("assistant", "Yes.")],
             "rejected": [msg("assistant", "No.")]} for i in range(1500)]
    rows[1038]["prompt"] = [msg("user", "hi"), msg("assistant", "calling"), msg("tool", "42")]
    assert 1038 not in chat_template.sample_indices(1500)  # the adversary's case: the sample misses it
    p = rows_file(tmp_path, "conv_big_tool_unsampled.jsonl", [json.dumps(r) for r in rows])
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    cfg = from_dict({})
    rr = RankReport(0)
    data = prepare(str(p), "train", "train", tok, cfg.train.max_prompt_length)
    assert not chat_template.check(rr, tok, {"train": data}, cfg)
    row = next(c for c in rr.checks if c.name == "train: template renders the rows")
    assert row.value.startswith("row 1038: ") and "Only system, user and assistant" in row.value, row.value


# ------------------------------------------------------------------------------------- item 2: control tokens

def test_special_token_text_in_the_data_is_named(tmp_path, own_hf_cache):
    from transformers import AutoTokenizer

    from dpo_dist.data.chat_template import special_text
    from dpo_dist.data.prepare import prepare

    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    rows = good_rows(6)
    rows[2]["chosen"] = " Fine.<|eos|>"  # a final EOS: TRL keeps it as the one EOS, nothing to say
    rows[4]["rejected"] = " Sure.<|eos|> And then more text."  # typed mid-answer: a control token
    p = rows_file(tmp_path, "special.jsonl", [json.dumps(r) for r in rows])
    data = prepare(str(p), "train", "train", tok, 512)
    assert special_text(data.dataset, data.fmt.columns, tok) == {"row": 4, "column": "rejected",
                                                                "token": "<|eos|>", "rows": 1}
    def msg(role, text):
        return {"role": role, "content": text}

    conv = [{"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "Hello")],
             "rejected": [msg("assistant", "Bye")]} for _ in range(5)]
    conv[3]["chosen"] = [msg("assistant", "Hello <|user|> again")]
    p = rows_file(tmp_path, "special_conv.jsonl", [json.dumps(r) for r in conv])
    data = prepare(str(p), "train", "train", tok, 512)
    assert special_text(data.dataset, data.fmt.columns, tok) == {"row": 3, "column": "chosen",
                                                                "token": "<|user|>", "rows": 1}
    clean = prepare(str(rows_file(tmp_path, "clean.jsonl", [json.dumps(r) for r in good_rows(6)])),
                    "train", "train", tok, 512)
    assert special_text(clean.dataset, clean.fmt.columns, tok) is None


# ---------------------------------------------------------------------------------------- item 3: data shapes

@pytest.mark.parametrize("content, cause", [
    (["x"], "chosen message 0 content is a list, not text"),
    (7, "chosen message 0 content is a number, not text"),
])
def test_message_content_that_is_not_text_names_the_row(content, cause, tmp_path, capsys, own_hf_cache):
    def msg(role, text):
        return {"role": role, "content": text}

    rows = [{"prompt": [msg("user", "q")], "chosen": [msg("assistant", "x")], "rejected": [msg("assistant", "y")]}
            for _ in range(4)]
    rows[2]["chosen"] = [msg("assistant", content)]
    p = rows_file(tmp_path, "content.jsonl", [json.dumps(r) for r in rows])
    line = one_line_exit(["init", "--output-dir", str(tmp_path / "o"), "--set", f"data.train={p}"], capsys)
    assert cause in line and "row 2)" in line, line


def test_step0_tolerance_scales_with_the_loss_and_skips_where_no_bound_is_derived():
    from types import SimpleNamespace as NS

    from dpo_dist.config.schema import from_dict
    from dpo_dist.verify.tolerances import loss_tolerance, step0_target, step0_tolerance

    cfg = from_dict({})

    def target(types):
        return step0_target(NS(loss_type=types, loss_weights=None, label_smoothing=0.0, use_weighting=False), 0.1)

    noise = {"bound": 1e-3, "pairs": 8, "mean_abs_gap": 2e-3, "beta": 0.1}
    sig, ipo = target(["sigmoid"]), target(["ipo"])
    assert step0_tolerance(cfg, False, 8, None, sig) == loss_tolerance(cfg, False, 8, None)  # unchanged for sigmoid
    assert step0_tolerance(cfg, False, 8, noise, sig).value == loss_tolerance(cfg, False, 8, noise).value
    assert step0_tolerance(cfg, False, 8, None, ipo).value == pytest.approx(
        loss_tolerance(cfg, False, 8, None).value * 25 / math.log(2))  # float32 rounding is relative
    assert step0_tolerance(cfg, False, 8, noise, ipo) is None  # precomputed: batching noise has no IPO bound
    assert step0_tolerance(cfg, True, 8, None, ipo) is None  # cross-device: the setting is in sigmoid-loss units


def test_pad_to_multiple_of_is_reserved_under_the_ranks_placement():
    from dpo_dist.config.schema import ConfigError, load
    from dpo_dist.config.yaml_text import parse_override

    sets = ["reference.placement=ranks", "reference.pad_to_multiple_of=64", "train.extra.pad_to_multiple_of=8"]
    with pytest.raises(ConfigError, match="'train.extra.pad_to_multiple_of' is set by dpo-dist itself"):
        load(None, [parse_override(s) for s in sets])
    assert load(None, [parse_override("train.extra.pad_to_multiple_of=8")]).train.extra == {"pad_to_multiple_of": 8}


def test_whole_dialogues_with_no_shared_opening_turn_name_the_row(tmp_path, capsys, own_hf_cache):
    """An implicit prompt is the turns both dialogues share: none shared is an empty prompt, which the template refuses
    only in the trainer stage for a row outside the sample. Checked on every row in the data checks."""
    def msg(role, text):
        return {"role": role, "content": text}

    rows = [{"chosen": [msg("user", f"q{i}"), msg("assistant", "yes")],
             "rejected": [msg("user", f"q{i}"), msg("assistant", "no")]} for i in range(6)]
    rows[3]["rejected"] = [msg("user", "another question"), msg("assistant", "no")]
    p = rows_file(tmp_path, "conv_no_shared.jsonl", [json.dumps(r) for r in rows])
    line = one_line_exit(["init", "--output-dir", str(tmp_path / "o"), "--set", f"data.train={p}"], capsys)
    assert "chosen and rejected start with different turns" in line and "row 3)" in line, line
