"""Every reach into accelerate's private surface, in one place (pinned to PINNED; tests/test_compat.py fails when it
moves). Nothing here imports accelerate at import time."""

from __future__ import annotations

import functools

PINNED = "1.15.0"  # the accelerate release whose internals are mirrored below (pyproject pins it too)
_MARK = "dpo_dist_fsdp_on_cpu"


def fsdp_on_cpu() -> bool:
    """Make accelerate honour an FSDP plugin on CPU processes (gloo), as it does on GPUs; True if this call
    installed it.

    accelerate 1.15's `AcceleratorState.__init__` enters its FSDP branch only for GPU-like distributed types: on CPU
    the state stays MULTI_CPU and the FSDP settings are silently dropped, so TRL trains an unsharded model. The
    wrapper runs the original, then, only when it left MULTI_CPU with an FSDP plugin given, does what the GPU
    branch does: distributed_type FSDP, the plugin's mixed precision, the plugin kept. GPU states are untouched
    (accelerate's own branch ran). Mirrors the branch `if (os.environ.get("ACCELERATE_USE_FSDP" ...) or fsdp_plugin
    is not None)` of AcceleratorState.__init__ (accelerate 1.15), and its last line (PartialState's type set to the
    state's); can go when accelerate takes FSDP on CPU."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, _MARK, False):
        return False

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # a later AcceleratorState() (no arguments) copies PartialState's MULTI_CPU back over the shared state (seen
        # in TRL's precompute pass): the plugin kept in the shared state then restores FSDP
        plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self.mixed_precision != "no":
                plugin.set_mixed_precision(self.mixed_precision)
            self.fsdp_plugin = plugin
            # as the GPU branch ends: every later AcceleratorState() (accelerate's optimizer wrapper makes one) copies
            # PartialState's type over this state; left MULTI_CPU, training after prepare ran with accelerate's
            # non-FSDP paths (its FSDP2 state-dict gather, the trainer's FSDP checks)
            PartialState._shared_state["distributed_type"] = self.distributed_type

    setattr(wrapped, _MARK, True)
    AcceleratorState.__init__ = wrapped
    return True
