"""The memory plan before launch: init refuses a layout that cannot fit (naming one that would) before loading
anything, --force overrides, and --dry-run checks a 70B run on the meta device in seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import torch
from conftest import dpo_dist_cli
from safetensors.torch import save_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.plan.presets import PRESETS

CLUSTER = ["--nodes", "1", "--gpus-per-node", "8", "--gpu-mem", "80GB", "--host-mem", "1TB"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return dpo_dist_cli(*args, env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                        timeout=timeout)


def test_dry_run_of_a_70b_preset_goes_through_construction_in_seconds():
    t0 = time.time()
    out = cli("init", "--dry-run", "--model", "llama-3-70b", "--nodes", "2", "--gpus-per-node", "8", "--gpu-mem",
              "80GB", "--host-mem", "2TB", "--sharding", "zero3_offload", "--set", "train.gradient_checkpointing=true",
              "--set", "train.per_device_train_batch_size=1")
    assert time.time() - t0 < 30
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LlamaForCausalLM with 70.554B parameters" in out.stdout
    assert "world 16 = 2 node(s) x 8" in out.stdout and "global batch 1 x 4 x 16 = 64" in out.stdout
    assert "plan: fits" in out.stdout


def test_dry_run_that_cannot_fit_says_what_would():
    out = cli("init", "--dry-run", "--model", "llama-3-70b", *CLUSTER)
    assert out.returncode == 2
    assert "does not fit" in out.stdout and "would fit" in out.stdout and "--force" in out.stdout


def fake_70b_checkpoint(tmp_path):
    """config.json of a 70B model and a tokenizer, with a stand-in weights file: enough to pass preflight, so the
    refusal is shown to come from the plan, before any weight is read."""
    d = tmp_path / "llama70b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PRESETS["llama-3-70b"]))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEFAULT_CHECKPOINT / f, d / f)
    save_file({"placeholder": torch.zeros(1)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_init_refuses_a_layout_that_cannot_fit_before_loading(tmp_path):
    d = fake_70b_checkpoint(tmp_path)
    t0 = time.time()
    out = cli("init", "--model", str(d), "--output-dir", str(tmp_path / "out"), *CLUSTER)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit 1 node(s) x 8 gpu rank(s)" in lines[0] and "would fit" in lines[0]
    assert time.time() - t0 < 30
    assert not (tmp_path / "out" / "report.json").exists()


def test_force_runs_a_layout_the_plan_refuses(tmp_path):
    tiny = ["--nodes", "1", "--gpus-per-node", "1", "--gpu-mem", "1MB", "--host-mem", "1GB",
            "--set", "verify.generation=false"]
    refused = cli("init", "--output-dir", str(tmp_path / "a"), *tiny)
    assert refused.returncode == 2 and "does not fit" in refused.stderr
    forced = cli("init", "--output-dir", str(tmp_path / "b"), "--force", *tiny)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["passed"]


def test_plan_refusal_plans_at_the_datas_padded_length_not_max_length():
    """Issue 23.5: a layout refused at train.max_length 1024 fits at the data's longest tokenized row (82 tokens on
    the embedded data), which is what TRL's collator pads to; the note says which length was used."""
    from dpo_dist.config.schema import from_dict
    from dpo_dist.init.plan_length import replan_at_data_length
    from dpo_dist.plan.refusal import ClusterArgs, plan_for, refusal

    cfg, small = from_dict({}), ClusterArgs(1, 1, 100 * 10**6, 64 * 2**30)
    problem = refusal(*plan_for(cfg, small)[:2])
    assert problem and "GPU" in problem  # at 1024 tokens
    again, note = replan_at_data_length(cfg, small, problem)
    assert again is None and "82 tokens" in note and "max_length 1024" in note
    tiny = ClusterArgs(1, 1, 10**6, 64 * 2**30)  # too small at any length: refused, naming the length used
    again, _ = replan_at_data_length(cfg, tiny, refusal(*plan_for(cfg, tiny)[:2]))
    assert again and "planned at 82 tokens" in again


def test_planner_vs_reality_command_line_is_still_accepted(tmp_path):
    """bench/planner_vs_reality.py runs `init` with these arguments (no --force): init must accept them."""
    sys.path.insert(0, str(DEFAULT_CHECKPOINT.parents[2] / "bench"))
    try:
        from planner_vs_reality import init_args
    finally:
        sys.path.pop(0)
    out = cli("init", "--dry-run", *init_args(str(DEFAULT_CHECKPOINT), tmp_path / "out", 1))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "forward proofs: 2 full-model forwards per rank" in out.stdout  # the verify pass and the KL's reference


def test_replanning_at_the_data_length_keeps_datasets_out_of_the_rank():
    """Issue 23.3: the rows are tokenized in a child process, so datasets/pyarrow (~100 MiB per rank) never enter a
    rank before its models load; the result is the same as measured in-process (82 tokens)."""
    from conftest import heavy_imports

    code = ("from dpo_dist.config.schema import from_dict\n"
            "from dpo_dist.init.plan_length import replan_at_data_length\n"
            "from dpo_dist.plan.refusal import ClusterArgs, plan_for, refusal\n"
            "cfg, small = from_dict({}), ClusterArgs(1, 1, 100 * 10**6, 64 * 2**30)\n"
            "again, note = replan_at_data_length(cfg, small, refusal(*plan_for(cfg, small)[:2]))\n"
            "assert again is None and '82 tokens' in note, (again, note)\n")
    assert "datasets" not in heavy_imports(code)
