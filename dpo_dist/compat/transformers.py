"""Every reach into transformers' private or internal loading surface, in one place.

Each public function says what it relies on, the pinned version (PINNED) and when it can go; tests/test_compat.py
fails when transformers moves. Nothing here imports transformers at import time.
"""

from __future__ import annotations

import contextlib

PINNED = "5.23"  # the transformers release whose internals are mirrored below (major.minor)


@contextlib.contextmanager
def outside_zero3():
    """Build a model whole even while a ZeRO-3 DeepSpeed state exists. transformers decides whether to partition at
    construction from a module-level weakref to the DeepSpeed config; accelerate's
    `zero3_init_context_manager(enable=False)` re-registers the same stage-3 config, so it does not help here.

    Reads the private `integrations.deepspeed._hf_deepspeed_config_weak_ref` (transformers 5.23); can go when
    transformers offers a public getter for the registered HfDeepSpeedConfig (or a 'no ZeRO-3 here' context)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    held = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_ds.set_hf_deepspeed_config(held)


def causal_lm_class(config):
    """The AutoModelForCausalLM class for a (non-remote) config, or None. Reads the private
    `AutoModelForCausalLM._model_mapping` (transformers 5.23); can go if the auto classes expose the lookup."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


@contextlib.contextmanager
def init_contexts(model_class, dtype, zero_init=None):
    """What `PreTrainedModel.get_init_context` enters under ZeRO-3, with our own zero.Init (or the meta device when
    `zero_init` is None). Mirrors internal helpers of modeling_utils / initialization / monkey_patching
    (transformers 5.23); can go if get_init_context accepts a caller's zero.Init."""
    import torch
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import local_torch_dtype, set_zero3_state
    from transformers.monkey_patching import apply_patches

    with contextlib.ExitStack() as stack:
        stack.enter_context(local_torch_dtype(dtype, model_class.__name__))
        stack.enter_context(hf_init.no_tie_weights())
        stack.enter_context(apply_patches())
        stack.enter_context(hf_init.no_init_weights())
        if zero_init is None:
            stack.enter_context(torch.device("meta"))
        else:
            stack.enter_context(prevent_arange_dtype_change())  # rotary tables keep their explicit fp32 dtype
            stack.enter_context(zero_init)
            stack.enter_context(set_zero3_state())
        yield


def instantiate(model_class, config):
    """The model built as `from_pretrained` builds it inside its init contexts (internal `patch_output_recorders`,
    transformers 5.23); can go with init_contexts."""
    from transformers.modeling_utils import patch_output_recorders

    model = model_class(config)
    patch_output_recorders(model)
    return model


def mark_loaded(tensor) -> None:
    """Flag a tensor as loaded, as transformers' loader does, so `initialize_weights()` skips it. Sets the private
    `_is_hf_initialized` (transformers 5.23); can go if transformers offers a public way to mark loaded weights."""
    tensor._is_hf_initialized = True


def load_ignore_patterns(model) -> tuple[list[str], list[str]]:
    """(unexpected, missing): the regex patterns a model class declares for file keys it drops and model keys that may
    be absent. Reads the private class attributes `_keys_to_ignore_on_load_unexpected` / `_missing` (transformers
    5.23); can go if they become public."""
    return (list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
            list(getattr(model, "_keys_to_ignore_on_load_missing", None) or []))


def conversions(model) -> tuple[list, list]:
    """(renamings, converters) that `from_pretrained` applies to this model's checkpoint keys (no user key_mapping,
    no quantizer: dpo-dist passes neither). Calls the internal `conversion_mapping.get_model_conversion_mapping`
    (transformers 5.23); can go if from_pretrained reports the keys it renamed."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model, None, None)
    return ([t for t in mapping if isinstance(t, WeightRenaming)],
            [t for t in mapping if isinstance(t, WeightConverter)])


def rename(key: str, renamings: list, converters: list, prefix: str | None, model_keys: dict) -> tuple[str, bool]:
    """(model name, converted?) for one file key, exactly as transformers' convert_and_load_state_dict_in_model does
    (rename, and fall back to the original key when renaming leads nowhere but the original name exists). Calls the
    internal `core_model_loading.rename_source_key` (transformers 5.23); can go with `conversions`."""
    from transformers.core_model_loading import rename_source_key

    renamed, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
    if renamed not in model_keys and key in model_keys:
        renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=model_keys)
    return renamed, pattern is not None


def no_split_modules(model) -> tuple[str, ...]:
    """The class names of a model's decoder blocks: transformers' `_no_split_modules` (a private class attribute,
    the same list accelerate's FSDP2 auto-wrap and device_map use; transformers 5.23); can go if transformers names
    its blocks publicly."""
    return tuple(getattr(model, "_no_split_modules", None) or ())
