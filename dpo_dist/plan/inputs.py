"""What the memory planner takes: the cluster and one layout's run settings (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from dpo_dist.config.backend_memory import MEMORY as BACKEND_MEMORY
from dpo_dist.config.backend_memory import backend_memory_of
from dpo_dist.config.names import Backend, Dtype, Placement
from dpo_dist.config.placement_memory import memory_of

GiB = 1 << 30
DTYPE_BYTES = {d.value: d.bytes for d in Dtype}
PLACEMENTS = tuple(Placement)  # every placement the planner sizes
LOGITS_MODES = ("fused", "full")
BACKENDS = tuple(b.value for b in BACKEND_MEMORY)  # every backend the planner sizes
MIXED_PRECISION = ("bf16", "no")


@dataclass(frozen=True)
class Cluster:
    """Where the job runs. device="cpu": every rank is a CPU process and "GPU memory" is that process's host memory."""

    nodes: int = 1
    gpus_per_node: int = 8  # ranks (processes) per node
    gpu_mem: int = 80 * 10**9  # bytes per GPU (unused for device="cpu")
    host_mem: int = 1024 * GiB  # bytes per node
    device: str = "gpu"  # "gpu" or "cpu"
    runtime_per_rank: int | None = None  # host bytes a rank holds before any model (None: 2 GiB gpu, 0.5 GiB cpu)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def runtime(self) -> int:
        if self.runtime_per_rank is not None:
            return self.runtime_per_rank
        return 2 * GiB if self.device == "gpu" else GiB // 2

    def problems(self) -> list[str]:
        out = []
        if self.nodes < 1 or self.gpus_per_node < 1:
            out.append("nodes and GPUs per node must be >= 1")
        if self.device not in ("gpu", "cpu"):
            out.append(f"device must be 'gpu' or 'cpu', got {self.device!r}")
        if self.device == "gpu" and self.gpu_mem <= 0:
            out.append("GPU memory must be > 0")
        if self.host_mem <= 0:
            out.append("host memory must be > 0")
        return out


@dataclass(frozen=True)
class RunSettings:
    """One layout and the run parameters that size activations. Defaults follow dpo-dist's run config defaults and
    the shipped DeepSpeed configs (ds_configs/*.json). `backend` picks the record (config/backend_memory.py) that
    says how the policy's states and gathers are laid out; zero_stage is its sharding degree (FSDP2: 3)."""

    backend: str = Backend.DEEPSPEED.value
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    placement: str = Placement.ZERO3.value
    micro_batch: int = 4  # prompt pairs per rank (train.per_device_train_batch_size); chosen+rejected doubles it
    max_length: int = 1024  # train.max_length: tokens per sequence
    gradient_checkpointing: bool = False
    dtype: str = Dtype.BFLOAT16.value
    ref_ranks: int | None = None  # K for placement "ranks" (None: the planner picks the smallest K that fits)
    lora_rank: int = 16
    logits: str = "fused"  # "fused": TRL 1.x chunked LM head; "full": fp32 [2b, T, V] logits materialized
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters
    sub_group_size: int = 1_000_000_000  # DeepSpeed's default
    reduce_bucket_size: int | None = None  # None: hidden_size**2, transformers' "auto"
    checkpoint_mmap_shared: bool = True  # cpu placement: one mmapped copy per node (checkpoint dtype = run dtype)
    mixed_precision: str = "bf16"  # a backend whose master is the parameter: "bf16" upcasts trainable ones to fp32

    @property
    def offload(self) -> str:
        return "all" if self.offload_params else "optimizer" if self.offload_optimizer else "none"

    def label(self) -> str:
        """e.g. 'ZeRO-3 off-opt ckpt ref:zero3', 'FSDP2 ckpt ref:zero3' (off-opt: optimizer offload; off-all:
        optimizer + parameters)."""
        parts = [backend_memory_of(self.backend).label.format(stage=self.zero_stage)]
        if self.offload != "none":
            parts.append("off-opt" if self.offload == "optimizer" else "off-all")
        if self.gradient_checkpointing:
            parts.append("ckpt")
        ranks = memory_of(self.placement).own_ranks and self.ref_ranks if self.placement in PLACEMENTS else False
        ref = self.placement + (f"(K={self.ref_ranks})" if ranks else "")
        return " ".join(parts) + f" ref:{ref}"

    def sharding_name(self) -> str:
        """The shipped sharding that runs this layout, or 'custom' (a sharding.ds_config JSON)."""
        return backend_memory_of(self.backend).shipped.get((self.zero_stage, self.offload), "custom")

    def problems(self) -> list[str]:
        out = []
        if self.backend not in BACKENDS:
            return [f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"]
        bm = backend_memory_of(self.backend)
        if self.zero_stage not in bm.stages:
            out.append(f"{self.backend}: sharding stage must be {' or '.join(map(str, bm.stages))}, got "
                       f"{self.zero_stage}")
        if self.offload_params and (self.zero_stage != 3 or not self.offload_optimizer):
            out.append("parameter offload needs ZeRO-3 with optimizer offload")
        elif self.offload not in bm.offloads:
            out.append(f"{self.backend} offloads {', '.join(bm.offloads)}, not {self.offload!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            out.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.placement not in PLACEMENTS:
            out.append(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.dtype not in DTYPE_BYTES:
            out.append(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.logits not in LOGITS_MODES:
            out.append(f"logits must be one of {', '.join(LOGITS_MODES)}, got {self.logits!r}")
        if self.micro_batch < 1 or self.max_length < 1:
            out.append("micro-batch and max_length must be >= 1")
        if self.ref_ranks is not None and self.ref_ranks < 1:
            out.append("ref_ranks must be >= 1")
        return out
