"""Gate, then train (issue 26): `dpo-dist launch -- --train` gates and, the gate passed, trains in the same processes
with the trainer it proved; smoke steps leave no trace on the training that follows; checkpoints, resume, the final
policy in Hugging Face format and the training history in report.json, for zero3, lora and precomputed."""

from __future__ import annotations

import pytest
from conftest import launch_init as _launch_init
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiproc]


def launch_init(out, *args):
    return _launch_init(out, *args, timeout=600)  # gate and training in one launch: twice a gate's time

# 3 steps of 2 x 1 pairs per rank, a checkpoint at step 2 (and the last), KL measured and an eval at every other step
RUN = ("--train", "--set", "verify.generation=false", "--set", "train.max_steps=3", "--set", "train.save_steps=2",
       "--set", "train.logging_steps=1", "--set", "kl.every_steps=1", "--set", "train.learning_rate=1e-3",
       "--set", "train.per_device_train_batch_size=2", "--set", "train.gradient_accumulation_steps=1",
       "--set", "train.warmup_ratio=0")


def trained(res, out):
    assert res.returncode == 0, res.output[-6000:]
    rep = res.report
    assert rep["passed"] is True
    t = rep["training"]
    assert t["steps"] == 3 and [e["step"] for e in t["loss"]] == [1, 2, 3]
    assert [e["step"] for e in t["kl"]] == [1, 2, 3] and t["kl_limit"] == 0.1
    assert [e["step"] for e in t["reward_margin"]] == [1, 2, 3]
    assert 2 in [e["step"] for e in t["eval_loss"]]  # the eval set that was given, evaluated every eval_steps
    assert t["checkpoints"] == ["checkpoint-2", "checkpoint-3"]
    for step in (2, 3):  # checkpoints carry the lineage marker and the KL monitor's state
        assert (out / f"checkpoint-{step}" / "dpo_dist_lineage.json").is_file()
        assert (out / f"checkpoint-{step}" / "dpo_dist_beta.json").is_file()
    assert t["plot"] == str(out / "kl_curve.png") and (out / "kl_curve.png").stat().st_size > 0
    final = out / "final"
    assert t["final_dir"] == str(final) and (final / "tokenizer_config.json").is_file()
    assert "training done: 3 steps" in res.terminal
    return rep


def test_zero3_smoke_steps_leave_no_trace_and_resume_continues(tmp_path):
    """The same 3 steps after a gate with smoke steps and after one without: the same losses, KL and final weights,
    bit for bit (the smoke steps ran at another learning rate and moved every weight). Resuming the second run from
    its step-2 checkpoint trains step 3 to the same weights again."""
    a, b = tmp_path / "smoke", tmp_path / "plain"
    res = launch_init(a, *RUN, "--smoke-steps", "1", "--set", "verify.smoke_learning_rate=1e-2")
    rep_a = trained(res, a)
    assert rep_a["facts"]["smoke_losses"]  # the smoke step ran, and passed its rows
    res = launch_init(b, *RUN)
    rep_b = trained(res, b)
    ta, tb = rep_a["training"], rep_b["training"]
    assert ta["loss"] == tb["loss"] and ta["reward_margin"] == tb["reward_margin"]
    assert [e["kl"] for e in ta["kl"]] == [e["kl"] for e in tb["kl"]]
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    start = load_file(str(DEFAULT_CHECKPOINT / "model.safetensors"))
    assert any(not wb[k].equal(start[k]) for k in start)  # and training did move the policy
    # resume from checkpoint-2 of the run without smoke steps: step 3 again, the same weights
    res = launch_init(b, *RUN, "--set", f"train.resume_from={b / 'checkpoint-2'}")
    assert res.returncode == 0, res.output[-6000:]
    tc = res.report["training"]
    assert tc["loss"] == tb["loss"]  # steps 1-2 from the checkpoint's log, step 3 trained again: the same
    wc = load_file(str(b / "final" / "model.safetensors"))
    assert all(wc[k].equal(wb[k]) for k in wb)


@pytest.mark.parametrize("placement", ["lora", "precomputed"])
def test_gate_then_train_checkpoint_and_resume(tmp_path, placement):
    out = tmp_path / "run"
    control = ("--set", "kl.control=adaptive") if placement == "lora" else ()  # adaptive beta through this path too
    res = launch_init(out, *RUN, *control, "--placement", placement, "--smoke-steps", "1")
    rep = trained(res, out)
    if control:
        assert "beta_changes" in rep["training"] and all("lr_scale" in e for e in rep["training"]["kl"])
    final = out / "final"
    if placement == "lora":  # the adapters, loadable with PEFT onto the SFT checkpoint
        assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(final))
        assert model.num_parameters() > 0
    first = rep["training"]["loss"]
    res = launch_init(out, *RUN, *control, "--placement", placement,
                      "--set", f"train.resume_from={out / 'checkpoint-2'}")
    assert res.returncode == 0, res.output[-6000:]
    t = res.report["training"]
    assert [e["step"] for e in t["loss"]] == [1, 2, 3]  # the checkpoint's logged history, then step 3 again
    assert t["loss"][2]["value"] == pytest.approx(first[2]["value"], abs=1e-4)


@pytest.mark.multiproc
def test_training_that_fails_after_a_passed_gate_exits_5(tmp_path):
    """A world of one (cheap; the exit-code contract needs no second rank): the gate passes, training fails (the test
    hook raises at its start), exit 5 and a line saying so; a failed gate (1) would have trained nothing."""
    import sys

    from conftest import run_cmd

    out = tmp_path / "run"
    code, log = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--output-dir", str(out), *RUN],
                        {"DPO_DIST_TEST_FAULT": "training:0", "PYTHONUNBUFFERED": "1"}, 300)
    assert code == 5, log[-4000:]
    assert "quality gate PASSED" in log
    assert "[dpo-dist] training FAILED after a passed gate on rank 0" in log
    assert not (out / "final").exists()
