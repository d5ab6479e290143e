"""model.loader: which loader `dpo-dist init` uses for ZeRO-3 models (dpo_dist.load.fastload or from_pretrained),
decided the same on every rank; fast refuses with one line where auto falls back with a warning."""

from __future__ import annotations

import pytest
from conftest import check_row, launch_init

from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.config.schema import load
from dpo_dist.config.yaml_text import parse_override
from dpo_dist.init.stages import InitRun
from dpo_dist.runtime.distributed import DistContext


def init_run(loader: str, stage: int = 3, *overrides: str, zero: dict | None = None) -> InitRun:
    cfg = load(None, [parse_override(f"model.loader={loader}"), *map(parse_override, overrides)])
    run = InitRun(cfg, DistContext())
    run.state.update(stage=stage, ds={"zero_optimization": {"stage": stage, **(zero or {})}})
    return run


def test_auto_and_fast_plan_the_default_checkpoint_under_zero3():
    for loader in ("auto", "fast"):
        run = init_run(loader)
        plan = run.fast_plan(DEFAULT_CHECKPOINT)
        assert plan is not None and plan.entries and run.rr.facts["loader"] == "fast"


def test_transformers_and_zero2_use_from_pretrained_without_a_warning(capsys):
    run = init_run("transformers")
    assert run.fast_plan(DEFAULT_CHECKPOINT) is None
    assert run.rr.facts["loader"] == "transformers"
    assert run.rr.facts["loader_reason"] == "model.loader: transformers"
    run = init_run("auto", stage=2)
    assert run.fast_plan(DEFAULT_CHECKPOINT) is None and "ZeRO-2" in run.rr.facts["loader_reason"]
    assert "WARNING" not in capsys.readouterr().err


def test_auto_falls_back_with_one_warning_naming_the_cause(capsys):
    run = init_run("auto", 3, "model.dtype=float32")  # the file is bf16: a cast needs from_pretrained
    assert run.fast_plan(DEFAULT_CHECKPOINT, "reference_loader") is None
    assert run.rr.facts["reference_loader"] == "transformers"
    assert "float32" in run.rr.facts["reference_loader_reason"]
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "from_pretrained" in err and "float32" in err
    run = init_run("auto", zero={"offload_param": {"device": "nvme"}})
    assert run.fast_plan(DEFAULT_CHECKPOINT) is None and "NVMe" in run.rr.facts["loader_reason"]


@pytest.mark.parametrize("overrides, stage, cause", [(("model.dtype=float32",), 3, "float32"), ((), 2, "ZeRO-2")])
def test_fast_refuses_in_one_line_with_the_fix(overrides, stage, cause):
    run = init_run("fast", stage, *overrides)
    with pytest.raises(ValueError) as e:
        run.fast_plan(DEFAULT_CHECKPOINT)
    msg = str(e.value)
    assert "\n" not in msg and cause in msg and "model.loader: transformers" in msg


@pytest.mark.multiproc
def test_init_with_the_transformers_loader_reports_it(tmp_path):
    """A real 2-process ZeRO-3 init with model.loader: transformers (the default, fast, is asserted on the README
    demo's report in test_init_multiproc.py)."""
    res = launch_init(tmp_path / "out", "--set", "model.loader=transformers", "--set", "verify.generation=false")
    assert res.returncode == 0, res.output[-6000:]
    facts = res.report["facts"]
    assert facts["zero_stage"] == 3 and facts["loader"] == "transformers", facts.get("loader_reason")
    assert check_row(res.report, "weights: policy == checkpoint files")["ok"]
    assert "from_pretrained" in check_row(res.report, "models loaded")["value"]
