"""dpo_dist.load.fastload: a ZeRO-3 model loaded by reading each rank's partitions straight from the file must be what
transformers' ZeRO-3 from_pretrained gives (weights bitwise, buffers, config, logits, training), or be refused
before anything is allocated.

The multi-process test runs this file as a driver script under torchrun (2 real processes, gloo, DeepSpeed's CPU
accelerator) on the embedded checkpoint; each rank writes what it saw as JSON and the test asserts on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, free_port, run_cmd  # noqa: E402

from dpo_dist.config.resources import DEFAULT_CHECKPOINT  # noqa: E402
from dpo_dist.load.fastload import FastLoadRefused, load_partitioned, plan_load  # noqa: E402


def tied_odd_checkpoint(dst: Path) -> Path:
    """A random tiny Llama with tied embeddings and an odd hidden size (25): at 2 ranks its norms, MLP and embedding
    matrices do not split evenly, so the last shard has padding (the embedded checkpoint, all multiples of 128,
    has none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=25, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(dst))
    return dst


# ---------------------------------------------------------------------------------------------------------------
# the driver (one rank)
# ---------------------------------------------------------------------------------------------------------------
def ds_config(world: int) -> dict:
    # persistence threshold 1000: the norms (128 elements) become full copies at deepspeed.initialize, which is
    # where a partition filled too late would show up as a stale value
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
            "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "train_batch_size": 2 * world, "gradient_clipping": 1.0, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def describe(model) -> dict:
    """Everything about a loaded ZeRO-3 model that must not depend on how it was loaded."""
    params = {n: [list(p.ds_shape), str(p.dtype), p.ds_persist, p.requires_grad, p.ds_tensor.numel(), p.numel()]
              for n, p in model.named_parameters()}
    buffers = {n: [str(b.dtype), list(b.shape), hashlib.sha256(b.cpu().contiguous().view(torch.uint8).numpy()
                                                                .tobytes()).hexdigest()[:16]]
               for n, b in model.named_buffers()}
    return {"params": params, "buffers": buffers, "config": model.config.to_dict(), "training": model.training,
            "generation": model.generation_config.to_dict(), "class": type(model).__name__,
            "tied": [n for n, _ in model.named_parameters(remove_duplicate=False)]}


def padding_is_zero(model) -> bool:
    ok = True
    for p in model.parameters():
        part = p.ds_tensor.numel()
        n = max(0, min(part, p.ds_numel - p.ds_zero_partition_rank * part))
        ok &= bool((p.ds_tensor.view(-1)[n:] == 0).all())
    return ok


