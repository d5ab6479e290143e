"""Every reach into DeepSpeed's (and torch.distributed's, for DeepSpeed's groups) private surface, in one place.

Each public function here says what private name it relies on, the version it is pinned to (PINNED), and when it can
go; tests/test_compat.py fails when the library moves. Nothing here imports deepspeed at import time.
"""

from __future__ import annotations

import functools
from datetime import timedelta

PINNED = "0.19.8"  # the deepspeed release whose private surface is used below (pyproject pins it too)


def reset_zero3_trace(engine) -> None:
    """After forwards outside the training step, release gathered ZeRO-3 parameters and invalidate the prefetch trace:
    otherwise the next training forward follows a stale trace and fails ('Cannot partition a param in flight').

    Relies on the param coordinator's private `_invalidate_trace` (deepspeed 0.19.8); can go when DeepSpeed resets
    the trace itself after forwards run outside the engine's step (or makes invalidation public)."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", opt)
    if offload is None or not hasattr(offload, "get_param_coordinator"):
        return
    offload.empty_partition_cache()
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


def broadcast_free_init_supported() -> bool:
    """Whether NoBroadcastInit may replace `zero.Init._zero_init_param`: only on the pinned deepspeed (another
    version gets the plain zero.Init: correct, slower)."""
    import deepspeed

    return deepspeed.__version__ == PINNED


@functools.cache
def no_broadcast_init_class():
    """`deepspeed.zero.Init` without the broadcast of every new parameter from rank 0 (class built on first use).

    Overrides the private `Init._zero_init_param` and calls the private `_convert_to_deepspeed_param` (deepspeed
    0.19.8); can go if zero.Init gets an option to skip that broadcast for weights that are overwritten anyway."""
    import deepspeed

    class NoBroadcastInit(deepspeed.zero.Init):
        """deepspeed 0.19.8's `Init._zero_init_param` is: `_convert_to_deepspeed_param(param)`, a broadcast of the full
        parameter from the group's first rank (so that random initializations agree), then `param.partition()`. With
        weights left uninitialized and every partition overwritten from the file afterwards, the broadcast only costs
        time (~0.5 s per 443M-parameter model on 2 CPU ranks) and memory on the receiving ranks (gloo's buffers: peaks
        of 1.2-1.45x ideal measured). Pinned: tests/test_compat.py fails if the original method changes."""

        filling = True  # the loader's own build; `end_filling` turns it off once the model is built

        def _zero_init_param(self, param):
            if not self.filling:  # a later conversion through this instance: an engine converts new parameters
                # (LoRA adapters) through a loaded parameter's `convert_to_zero_parameters`, bound to this Init;
                # their values are real and must be broadcast and copied, as the stock Init does
                return super()._zero_init_param(param)
            self._convert_to_deepspeed_param(param)
            _empty_partition(self, param)
            param.partition()

    return NoBroadcastInit


def end_filling(init) -> None:
    """The loader's model is built: from now on parameters converted through `init` (see NoBroadcastInit) get the
    stock `_zero_init_param` (broadcast, then a partition copied from their values)."""
    if hasattr(init, "filling"):
        init.filling = False


def _empty_partition(init, param) -> None:
    """This rank's partition of `param`, allocated and left uninitialized as deepspeed 0.19.8's `_partition_param`
    allocates it (device, dtype, size, attributes), before `param.partition()` runs: that then takes its "already
    partitioned" branch and only frees the full tensor, instead of copying this rank's slice of the freshly built
    (garbage) tensor into a new partition. The fast loader overwrites every partition from the file anyway; the copy
    was 55 % of its time (443M model: the copy reads the never-touched full tensor and writes the partition). NVMe
    and quantized weights are refused by the loader before this runs (fastload._check_init)."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    tensor_size = init._aligned_size(param)
    partition_size = tensor_size // init._partition_world_size(param)
    device = init.local_device if param.ds_persist else init.remote_device
    part = torch.empty(partition_size, dtype=param.dtype, device=device)
    if device == OffloadDeviceEnum.cpu and init.pin_memory:
        part = get_accelerator().pin_memory(part)
    part.requires_grad = False
    param.ds_tensor = part
    part.ds_numel = partition_size
    part.status = PartitionedParamStatus.AVAILABLE
    part.final_location = None
    param.ds_numel_aligned = tensor_size


def zero_init(ds_config: dict, dtype, skip_broadcast: bool):
    """A `zero.Init` context for `ds_config` (NoBroadcastInit when `skip_broadcast`).

    Imports `torch._dynamo` first: imported lazily inside zero.Init it fails with "TypeError: Signature mismatch"
    (torch 2.x with deepspeed 0.19.8); can go when that import order no longer matters."""
    import deepspeed
    import torch._dynamo  # noqa: F401

    cls = no_broadcast_init_class() if skip_broadcast else deepspeed.zero.Init
    return cls(config_dict_or_path=ds_config, dtype=dtype)


def timeout_new_groups(timeout_s: int) -> None:
    """Every process group created from here on (DeepSpeed's engines clone the world group for data parallelism)
    times out after sharding.timeout_s as the world group does: torch gives a new group its module default, 30 min,
    not the world group's timeout, so a stopped rank held its peers for half an hour inside deepspeed.initialize.

    Assigns torch.distributed.distributed_c10d's module defaults `default_pg_timeout` / `default_pg_nccl_timeout`
    (read by its private `_get_default_timeout` at each new_group; torch 2.x); can go when DeepSpeed passes a timeout
    to the groups it creates."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)


def partition_range(numel: int, part: int, rank: int) -> tuple[int, int]:
    """(start, count) of the flat elements that rank `rank` holds of a `numel`-element tensor cut into equal
    partitions of `part` elements (ZeRO-3's layout: the last one padded, ranks past the end hold none)."""
    start = rank * part
    return start, max(0, min(part, numel - start))


def local_partition(p, rank: int):
    """(this rank's partition tensor, flat offset of its first element, count of real elements, full numel) of a
    ZeRO-3 partitioned parameter (`ds_tensor`, `ds_numel`), or None for a parameter DeepSpeed does not partition."""
    part_tensor = getattr(p, "ds_tensor", None)
    if part_tensor is None:
        return None
    numel = int(p.ds_numel)
    start, n = partition_range(numel, part_tensor.numel(), rank)
    return part_tensor, start, n, numel
