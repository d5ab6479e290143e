"""Prove policy, reference and checkpoint files hold bitwise equal weights, without gathering any parameter.

Each rank fingerprints only what it holds (dpo_dist.sharding.views): under ZeRO-3 its partition `p.ds_tensor` (flat
elements [rank*part, rank*part + n); the padded tail is skipped), under FSDP2 its DTensor's local Shard(0) rows (a
contiguous flat range), otherwise a 1/world slice of the replicated tensor; for the files, a 1/world slice read with
one pread (the split does not matter). Fingerprints add over positions, so one all-reduce per source yields the
fingerprint of every whole tensor on every rank, and every rank reaches the same verdict.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpo_dist.load.checkpoint import TensorEntry, read_elements, tensor_index
from dpo_dist.load.key_mapping import FileAccount, account, file_key_for
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.sharding import views
from dpo_dist.verify.fingerprint import (
    fingerprint_bytes,
    fingerprint_flat,
    fingerprint_hex,
    fingerprint_scan,
    shard_range,
)


def local_slice(p: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, int, int]:
    """(this rank's flat elements, their offset in the whole tensor, the whole tensor's numel)."""
    return tuple(views.local_view(p, ctx.rank, ctx.world_size))


def compare_dtype(model, p) -> torch.dtype:
    """The dtype a parameter is proved in: its own, except an FSDP2 fp32 master copy upcast from a 16-bit checkpoint
    (accelerate's and dpo_dist.sharding.fsdp2's policy under bf16 mixed precision), which is compared in the dtype
    the model was loaded in (model.config.dtype): bf16 -> fp32 is exact, so casting back is lossless and a policy
    equal to its bf16 reference and files stays bitwise equal; fingerprinting the fp32 bits would differ from both."""
    if p.dtype != torch.float32 or not p.requires_grad or not views.is_dtensor(p):
        return p.dtype  # a frozen fp32 reference is no master copy: it is proved in fp32, and fails against bf16
    loaded = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(loaded, str):
        loaded = getattr(torch, loaded, None)
    return loaded if loaded in (torch.bfloat16, torch.float16) else p.dtype


def param_meta(model) -> dict[str, tuple[torch.dtype, int]]:
    """name -> (dtype it is proved in, full numel), for every parameter, partitioned or not."""
    return {n: (compare_dtype(model, p), views.full_numel(p)) for n, p in model.named_parameters()}


def _reduce(names: list[str], local: list[torch.Tensor], ctx: DistContext,
            nonfinite: dict[str, int] | None = None) -> dict[str, str]:
    """One all-reduce for every tensor's fingerprint ([N, 2], or [N, 3] with the non-finite counts, which go into
    `nonfinite` for the tensors that have any)."""
    if not names:
        return {}
    stacked = torch.stack([t.cpu() for t in local])  # [N, 2 or 3] int64
    total = ctx.all_reduce(stacked, "sum")
    if nonfinite is not None and total.shape[1] > 2:
        nonfinite.update({n: int(total[i, 2]) for i, n in enumerate(names) if int(total[i, 2])})
    return {n: fingerprint_hex(total[i]) for i, n in enumerate(names)}


def _progress(items: Iterable, ctx: DistContext, desc: str | None):
    """A progress bar on rank 0 only (the others stay quiet), when a description is given."""
    if not desc:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not ctx.is_main, leave=False)


def model_fingerprints(model, ctx: DistContext, desc: str | None = None,
                       nonfinite: dict[str, int] | None = None, stored: bool = False) -> dict[str, str]:
    """Every parameter's fingerprint, in the dtype it is proved in (compare_dtype; `stored`: in the dtype it is
    kept in, to see a change below the checkpoint dtype's resolution); given a dict, `nonfinite` also receives name
    -> count of inf/NaN elements for the parameters that hold any (counted in the same pass, all-reduced with the
    fingerprints)."""
    names, local = [], []
    for name, p in _progress(list(model.named_parameters()), ctx, desc):
        flat, start, _ = local_slice(p, ctx)
        want = p.dtype if stored else compare_dtype(model, p)
        if flat.dtype != want:
            flat = flat.to(want)
        names.append(name)
        local.append(fingerprint_flat(flat, start) if nonfinite is None else fingerprint_scan(flat, start))
    return _reduce(names, local, ctx, nonfinite)


@dataclass
class FileProof:
    """The checkpoint files as the model sees them: fingerprints by parameter name, what could not be compared."""

    fingerprints: dict[str, str]
    missing: list[str]  # parameters with no file tensor of their shape
    account: FileAccount  # where every file tensor goes and every model tensor comes from
    converted: list[str] = field(default_factory=list)  # parameters transformers builds by transforming file values
    nonfinite: dict[str, int] = field(default_factory=dict)  # file key -> inf/NaN elements


def file_proof(ckpt: Path, model, ctx: DistContext, desc: str | None = None) -> FileProof:
    """Fingerprints of the files' tensors under the parameter names transformers loads them into (its own key
    renaming and tying), each rank reading its own slice, plus the account of every file and model tensor."""
    index = tensor_index(ckpt)
    acct = account(model, index)
    meta = param_meta(model)
    keys, converted = {}, []
    for name in meta:
        key = file_key_for(acct, model, name)
        if key is None and (name in acct.converted_targets or acct.tied.get(name) in acct.converted_targets):
            converted.append(name)  # fused or split on load: the file's values are not the parameter's bitwise
            continue
        keys[name] = key
    nonfinite: dict[str, int] = {}
    fps, missing = file_fingerprints(ckpt, {n: meta[n] for n in keys}, ctx, desc, keys, index, nonfinite)
    return FileProof(fps, missing, acct, converted, nonfinite)


def file_fingerprints(ckpt: Path, wanted: dict[str, tuple[torch.dtype, int]], ctx: DistContext,
                      desc: str | None = None, file_keys: dict[str, str | None] | None = None,
                      index: dict[str, TensorEntry] | None = None,
                      nonfinite: dict[str, int] | None = None) -> tuple[dict[str, str], list[str]]:
    """Fingerprints of the checkpoint's tensors for the parameters named in `wanted` (cast to the parameter dtype, as
    loading does), plus the wanted names the files do not hold. `file_keys` maps a parameter to its file key where
    they differ (see `file_proof`); `nonfinite` receives file key -> inf/NaN count, counted in the file's own dtype.
    Every rank reads only its own slice of each tensor."""
    index = tensor_index(ckpt) if index is None else index
    names, local, missing, keys = [], [], [], []
    for name, (dtype, numel) in _progress(list(wanted.items()), ctx, desc):
        key = name if file_keys is None else file_keys.get(name)
        entry: TensorEntry | None = index.get(key) if key else None
        if entry is None or entry.numel != numel:
            missing.append(name if entry is None else f"{name} (shape {entry.shape} in file)")
            continue
        start, n = shard_range(numel, ctx.rank, ctx.world_size)
        buf = read_elements(entry, start, n)
        if entry.dtype == dtype:
            fp = fingerprint_bytes(buf, dtype, start, scan=True)
        else:
            vals = torch.frombuffer(bytearray(buf), dtype=entry.dtype) if buf else torch.empty(0, dtype=entry.dtype)
            fp = torch.cat([fingerprint_flat(vals.to(dtype), start), fingerprint_scan(vals)[2:]])
        names.append(name)
        keys.append(key)
        local.append(fp)
    counts: dict[str, int] = {}
    fps = _reduce(names, local, ctx, counts)
    if nonfinite is not None:
        nonfinite.update({keys[names.index(n)]: c for n, c in counts.items()})
    return fps, missing


def compare(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Names whose fingerprints differ, or that only one side has, in model order."""
    return [n for n in a if a.get(n) != b.get(n)] + [n for n in b if n not in a]


def max_abs_diff(a, b, name: str, ctx: DistContext) -> float:
    """Largest |a - b| over one named tensor, each rank over its own slice, all-reduced with MAX (no gather)."""
    pa, pb = dict(a.named_parameters())[name], dict(b.named_parameters()).get(name)
    local = torch.zeros(1, dtype=torch.float64)
    if pb is not None:
        xa, _, na = local_slice(pa, ctx)
        xb, _, nb = local_slice(pb, ctx)
        if na == nb and xa.numel() and xa.numel() == xb.numel():
            local[0] = (xa.double().cpu() - xb.double().cpu()).abs().max()
    return float(ctx.all_reduce(local, "max").item())


def local_bytes(model, ctx: DistContext) -> int:
    """Bytes of parameter data this rank actually holds (its partitions under ZeRO-3, its shards under FSDP2)."""
    return views.local_bytes(model)
