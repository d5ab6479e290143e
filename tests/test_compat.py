"""dpo_dist/compat/: the one place that touches DeepSpeed's, TRL's, transformers' and datasets' private surface.

One pin test per compat entry: each fails when the library moves (the private name disappears, or the source or
signature it mirrors changes), naming the compat function to re-check. Then the guard: no dpo_dist module outside
compat/ reaches into those libraries' private names (an `ast` scan, plus, for our subclasses of library classes, a
check against the library classes' own attributes), with an allow-list that says why.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

from dpo_dist.compat import accelerate as acc_compat
from dpo_dist.compat import datasets as datasets_compat
from dpo_dist.compat import deepspeed as ds_compat
from dpo_dist.compat import transformers as hf_compat
from dpo_dist.compat import trl as trl_compat

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_dist"
LIBS = ("deepspeed", "trl", "transformers", "accelerate", "peft", "datasets", "torch")


def flat_source(obj) -> str:
    return " ".join(inspect.getsource(obj).split())


def assert_mirrors(obj, pieces: tuple[str, ...], entry: str) -> None:
    """Every piece of code (whitespace-normalized) is still in obj's source; else name the compat entry to re-check."""
    src = flat_source(obj)
    missing = [p for p in pieces if p not in src]
    assert not missing, f"{obj.__qualname__} changed (no {missing[0]!r}): re-check dpo_dist.compat.{entry}"


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# -- versions: every entry names the release it was checked against -------------------------------------------------
def test_pinned_versions_are_installed():
    import datasets
    import deepspeed
    import transformers
    import trl

    assert deepspeed.__version__ == ds_compat.PINNED, "re-check every entry of dpo_dist/compat/deepspeed.py"
    assert trl.__version__ == trl_compat.PINNED, "re-check every entry of dpo_dist/compat/trl.py"
    assert transformers.__version__.startswith(hf_compat.PINNED + "."), "re-check dpo_dist/compat/transformers.py"
    assert datasets.__version__ == datasets_compat.PINNED, "re-check dpo_dist/compat/datasets.py"


# -- compat/deepspeed.py --------------------------------------------------------------------------------------------
def test_reset_zero3_trace_private_coordinator_api():
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert params(Coordinator._invalidate_trace) == ["self"], "re-check compat.deepspeed.reset_zero3_trace"
    assert params(Coordinator.is_invalid_trace) == ["self"]
    assert "parameter_offload" in flat_source(DeepSpeedZeroOptimizer_Stage3.__init__)
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    assert callable(DeepSpeedZeRoOffload.get_param_coordinator)
    assert callable(DeepSpeedZeRoOffload.empty_partition_cache)


def test_reset_zero3_trace_ignores_what_is_not_zero3():
    ds_compat.reset_zero3_trace(None)
    ds_compat.reset_zero3_trace(object())


def test_no_broadcast_init_replaces_the_pinned_zero_init_param():
    """NoBroadcastInit replaces deepspeed.zero.Init._zero_init_param (private): pinned to the source it replaces.
    (Was tests/test_fastload.py::test_pinned_deepspeed_zero_init_param.)"""
    import deepspeed

    assert deepspeed.__version__ == ds_compat.PINNED
    assert ds_compat.broadcast_free_init_supported()
    src = inspect.getsource(deepspeed.zero.Init._zero_init_param)
    body = [line.strip() for line in src.splitlines()[1:] if line.strip()]
    assert body == [
        "self._convert_to_deepspeed_param(param)",
        "partition_group = self.get_partition_dp_group(param)",
        "if dist.get_world_group() == partition_group:",
        "dist.broadcast(param.data.view(torch.uint8), 0, partition_group)",
        "else:",
        "dist.broadcast(param.data.view(torch.uint8), dist.get_global_rank(partition_group, 0), partition_group)",
        "param.partition()",
    ], "deepspeed changed Init._zero_init_param: re-check dpo_dist.compat.deepspeed.no_broadcast_init_class"
    cls = ds_compat.no_broadcast_init_class()
    assert issubclass(cls, deepspeed.zero.Init) and params(cls._zero_init_param) == ["self", "param"]
    assert params(deepspeed.zero.Init._convert_to_deepspeed_param) == ["self", "param"]


