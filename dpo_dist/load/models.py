"""Load the tokenizer and the two models, and check their roles: reference frozen + eval, policy trainable.

Loading goes through transformers' DeepSpeed integration: the DeepSpeed state (our DPOConfig) exists before
`from_pretrained`, so under ZeRO-3 each rank only ever holds its partition (the other order loads a full copy per rank,
FAI-RL#66). Under ZeRO-3, by default (model.loader auto), `load_causal_lm` is given a dpo_dist.load.fastload plan
instead: each rank reads only its own partitions' bytes from the safetensors files, with no rank-0 copy
(init/loader_choice.py decides, the same on every rank). Nothing here gathers a parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dpo_dist.load.checkpoint import DTYPES


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_causal_lm(path: Path, dtype: str, trust_remote_code: bool, allow_pickle: bool, plan=None):
    """from_pretrained under whatever DeepSpeed state exists (ZeRO-3: partitioned while loading), or, given a
    `fastload.plan_load` result, dpo_dist.load.fastload under the registered ZeRO-3 config: each rank reads only its
    own partition's bytes from the files (same parameters, bitwise, without a full copy on any rank)."""
    if plan is not None:
        import copy
        import dataclasses

        from dpo_dist.load import fastload

        # a plan may serve two models (policy and reference): each gets its own config object, as from_pretrained
        # would give it
        plan = dataclasses.replace(plan, config=copy.deepcopy(plan.config))
        return fastload.load_partitioned(path, plan.dtype, trust_remote_code=trust_remote_code, plan=plan)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle
    )


def freeze(model) -> None:
    """Reference: no gradients, eval mode everywhere (dropout off)."""
    model.requires_grad_(False)
    model.eval()


def training_modules(model) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if m.training]


def read_config_json(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def load_cpu_shared(path: Path, dtype: str, trust_remote_code: bool):
    """An unsharded model in host memory whose weights are copy-on-write views of the safetensors files.

    Every rank on a node maps the same file pages (MAP_PRIVATE), so the weights are paid once per node in page cache,
    not once per rank (RSS counts them per rank; PSS shows the share). Any write would silently make a private copy,
    which a frozen reference never does. Falls back to a private copy (from_pretrained) when the file dtype differs
    from the wanted one. Returns (model, shared)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_dist.load.checkpoint import tensor_index

    want = DTYPES[dtype]
    index = tensor_index(path)
    if any(e.dtype != want for e in index.values()):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=want, trust_remote_code=trust_remote_code)
        return model, False
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=want, trust_remote_code=trust_remote_code)
    storages = {}
    state = {}
    for name, e in index.items():
        if e.file not in storages:
            import os

            storages[e.file] = torch.UntypedStorage.from_file(e.file, shared=False, nbytes=os.path.getsize(e.file))
        item = torch.empty((), dtype=e.dtype).element_size()
        t = torch.empty(0, dtype=e.dtype)
        t.set_(storages[e.file], e.start // item, e.shape)
        state[name] = t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing {still_meta[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model, True


def shared_memory_kb() -> dict[str, int]:
    """This process's RSS and PSS (kB) from /proc (PSS splits shared file pages among the processes mapping them),
    and its VmHWM so far."""
    out = {}
    try:
        for line in open("/proc/self/smaps_rollup"):
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_File", "Private_Dirty"):
                out[key] = int(rest.split()[0])
        for line in open("/proc/self/status"):  # the peak so far: taken after loading, the load stage's peak
            if line.startswith("VmHWM:"):
                out["VmHWM"] = int(line.split()[1])
    except OSError:
        pass
    return out
