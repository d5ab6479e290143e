"""Load a safetensors checkpoint straight into ZeRO-3 partitions: each rank reads only its own bytes.

transformers' ZeRO-3 `from_pretrained` builds the model under DeepSpeed's `zero.Init` (which broadcasts every freshly
created parameter from rank 0), then has rank 0 read the whole state dict and writes it into the model one module at a
time by gathering each module's parameters on every rank (`GatheredParameters(modifier_rank=0)`): rank 0 holds the
full checkpoint mapped and each layer in full, the others wait. Measured on a 443M-parameter bf16 model, 2 CPU ranks,
policy + reference: rank 0 peaked at 1.86x the ideal memory, and loading took 8-16 s.

Here (`load_partitioned`):

1. The model is built under `zero.Init` without initializing weights (transformers' `no_init_weights`, default dtype =
   the checkpoint's), exactly as `from_pretrained` builds it, but without `zero.Init`'s broadcast of every parameter
   from rank 0 (the values are garbage that step 3 overwrites; see
   `dpo_dist.compat.deepspeed.no_broadcast_init_class`, pinned to deepspeed 0.19.8).
2. Names, shapes and dtypes are checked against the safetensors headers first, on a model built on the meta device
   (no memory, no collective), so a checkpoint this loader cannot take is refused with `FastLoadRefused` (a
   ValueError) before anything is allocated, on every rank alike: the caller falls back to `from_pretrained`.
3. Each parameter's local partition `p.ds_tensor` (rank r of its partition group holds flat elements
   [r*part, r*part + n), part = ceil(numel / world)) is filled with `os.preadv` straight from the file's byte range
   into the partition's memory: no mapping (a mapped file counts in RSS while mapped), no full tensor, no
   collective. The padded tail of the last shard is zeroed.
4. What `from_pretrained` does after loading, done the same way: loaded parameters marked `_is_hf_initialized`,
   `initialize_weights()` (recomputes the non-persistent rotary buffers, skips every loaded parameter), tied weights
   tied, `eval()`, the checkpoint's generation config.

All of it happens before `deepspeed.initialize` sees the model: parameters under the persistence threshold become
permanent full copies there, from the partitions filled here.

Measured (bench/bench_init.py, 443M-parameter bf16 Llama, 2 CPU ranks, policy + reference): peak RSS 1.01x the ideal
(runtime baseline + each rank's share) on every rank, 0.27x the naive path's time; transformers' path 1.8-2.3x.
`pin_malloc_mmap_threshold` is a separate, process-wide option for the rest of `dpo-dist init` (see bench/README.md).

The result, for dpo-dist's purposes, is what `AutoModelForCausalLM.from_pretrained` gives under ZeRO-3: same
parameter names, shapes, dtypes and ZeRO attributes, partitions bitwise equal to the file (tests/test_fastload.py
checks the fingerprints against the files and the from_pretrained path, and equal logits and training losses through
DeepSpeed engines). File keys are renamed by transformers' own mapping (dpo_dist.load.key_mapping: legacy names and
prefixes, exactly as from_pretrained renames them); what transformers converts (fused or split values), dtype casts
and quantization are refused rather than guessed.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpo_dist.compat import deepspeed as ds_compat
from dpo_dist.compat import transformers as hf_compat
from dpo_dist.config.names import Dtype
from dpo_dist.load.checkpoint import DTYPES, TensorEntry, tensor_index
from dpo_dist.load.key_mapping import account
from dpo_dist.load.reader import Reader


class FastLoadRefused(ValueError):
    """The checkpoint cannot be loaded by reading partitions directly (dtype, names or shapes differ from the model,
    unsupported DeepSpeed settings). Nothing was allocated or communicated; load with `from_pretrained` instead."""


@dataclass
class LoadPlan:
    """Where each parameter's bytes are: canonical parameter name -> file entry (after tying), plus the model class
    and config to build."""

    path: Path
    dtype: torch.dtype
    config: Any
    model_class: type
    entries: dict[str, TensorEntry]
    buffers: dict[str, TensorEntry] = field(default_factory=dict)  # persistent buffers held by the file
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied: canonical name -> every name of it
    ignored_file_keys: list[str] = field(default_factory=list)  # file keys that are aliases of a tied parameter

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise FastLoadRefused(f"unsupported dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _model_class(config, trust_remote_code: bool):
    if getattr(config, "auto_map", None) and "AutoModelForCausalLM" in config.auto_map:
        if not trust_remote_code:
            raise FastLoadRefused("the checkpoint's model class is remote code: set trust_remote_code (and the "
                                  "from_pretrained path) instead")
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], config.name_or_path)
    model_class = hf_compat.causal_lm_class(config)
    if model_class is None:
        raise FastLoadRefused(f"no causal-LM class for config {type(config).__name__}")
    return model_class


def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _meta_model(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """(config, model class, the model built from config.json on the meta device, tied): no memory, no collective."""
    config = _load_config(path, trust_remote_code)
    model_class = _model_class(config, trust_remote_code)
    with hf_compat.init_contexts(model_class, dtype):
        meta = hf_compat.instantiate(model_class, config)
    meta.tie_weights()
    return config, model_class, meta


def plan_load(path: str | Path, dtype: str | torch.dtype, trust_remote_code: bool = False) -> LoadPlan:
    """Check that the checkpoint maps one to one onto the model's parameters, in the wanted dtype, and say where
    every parameter's bytes are. Builds the model on the meta device only: no memory, no collective; every rank
    reaches the same verdict. Raises FastLoadRefused with the reason."""
    path = Path(path)
    want = _as_dtype(dtype)
    try:
        index = tensor_index(path)
    except ValueError as e:  # CheckpointError: no safetensors, pickle only, corrupt header
        raise FastLoadRefused(str(e)) from None
    config, model_class, meta = _meta_model(path, want, trust_remote_code)
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in meta.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    # file keys as from_pretrained renames them (transformers' own mapping: legacy names, prefixes)
    acct = account(meta, index)
    entries, aliases, problems, used = {}, {}, [], set()
    for key, all_names in names.items():
        p = params[key]
        canonical = all_names[0]
        if len(all_names) > 1:
            aliases[canonical] = all_names
        in_file = [acct.file_key_of[n] for n in all_names if n in acct.file_key_of]
        if not in_file:
            converted = any(n in acct.converted_targets for n in all_names)
            problems.append(f"{canonical} is converted by transformers on load (values transformed)" if converted
                            else f"{canonical} not in the checkpoint")
            continue
        e = index[in_file[0]]
        used.update(in_file)
        if tuple(e.shape) != tuple(p.shape):
            problems.append(f"{canonical}: shape {tuple(e.shape)} in file, {tuple(p.shape)} in the model")
        elif e.dtype != want or p.dtype != want:
            problems.append(f"{canonical}: {e.dtype} in file, {p.dtype} in the model, wanted {want} (a cast needs "
                            "from_pretrained)")
        else:
            entries[canonical] = e
    buffers = {}
    param_names = {n for ns in names.values() for n in ns}
    for name in meta.state_dict():
        if name in param_names:
            continue
        e = index.get(acct.file_key_of.get(name, name))  # a persistent buffer: loaded whole on every rank
        buf = meta.get_buffer(name)
        if e is None:
            problems.append(f"persistent buffer {name} not in the checkpoint")
        elif tuple(e.shape) != tuple(buf.shape) or e.dtype != buf.dtype:
            problems.append(f"buffer {name}: {e.dtype}{tuple(e.shape)} in file, {buf.dtype}{tuple(buf.shape)} in "
                            "the model")
        else:
            buffers[name] = e
            used.add(e.name)
    extra = sorted(set(index) - used)
    # aliases of tied parameters, and keys the model class drops by its own patterns: transformers ignores them too
    ignored = [n for n in extra if acct.file_key_of.get(acct.renamed.get(n, n)) == n or n in acct.ignored]
    extra = [n for n in extra if n not in ignored]
    if extra:
        problems.append(f"{len(extra)} checkpoint tensor(s) the model does not have or transformers converts, e.g. "
                        f"{extra[0]}")
    if problems:
        raise FastLoadRefused(f"{path}: cannot read partitions directly: " + "; ".join(problems[:3])
                              + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return LoadPlan(path, want, config, model_class, entries, buffers, aliases, ignored)


def account_files(path: str | Path, trust_remote_code: bool = False):
    """Where every tensor of the checkpoint's files goes and where every model tensor comes from
    (`key_mapping.FileAccount`), for a model built from config.json on the meta device: no memory, no collective,
    about a second. For a preflight: a config.json that does not describe the files (fewer layers than they hold)
    shows as unexplained tensors before anything is launched or loaded."""
    path = Path(path)
    index = tensor_index(path)
    return account(_meta_model(path, torch.bfloat16, trust_remote_code)[2], index)


def _check_init(init) -> None:
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    if init.remote_device == OffloadDeviceEnum.nvme:
        raise FastLoadRefused("parameters offloaded to NVMe: load with from_pretrained")
    if init.quantized_weights or init.quantized_nontrainable_weights or init.quantized_initialization:
        raise FastLoadRefused("ZeRO quantized weights: load with from_pretrained")


def pin_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """glibc only: serve every allocation of `nbytes` or more with its own mapping, returned to the OS when freed.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so later blocks of
    that size (gathered ZeRO-3 parameters, pread buffers, logits) come from the heap, and the heap keeps them after
    they are freed: measured in `dpo-dist init` on 0.44B, 2 ranks, +250-300 MiB of RSS per stage that never went
    back. Pinning the threshold (what `MALLOC_MMAP_THRESHOLD_=1048576` does from process start) disables that
    adjustment. Returns whether it was applied (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def fill_partitions(model, plan: LoadPlan, stats: dict | None = None) -> int:
    """Write every parameter's local ZeRO-3 partition (and any persistent buffer) from the files; returns the bytes
    read by this rank (`stats`, when given, gets the size of every read request). No collective."""
    import deepspeed.comm as dist

    params = dict(model.named_parameters())
    reader = Reader()
    jobs = []
    try:
        for name, e in plan.entries.items():
            p = params[name]
            if getattr(p, "ds_tensor", None) is None:
                raise FastLoadRefused(f"{name} is not a ZeRO-3 partitioned parameter")
            part_tensor, start, n, numel = ds_compat.local_partition(p, dist.get_rank(group=p.ds_process_group))
            if numel != e.numel or p.dtype != e.dtype:
                raise FastLoadRefused(f"{name}: the built model differs from the plan ({p.dtype} {numel} elements)")
            part = part_tensor.numel()
            flat = part_tensor.data.view(-1)
            jobs.append((e, start, flat[:n]))
            if n < part:
                with torch.no_grad():
                    flat[n:].zero_()  # padding of the last shard (torch.empty: garbage otherwise)
            hf_compat.mark_loaded(p)  # as transformers' ZeRO-3 loader marks what it loaded
        reader.read_many(jobs)  # file order, neighbouring ranges as one request
        read_buffers(model, plan, reader)
        if stats is not None:
            stats.update(request_sizes=reader.request_sizes)
        return reader.bytes_read
    finally:
        reader.close()


def read_buffers(model, plan: LoadPlan, reader: Reader) -> None:
    """Every persistent buffer the files hold, whole on every rank (buffers are never sharded)."""
    for name, e in plan.buffers.items():
        buf = model.get_buffer(name)
        tmp = torch.empty(e.numel, dtype=e.dtype)
        reader.read(e, 0, tmp)
        with torch.no_grad():
            buf.copy_(tmp.view(buf.shape))
        hf_compat.mark_loaded(buf)


# The reader and the finish, for other layouts' loaders (dpo_dist.sharding.fsdp2 fills FSDP2 shards the same way).
_Reader = Reader


def finish(model, plan: LoadPlan) -> None:
    """What from_pretrained does after loading (see _finish)."""
    _finish(model, plan)


def _finish(model, plan: LoadPlan) -> None:
    """What from_pretrained does after loading (transformers 5.23 `_finalize_model_loading` and after), for a model
    whose every parameter came from the file."""
    from transformers import GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.initialize_weights()  # skips the flagged (loaded) tensors; recomputes the rotary tables
    model.tie_weights()
    model.eval()
    if model.can_generate():
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(str(plan.path), local_files_only=True)


def _check_built(model, plan: LoadPlan) -> None:
    got = {n: (tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for n, p in model.named_parameters()}
    want = {n: (tuple(e.shape), e.dtype) for n, e in plan.entries.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise FastLoadRefused(f"the model built under zero.Init differs from the one planned: {diff[:2]}")


def load_partitioned(path: str | Path, dtype: str | torch.dtype = Dtype.BFLOAT16.value,
                     ds_config: dict | None = None, *, trust_remote_code: bool = False,
                     skip_init_broadcast: bool | None = None, plan: LoadPlan | None = None,
                     timings: dict | None = None):
    """A causal LM from a safetensors checkpoint, ZeRO-3 partitioned, each rank reading only its own bytes.

    path: checkpoint directory (config.json + model.safetensors or an index with shards).
    dtype: the parameter dtype; must equal every tensor's dtype in the file (no casting here).
    ds_config: the DeepSpeed config dict for zero.Init (stage 3). None: the one transformers has registered
        (`HfDeepSpeedConfig`, which TRL's DPOConfig/accelerate create) — the same one from_pretrained would use.
    skip_init_broadcast: skip zero.Init's broadcast of every new parameter (default: when deepspeed is the pinned
        0.19.8; another version falls back to the plain zero.Init, which is correct but slower).
    plan: a `plan_load` result, to skip re-planning. timings: filled with seconds per phase when given.

    Raises FastLoadRefused (a ValueError) before any allocation or collective when the checkpoint does not map one to
    one onto the model in `dtype`; call transformers' from_pretrained then. Call it on every rank of the partition
    group, in the same order as any other zero.Init construction (parameter ids are assigned in order).
    """
    t0 = time.perf_counter()
    if ds_config is None:
        from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            raise FastLoadRefused("no ZeRO-3 DeepSpeed config registered: pass ds_config, or create the DPOConfig / "
                                  "HfDeepSpeedConfig first")
        ds_config = deepspeed_config()
    stage = (ds_config.get("zero_optimization") or {}).get("stage")
    if stage != 3:
        raise FastLoadRefused(f"DeepSpeed config is ZeRO stage {stage}, not 3: nothing to partition")
    plan = plan or plan_load(path, dtype, trust_remote_code)
    t1 = time.perf_counter()
    if skip_init_broadcast is None:
        skip_init_broadcast = ds_compat.broadcast_free_init_supported()
    init = ds_compat.zero_init(ds_config, plan.dtype, skip_init_broadcast)
    _check_init(init)
    try:
        with hf_compat.init_contexts(plan.model_class, plan.dtype, init):
            model = hf_compat.instantiate(plan.model_class, plan.config)
    finally:
        ds_compat.end_filling(init)  # later conversions through this Init (LoRA adapters) keep their values
    model.tie_weights()
    _check_built(model, plan)
    t2 = time.perf_counter()
    stats: dict = {}
    nbytes = fill_partitions(model, plan, stats)
    t3 = time.perf_counter()
    _finish(model, plan)
    model.config.name_or_path = str(plan.path)
    if timings is not None:
        timings.update(plan_s=t1 - t0, build_s=t2 - t1, read_s=t3 - t2, finish_s=time.perf_counter() - t3,
                       bytes_read=nbytes, request_sizes=stats["request_sizes"])
    return model