def test_empty_partition_matches_the_pinned_partition_param():
    """compat.deepspeed._empty_partition allocates a partition as deepspeed 0.19.8's `_partition_param` does, so that
    `param.partition()` takes its "already partitioned" branch (free the full tensor, no copy): pinned to that
    source."""
    from deepspeed.runtime.zero import partition_parameters

    src = flat_source(partition_parameters)
    for line in ("if param.ds_tensor is not None and not has_been_updated: ##param already partitioned",
                 "if param.ds_persist: device = self.local_device",
                 "partitioned_tensor = torch.empty(partition_size, dtype=param.dtype, device=device)",
                 "if device == OffloadDeviceEnum.cpu and self.pin_memory: partitioned_tensor = "
                 "get_accelerator().pin_memory(partitioned_tensor)",
                 "partitioned_tensor.requires_grad = False param.ds_tensor = partitioned_tensor "
                 "param.ds_tensor.ds_numel = partition_size param.ds_tensor.status = PartitionedParamStatus.AVAILABLE "
                 "param.ds_tensor.final_location = final_location param.ds_numel_aligned = tensor_size"):
        assert line in src, f"deepspeed changed _partition_param: re-check compat.deepspeed._empty_partition ({line})"


def test_zero_init_arguments():
    import deepspeed

    assert {"config_dict_or_path", "dtype"} <= set(params(deepspeed.zero.Init.__init__)), \
        "re-check compat.deepspeed.zero_init"


def test_timeout_new_groups_module_defaults_are_what_new_groups_read():
    from torch.distributed import distributed_c10d

    src = flat_source(distributed_c10d._get_default_timeout)
    assert "return default_pg_nccl_timeout" in src and "return default_pg_timeout" in src, \
        "torch no longer reads its module defaults for a new group's timeout: re-check compat.deepspeed." \
        "timeout_new_groups"
    assert "_get_default_timeout(backend)" in " ".join(inspect.getsource(distributed_c10d).split())


def test_partition_layout_is_equal_padded_parts():
    """compat.deepspeed.partition_range / local_partition assume ZeRO-3 cuts a tensor into world equal parts of
    ceil(numel / world) elements, the last padded."""
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.partition_parameters import Init

    src = flat_source(partition_parameters)  # _partition_param is wrapped (nvtx): read the module
    assert ("tensor_size = self._aligned_size(param) "
            "partition_size = tensor_size // self._partition_world_size(param)") in src
    assert "return param.ds_numel + self._padding_size(param)" in flat_source(Init._aligned_size)
    assert "return (partition_world_size - remainder) if remainder else 0" in flat_source(Init._padding_size)
    assert ds_compat.partition_range(10, 3, 3) == (9, 1) and ds_compat.partition_range(2, 1, 3) == (3, 0)


# -- compat/transformers.py -----------------------------------------------------------------------------------------
def test_outside_zero3_hides_the_registered_config_and_restores_it():
    from transformers.integrations import deepspeed as hf_ds
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    assert hasattr(hf_ds, "_hf_deepspeed_config_weak_ref"), "re-check compat.transformers.outside_zero3"
    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with hf_compat.outside_zero3():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        hf_ds.unset_hf_deepspeed_config()
        del keep


def test_causal_lm_class_reads_the_auto_mapping():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    assert hasattr(AutoModelForCausalLM, "_model_mapping"), "re-check compat.transformers.causal_lm_class"
    assert hf_compat.causal_lm_class(LlamaConfig()) is LlamaForCausalLM


