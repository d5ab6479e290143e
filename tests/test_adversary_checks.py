"""The checkpoint, data and check-side cases of the second adversarial pass (issue 21): each reproduces the
adversary's input (/work/shared/notes/adversary-2026-12.md) and asserts what a user expects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpo_dist.cli.main import main
from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.load.checkpoint import INDEX_NAME, SINGLE_NAME, read_elements, tensor_index, weight_files


def one_line_exit(argv: list[str], capsys, code: int = 2) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("dpo-dist"), err
    return lines[0]


def add_index(d: Path, noise: float) -> None:
    """The adversary's ck/stale_index: model.safetensors intact, plus an index and two shards holding the same
    tensors with `noise` * N(0, 1) added (0: an identical second copy)."""
    ts = load_file(str(d / SINGLE_NAME))
    g = torch.Generator().manual_seed(0)
    names = sorted(ts)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fname = f"model-0000{i}-of-00002.safetensors"
        shard = {n: (ts[n].float() + noise * torch.randn(ts[n].shape, generator=g)).to(ts[n].dtype) for n in part}
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------------------------------------------- #41 / #42

def test_stale_index_beside_model_safetensors_is_refused_naming_both_sets(tmp_path, capsys):
    d = tmp_path / "stale_index"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.02)
    out = tmp_path / "out"
    line = one_line_exit(["init", "--model", str(d), "--output-dir", str(out)], capsys)
    assert "two different weight sets" in line and SINGLE_NAME in line and INDEX_NAME in line, line
    assert "model-00001-of-00002.safetensors" in line and "remove the stale set" in line, line
    assert not (out / "report.json").exists()


def test_weight_set_is_the_one_from_pretrained_loads(tmp_path):
    """Pins transformers' order: with both sets present, from_pretrained loads model.safetensors, and so do the
    fast loader and the file fingerprint (both read tensor_index, i.e. weight_files)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "both"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.02)
    assert weight_files(d) == [d / SINGLE_NAME]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    e = tensor_index(d)["model.embed_tokens.weight"]
    ours = torch.frombuffer(bytearray(read_elements(e, 0, e.numel)), dtype=e.dtype).float().reshape(e.shape)
    assert torch.equal(model.model.embed_tokens.weight.detach(), ours)


def test_identical_second_copy_is_accepted(tmp_path, capsys):
    """A re-sharded copy kept beside the single file holds the same weights: nothing is ambiguous."""
    from dpo_dist.load.checkpoint import competing_sets
    d = tmp_path / "same"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.0)
    assert competing_sets(d) is None


def test_config_transformers_weights_is_followed_first(tmp_path):
    """transformers loads config.json's `transformers_weights` before any default name; so must every loader here."""
    d = tmp_path / "explicit"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    add_index(d, 0.02)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_weights": INDEX_NAME}))
    assert [f.name for f in weight_files(d)] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]


# ---------------------------------------------------------------------------------------------------- #37

def test_unset_eval_is_no_eval_set_except_for_the_demo(tmp_path):
    from dpo_dist.config.schema import load, parse_override

    def cfg(*sets: str):
        return load(None, [parse_override(s) for s in sets]).data

    assert (cfg().train, cfg().eval) == ("default", "default")  # the demo: embedded model, data unset
    assert cfg("data.train=my.jsonl").eval is None  # never the demo's eval rows beside a user's train set
    assert cfg(f"model.path={tmp_path}").eval is None
    assert cfg(f"model.path={tmp_path}", "data.train=my.jsonl").eval is None
    assert cfg("data.eval=null").eval is None
    assert cfg("data.train=my.jsonl", "data.eval=default").eval == "default"  # said explicitly: kept


def test_demo_note_names_a_user_model_on_the_demo_data():
    from dpo_dist.data.sources import demo_note

    assert demo_note("default", "default") is None
    assert demo_note("/ckpt", "my.jsonl") is None
    note = demo_note("/ckpt", "default")
    assert note and "demo" in note and "data.train" in note
