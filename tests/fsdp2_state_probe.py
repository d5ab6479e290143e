"""Run under torchrun, 2 CPU processes: which distributed type accelerate gives an FSDP2 plugin, without and with
dpo_dist.compat.accelerate.fsdp_on_cpu (argv[1] "patched" or "plain"). Used by tests/test_fsdp2.py."""

import sys

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

if sys.argv[1] == "patched":
    from dpo_dist.compat.accelerate import fsdp_on_cpu

    fsdp_on_cpu()
acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
if acc.is_main_process:
    print(f"STATE {acc.state.distributed_type.value} fsdp2={acc.is_fsdp2}", flush=True)
dist.barrier()
dist.destroy_process_group()
