"""What one rank holds of a parameter, whatever shards it: the local view every proof reads (fingerprints, finite
scans, byte counts) without gathering anything.

The view is a property of the tensor, not of a global setting: a ZeRO-3 parameter carries `ds_tensor`, an FSDP2 one is
a DTensor, anything else is replicated and each rank takes a 1/world slice of it. Asking the tensor keeps a DTensor
from ever taking the replicated branch (where its global numel would be counted as local bytes and slicing it could
gather).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dpo_dist.compat.deepspeed import local_partition, partition_range


class LocalView(NamedTuple):
    flat: torch.Tensor  # this rank's elements, 1-D, in the parameter's stored dtype
    start: int  # flat offset of flat[0] in the whole tensor
    numel: int  # the whole tensor's element count


def is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def dtensor_view(p) -> LocalView:
    """An FSDP2 parameter: DTensor sharded on dim 0 over a 1-D mesh. Its local shard is a contiguous row range
    (torch.chunk's split: ceil(rows / world) rows per rank, the last ranks fewer or none), so its flat offset is
    first_row x row numel. Any other placement is refused, not guessed."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    local = p.to_local()
    numel = p.numel()
    if placements == (Replicate(),):
        start, n = partition_range(numel, -(-numel // p.device_mesh.size()), p.device_mesh.get_local_rank())
        return LocalView(local.detach().reshape(-1)[start:start + n], start, numel)
    if placements != (Shard(0),) or p.device_mesh.ndim != 1:
        raise ValueError(f"a DTensor parameter placed {placements} on a {p.device_mesh.ndim}-D mesh: dpo-dist proves "
                         "Shard(0) parameters on a 1-D mesh only (FSDP2's default; no shard_placement_fn)")
    rows = p.shape[0] if p.dim() else 1
    per = -(-rows // p.device_mesh.size())
    first = min(rows, per * p.device_mesh.get_local_rank())
    row_numel = numel // rows if rows else 0
    want = max(0, min(per, rows - first))
    if (local.shape[0] if local.dim() else 1) != want:
        raise ValueError(f"a DTensor shard of {want} rows was expected on this rank, it holds {tuple(local.shape)}: "
                         "an uneven split dpo-dist does not know")
    return LocalView(local.detach().reshape(-1), first * row_numel, numel)


def local_view(p, rank: int, world: int) -> LocalView:
    """This rank's part of parameter `p` (rank and world of the replicated slice; sharded parameters say theirs)."""
    part = local_partition(p, rank)
    if part is not None:  # ZeRO-3 partitioned parameter (the padded tail is not part of the view)
        ds_tensor, start, n, numel = part
        return LocalView(ds_tensor.data.reshape(-1)[:n], start, numel)
    if is_dtensor(p):
        return dtensor_view(p)
    numel = p.numel()
    start, n = partition_range(numel, -(-numel // world), rank) if world > 1 else (0, numel)
    return LocalView(p.data.reshape(-1)[start:start + n], start, numel)


def full_numel(p) -> int:
    """The whole parameter's element count (a ZeRO-3 parameter's own numel is 0 outside a gather)."""
    return int(getattr(p, "ds_numel", p.numel()))


def held(p) -> torch.Tensor:
    """The storage this rank holds for `p`: its ZeRO-3 partition, its FSDP2 local shard, or the tensor itself."""
    ds_tensor = getattr(p, "ds_tensor", None)
    if ds_tensor is not None:
        return ds_tensor
    return p.to_local() if is_dtensor(p) else p.data


def local_bytes(model) -> int:
    """Bytes of parameter data this rank actually holds."""
    return sum(t.numel() * t.element_size() for t in map(held, model.parameters()))


def is_sharded(model) -> bool:
    """Whether any parameter is sharded across ranks (then forwards are collectives: every rank runs the same
    number of them)."""
    return any(hasattr(p, "ds_tensor") or is_dtensor(p) for p in model.parameters())
