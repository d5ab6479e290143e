"""Resume lineage (issue 13.4): the marker names the run, the policy path is the one init started from, and the
first resumed loss stays within the run's own logged spread."""

from __future__ import annotations

import json

import pytest

from dpo_dist.verify import lineage

FP_REF = {"a": "01" * 16, "b": "02" * 16}
FP_POL = dict(FP_REF)


def checkpoint(tmp_path, identity, losses, marker=True):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir(parents=True)
    if marker:
        lineage.write_marker(ckpt, identity, 4)
    history = [{"loss": x, "step": i + 1} for i, x in enumerate(losses)] + [{"train_runtime": 1.0}]
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return ckpt


def test_marker_of_this_run_passes(tmp_path):
    ident = lineage.new_identity(FP_REF, FP_POL)
    assert lineage.check_checkpoint(checkpoint(tmp_path, ident, [0.69]), ident, FP_POL) == []


def test_checkpoint_without_marker_is_refused(tmp_path):
    ident = lineage.new_identity(FP_REF, FP_POL)
    problems = lineage.check_checkpoint(checkpoint(tmp_path, ident, [0.69], marker=False), ident, FP_POL)
    assert problems and lineage.MARKER in problems[0] and "not saved by a dpo-dist run" in problems[0]


@pytest.mark.parametrize("what", ["reference_digest", "policy_digest", "run_id"])
def test_checkpoint_of_another_run_is_refused(tmp_path, what):
    ident = lineage.new_identity(FP_REF, FP_POL)
    other = {**ident, what: "f" * 32}
    problems = lineage.check_checkpoint(checkpoint(tmp_path, other, [0.69]), ident, FP_POL)
    assert len(problems) == 1 and "saved by another run" in problems[0] and what in problems[0]


def test_another_policy_path_is_refused(tmp_path):
    ident = lineage.new_identity(FP_REF, FP_POL)
    ckpt = checkpoint(tmp_path, ident, [0.69])
    problems = lineage.check_checkpoint(ckpt, ident, {**FP_POL, "b": "03" * 16})
    assert problems and "model.path does not hold the policy this run started from" in problems[0]


def test_manifest_without_identity_is_refused(tmp_path):
    ident = lineage.new_identity(FP_REF, FP_POL)
    assert "no run identity" in lineage.check_checkpoint(checkpoint(tmp_path, ident, [0.69]), None, FP_POL)[0]


def test_digest_depends_on_every_fingerprint_and_name():
    base = lineage.digest(FP_REF)
    assert lineage.digest(dict(reversed(FP_REF.items()))) == base
    assert lineage.digest({**FP_REF, "b": "03" * 16}) != base
    assert lineage.digest({"a": FP_REF["a"], "c": FP_REF["b"]}) != base


def test_loss_tolerance_is_the_runs_own_spread():
    # the last 8 losses lie within 0.05 of the last one; the largest logged step change is 0.04
    losses = [0.6931, 0.69, 0.67, 0.66, 0.65, 0.64, 0.62, 0.61, 0.60, 0.60]
    assert lineage.loss_tolerance(losses) == pytest.approx(0.07 + 0.02)
    assert lineage.loss_tolerance([0.6931]) is None and lineage.loss_tolerance([]) is None


def test_resumed_loss_near_the_last_passes_and_far_fails(tmp_path):
    """The numbers of a real run (HOT smoke steps, checkpoint-4): continuing gives ~the next logged loss; the issue's
    foreign checkpoint gave 13.7."""
    ident = lineage.new_identity(FP_REF, FP_POL)
    ckpt = checkpoint(tmp_path, ident, [0.6931, 0.6862, 0.6725, 0.6522])
    near = lineage.check_resumed_loss(ckpt, [0.6262, 0.59])
    assert near["ok"], near
    far = lineage.check_resumed_loss(ckpt, [13.7])
    assert not far["ok"] and "13.7000" in far["value"] and "tolerance" in far["value"]


