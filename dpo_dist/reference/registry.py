"""Placement name -> its strategy: the one place that maps names to modules. A new placement is one module
(dpo_dist/reference/<name>.py, a ReferencePlacement subclass), one Placement member (config/names.py) and one line
here."""

from __future__ import annotations

from dpo_dist.config.names import Placement
from dpo_dist.reference.base import ReferencePlacement
from dpo_dist.reference.cpu import CpuPlacement
from dpo_dist.reference.lora import LoraPlacement
from dpo_dist.reference.precomputed import PrecomputedPlacement
from dpo_dist.reference.ranks import RanksPlacement
from dpo_dist.reference.zero3 import Zero3Placement

STRATEGIES: dict[Placement, type[ReferencePlacement]] = {
    cls.name: cls for cls in (Zero3Placement, CpuPlacement, LoraPlacement, PrecomputedPlacement, RanksPlacement)}


def strategy_for(placement: str) -> ReferencePlacement:
    """The strategy of a placement name (config values are plain strings; Placement members are too)."""
    try:
        return STRATEGIES[Placement(placement)]()
    except ValueError:
        known = ", ".join(Placement.values())
        raise ValueError(f"unknown reference.placement {placement!r}: one of {known}") from None
