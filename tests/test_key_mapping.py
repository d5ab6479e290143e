"""The file proof and the fast loader see the files as from_pretrained does: transformers' own key renaming, tying,
sharded checkpoints, and every file tensor accounted for both ways (issue 13.1, issue 17)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.load.checkpoint import INDEX_NAME, tensor_index
from dpo_dist.load.fastload import FastLoadRefused, account_files, plan_load
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.verify import weights

CTX = DistContext(0, 1)
# Sizes small enough for every text architecture; each applies only where the config has the attribute.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Architectures the sweep must have built and checked with renamed keys (a guard against a sweep that builds none).
MUST_RENAME = {"gpt_neox", "granitemoe", "aria_text", "mixtral", "qwen2_moe", "deepseek_v3", "nemotron_h"}


def from_pretrained(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path))


def tiny_model(model_type: str):
    """A random model of this architecture with tiny sizes, or None if one cannot be built that small (multimodal
    wrappers whose vision tower keeps its full default size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.for_model(model_type)
    try:
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in TINY.items() if hasattr(base, k)})
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - a config that cannot be made tiny generically
        return None
    if sum(p.numel() for p in meta.parameters()) > 5_000_000:
        return None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def renaming_architectures() -> list[str]:
    """Every causal-LM model type of the installed transformers with a checkpoint conversion mapping."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        cls = cls[0] if isinstance(cls, (list, tuple)) else cls
        if get_checkpoint_conversion_mapping(cls) or get_checkpoint_conversion_mapping(model_type):
            out.append(model_type)
    return out


# The pin of transformers' key-conversion API (compat.transformers.conversions / rename) is in tests/test_compat.py.


def test_every_renaming_architecture(tmp_path):
    """For each architecture whose mapping renames keys: save_pretrained writes the legacy (checkpoint) names, and
    the file proof maps them back: every tensor accounted for both ways, the renamed ones bitwise equal to the
    loaded model; the fast loader plans renamed keys and refuses converted (fused) ones by name."""
    checked, renamed_seen, unbuildable = {}, set(), []
    for model_type in renaming_architectures():
        model = tiny_model(model_type)
        if model is None:
            unbuildable.append(model_type)
            continue
        d = tmp_path / model_type
        model.save_pretrained(str(d))
        file_keys = set(tensor_index(d))
        loaded = from_pretrained(d)
        proof = weights.file_proof(d, loaded, CTX)
        fps = weights.model_fingerprints(loaded, CTX)
        assert proof.account.complete, (model_type, proof.account.describe())
        assert not proof.missing, (model_type, proof.missing)
        bad = [n for n in weights.compare(fps, proof.fingerprints) if n not in proof.converted]
        assert not bad, (model_type, bad[:3])
        assert set(proof.converted) <= proof.account.converted_targets | set(proof.account.tied)
        if file_keys - set(loaded.state_dict()):
            renamed_seen.add(model_type)
            assert proof.account.renamed or proof.account.converted, model_type
        try:
            plan = plan_load(d, loaded.dtype)
            assert not proof.account.converted, model_type  # a plan only where nothing is converted
            assert {e.name for e in plan.entries.values()} <= file_keys
            assert {n for n in plan.entries} <= set(fps)
        except FastLoadRefused as e:
            assert proof.account.converted, (model_type, str(e))
            assert "converted" in str(e), (model_type, str(e))
        checked[model_type] = proof.account.describe()
    print(f"checked {len(checked)}: {checked}\nnot buildable tiny: {unbuildable}")
    assert MUST_RENAME <= renamed_seen, MUST_RENAME - renamed_seen
    assert len(checked) >= 40, (len(checked), unbuildable)


def test_gpt_neox_legacy_lm_head_is_proven_against_its_file_name(tmp_path):
    """The issue's false failure: GPT-NeoX files call lm_head.weight `embed_out.weight`."""
    model = tiny_model("gpt_neox")
    model.save_pretrained(str(tmp_path))
    assert "embed_out.weight" in tensor_index(tmp_path)
    loaded = from_pretrained(tmp_path)
    proof = weights.file_proof(tmp_path, loaded, CTX)
    assert proof.account.renamed == {"embed_out.weight": "lm_head.weight"}
    assert proof.fingerprints["lm_head.weight"] == weights.model_fingerprints(loaded, CTX)["lm_head.weight"]
    plan = plan_load(tmp_path, torch.float32)
    assert plan.entries["lm_head.weight"].name == "embed_out.weight"


def test_legacy_layernorm_gamma_beta_names(tmp_path):
    """transformers' 'legacy' renaming, applied to every model (LayerNorm.gamma/.beta -> .weight/.bias): a BERT
    LM-head checkpoint whose LayerNorm keys were renamed to the old names inside the safetensors file."""
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=64, is_decoder=True)
    BertLMHeadModel(cfg).save_pretrained(str(tmp_path))
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    legacy = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
              for k, v in tensors.items()}
    assert sum(k.endswith(".gamma") for k in legacy) >= 2
    save_file(legacy, str(f), metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path)
    proof = weights.file_proof(tmp_path, loaded, CTX)
    assert proof.account.complete, proof.account.describe()
    assert {k for k in proof.account.renamed if k.endswith((".gamma", ".beta"))} == \
        {k for k in legacy if k.endswith((".gamma", ".beta"))}
    assert proof.fingerprints == weights.model_fingerprints(loaded, CTX)


def test_config_with_fewer_layers_than_the_files(tmp_path):
    """Issue 13.1: num_hidden_layers one less than the files hold. The old proof compared only the model's tensors
    and passed; the account names the left-over layer."""
    d = tmp_path / "short"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (d / "config.json").write_text(json.dumps(cfg))
    loaded = from_pretrained(d)
    proof = weights.file_proof(d, loaded, CTX)
    last = cfg["num_hidden_layers"]
    assert not proof.account.complete
    assert proof.account.unexplained_file and all(k.startswith(f"model.layers.{last}.")
                                                  for k in proof.account.unexplained_file)
    assert f"model.layers.{last}." in proof.account.describe()
    assert not proof.account.unexplained_model
    with pytest.raises(FastLoadRefused, match=f"model.layers.{last}"):
        plan_load(d, "bfloat16")
    before_loading = account_files(d)  # what a preflight can call: config.json and the headers, a meta model
    assert before_loading.unexplained_file == proof.account.unexplained_file
    assert account_files(DEFAULT_CHECKPOINT).complete


def test_config_with_more_layers_than_the_files(tmp_path):
    d = tmp_path / "long"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    loaded = from_pretrained(d)
    acct = weights.file_proof(d, loaded, CTX).account
    assert not acct.unexplained_file
    assert acct.unexplained_model and all(k.startswith(f"model.layers.{cfg['num_hidden_layers'] - 1}.")
                                          for k in acct.unexplained_model)


def test_tied_embeddings_in_a_sharded_checkpoint(tmp_path):
    """Tied lm_head (absent from the files) and an index over several safetensors files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=25, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="4KB")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in tensor_index(tmp_path)
    loaded = from_pretrained(tmp_path)
    proof = weights.file_proof(tmp_path, loaded, CTX)
    assert proof.account.complete and proof.account.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert proof.fingerprints == weights.model_fingerprints(loaded, CTX)
    plan = plan_load(tmp_path, "bfloat16")
    assert len({e.file for e in plan.entries.values()}) > 2