def test_resumed_loss_with_one_logged_loss_says_it_was_not_checked(tmp_path):
    ident = lineage.new_identity(FP_REF, FP_POL)
    row = lineage.check_resumed_loss(checkpoint(tmp_path, ident, [0.6931]), [13.7])
    assert row["ok"] and row["value"].startswith("not checked: 1 logged loss")


# -- for real: `dpo-dist init` runs (a world of one each), trainer checkpoints, resumes ------------------------------
def init(out, *args, model=None, lr="2e-3"):
    from conftest import init_single

    return init_single(out, "--set", "verify.generation=false", "--set", f"verify.smoke_learning_rate={lr}",
                       "--set", "train.extra.save_strategy=steps", "--set", "train.save_steps=2", *args,
                       *(["--model", str(model)] if model is not None else []))


def another_model_same_shape(dst):
    """Another trained model of exactly the embedded checkpoint's shape: its weights plus Gaussian noise of half each
    matrix's spread (it still reads text in order: the tokenizer check passes on it, ratio 0.135 measured)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    shutil.copytree(DEFAULT_CHECKPOINT, dst)
    gen = torch.Generator().manual_seed(3)
    tensors = load_file(str(dst / "model.safetensors"))
    for name, t in tensors.items():
        if t.dim() > 1:
            noise = 0.5 * t.float().std() * torch.randn(t.shape, generator=gen)
            tensors[name] = (t.float() + noise).to(t.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_from_this_run_passes_and_from_another_model_fails(tmp_path):
    import shutil

    from conftest import check_row

    run = tmp_path / "run"
    code, log, first = init(run, "--smoke-steps", "4")
    assert code == 0, log[-4000:]
    ident = json.loads((run / "reference_manifest.json").read_text())["lineage"]
    for step in (2, 4):
        marker = json.loads((run / f"checkpoint-{step}" / lineage.MARKER).read_text())
        assert marker == {**ident, "step": step}
    # 1. this run's checkpoint: belongs, and the resumed losses continue it (within the logged spread)
    code, log, rep = init(run, "--smoke-steps", "4", "--set", f"train.resume_from={run / 'checkpoint-2'}")
    assert code == 0, log[-4000:]
    assert check_row(rep, "resume checkpoint belongs to this run")["ok"]
    row = check_row(rep, "resumed loss continues the run")
    assert row["ok"] and "tolerance" in row["value"], row
    print("resumed loss row, this run:", row["value"])
    assert rep["facts"]["smoke_losses"] == pytest.approx(first["facts"]["smoke_losses"][2:], abs=1e-4)
    # 2. a checkpoint trained from another model of the same shape, by another dpo-dist run: refused before training
    other = tmp_path / "other"
    code, log, _ = init(other, "--smoke-steps", "2", model=another_model_same_shape(tmp_path / "another"),
                          lr="1e-2")  # its norms sit where a bf16 step of 2e-3 does not move them
    assert code == 0, log[-4000:]
    code, log, rep = init(run, "--smoke-steps", "4", "--set", f"train.resume_from={other / 'checkpoint-2'}")
    assert code == 1
    row = check_row(rep, "resume checkpoint belongs to this run")
    assert not row["ok"] and "saved by another run" in row["value"]
    assert "resumed training ran" not in [r["check"] for r in rep["checks"]]  # stopped before training
    # 3. the same foreign weights with this run's marker and trainer state copied in: the loss gives it away
    forged = tmp_path / "forged" / "checkpoint-2"
    shutil.copytree(other / "checkpoint-2", forged)
    for name in (lineage.MARKER, "trainer_state.json"):
        shutil.copy(run / "checkpoint-2" / name, forged / name)
    code, log, rep = init(run, "--smoke-steps", "4", "--set", f"train.resume_from={forged}")
    assert code == 1, log[-4000:]
    assert check_row(rep, "resume checkpoint belongs to this run")["ok"]
    row = check_row(rep, "resumed loss continues the run")
    assert not row["ok"] and "tolerance" in row["value"], row
    print("resumed loss row, forged:", row["value"])
