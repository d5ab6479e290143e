"""Reads of torch FSDP2's private state (pinned to torch PINNED; tests/test_compat.py fails when it moves). FSDP2's
public API can set reshard-after-forward and mixed precision (`fully_shard` arguments, `set_reshard_after_forward`)
but not read them back, and the wrap audit must report what each unit really does, not what we asked for."""

from __future__ import annotations

PINNED = "2.13"  # torch minor release whose FSDP2 internals are read below


def unit_settings(module) -> dict:
    """What one FSDP2 unit (an FSDPModule) does: whether it frees its gathered parameters after forward, and its
    mixed-precision policy's dtypes. Reads FSDPModule._get_fsdp_state(), FSDPState._fsdp_param_groups and
    FSDPParamGroup.post_forward_mesh_info / mp_policy (torch 2.13); can go when FSDPModule exposes them."""
    groups = module._get_fsdp_state()._fsdp_param_groups
    if not groups:  # a unit that manages no parameter of its own
        return {"params": 0, "reshard_after_forward": None, "param_dtype": None, "reduce_dtype": None}
    g = groups[0]
    return {"params": sum(len(x.fsdp_params) for x in groups),
            "reshard_after_forward": g.post_forward_mesh_info is not None,
            "param_dtype": g.mp_policy.param_dtype, "reduce_dtype": g.mp_policy.reduce_dtype}


def settle_root(module) -> None:
    """Make `module` the root of its FSDP2 units now, instead of at its first forward. FSDP2 picks the root lazily, as
    the first unit to run forward; a PeftModel's generate() calls the inner Hugging Face model directly, which would
    become the root and the PeftModel's later forwards then fail ("requires running forward through the root module
    first"). Calls FSDPModule._get_fsdp_state()._lazy_init() (torch 2.13), what the root's first forward calls; can go
    when FSDP2 lets a caller name the root."""
    module._get_fsdp_state()._lazy_init()
