"""Adding a reference placement is one module: every Placement member has its strategy in dpo_dist/reference/<name>.py,
registered once, and the init stages never name a placement (they ask the strategy). The stage state is typed: a
mistyped field raises instead of reading None."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dpo_dist.config.names import Placement
from dpo_dist.init.state import InitState
from dpo_dist.reference.base import ReferencePlacement
from dpo_dist.reference.registry import STRATEGIES, strategy_for
from dpo_dist.verify import model_checks
from dpo_dist.verify.report import RankReport

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_dist"
# the modules that run every placement: they ask the strategy and never compare or spell a placement name
PLACEMENT_BLIND = [PACKAGE / "init" / "stages.py", PACKAGE / "init" / "state.py", PACKAGE / "api.py"]


@pytest.mark.parametrize("placement", list(Placement))
def test_every_placement_has_its_own_strategy_module(placement):
    strategy = strategy_for(placement.value)  # the config holds plain strings
    assert isinstance(strategy, ReferencePlacement) and strategy.name is placement
    assert type(strategy).__module__ == f"dpo_dist.reference.{placement.value}"
    for method in ("load", "build_trainer", "check_trainer", "kl_reference"):  # the abstract ones
        assert getattr(type(strategy), method) is not getattr(ReferencePlacement, method), method
    assert set(STRATEGIES) == set(Placement)


def test_an_unknown_placement_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown reference.placement 'gpu'"):
        strategy_for("gpu")


@pytest.mark.parametrize("path", PLACEMENT_BLIND, ids=lambda p: p.name)
def test_stages_never_name_or_compare_a_placement(path):
    tree = ast.parse(path.read_text())
    names = set(Placement.values())
    strategy_modules = {f"dpo_dist.reference.{n}" for n in names}
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        assert not (isinstance(node, ast.Name) and node.id == "Placement"), where
        assert not (isinstance(node, ast.Constant) and node.value in names), f"{where}: {node.value!r}"
        if isinstance(node, ast.ImportFrom):
            assert node.module not in strategy_modules, f"{where}: imports {node.module}"
            assert not {a.name for a in node.names} & names, f"{where}: imports a placement module"
        if isinstance(node, ast.Compare):  # `... .placement == x`, `x in (...)` on a placement
            sides = [node.left, *node.comparators]
            assert not any(isinstance(s, ast.Attribute) and s.attr == "placement" for s in sides), where


def test_stage_state_refuses_a_mistyped_field():
    state = InitState()
    state.update(stage=3, ds={})
    assert state.stage == 3 and state.remote is None
    with pytest.raises(TypeError, match="no field referense"):
        state.update(referense=object())
    with pytest.raises(AttributeError):
        state.referense = object()


def test_shared_rows_keep_their_names_values_and_hints():
    rr = RankReport(0)
    fp = {"a": "1", "b": "2"}
    assert model_checks.weights_equal(fp, dict(fp), rr, note=" (reference fingerprinted on its own ranks)")
    assert not model_checks.weights_equal(fp, {"a": "1", "b": "3"}, rr, gap=lambda name: 0.5)
    assert model_checks.reference_unmoved(fp, dict(fp), rr)
    assert not model_checks.reference_unmoved(fp, {"a": "9", "b": "2"}, rr, " (reference ranks)")
    rows = [(c.name, c.ok, c.value) for c in rr.checks]
    assert rows == [
        ("weights: policy == reference", True, "2 tensors bitwise equal (reference fingerprinted on its own ranks)"),
        ("weights: policy == reference", False, "1 differ, first: b (max abs diff 0.5)"),
        ("no reference parameter moved", True, "2 reference tensors unchanged"),
        ("no reference parameter moved (reference ranks)", False, "1 changed, e.g. a")]
    assert "first differing tensor: b" in rr.checks[1].hint


def test_shared_rows_are_written_once():
    """Each shared row is written in one place (verify/model_checks.py), not again in a placement or a stage."""
    for path in [*PACKAGE.joinpath("reference").glob("*.py"), *PACKAGE.joinpath("init").glob("*.py")]:
        src = path.read_text()
        for row in ('"policy trainable"', '"configs equal"', '"weights: policy == reference"',
                    '"no reference parameter moved'):
            assert row not in src, f"{path.name} writes {row} itself"
