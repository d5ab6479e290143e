"""Gate, then train (issue 26), the parts that need no launch: the training schedule in the typed config and what
DPOConfig gets from it, the sbatch gate-then-train job's script and exit code, and `dpo-dist plan`'s recommended
config keys (the shipped 70B/8x8 example is that recommendation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpo_dist.config.schema import ConfigError, from_dict, to_dict
from dpo_dist.config.trl_args import dpo_config_kwargs
from dpo_dist.launch.sbatch import SlurmSpec, render_sbatch, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_training_schedule_defaults_reach_dpo_config():
    cfg = from_dict({})
    kw = dpo_config_kwargs(cfg, {})
    assert kw["num_train_epochs"] == 1.0 and kw["max_steps"] == -1
    assert kw["lr_scheduler_type"] == "cosine" and kw["warmup_steps"] == 0.1  # a ratio, as transformers 5 reads it
    assert kw["save_total_limit"] == 2  # checkpoints capped unless the user says otherwise
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == cfg.train.save_steps  # the eval set is evaluated
    assert dpo_config_kwargs(from_dict({"data": {"eval": None}}), {})["eval_strategy"] == "no"
    t = to_dict(cfg)["train"]  # in the printed resolved config
    assert {"num_train_epochs", "max_steps", "warmup_ratio", "lr_scheduler_type", "eval_strategy", "eval_steps",
            "save_total_limit"} <= set(t)
    # the smoke steps keep their own schedule
    smoke = dpo_config_kwargs(cfg, {}, smoke_steps=2)
    assert smoke["max_steps"] == 2 and smoke["eval_strategy"] == "no"


@pytest.mark.parametrize("train, needle", [
    ({"max_steps": 0}, "train.max_steps"),
    ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
    ({"save_total_limit": 0}, "train.save_total_limit"),
    ({"lr_scheduler_type": "cosin"}, "train.lr_scheduler_type"),
    ({"extra": {"max_steps": 3}}, "train.extra"),  # first-class now: extra must not set it
])
def test_bad_training_settings_are_named(train, needle):
    with pytest.raises(ConfigError) as e:
        from_dict({"train": train})
    assert needle in e.value.one_line()


def test_eval_strategy_needs_an_eval_set():
    with pytest.raises(ConfigError, match="needs an eval set"):
        from_dict({"train": {"eval_strategy": "steps"}, "data": {"eval": None}})


def test_sbatch_train_job_gates_then_trains():
    spec = SlurmSpec(config_file="/r/c.yaml", report="/r/report.json", log_dir="/r/logs", workdir="/w", train=True)
    text = render_sbatch(spec)
    assert "-m dpo_dist init --sharding zero3 --config /r/c.yaml --train" in " ".join(text.split())
    assert "5 training failed after a passed gate" in text
    assert text.rstrip().endswith('"$REPORT" "$SRUN_EXIT" "$BEFORE" train')
    gate_only = render_sbatch(SlurmSpec(config_file="/r/c.yaml", report="/r/report.json", log_dir="/r/logs",
                                        workdir="/w"))
    assert "--train" not in gate_only and gate_only.rstrip().endswith('"$BEFORE"')


def test_train_job_exit_code_says_which_part_failed(tmp_path, capsys):
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps({"passed": True, "world_size": 2, "checks": []}))
    assert verdict(str(rep), 1, "none", "train") == 5  # gate passed, training did not finish
    assert "training FAILED after a passed gate" in capsys.readouterr().out.strip().splitlines()[-1]
    rep.write_text(json.dumps({"passed": True, "world_size": 2, "checks": [],
                               "training": {"steps": 3, "final_dir": "/r/final"}}))
    assert verdict(str(rep), 0, "none", "train") == 0
    assert "training done (3 steps)" in capsys.readouterr().out
    rep.write_text(json.dumps({"passed": False, "world_size": 2, "checks": [
        {"check": "initial KL < limit", "ok": False, "value": "0.3", "failed_ranks": [0]}]}))
    assert verdict(str(rep), 1, "none", "train") not in (0, 5)  # the gate's failure, not training's
    assert "quality gate FAILED" in capsys.readouterr().out


def test_plan_prints_and_writes_the_recommended_config_and_the_70b_example_is_it(tmp_path, capsys):
    from dpo_dist.cli.main import main

    target = tmp_path / "start.yaml"
    argv = ["plan", "--model", "llama-3-70b", "--nodes", "8", "--gpus-per-node", "8", "--gpu-mem", "80GB",
            "--host-mem", "2TB", "--write-config", str(target)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended: ZeRO-3 ckpt ref:zero3" in out
    assert "gradient_checkpointing: true" in out
    assert "global batch: 4 x 4 x 64 policy ranks = 1,024" in out
    written = yaml.safe_load(target.read_text())
    assert written["train"]["gradient_checkpointing"] is True and written["sharding"] == {"name": "zero3"}
    assert main(argv) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    example = yaml.safe_load((ROOT / "examples" / "my_run.yaml").read_text())
    for section, keys in written.items():  # the shipped 70B example is that layout
        for key, value in keys.items():
            assert example[section][key] == value, (section, key)
    assert main([*argv[:-2], "--config", str(ROOT / "examples" / "my_run.yaml")]) == 0
    assert "your config" in (out := capsys.readouterr().out) and "ZeRO-3 ckpt ref:zero3 fits" in out