def test_init_contexts_mirror_get_init_context():
    from transformers import PreTrainedModel

    assert_mirrors(PreTrainedModel.get_init_context, (
        "local_torch_dtype(dtype, cls.__name__), init.no_tie_weights(), apply_patches()",
        "init.no_init_weights(), prevent_arange_dtype_change(),",
        "deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state(),"),
        "transformers.init_contexts")


def test_instantiate_mirrors_from_pretrained():
    import transformers.modeling_utils as mu

    assert "patch_output_recorders(model)" in flat_source(mu), "re-check compat.transformers.instantiate"


def test_mark_loaded_is_what_initialize_weights_skips():
    import transformers.modeling_utils as mu

    assert 'getattr(module, "_is_hf_initialized", False)' in flat_source(mu), \
        "re-check compat.transformers.mark_loaded"


def test_load_ignore_patterns_attributes_exist():
    from transformers import PreTrainedModel

    assert hasattr(PreTrainedModel, "_keys_to_ignore_on_load_unexpected")
    assert hasattr(PreTrainedModel, "_keys_to_ignore_on_load_missing")


def test_pinned_transformers_mapping():
    """compat.transformers.conversions / rename call transformers' private loading API the way from_pretrained does
    (transformers 5.23): if either call site moves, this fails. (Was tests/test_key_mapping.py's.)"""
    import transformers.modeling_utils as mu
    from transformers import core_model_loading as cml
    from transformers.conversion_mapping import get_model_conversion_mapping

    flat = flat_source(mu)
    assert "weight_conversions = get_model_conversion_mapping(model, key_mapping, hf_quantizer)" in flat
    load = flat_source(cml.convert_and_load_state_dict_in_model)
    assert ("renamed_key, source_pattern = rename_source_key( original_key, renamings, converters, base_model_prefix, "
            "meta_model_state_dict )") in load
    assert "if renamed_key not in meta_model_state_dict and original_key in meta_model_state_dict:" in load
    assert params(cml.rename_source_key)[:5] == [
        "source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict"]
    assert params(get_model_conversion_mapping)[:3] == ["model", "key_mapping", "hf_quantizer"]


# -- compat/trl.py --------------------------------------------------------------------------------------------------
def test_trl_private_hooks_we_override_still_exist():
    assert trl_compat.check_trl_hooks() == []


def test_trainer_prepare_inputs_hook():
    """reference/trainers.py overrides transformers' Trainer._prepare_inputs (keeps precomputed log-probs fp32)."""
    from transformers import Trainer

    assert params(Trainer._prepare_inputs) == ["self", "inputs"]
    assert "self._prepare_inputs(inputs)" in flat_source(Trainer.training_step)


def test_dpo_trainer_wraps_with_its_module_level_get_peft_model():
    """compat.trl.peft_wrap_returns patches trl.trainer.dpo_trainer.get_peft_model: TRL must still call that name."""
    import inspect

    import trl.trainer.dpo_trainer as dpo_module

    assert hasattr(dpo_module, "get_peft_model")
    assert "get_peft_model(" in inspect.getsource(dpo_module.DPOTrainer.__init__), \
        "TRL's DPOTrainer no longer wraps with get_peft_model in __init__: re-check compat.trl.peft_wrap_returns"


def test_dpo_trainer_builds_and_hashes_its_reference_through_module_level_names():
    """compat.trl.brings_its_reference patches trl.trainer.dpo_trainer's create_model_from_path and hash_module: TRL
    must still build its own reference and hash it through those names (and only where ref_model is None)."""
    import trl.trainer.dpo_trainer as dpo_module

    assert callable(dpo_module.create_model_from_path) and callable(dpo_module.hash_module)
    assert_mirrors(dpo_module.DPOTrainer.__init__, (
        "self.ref_model = create_model_from_path(ref_model_path, **ref_model_init_kwargs)",
        "hash_module(self.ref_model or self.model) if args.precompute_ref_log_probs else None"),
        "trl.brings_its_reference")
    with trl_compat.brings_its_reference():
        assert dpo_module.create_model_from_path("x") is None
    assert dpo_module.create_model_from_path is not None and dpo_module.hash_module.__name__ == "hash_module"


