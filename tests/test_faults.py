"""Bad input and faults: one line naming the cause, a non-zero exit, no report that could pass for a good one, and
every rank ends promptly. Counted in the README ("When it fails")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, check_row, dpo_dist_cli, edited_checkpoint, free_port, init_single, launch_init
from safetensors.torch import load_file, save_file

from dpo_dist.cli.main import main
from dpo_dist.config.resources import DEFAULT_DIR


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# bad input caught before anything is launched: in-process through the real CLI entry point (exit 2, one line)

def _ckpt_missing_dir(tmp):
    return ["--model", str(tmp / "nope")], "checkpoint directory"


def _ckpt_no_config(tmp):
    d = edited_checkpoint(tmp)
    (d / "config.json").unlink()
    return ["--model", str(d)], "has no config.json"


def _ckpt_bad_json(tmp):
    d = edited_checkpoint(tmp)
    (d / "config.json").write_text("{not json")
    return ["--model", str(d)], "config.json is not valid JSON"


def _ckpt_no_weights(tmp):
    d = edited_checkpoint(tmp)
    (d / "model.safetensors").unlink()
    return ["--model", str(d)], "no weights in"


def _ckpt_truncated(tmp):
    d = edited_checkpoint(tmp)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["--model", str(d)], "is truncated"


def _ckpt_corrupt_header(tmp):
    d = edited_checkpoint(tmp)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    return ["--model", str(d)], "corrupt safetensors header"


def _ckpt_missing_shard(tmp):
    d = edited_checkpoint(tmp)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return ["--model", str(d)], "model-00002-of-00002.safetensors"


def _ckpt_pickle_only(tmp):
    d = edited_checkpoint(tmp)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    return ["--model", str(d)], "model.allow_pickle"


def _ckpt_remote_code(tmp):
    d = edited_checkpoint(tmp)
    conf = json.loads((d / "config.json").read_text())
    conf.update(model_type="my_custom_llm", auto_map={"AutoConfig": "custom.MyConfig"})
    (d / "config.json").write_text(json.dumps(conf))
    return ["--model", str(d)], "model.trust_remote_code"


def _tokenizer_missing(tmp):
    d = edited_checkpoint(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    return ["--model", str(d)], "no tokenizer in"


def _reference_missing(tmp):
    return ["--reference", str(tmp / "ref-nope")], "reference: checkpoint directory"


def _data_missing(tmp):
    return ["--set", f"data.train={tmp / 'none.jsonl'}"], "does not exist. Fix: check data.train"


def _data_empty(tmp):
    return ["--set", f"data.train={write_jsonl(tmp / 'e.jsonl', [])}"], "train dataset is empty"


def _data_missing_field(tmp):
    p = write_jsonl(tmp / "m.jsonl", [{"prompt": "a", "chosen": "b"}])
    return ["--set", f"data.train={p}"], "lacks rejected"


def _data_not_string(tmp):
    p = write_jsonl(tmp / "n.jsonl", [{"prompt": "a", "chosen": 3, "rejected": "c"}])
    return ["--set", f"data.train={p}"], "chosen must be non-empty strings"


def _data_no_preference(tmp):
    p = write_jsonl(tmp / "s.jsonl", [{"prompt": "a", "chosen": "same", "rejected": "same"}] * 3)
    return ["--set", f"data.train={p}"], "chosen == rejected in every row"


def _yaml(tmp, text):
    p = tmp / "run.yaml"
    p.write_text(text)
    return ["--config", str(p)]


def _yaml_unknown_key(tmp):
    return _yaml(tmp, "train:\n  betta: 0.1\n"), "did you mean 'train.beta'"


def _yaml_wrong_type(tmp):
    return _yaml(tmp, "train:\n  per_device_train_batch_size: four\n"), "must be int"


def _yaml_beta(tmp):
    return _yaml(tmp, "train:\n  beta: 0\n"), "'train.beta' must be > 0"


def _yaml_lr(tmp):
    return _yaml(tmp, "train:\n  learning_rate: -0.1\n"), "'train.learning_rate' must be > 0"


def _yaml_prompt_len(tmp):
    return _yaml(tmp, "train:\n  max_length: 256\n  max_prompt_length: 256\n"), "must be < 'train.max_length'"


def _yaml_ranks(tmp):
    return ["--placement", "ranks"], "launch at least 2 processes or lower reference.ranks"


def _out_not_writable(tmp):
    blocker = tmp / "a-file"
    blocker.write_text("x")
    return ["--output-dir", str(blocker / "out")], "is not writable"


def _out_from_other_run(tmp):
    out = tmp / "used"
    out.mkdir()
    (out / "report.json").write_text('{"passed": true}')
    return ["--output-dir", str(out)], "already holds a report from another run"


BAD_INPUTS = [_ckpt_missing_dir, _ckpt_no_config, _ckpt_bad_json, _ckpt_no_weights, _ckpt_truncated,
              _ckpt_corrupt_header, _ckpt_missing_shard, _ckpt_pickle_only, _ckpt_remote_code, _tokenizer_missing,
              _reference_missing, _data_missing, _data_empty, _data_missing_field, _data_not_string,
              _data_no_preference, _yaml_unknown_key, _yaml_wrong_type, _yaml_beta, _yaml_lr, _yaml_prompt_len,
              _yaml_ranks, _out_not_writable, _out_from_other_run]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__.lstrip("_") for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    args, cause = case(tmp_path)
    out = tmp_path / "run-out"
    if "--output-dir" not in args:
        args += ["--output-dir", str(out)]
    code = main(["init", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpo-dist: "), err
    assert cause in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (out / "report.json").exists()


def test_stale_report_is_removed_with_overwrite_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "report.json").write_text('{"passed": true}')
    code = main(["init", "--output-dir", str(out), "--overwrite", "--model", str(tmp_path / "nope")])
    assert code == 2
    assert not (out / "report.json").exists()  # the old "passed" can no longer be mistaken for this run's


def test_real_cli_process_bad_input(tmp_path):
    t0 = time.time()
    out = dpo_dist_cli("init", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"), timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr
    assert time.time() - t0 < 20  # nothing heavy was loaded


def test_disk_full_while_writing_report_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from dpo_dist.init.stages import InitResult, finish
    from dpo_dist.runtime.distributed import DistContext
    from dpo_dist.verify import report as report_mod
    from dpo_dist.verify.report import Check, RankReport, build_report

    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_mod.os, "fsync", full)
    rr = RankReport(0, [Check("x", True, "fine")])
    code = finish(InitResult(build_report([rr], {})), DistContext(), str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "could not write" in err
    assert list((tmp_path / "out").iterdir()) == []  # no report, no temp file


# ---------------------------------------------------------------------------------------------------------------
# bad input found while loading: a single process, the real init (exit 1, named check, one closing line)

SINGLE_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


def init_one(tmp_path: Path, *args: str, timeout: float = 120):
    return init_single(tmp_path / "out", *args, env=SINGLE_ENV, timeout=timeout)


def edit_tokenizer(d: Path, fn) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    fn(tok)
    tok.save_pretrained(str(d))


def test_tokenizer_larger_than_embeddings_and_ids_out_of_range(tmp_path):
    d = edited_checkpoint(tmp_path)
    edit_tokenizer(d, lambda t: t.add_special_tokens({"additional_special_tokens": ["<|x1|>", "<|x2|>"]}))
    code, log, rep = init_one(tmp_path, "--model", str(d))
    assert code == 1 and rep["passed"] is False
    assert "514 tokens, 512 embedding rows" in check_row(rep, "tokenizer fits embeddings")["value"]
    assert "<|x1|>=512" in check_row(rep, "special token ids in range")["value"]
    assert "dpo-dist: tokenizer failed on rank(s) 0: check 'tokenizer fits embeddings'" in log


def _drop_special(d: Path, key: str) -> None:
    cfg_path = d / "tokenizer_config.json"
    conf = json.loads(cfg_path.read_text())
    conf.pop(key, None)
    cfg_path.write_text(json.dumps(conf))


def test_no_eos(tmp_path):
    d = edited_checkpoint(tmp_path)
    _drop_special(d, "eos_token")
    code, log, rep = init_one(tmp_path, "--model", str(d))
    assert code == 1 and not check_row(rep, "eos token present")["ok"]


def test_no_pad_fails_when_policy_says_fail(tmp_path):
    d = edited_checkpoint(tmp_path)
    _drop_special(d, "pad_token")
    code, log, rep = init_one(tmp_path, "--model", str(d), "--set", "model.pad_policy=fail")
    assert code == 1
    row = check_row(rep, "pad token present")
    assert not row["ok"] and "model.pad_policy: eos" in row["hint"]


def test_reference_with_another_tokenizer(tmp_path):
    ref = edited_checkpoint(tmp_path, "ref")
    edit_tokenizer(ref, lambda t: t.add_tokens(["zzzz"]))
    code, log, rep = init_one(tmp_path, "--reference", str(ref), "--set", "verify.generation=false")
    assert code == 1
    row = check_row(rep, "reference tokenizer equal")
    assert not row["ok"] and "vocabularies differ (512 vs 513 tokens)" in row["value"]


def test_batch_sizes_that_do_not_divide(tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["train_batch_size"] = 7
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    code, log, rep = init_one(tmp_path, "--set", f"sharding.ds_config={p}")
    assert code == 1
    row = check_row(rep, "batch sizes consistent")
    assert not row["ok"] and "train_batch_size=7 (run config gives 16)" in row["value"]


def test_dataset_smaller_than_one_global_batch(tmp_path):
    rows = [json.loads(line) for line in (DEFAULT_DIR / "train.jsonl").read_text().splitlines()[:5]]
    p = write_jsonl(tmp_path / "small.jsonl", rows)
    code, log, rep = init_one(tmp_path, "--set", f"data.train={p}", "--set", "verify.generation=false")
    assert code == 1
    row = check_row(rep, "train data fills one global batch")
    assert "5 rows < global batch 16" in row["value"]


def test_long_prompts_are_truncated_keeping_the_end_and_counted(tmp_path):
    rows = [json.loads(line) for line in (DEFAULT_DIR / "train.jsonl").read_text().splitlines()]
    rows[0]["prompt"] = "word " * 300 + "What is the closest star to Earth?"
    p = write_jsonl(tmp_path / "long.jsonl", rows)
    code, log, rep = init_one(tmp_path, "--set", f"data.train={p}", "--set", "train.max_prompt_length=64",
                                 "--set", "verify.generation=false")
    assert code == 0, log[-3000:]
    assert rep["facts"]["truncated_prompts"] == 1
    assert "1 prompts truncated to 64 tokens" in check_row(rep, "datasets valid")["value"]


def test_rendezvous_that_never_completes_names_who_joined(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    t0 = time.time()
    code, log, _ = init_single(tmp_path / "o", "--set", "sharding.timeout_s=10", env=env, timeout=90)
    assert code == 3
    assert "1/2 clients joined" in log and "rendezvous at 127.0.0.1" in log and "Traceback" not in log
    assert time.time() - t0 < 60
    assert not (tmp_path / "o" / "report.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# distributed faults: 2 real processes under accelerate launch



@pytest.mark.multiproc
def test_rank_killed_during_loading_ends_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "load:1:exit")
    t0 = time.time()
    res = launch_init(tmp_path / "out", timeout=120)
    assert res.returncode != 0
    assert time.time() - t0 < 60
    assert "rank 1: injected crash at stage 'load'" in res.output
    assert res.report is None  # nothing that could pass for a finished run


@pytest.mark.multiproc
def test_rank_failing_in_a_local_stage_stops_all_ranks_there_and_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "tokenizer:1")
    res = launch_init(tmp_path / "out", timeout=120)
    assert res.returncode == 1
    row = check_row(res.report, "tokenizer")
    assert row["failed_ranks"] == [1] and "injected fault" in row["value"]
    assert "tokenizer fits embeddings" in [r["check"] for r in res.report["checks"]]  # rank 0 finished the stage
    assert "models loaded" not in [r["check"] for r in res.report["checks"]]  # and no rank went on to loading
    assert "dpo-dist: tokenizer failed on rank(s) 1: " in res.output


@pytest.mark.multiproc
def test_rank_failing_inside_a_collective_stage_ends_the_job_promptly(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "load:1")
    t0 = time.time()
    res = launch_init(tmp_path / "out", "--set", "sharding.timeout_s=600", timeout=120)
    assert res.returncode != 0 and time.time() - t0 < 60  # not the 600 s collective timeout
    assert "dpo-dist: rank 1 failed in stage 'load': RuntimeError: injected fault" in res.output
    assert res.report is None


@pytest.mark.multiproc
def test_one_rank_copy_perturbed_after_load_is_named_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_TEST_FAULT", "static proofs:1:perturb")
    res = launch_init(tmp_path / "out", timeout=120)
    assert res.returncode == 1
    row = check_row(res.report, "weights: policy == reference")
    assert not row["ok"] and row["failed_ranks"] == [0, 1]
    assert "lm_head.weight" not in row["value"] and "model.norm.weight" in row["value"]
    assert "max abs diff 1" in row["value"]


@pytest.mark.multiproc
def test_reference_with_other_config_and_weights_names_the_keys_and_tensors(tmp_path):
    ref = edited_checkpoint(tmp_path, "ref")
    conf = json.loads((ref / "config.json").read_text())
    conf["rms_norm_eps"] = 1e-5
    (ref / "config.json").write_text(json.dumps(conf))
    tensors = load_file(str(ref / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * torch.tensor(2.0, dtype=torch.bfloat16)
    victim = "model.layers.1.mlp.down_proj.weight"  # and one element deep inside a layer
    tensors[victim].view(-1)[123] += torch.tensor(0.5, dtype=tensors[victim].dtype)
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    res = launch_init(tmp_path / "out", "--reference", str(ref), timeout=120)
    assert res.returncode == 1 and res.report["passed"] is False
    assert "rms_norm_eps" in check_row(res.report, "configs equal")["value"]
    w = check_row(res.report, "weights: policy == reference")
    assert not w["ok"] and w["failed_ranks"] == [0, 1]  # every rank names it, not only the one holding the shard
    assert "2 differ, first: " + victim in w["value"] and "max abs diff" in w["value"]  # norm and the layer's
    assert victim in w["hint"]
    assert "FAIL" in res.terminal and victim in res.terminal
