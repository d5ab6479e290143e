"""Build a Llama-shaped checkpoint with random bf16 weights (default ~0.45B parameters) for benchmarks and GPU runs.

It reuses the embedded tokenizer (a smaller vocabulary than the embedding matrix is allowed), so no download is needed.
Random weights generate noise: run `dpo-dist init --set verify.generation=false --set verify.perplexity=false
--set verify.tokenizer_order=false` on it (the proofs that judge trained weights).

    python bench/make_checkpoint.py --out /tmp/llama-450m
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dpo_dist.config.resources import DEFAULT_CHECKPOINT

    out = Path(args.out)
    if (out / "model.safetensors").exists():
        print(f"exists: {out}")
        return
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    print(f"wrote {out}: {n / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