def test_metrics_store():
    from trl import DPOTrainer

    assert_mirrors(DPOTrainer.__init__, ('self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}',),
                   "trl.metrics")


def test_precompute_cache_key_is_computed_as_trl_computes_it():
    from datasets import Dataset
    from trl import DPOTrainer

    assert_mirrors(DPOTrainer._precompute_ref_logps, (
        "model_hash = self._precompute_model_hash",
        "fingerprint = [Hasher.hash((dataset._fingerprint, model_hash))]",
        "cache_file = dataset._get_cache_file_path(fingerprint)"), "trl.key_precompute_cache")
    assert params(Dataset._get_cache_file_path) == ["self", "fingerprint"]


def test_precompute_cache_key_sets_both_halves(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"a": [1, 2]})
    ds.save_to_disk(str(tmp_path / "d"))
    ds = Dataset.load_from_disk(str(tmp_path / "d"))
    trainer = type("T", (), {})()
    path = trl_compat.key_precompute_cache(trainer, ds, "weights", "data")
    assert trainer._precompute_model_hash == "weights" and datasets_compat.fingerprint(ds) == "data"
    assert path.startswith(str(tmp_path)) and path == trl_compat.key_precompute_cache(trainer, ds, "weights", "data")


def test_prepare_dataset_stub_holds_what_trl_reads():
    import trl.trainer.dpo_trainer as dpo

    assert params(dpo.DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    src = inspect.getsource(dpo.DPOTrainer._prepare_dataset)
    read = {node.attr for node in ast.walk(ast.parse(inspect.cleandoc("\n" + src) if src.startswith(" ") else src))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    assert read == {"_tokenizer"}, f"_prepare_dataset reads self.{read}: re-check compat.trl.prepare_dataset's stub"
    assert "with global_then_local_main_first():" in flat_source(dpo.DPOTrainer._prepare_dataset)
    assert callable(dpo.global_then_local_main_first)
    # prepare_dataset assigns the pad token as DPOTrainer.__init__ does before preparing (the tokenizer's hash changes)
    assert "self._tokenizer.pad_token = self._tokenizer.eos_token" in flat_source(dpo.DPOTrainer.__init__)


def test_tokenize_signature():
    from trl.data_utils import _tokenize

    assert params(_tokenize) == ["processing_class", "input", "apply_chat_template_kwargs"], \
        "re-check compat.trl.tokenize"


# -- compat/datasets.py ---------------------------------------------------------------------------------------------
def test_dataset_fingerprint():
    from datasets import Dataset

    fp = datasets_compat.fingerprint(Dataset.from_dict({"a": [1]}))
    assert isinstance(fp, str) and fp


# -- compat/accelerate.py -------------------------------------------------------------------------------------------
def test_accelerate_pinned_and_its_cpu_state_still_drops_fsdp():
    """fsdp_on_cpu wraps AcceleratorState.__init__: the FSDP branch it mirrors is still there, still only for GPU-like
    types (were MULTI_CPU added to it, the wrapper would be a no-op and can go)."""
    import accelerate
    from accelerate.state import AcceleratorState

    assert accelerate.__version__ == acc_compat.PINNED, "re-check dpo_dist/compat/accelerate.py"
    src = flat_source(AcceleratorState.__init__)
    assert_mirrors(AcceleratorState.__init__, (
        'os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None',
        "self.distributed_type = DistributedType.FSDP", "fsdp_plugin.set_mixed_precision(self._mixed_precision)",
        "self.fsdp_plugin = fsdp_plugin", 'PartialState._shared_state["distributed_type"] = self.distributed_type'),
        "accelerate.fsdp_on_cpu")
    branch = src[:src.index("self.distributed_type = DistributedType.FSDP")]
    gpu_types = branch[branch.rindex("elif self.distributed_type in ["):]
    assert "MULTI_GPU" in gpu_types and "MULTI_CPU" not in gpu_types, "re-check compat.accelerate.fsdp_on_cpu"


def test_no_split_modules_names_the_decoder_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert hasattr(LlamaForCausalLM, "_no_split_modules"), "re-check compat.transformers.no_split_modules"
    assert hf_compat.no_split_modules(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=8,
                                      intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=16))) == ("LlamaDecoderLayer",)


