"""Backend name -> its strategy: the one place that maps sharding backends to modules. A new backend is one module
(dpo_dist/sharding/<name>.py, a ShardingBackend subclass), one Backend member (config/names.py), its shipped names in
config/sharding.py, and one line here."""

from __future__ import annotations

from dpo_dist.config.names import Backend
from dpo_dist.config.sharding import backend_of
from dpo_dist.sharding.base import ShardingBackend
from dpo_dist.sharding.deepspeed import DeepSpeedBackend
from dpo_dist.sharding.fsdp2 import Fsdp2Backend

BACKENDS: dict[Backend, type[ShardingBackend]] = {cls.name: cls for cls in (DeepSpeedBackend, Fsdp2Backend)}


def backend_for(cfg) -> ShardingBackend:
    """The backend of a run config's sharding section (name, or a user DeepSpeed JSON, or the launch's)."""
    return BACKENDS[backend_of(cfg.sharding.name, cfg.sharding.ds_config)]()
