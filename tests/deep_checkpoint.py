"""Build a deep, trained test checkpoint: the numeric checks must hold on a model whose bf16 forwards behave like a
real one's (many layers, peaked next-token distributions), not only on the embedded 4-layer one.

A Llama with 24 narrow layers, the embedded tokenizer and chat template, trained briefly (seeded, fixed steps, CPU)
on the embedded corpus and train.jsonl, saved in bf16 safetensors with save_pretrained.

    python tests/deep_checkpoint.py OUT [--tie]
    python tests/deep_checkpoint.py OUT --start BASE --extra-steps N

`--start BASE --extra-steps N` trains BASE N steps more: a checkpoint with the same config and tokenizer but other
weights (a wrong `reference.path`). Tests take both from the session fixtures in tests/conftest.py
(`deep_checkpoint`, `deep_checkpoint_other`), built once into a cache keyed by this file's hash (see `cached`).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 4321
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 24, 64, 172, 4, 2
STEPS, BATCH, LR = 200, 16, 3e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def training_examples(tokenizer) -> list[list[int]]:
    """The embedded SFT data, tokenized the way the embedded checkpoint was trained (its builder's helpers)."""
    from dpo_dist.default import build

    pairs, passages = build.read_corpus(build.HERE / "corpus.txt")
    prefs = build.read_jsonl(build.HERE / "train.jsonl")
    return build.build_examples(tokenizer, pairs, passages, prefs)


def peakedness(model, examples, pad_id: int) -> dict[str, float]:
    """Mean max next-token probability and mean entropy (nats) over the real tokens of the data."""
    import torch

    from dpo_dist.default.build import collate

    model.eval()
    maxp, ent, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            ids, mask, _ = collate(examples[i : i + 32], pad_id)
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            keep = mask.bool()
            maxp += logp.exp().amax(-1)[keep].sum().item()
            ent += -(logp.exp() * logp).sum(-1)[keep].sum().item()
            n += int(keep.sum())
    model.train()
    return {"mean_max_prob": round(maxp / n, 4), "mean_entropy": round(ent / n, 4)}


def train(model, examples, pad_id: int, steps: int, seed: int) -> float:
    import torch

    from dpo_dist.default.build import collate

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]))  # similar lengths per batch: less padding
    batches = [order[k : k + BATCH] for k in range(0, len(order), BATCH)]
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:  # short warmup, then constant
            group["lr"] = LR * min(1.0, (step + 1) / 20)
        ids, mask, labels = collate([examples[i] for i in rng.choice(batches)], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach())


def build(out: Path, start: Path | None = None, extra_steps: int = 0, tie: bool = False, threads: int = 2,
          quiet: bool = False) -> dict:
    """Write the checkpoint to `out` (replaced atomically: built in a sibling temp dir, then renamed): a fresh one,
    or `start` trained `extra_steps` more."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(SEED)
        tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
        examples = training_examples(tok)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
            tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, attention_dropout=0.0,
        )
        if start is None:
            model = LlamaForCausalLM(config)
            before = None if quiet else peakedness(model, examples, tok.pad_token_id)  # a pass saved in the tests
            last = train(model, examples, tok.pad_token_id, STEPS, SEED)
        else:
            model = LlamaForCausalLM.from_pretrained(str(start), dtype=torch.float32)
            before = json.loads((start / "deep_checkpoint.json").read_text())["after"]
            last = train(model, examples, tok.pad_token_id, extra_steps, SEED + 1)
        after = peakedness(model, examples, tok.pad_token_id)
        model.to(torch.bfloat16)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            if (DEFAULT_CHECKPOINT / name).exists():
                shutil.copy2(DEFAULT_CHECKPOINT / name, tmp / name)
        info = {"layers": LAYERS, "hidden": HIDDEN, "parameters": sum(p.numel() for p in model.parameters()),
                "steps": STEPS + extra_steps, "start": str(start or ""),
                "last_train_loss": round(last, 4), "before": before, "after": after,
                "tied": tie, "build_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "deep_checkpoint.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        torch.set_num_threads(old_threads)
    if not quiet:
        print(f"wrote {out}: {json.dumps(info)}")
    return info


def source_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("DPO_DIST_TEST_CACHE") or ROOT / ".cache")


def cached(variant: str = "base", extra_steps: int = 0, tie: bool = False) -> Path:
    """The checkpoint in the cache (keyed by this file's hash), built once; a file lock keeps concurrent pytest
    processes from building it twice. A variant with extra_steps starts from the base one."""
    root = cache_root() / f"deep-ckpt-{source_key()}"
    out = root / variant
    root.mkdir(parents=True, exist_ok=True)
    if (out / "deep_checkpoint.json").exists():
        return out
    with open(root / f"{variant}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "deep_checkpoint.json").exists():  # another process built it while this one waited
            return out
        start = cached("base", tie=tie) if extra_steps else None
        build(out, start=start, extra_steps=extra_steps, tie=tie, quiet=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--start", type=Path, help="a checkpoint built by this script to train further")
    ap.add_argument("--extra-steps", type=int, default=0, help="with --start: train this many steps more")
    ap.add_argument("--tie", action="store_true", help="tie the input and output embeddings")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if (args.start is None) != (args.extra_steps == 0):
        ap.error("--start and --extra-steps go together")
    build(args.out.resolve(), start=args.start, extra_steps=args.extra_steps, tie=args.tie, threads=args.threads)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