# -- compat/torch_fsdp.py -------------------------------------------------------------------------------------------
def test_fsdp2_unit_state_is_where_unit_settings_reads_it():
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    from dpo_dist.compat import torch_fsdp

    assert torch.__version__.startswith(torch_fsdp.PINNED + "."), "re-check dpo_dist/compat/torch_fsdp.py"
    assert callable(FSDPModule._get_fsdp_state)
    assert "self._fsdp_param_groups" in flat_source(FSDPState.__init__)
    assert_mirrors(FSDPParamGroup.__init__, ("self.fsdp_params = [", "self.mp_policy = mp_policy",
                                            "self.post_forward_mesh_info = post_forward_mesh_info"),
                   "torch_fsdp.unit_settings")


def test_fsdp2_root_is_chosen_where_settle_root_calls_it():
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    assert callable(FSDPState._lazy_init)  # torch_fsdp.settle_root: what the first forward calls
    assert "self._lazy_init()" in flat_source(FSDPState._root_pre_forward)
    assert "self._is_root = True" in flat_source(FSDPState._lazy_init)


# -- the guard: private access to the libraries only in compat/ -----------------------------------------------------
# (module, private name): why it stays outside compat/. Keep this short.
ALLOWED = {
    ("dpo_dist.reference.trainers", "_precompute_ref_logps"):
        "our trainers override TRL's hook (defining it and calling super()'s): the override is the point; "
        "compat.trl.check_trl_hooks pins it",
    ("dpo_dist.reference.trainers", "_prepare_inputs"):
        "overrides transformers' Trainer hook to keep precomputed log-probs fp32; test_trainer_prepare_inputs pins it",
}


def outside_compat() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if rel.parts[1] == "compat":
            continue
        out[".".join(p for p in rel.parts if p != "__init__")] = path
    return out


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def library_bound(tree: ast.AST) -> set[str]:
    """Local names bound by an import from the libraries (modules, classes, functions)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update((a.asname or a.name.split(".")[0]) for a in node.names if a.name.split(".")[0] in LIBS)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBS:
            bound.update(a.asname or a.name for a in node.names)
    return bound


def patches(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, what, attribute) for every assignment to an attribute of something imported from the libraries
    (monkeypatching: `dpo_module.get_peft_model = ...`), and setattr on one."""
    bound, found = library_bound(tree), []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
        for t in targets:
            root = t
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(t, ast.Attribute) and isinstance(root, ast.Name) and root.id in bound:
                found.append((node.lineno, f"{ast.unparse(t)} = ... (patches the library)", t.attr))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in bound:
            found.append((node.lineno, ast.unparse(node), ast.unparse(node.args[1]) if len(node.args) > 1 else ""))
    return found


def private_reads(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, what, private name) for: private names imported from the libraries, private library modules imported,
    private attributes read or written on anything but `self`/`cls` or a standard-library module, and private names
    passed to getattr/setattr/hasattr."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBS:
            parts = node.module.split(".")
            found += [(node.lineno, f"from {node.module} import {a.name}", a.name) for a in node.names
                      if private(a.name)]
            found += [(node.lineno, f"from {node.module} import ...", p) for p in parts if private(p)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}", p) for a in node.names if a.name.split(".")[0] in LIBS
                      for p in a.name.split(".") if private(p)]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            v = node.value
            if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in sys.stdlib_module_names):
                continue
            found.append((node.lineno, ast.unparse(node), node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1 and \
                isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) and \
                private(node.args[1].value):
            found.append((node.lineno, ast.unparse(node), node.args[1].value))
    return found


def library_names(cls) -> set[str]:
    """Private names the library classes in cls's MRO define or assign on self."""
    names: set[str] = set()
    for k in cls.__mro__:
        if k.__module__.split(".")[0] not in LIBS:
            continue
        names.update(n for n in vars(k) if private(n))
        try:
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(k)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        names.update(node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Name) and node.value.id == "self" and private(node.attr))
    return names


