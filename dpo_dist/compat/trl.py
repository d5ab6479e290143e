"""Every reach into TRL's private surface (and transformers Trainer's, as TRL's DPOTrainer uses it), in one place.

Each public function says what private name it relies on, the pinned version (PINNED) and when it can go;
tests/test_compat.py fails when TRL moves. Nothing here imports trl at import time.
"""

from __future__ import annotations

import contextlib
import inspect
from types import SimpleNamespace

PINNED = "1.16.0"  # the trl release whose private surface is used below (pyproject pins it too)
PRECOMPUTE_SIGNATURE = ("self", "dataset", "name", "batch_size")


def check_trl_hooks() -> list[str]:
    """What of TRL's private surface reference/trainers.py overrides is missing (empty list = all there):
    `DPOTrainer._precompute_ref_logps` (its signature, that `_compute_loss` reads its result, that it forwards
    `self.ref_model` when set). Can go when TRL lets a caller supply reference log-probs or a reference forward."""
    from trl import DPOTrainer

    problems = []
    fn = getattr(DPOTrainer, "_precompute_ref_logps", None)
    if fn is None:
        problems.append("DPOTrainer._precompute_ref_logps is gone")
    elif tuple(inspect.signature(fn).parameters) != PRECOMPUTE_SIGNATURE:
        problems.append(f"DPOTrainer._precompute_ref_logps{inspect.signature(fn)} changed")
    if "precompute_ref_logps" not in inspect.getsource(DPOTrainer._compute_loss):
        problems.append("DPOTrainer._compute_loss no longer reads precompute_ref_logps")
    if fn is not None and "self.ref_model or self.model" not in inspect.getsource(fn):
        problems.append("DPOTrainer._precompute_ref_logps no longer forwards self.ref_model when it is set")
    return problems


def metrics(trainer, mode: str = "train"):
    """TRL's per-mode metric store (name -> list of values, averaged into the next log line). Reads the private
    `DPOTrainer._metrics` (trl 1.16); can go when TRL offers a public way to log a metric from a callback."""
    return trainer._metrics[mode]


def key_precompute_cache(trainer, dataset, model_hash: str, data_key: str) -> str:
    """Give TRL's reference log-prob cache our key and return the cache file TRL will read or write.

    TRL keys that file on (dataset._fingerprint, self._precompute_model_hash) through the dataset's private
    `_get_cache_file_path` (trl 1.16, datasets 5.2): both are set here, and the path is computed as TRL computes it.
    Can go when TRL takes a cache key (or the reference's identity) as an argument."""
    from datasets.fingerprint import Hasher

    trainer._precompute_model_hash = model_hash
    dataset._fingerprint = data_key
    return dataset._get_cache_file_path(Hasher.hash((dataset._fingerprint, model_hash)))


def prepare_dataset(dataset, tok, args, name: str):
    """TRL's own preparation (tokenization) of `dataset`, outside a trainer and without its barriers.

    Calls the private `DPOTrainer._prepare_dataset` on a stub holding `_tokenizer`, with the module-level
    `global_then_local_main_first` replaced by a no-op only around the call (trl 1.16). Can go when TRL exposes its
    dataset preparation as a function."""
    import trl.trainer.dpo_trainer as dpo

    # DPOTrainer.__init__ assigns the pad token before preparing its datasets; the assignment changes the tokenizer's
    # datasets hash (even to the same value), so it is made here too, or the trainer's maps would miss this cache
    tok.pad_token = args.pad_token or tok.pad_token or tok.eos_token
    stub = SimpleNamespace(_tokenizer=tok)
    saved = dpo.global_then_local_main_first
    dpo.global_then_local_main_first = contextlib.nullcontext
    try:
        return dpo.DPOTrainer._prepare_dataset(stub, dataset, tok, args, name)
    finally:
        dpo.global_then_local_main_first = saved


def tokenize(tok, text, **chat_template_kwargs) -> dict:
    """One example tokenized as TRL's dataset preparation tokenizes it (chat template for conversations). Calls the
    private `trl.data_utils._tokenize` (trl 1.16); can go when TRL makes it public."""
    from trl.data_utils import _tokenize

    return _tokenize(tok, text, **chat_template_kwargs)


@contextlib.contextmanager
def peft_wrap_returns(peft_model, kwargs: dict):
    """While DPOTrainer(model=base, peft_config=...) is built, its get_peft_model(base, peft_config) returns the
    PeftModel that wrap_lora already made from that base (checked: same base, config and arguments), so TRL takes its
    new-adapter path (reference = the base with adapters disabled, ref_model None) without wrapping twice.

    Passing the PeftModel itself (peft_config=None) is not the same in trl 1.16: it then treats the adapter as a
    pretrained one and adds a frozen copy of it, adapter "ref", as the reference, copied from the adapter's tensors,
    which the forward proofs' ZeRO-3 engine has partitioned by then (RuntimeError: size ... must match ... 0).

    Relies on: trl.trainer.dpo_trainer calling its module-level `get_peft_model` (patched here for the duration).
    Can go when DPOTrainer accepts an already-wrapped new adapter as the policy with the base as reference."""
    import trl.trainer.dpo_trainer as dpo_module

    original, calls = dpo_module.get_peft_model, []

    def reuse(model, peft_config, **got):
        calls.append(got)
        if model is not peft_model.get_base_model() or peft_config is not peft_model.peft_config["default"] or \
                got != kwargs:
            raise ValueError(f"TRL wraps the policy with PEFT differently from dpo-dist ({type(model).__name__}, "
                             f"arguments {got} vs {kwargs}): report this as a dpo-dist bug")
        return peft_model

    dpo_module.get_peft_model = reuse
    try:
        yield calls
    finally:
        dpo_module.get_peft_model = original


@contextlib.contextmanager
def brings_its_reference():
    """While a DPOTrainer is built in precompute mode with no `ref_model` (dpo-dist's cpu and ranks placements bring
    the reference themselves), TRL builds no reference of its own and hashes no model.

    TRL 1.16 under FSDP loads a second reference from the policy's path whenever `ref_model` is None and no PEFT model
    is trained, even in precompute mode (`create_model_from_path` in `DPOTrainer.__init__`), and shards it whole at the
    root; and it hashes `self.ref_model or self.model` for its cache key (`hash_module`: every tensor to numpy, which
    a DTensor cannot give without gathering the whole model). dpo-dist keys its caches itself (key_precompute_cache).
    Patches the module-level `create_model_from_path` (-> None: TRL then keeps `ref_model` None, as under DeepSpeed)
    and `hash_module` of trl.trainer.dpo_trainer for the duration. Can go when TRL builds no reference in precompute
    mode under FSDP (and hashes lazily)."""
    import trl.trainer.dpo_trainer as dpo_module

    saved = dpo_module.create_model_from_path, dpo_module.hash_module
    dpo_module.create_model_from_path = lambda *a, **k: None
    dpo_module.hash_module = lambda module: "dpo-dist keys its own cache"
    try:
        yield
    finally:
        dpo_module.create_model_from_path, dpo_module.hash_module = saved
