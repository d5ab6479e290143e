"""Gate, then train, under FSDP2 (issue 22, item 6): `dpo-dist launch --sharding fsdp2 -- --train` on 2 CPU processes
trains the trainer the gate proved, saves DCP-sharded checkpoints with the lineage marker, exports the trained policy
as Hugging Face safetensors, resumes re-verified, and refuses a checkpoint of another run. Two launches (train, resume)
and one world of one (the refusal: it stops in the static proofs, before anything trains)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import check_row, launch_init, run_cmd
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiproc]

# 3 steps of 2 x 1 pairs per rank, a checkpoint at step 2 (and the last), KL measured at every step. The smoke steps
# rehearse the same 3 steps under the same schedule (linear decay from the same learning rate, no warmup): training
# after the gate must then repeat them bit for bit, which it does only if dpo_dist.train.rewind put back the weights,
# the RNGs (the batch order) and a fresh optimizer and scheduler.
RUN = ("--train", "--set", "verify.generation=false", "--set", "train.max_steps=3", "--set", "train.save_steps=2",
       "--set", "train.logging_steps=1", "--set", "kl.every_steps=1", "--set", "train.learning_rate=1e-3",
       "--set", "train.lr_scheduler_type=linear", "--set", "train.per_device_train_batch_size=2",
       "--set", "train.gradient_accumulation_steps=1", "--set", "train.warmup_ratio=0")
SMOKE = ("--smoke-steps", "3", "--set", "verify.smoke_learning_rate=1e-3")


def _launch(out, *args):
    return launch_init(out, *args, sharding="fsdp2", timeout=600)


def _dcp_model(checkpoint, tmp_path) -> dict[str, torch.Tensor]:
    """The policy a DCP checkpoint holds (torch's own consolidation, no process group): the fp32 master."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp_path / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "pytorch_model_fsdp_0"), str(dst))
    return torch.load(dst)["model"]


def test_fsdp2_gate_then_train_checkpoints_exports_and_resumes_reverified(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT
    from dpo_dist.verify import lineage

    out = tmp_path / "run"
    res = _launch(out, *RUN, *SMOKE)
    assert res.returncode == 0, res.output[-6000:]
    rep = res.report
    assert rep["passed"] is True and check_row(rep, "trainer reference is the sharded one")["ok"]
    t, facts = rep["training"], rep["facts"]
    assert t["steps"] == 3 and [e["step"] for e in t["loss"]] == [1, 2, 3]
    assert "training done: 3 steps" in res.terminal
    # rewind: the training after the gate repeats the smoke steps bit for bit (losses, KL, reward margins)
    assert [e["value"] for e in t["loss"]] == facts["smoke_losses"]
    assert [(e["kl"], e.get("reward_margin")) for e in t["kl"]] == \
        [(e["kl"], e.get("reward_margin")) for e in facts["kl_history"]]
    assert t["loss"][0]["value"] == pytest.approx(0.693147, abs=1e-6) and t["loss"][2]["value"] < 0.69
    # checkpoints: DCP, one shard file per rank for the model and the optimizer, with this run's marker
    ident = json.loads((out / "reference_manifest.json").read_text())["lineage"]
    assert t["checkpoints"] == ["checkpoint-2", "checkpoint-3"]
    for step in (2, 3):
        ckpt = out / f"checkpoint-{step}"
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not list(ckpt.glob("*.safetensors"))  # no gathered copy in a checkpoint
        assert json.loads((ckpt / lineage.MARKER).read_text()) == {**ident, "step": step}
        assert (ckpt / "dpo_dist_beta.json").is_file()
    # the export: from_pretrained loads it, and it is the trained policy (checkpoint-3's fp32 master) in model.dtype
    final = out / "final"
    exported = load_file(str(final / "model.safetensors"))
    master = _dcp_model(out / "checkpoint-3", tmp_path)
    assert exported.keys() == master.keys()
    assert all(v.dtype == torch.bfloat16 and v.equal(master[k].to(torch.bfloat16)) for k, v in exported.items())
    start = load_file(str(DEFAULT_CHECKPOINT / "model.safetensors"))
    assert all(not master[k].equal(start[k].to(master[k].dtype)) for k in start)  # every tensor trained
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert all(p.equal(exported[n].to(p.dtype)) for n, p in model.state_dict().items())
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (final / "tokenizer_config.json").is_file()

    # a checkpoint of another init (its marker names another run id): refused before anything trains, exit 1. A world
    # of one: the lineage check runs in the static proofs, whatever the world
    other = tmp_path / "other" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", other)
    (other / lineage.MARKER).write_text(json.dumps({**ident, "run_id": "0" * 32, "step": 2}))
    code, log = run_cmd([sys.executable, "-m", "dpo_dist", "init", "--sharding", "fsdp2", "--output-dir", str(out),
                         *RUN, "--set", f"train.resume_from={other}"], {"PYTHONUNBUFFERED": "1"}, 300)
    refused = json.loads((out / "report.json").read_text())
    row = check_row(refused, "resume checkpoint belongs to this run")
    assert code == 1 and not row["ok"] and "saved by another run (another init" in row["value"], log[-3000:]
    assert "training" not in refused and "resumed training ran" not in [r["check"] for r in refused["checks"]]

    # resume from this run's checkpoint-2: re-verified, and step 3 trains again to the same loss and weights, bitwise
    res = _launch(out, *RUN, "--set", f"train.resume_from={out / 'checkpoint-2'}")
    assert res.returncode == 0, res.output[-6000:]
    resumed = res.report
    for name in ("reference == init manifest", "resume checkpoint belongs to this run"):
        assert check_row(resumed, name)["ok"], check_row(resumed, name)
    assert resumed["training"]["loss"] == t["loss"]  # steps 1-2 from the checkpoint's log, step 3 trained again
    again = load_file(str(final / "model.safetensors"))
    assert again.keys() == exported.keys() and all(again[k].equal(exported[k]) for k in exported)
    marker = json.loads((out / "checkpoint-3" / lineage.MARKER).read_text())
    assert marker == {**ident, "step": 3}  # the resumed run's checkpoints carry the same identity