def subclass_reads(mod: str, tree: ast.Module) -> list[tuple[int, str, str]]:
    """In our subclasses of library classes: methods we define, and `self._x` we use, that are the library's own
    private names (an override of, or a reach into, its internals)."""
    found = []
    module = None
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or not node.bases:
            continue
        module = module or importlib.import_module(mod)
        cls = getattr(module, node.name, None)
        if not isinstance(cls, type) or not any(k.__module__.split(".")[0] in LIBS for k in cls.__mro__[1:]):
            continue
        theirs = library_names(cls) - {"_is_protocol"}
        for sub in ast.walk(node):
            if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and sub.name in theirs:
                found.append((sub.lineno, f"{node.name}.{sub.name} overrides the library's", sub.name))
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self" \
                    and sub.attr in theirs:
                found.append((sub.lineno, f"{node.name}: self.{sub.attr} is the library's", sub.attr))
    return found


def test_no_private_library_access_outside_compat():
    bad, used = [], set()
    for mod, path in outside_compat().items():
        tree = ast.parse(path.read_text(), str(path))
        for line, what, name in private_reads(tree) + patches(tree) + subclass_reads(mod, tree):
            if (mod, name) in ALLOWED:
                used.add((mod, name))
                continue
            bad.append(f"{mod}:{line} {what}")
    assert not bad, ("private names of deepspeed/trl/transformers/accelerate/peft/datasets/torch used outside "
                     "dpo_dist/compat/ (move them behind a compat function with its pin test):\n" + "\n".join(bad))
    assert used == set(ALLOWED), f"allow-list entries no longer needed: {set(ALLOWED) - used}"


@pytest.mark.parametrize("source,expected", [
    ("import trl.trainer._x\n", ["_x"]),
    ("from trl.data_utils import _tokenize\n", ["_tokenize"]),
    ("from transformers import integrations as i\nr = i._hf_deepspeed_config_weak_ref\n",
     ["_hf_deepspeed_config_weak_ref"]),
    ("x = trainer._metrics['train']\n", ["_metrics"]),
    ("p._is_hf_initialized = True\n", ["_is_hf_initialized"]),
    ("getattr(model, '_keys_to_ignore_on_load_missing', None)\n", ["_keys_to_ignore_on_load_missing"]),
    ("import os\nos._exit(1)\nself._mine = 1\n", []),
])
def test_the_scan_sees_each_kind_of_access(source, expected):
    assert [name for _, _, name in private_reads(ast.parse(source))] == expected


@pytest.mark.parametrize("source,expected", [
    ("import trl.trainer.dpo_trainer as dpo\ndpo.get_peft_model = f\n", ["get_peft_model"]),
    ("from torch.distributed import distributed_c10d\ndistributed_c10d.default_pg_timeout = 1\n",
     ["default_pg_timeout"]),
    ("import transformers\nsetattr(transformers, 'x', 1)\n", ["'x'"]),
    ("import torch\nmodel.config.name_or_path = 'p'\nx = torch.zeros(1)\n", []),
])
def test_the_scan_sees_monkeypatching(source, expected):
    assert [name for _, _, name in patches(ast.parse(source))] == expected


def test_the_subclass_check_sees_an_override():
    tree = ast.parse(inspect.getsource(importlib.import_module("dpo_dist.reference.trainers")))
    names = {name for _, _, name in subclass_reads("dpo_dist.reference.trainers", tree)}
    assert {"_precompute_ref_logps", "_prepare_inputs"} <= names
    assert "_reference_digest" not in names  # ours
