"""The names a run config chooses from, defined once: reference placements, shipped shardings and their backends,
model dtypes.

Members are strings (`Placement.ZERO3 == "zero3"`, same hash, formats as "zero3"), so the config keeps plain
strings from YAML and every module compares against these members instead of spelling the names again.
"""

from __future__ import annotations

from enum import Enum


class NameEnum(str, Enum):
    """A str-valued enum that behaves as its value everywhere: ==, hash (dict keys), str() and f-strings."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Placement(NameEnum):
    """Where the frozen reference lives (dpo_dist.reference: one strategy module each)."""

    ZERO3 = "zero3"
    CPU = "cpu"
    LORA = "lora"
    PRECOMPUTED = "precomputed"
    RANKS = "ranks"


# another spelling a user may write -> the placement it names. `sharded` says what the default placement is under
# either backend (the reference sharded per layer across the ranks, as the policy is: ZeRO-3's partitions or FSDP2's
# per-layer units); `zero3` stays its name in reports and configs, as it was.
PLACEMENT_ALIASES: dict[str, Placement] = {"sharded": Placement.ZERO3}


class Sharding(NameEnum):
    """The shipped shardings (launch/<name>.yaml; the DeepSpeed ones also ds_configs/<name>.json). Each belongs to
    one backend (config/sharding.py)."""

    ZERO2 = "zero2"
    ZERO3 = "zero3"
    ZERO3_OFFLOAD = "zero3_offload"
    FSDP2 = "fsdp2"


class Backend(NameEnum):
    """Sharding backends (dpo_dist.sharding: one strategy module each); a shipped sharding belongs to one
    (config/sharding.py)."""

    DEEPSPEED = "deepspeed"
    FSDP2 = "fsdp2"


class Dtype(NameEnum):
    """Model dtypes a run may load in."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def bytes(self) -> int:
        return 4 if self is Dtype.FLOAT32 else 2