def driver(out: Path, tied: Path | None) -> None:
    from datetime import timedelta

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60), auto_mpi_discovery=False)
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from dpo_dist.runtime.distributed import DistContext
    from dpo_dist.verify import probes, weights

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ctx = DistContext(rank, world)
    ds = ds_config(world)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (what DPOConfig does: from_pretrained partitions from now on)
    res: dict = {"rank": rank, "world": world}
    hf = AutoModelForCausalLM.from_pretrained(str(DEFAULT_CHECKPOINT), dtype=torch.bfloat16)
    fast = load_partitioned(DEFAULT_CHECKPOINT, "bfloat16")  # the registered config, as the product would pass
    slow = load_partitioned(DEFAULT_CHECKPOINT, torch.bfloat16, ds, skip_init_broadcast=False)  # plain zero.Init
    res["describe"] = {"hf": describe(hf), "fast": describe(fast), "slow": describe(slow)}
    fp_files, missing = weights.file_fingerprints(DEFAULT_CHECKPOINT, weights.param_meta(hf), ctx)
    res["fp"] = {"files": fp_files, "hf": weights.model_fingerprints(hf, ctx),
                 "fast": weights.model_fingerprints(fast, ctx), "slow": weights.model_fingerprints(slow, ctx)}
    res["missing"] = missing
    res["padding_zero"] = padding_is_zero(fast)
    # a parameter made after loading (a LoRA adapter) and converted through a loaded parameter's Init, as a
    # DeepSpeed engine converts new parameters: it keeps its values (the loader skips the copy only while building)
    extra = torch.nn.Parameter(torch.arange(1, 1001, dtype=torch.bfloat16))
    next(fast.parameters()).convert_to_zero_parameters([extra])
    part = extra.ds_tensor.numel()
    n = max(0, min(part, 1000 - rank * part))
    res["converted_later_keeps_values"] = bool(torch.equal(
        extra.ds_tensor[:n], torch.arange(1, 1001, dtype=torch.bfloat16)[rank * part: rank * part + n]))
    if tied is not None:
        hf_t = AutoModelForCausalLM.from_pretrained(str(tied), dtype=torch.bfloat16)
        fast_t = load_partitioned(tied, "bfloat16", ds)
        res["tied"] = {"hf": describe(hf_t), "fast": describe(fast_t),
                       "fp_hf": weights.model_fingerprints(hf_t, ctx),
                       "fp_fast": weights.model_fingerprints(fast_t, ctx), "padding_zero": padding_is_zero(fast_t),
                       "padded": [n for n, p in fast_t.named_parameters() if p.ds_numel % world]}
    # forwards through a temporary ZeRO-3 inference engine, as dpo-dist's forward proofs run them
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8]]) + rank
    logits = {}
    models = {"hf": hf, "fast": fast} | ({"hf_t": hf_t, "fast_t": fast_t} if tied is not None else {})
    for name, m in models.items():
        with torch.no_grad(), probes.forward_ready(m, ds, ctx) as ready:
            logits[name] = ready(input_ids=ids % m.config.vocab_size).logits.float()
    res["logits_equal"] = bool(torch.equal(logits["hf"], logits["fast"]))
    res["logits_max_abs"] = float((logits["hf"] - logits["fast"]).abs().max())
    if tied is not None:
        res["tied_logits_equal"] = bool(torch.equal(logits["hf_t"], logits["fast_t"]))
    # training: same batch, one optimizer step each, then the loss again and the weights
    losses = {}
    for name, m in (("hf", hf), ("fast", fast)):
        m.train()
        engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters()], config=ds)
        res.setdefault("persistent", {})[name] = [n for n, p in m.named_parameters() if p.ds_persist]
        first = engine(input_ids=ids, labels=ids).loss
        engine.backward(first)
        engine.step()
        second = engine(input_ids=ids, labels=ids).loss
        losses[name] = [first.item(), second.item()]
        res.setdefault("fp_after_step", {})[name] = weights.model_fingerprints(m, ctx)
        engine.destroy()
    res["losses"] = losses
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------------------
def launch_driver(tmp_path: Path, nproc: int) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    tied = tied_odd_checkpoint(tmp_path / "tied")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()), "--driver", str(out),
            "--tied", str(tied)]
    code, log = run_cmd(argv, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=180, cwd=ROOT)
    assert code == 0, log[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_rank(res: dict) -> None:
    d = res["describe"]
    # same parameter names, shapes, dtypes, partition sizes; same buffers, config, generation config, mode
    assert d["fast"] == d["hf"], {k: (d["fast"][k], d["hf"][k]) for k in d["hf"] if d["fast"][k] != d["hf"][k]}
    assert d["slow"] == d["hf"]
    assert set(d["hf"]["buffers"]) >= {"model.rotary_emb.inv_freq"}
    # bitwise: partitions == the files == transformers' path (and with zero.Init's broadcast kept)
    fp = res["fp"]
    assert not res["missing"] and len(fp["files"]) == len(d["hf"]["params"])
    assert fp["fast"] == fp["files"] == fp["hf"] == fp["slow"]
    assert res["padding_zero"]
    assert res["converted_later_keeps_values"]
    assert res["logits_equal"], res["logits_max_abs"]
    # one training step: same losses before and after it, same weights after it. The norms are persistent
    # (full copies made by deepspeed.initialize from the partitions): a partition filled too late would differ
    assert res["persistent"]["fast"] == res["persistent"]["hf"] and res["persistent"]["hf"]
    assert res["losses"]["fast"] == res["losses"]["hf"]
    assert res["losses"]["fast"][1] != res["losses"]["fast"][0]
    assert res["fp_after_step"]["fast"] == res["fp_after_step"]["hf"] != fp["hf"]
    # tied embeddings: one parameter under two names, as from_pretrained ties them
    t = res["tied"]
    assert t["fast"] == t["hf"] and "lm_head.weight" in t["fast"]["tied"]
    assert "lm_head.weight" not in t["fast"]["params"]
    assert t["fp_fast"] == t["fp_hf"]
    assert t["padding_zero"]
    assert res["tied_logits_equal"]


@pytest.mark.multiproc
def test_two_ranks_equal_to_from_pretrained(tmp_path):
    ranks = launch_driver(tmp_path, 2)
    for res in ranks:
        check_rank(res)
        assert "model.embed_tokens.weight" in res["tied"]["padded"]  # 101 x 25 elements: the last shard is padded
    assert ranks[0]["fp"] == ranks[1]["fp"]  # every rank holds the same verdict


@pytest.mark.multiproc
def test_one_rank_equal_to_from_pretrained(tmp_path):
    (res,) = launch_driver(tmp_path, 1)
    check_rank(res)
    assert not res["tied"]["padded"]


def renamed_copy(dst: Path, old: str, new: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(DEFAULT_CHECKPOINT, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[new] = tensors.pop(old)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_plan_maps_every_parameter():
    from dpo_dist.load.checkpoint import tensor_index

    plan = plan_load(DEFAULT_CHECKPOINT, "bfloat16")
    index = tensor_index(DEFAULT_CHECKPOINT)
    assert plan.entries == index and not plan.buffers and not plan.aliases
    assert plan.nbytes == sum(e.nbytes for e in index.values())


def test_refuses_another_dtype():
    with pytest.raises(FastLoadRefused, match="wanted torch.float32"):
        plan_load(DEFAULT_CHECKPOINT, "float32")
    with pytest.raises(ValueError):  # callers may catch ValueError
        plan_load(DEFAULT_CHECKPOINT, "float16")


def test_refuses_renamed_keys(tmp_path):
    ckpt = renamed_copy(tmp_path / "renamed", "model.norm.weight", "model.final_norm.weight")
    with pytest.raises(FastLoadRefused, match=r"model\.norm\.weight not in the checkpoint.*final_norm"):
        plan_load(ckpt, "bfloat16")


def test_refuses_other_shapes(tmp_path):
    ckpt = tmp_path / "shapes"
    shutil.copytree(DEFAULT_CHECKPOINT, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FastLoadRefused, match=r"shape \(344, 128\) in file, \(256, 128\) in the model"):
        plan_load(ckpt, "bfloat16")


def test_refuses_without_zero3():
    with pytest.raises(FastLoadRefused, match="stage 2"):
        load_partitioned(DEFAULT_CHECKPOINT, "bfloat16", {"zero_optimization": {"stage": 2}})
    with pytest.raises(FastLoadRefused, match="no ZeRO-3 DeepSpeed config registered"):
        load_partitioned(DEFAULT_CHECKPOINT, "bfloat16")


def test_tied_plan_loads_one_tensor_for_two_names(tmp_path):
    plan = plan_load(tied_odd_checkpoint(tmp_path / "tied"), "bfloat16")
    assert plan.aliases == {"model.embed_tokens.weight": ["model.embed_tokens.weight", "lm_head.weight"]}
    assert "lm_head.weight" not in plan.entries


# The pin of deepspeed.zero.Init._zero_init_param (NoBroadcastInit) is in tests/test_compat.py.


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    ap.add_argument("--tied")
    a = ap.parse_args()
    driver(Path(a.driver), Path(a.tied) if a.tied else None)


def test_read_many_coalesces_neighbouring_ranges_into_few_requests(tmp_path, monkeypatch):
    """Reader.read_many fills every destination with exactly the file's bytes (ranges in any order, gaps, a range
    that ends the file, partial kernel reads), and reads ranges of one file lying within the gap limit of each other
    as one request: here two ranks' halves of 40 small tensors and one big one, as rank 1 needs them."""
    from dpo_dist.load import fastload
    from dpo_dist.load import reader as reader_mod
    from dpo_dist.load.checkpoint import TensorEntry

    sizes = [256] * 40 + [400_001]  # bf16 elements per tensor; the last, odd, ends the file
    data = torch.randint(0, 256, (2 * sum(sizes),), dtype=torch.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    entries, start = [], 0
    for i, n in enumerate(sizes):
        entries.append(TensorEntry(f"t{i}", str(path), torch.bfloat16, (n,), start, 2 * n))
        start += 2 * n
    jobs = []
    for e in reversed(entries):  # rank 1 of 2: the second half of each tensor
        part = -(-e.numel // 2)
        jobs.append((e, part, torch.empty(e.numel - part, dtype=torch.bfloat16)))
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, bufs[:1], off) if len(bufs) > 3
                        else real(fd, bufs, off))  # the kernel may fill fewer buffers than asked
    reader = fastload.Reader()
    try:
        reader.read_many(jobs)
    finally:
        reader.close()
    for e, first, dst in jobs:
        lo = e.start + 2 * first
        assert torch.equal(dst.view(torch.uint8), data[lo: lo + dst.numel() * 2]), e.name
    assert reader.bytes_read == sum(d.numel() * 2 for _, _, d in jobs)
    assert len(reader.request_sizes) == 1  # one span: every gap is another rank's 256 bytes
    assert reader.request_sizes[0] == entries[-1].start + entries[-1].nbytes - (entries[0].start + 256)
    monkeypatch.setattr(reader_mod, "_GAP_BYTES", 100)  # gaps over the limit: one request per range
    reader = fastload.Reader()
    try:
        reader.read_many(jobs)
    finally:
        reader.close()
    assert len(reader.request_sizes) == len(sizes)
