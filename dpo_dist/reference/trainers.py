"""DPOTrainer variants for reference placements TRL does not offer: a CPU reference, and precomputed log-probs kept
on disk under a key of the reference's weights fingerprint and the data.

Both override TRL's private `_precompute_ref_logps` (TRL 1.16.0, pinned in pyproject; tests/test_compat.py fails
loudly if its signature or role changes). Why: with `ref_model` given, TRL always wraps the reference with DeepSpeed
(`prepare_deepspeed`), which would shard or move a CPU reference; with `precompute_ref_log_probs=True` and no
`ref_model`, TRL builds no reference at all, and this hook is where the log-probs come from.
"""

from __future__ import annotations

import contextlib
import os

import torch
from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from dpo_dist.compat import trl as trl_compat

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class CpuReference(torch.nn.Module):
    """Runs a host-memory reference on CPU for TRL's per-batch reference forward and hands results back on the
    policy's device. Not a DeepSpeed engine: nothing shards, moves or copies it."""

    def __init__(self, model: torch.nn.Module, out_device: torch.device, whole=contextlib.nullcontext):
        super().__init__()
        self.module = model
        self.out_device = out_device
        self.whole = whole  # the sharding backend's context for an unsharded model (ShardingBackend.whole)
        add_fused_lm_head(model)  # TRL calls the reference with fused_lm_head=True

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        cpu = torch.device("cpu")
        args = [a.to(cpu) if torch.is_tensor(a) else a for a in args]
        kwargs = {k: v.to(cpu) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with self.whole():  # ZeRO-3: TRL's fused head would treat this whole CPU model as partitioned otherwise
            out = self.module(*args, **kwargs)
        for key in ("log_probs", "logits", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"):
            val = getattr(out, key, None)
            if torch.is_tensor(val):
                setattr(out, key, val.to(self.out_device))
                if hasattr(out, "__setitem__") and key in out:
                    out[key] = getattr(out, key)
        return out


class CpuReferenceDPOTrainer(DPOTrainer):
    """DPOTrainer whose reference is a CpuReference (construct with precompute_ref_log_probs=True, ref_model=None)."""

    def __init__(self, *args, cpu_reference: torch.nn.Module, whole=contextlib.nullcontext, **kwargs):
        self._cpu_reference = cpu_reference
        with trl_compat.brings_its_reference():  # under FSDP, TRL would load a reference of its own otherwise
            super().__init__(*args, **kwargs)
        # TRL built no reference (precompute mode); from here on it forwards ours per micro-batch instead.
        self.precompute_ref_logps = False
        self.ref_model = CpuReference(cpu_reference, self.accelerator.device, whole)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset  # nothing to precompute: the CPU reference runs online


class PrecomputedDPOTrainer(DPOTrainer):
    """DPOTrainer that precomputes reference log-probs once, cached under (reference fingerprint, data)."""

    def __init__(self, *args, reference_digest: str, data_keys: dict[str, str], **kwargs):
        self._reference_digest = reference_digest
        self._data_keys = data_keys
        self.cache_hits: dict[str, bool] = {}
        self.precompute_batch_size: int | None = None
        self.step0_noise: list[dict] = []  # per micro-batch of the first step: see tolerances.measure_batching_noise
        self._rows_by_value: dict[tuple[float, float], list[int]] | None = None
        with trl_compat.brings_its_reference():  # TRL's hash of a sharded (DTensor) reference would gather it
            super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL keys its cache file on (dataset fingerprint, model hash). Its model hash of a ZeRO-3 model is
        # rank-dependent and ignores what the weights are, and the dataset fingerprint chains through TRL's own map
        # calls (which hash run arguments such as the output dir). Ours: the all-reduced weights fingerprint, and a
        # hash of the rows, the tokenizer and the length limits: same inputs, same key, in any output dir.
        cache_file = trl_compat.key_precompute_cache(self, dataset, self._reference_digest, self._data_keys[name])
        self.cache_hits[name] = os.path.exists(cache_file)
        if name == "train":
            self.precompute_batch_size = batch_size
        from dpo_dist.runtime.disk_writes import (
            no_leftovers,  # a full disk: the cache's path named, no truncated temp file left
        )

        with no_leftovers(os.path.dirname(cache_file), cache_file, f"caching reference log-probs for {name}"):
            return super()._precompute_ref_logps(dataset, name, batch_size)

    def rows_by_cached_value(self) -> dict[tuple[float, float], list[int]]:
        """Dataset rows by their cached (chosen, rejected) reference log-probs: finds a micro-batch's rows."""
        if self._rows_by_value is None:
            self._rows_by_value = {}
            cols = zip(self.train_dataset["ref_chosen_logps"], self.train_dataset["ref_rejected_logps"], strict=True)
            for j, key in enumerate(cols):
                self._rows_by_value.setdefault((float(key[0]), float(key[1])), []).append(j)
        return self._rows_by_value

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The first step's micro-batches: measure the policy's batching noise on the very rows trained (the reference
        # was freed; the policy is bitwise it at step 0). Every rank runs the same number of extra forwards.
        if self.state.global_step == 0 and self.model.training and self.precompute_batch_size:
            from dpo_dist.verify.tolerances import PrecomputeBatching, measure_batching_noise

            acc = self.accelerator
            batching = PrecomputeBatching(len(self.train_dataset), self.precompute_batch_size, acc.num_processes,
                                          acc.even_batches, acc.split_batches)
            self.step0_noise.append(measure_batching_noise(self, model, inputs, batching, self.train_dataset))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _prepare_inputs(self, inputs):
        # Under DeepSpeed, transformers' Trainer casts every floating input to the engine dtype: the precomputed
        # sequence log-probs (sums of order -100) would reach the loss rounded to bf16 (steps of 0.5-1 nat), and the
        # step-0 loss would miss ln 2 by ~3e-3. Keep them in fp32, as they were computed.
        keep = {k: inputs[k] for k in REF_COLUMNS if k in inputs}
        out = super()._prepare_inputs(inputs)
        for k, v in keep.items():
            out[k] = v.to(device=self.accelerator.device, dtype=torch.float32)
        return out


class RemoteOnlineDPOTrainer(DPOTrainer):
    """reference.placement ranks, serve: online. Constructed in TRL's precompute mode with no `ref_model` (so TRL
    builds, loads and wraps no reference on this rank), then switched to per-micro-batch reference forwards through
    a RemoteReference that asks this rank's reference rank."""

    def __init__(self, *args, remote_reference: torch.nn.Module, **kwargs):
        self._remote = remote_reference
        super().__init__(*args, **kwargs)
        self.precompute_ref_logps = False
        self.ref_model = remote_reference

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset  # nothing to precompute: the reference ranks answer per micro-batch


class RemotePrecomputeDPOTrainer(PrecomputedDPOTrainer):
    """reference.placement ranks, serve: precompute. TRL's precompute pass runs as usual (same batches, same gather,
    same cache file), with the reference forward answered by the reference ranks; training then reads the cached
    log-probs and the reference ranks only serve the KL monitor."""

    def __init__(self, *args, remote_reference: torch.nn.Module, **kwargs):
        self._remote = remote_reference
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self.ref_model = self._remote  # TRL calls `self.ref_model or self.model`: ours, never the policy
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self.ref_model = None
