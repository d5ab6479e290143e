"""The Python entry point (dpo_dist.api.prepare) in a real training script under accelerate launch: init, the gate,
then training with the returned DPOTrainer. With the reference on separate ranks, those ranks keep serving while the
script trains and end with it."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT, free_port, run_cmd
from safetensors.torch import load_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.multiproc


def test_training_script_trains_past_init_with_reference_ranks(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    # a smoke step in the gate (issue 26: the training that followed crashed in accelerate's DeepSpeed backward)
    cfg.write_text(f"verify:\n  smoke_steps: 1\nreference:\n  placement: ranks\ntrain:\n  output_dir: {out}\n"
                   "  learning_rate: 1.0e-3\n"
                   "  per_device_train_batch_size: 2\n  gradient_accumulation_steps: 1\n  save_steps: 3\n"
                   "  max_steps: 3\n  logging_steps: 1\n")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/zero3.yaml"),
            "--deepspeed_config_file", str(ROOT / "ds_configs/zero3.json"), "--num_processes", "3",
            "--main_process_port", str(free_port()), str(ROOT / "examples/train_after_init.py"), str(cfg)]
    code, output = run_cmd(argv, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, 300)
    assert code == 0, output[-5000:]  # every process, the reference rank included, ended cleanly
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and rep["facts"]["policy_ranks"] == 2
    # three steps trained after init, through the reference rank (TRL's logged loss moved off ln 2)
    assert (out / "checkpoint-3").is_dir()
    assert "'train_loss'" in output
    assert rep["training"]["steps"] == 3 and len(rep["training"]["loss"]) == 3  # api.train's history
    trained = load_file(str(out / "final" / "model.safetensors"))  # the trained policy, Hugging Face format
    start = load_file(str(DEFAULT_CHECKPOINT / "model.safetensors"))
    assert any(not trained[k].equal(start[k]) for k in start if k in trained)
