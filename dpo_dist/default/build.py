"""Build the embedded default SFT checkpoint (`dpo_dist/default/tiny-sft/`) from the text files next to this script.

    python -m dpo_dist.default.build [--out DIR] [--seconds S] [--steps N]

Trains a byte-level BPE tokenizer on `corpus.txt`, then a ~0.9M-parameter Llama on the corpus (rendered through the
chat template and as plain text) and on `train.jsonl`'s prompt+chosen, and saves both in bf16 safetensors. Seeds are
fixed and training runs a fixed number of steps, so two runs on the same machine and thread count give the same
weights; `--seconds` is only a safety cap (a run that hits it says so).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

T_START = time.monotonic()
HERE = Path(__file__).resolve().parent
SEED = 1234
VOCAB_SIZE = 512
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SAMPLE_PROMPT = "Explain machine learning in simple terms."
# Newlines are written as Jinja string literals ('\n'): transformers renders with trim_blocks=True, which would eat a
# literal newline that follows a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Only system, user and assistant roles are supported.') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def read_corpus(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Return (chat pairs, plain passages) from corpus.txt (blank-line separated blocks, '#' comments)."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    blocks = [b.strip() for b in "\n".join(lines).split("\n\n") if b.strip()]
    pairs, passages = [], []
    for block in blocks:
        rows = block.split("\n")
        if len(rows) == 2 and rows[0].startswith("User: ") and rows[1].startswith("Assistant: "):
            pairs.append((rows[0][len("User: ") :], rows[1][len("Assistant: ") :]))
        else:
            passages.append(" ".join(rows))
    return pairs, passages


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # add_bos_token=True makes transformers install a post-processor that prepends <|bos|> to plain text (what TRL's
    # DPO does with string prompts); apply_chat_template tokenizes without it, so the template writes bos itself.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def chat_ids(tokenizer, user: str, assistant: str) -> list[int]:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_examples(tokenizer, pairs, passages, prefs) -> list[list[int]]:
    """Token id sequences to train on: chat-templated and plain forms of every Q/A, plus the plain passages."""
    eos = tokenizer.eos_token_id
    examples = []
    qa = list(pairs) + [(row["prompt"], row["chosen"].strip()) for row in prefs]
    for question, answer in qa:
        examples.append(chat_ids(tokenizer, question, answer))
        # Plain form, exactly as TRL's DPO tokenizes a string prompt + completion (bos added, eos appended).
        examples.append(tokenizer(question + " " + answer)["input_ids"] + [eos])
    examples += [tokenizer(p)["input_ids"] + [eos] for p in passages]
    return examples


def build_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def collate(batch: list[list[int]], pad_id: int):
    import torch

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train(model, examples, pad_id: int, steps: int, seconds: float, batch_size: int = 8, lr: float = 3e-3) -> int:
    import torch

    rng = random.Random(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = 50

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def epoch_batches() -> list[list[int]]:  # shuffle, then sort within chunks of 8 batches to cut padding
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        chunk = 8 * batch_size
        batches = []
        for i in range(0, len(perm), chunk):
            group = sorted(perm[i : i + chunk], key=lambda j: len(examples[j]))
            batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
        rng.shuffle(batches)
        return batches

    model.train()
    queue: list[list[int]] = []
    start, recent = time.monotonic(), []
    for step in range(steps):
        if not queue:
            queue = epoch_batches()
        ids, mask, labels = collate([examples[i] for i in queue.pop()], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 200 == 0 or step == steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  mean50 {sum(recent) / len(recent):.4f}  "
                f"{time.monotonic() - start:5.1f}s",
                flush=True,
            )
        if time.monotonic() - start > seconds:
            print(f"WARNING: hit the --seconds cap after {step + 1}/{steps} steps; the result is not reproducible")
            return step + 1
    return steps


def dataset_loss(model, examples, pad_id: int) -> float:
    """Token-weighted mean loss over all examples (no grad)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            ids, mask, labels = collate(examples[i : i + 32], pad_id)
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.float().item() * n
            count += n
    return total / count


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 80) -> str:
    import torch

    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny-sft", help="output directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1600, help="AdamW steps, batch 8 (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=240.0, help="cap on training seconds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    tmp = out.with_name(out.name + ".tmp")
    if out.exists() and any(out.iterdir()) and not (out / "model.safetensors").exists():
        raise SystemExit(f"{out} is not empty and holds no model.safetensors; refusing to replace it")

    import torch
    from transformers import GenerationConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    pairs, passages = read_corpus(HERE / "corpus.txt")
    prefs = read_jsonl(HERE / "train.jsonl")
    tokenizer = build_tokenizer([t for pair in pairs for t in pair] + passages)
    examples = build_examples(tokenizer, pairs, passages, prefs)
    pad_id = tokenizer.pad_token_id
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    print(f"tokenizer: vocab {len(tokenizer)}, bos/eos/pad ids {bos_id}/{eos_id}/{pad_id}")
    print(f"data: {len(pairs)} corpus Q/A, {len(passages)} passages, {len(prefs)} pref rows -> {len(examples)} seqs")

    model = build_model(tokenizer)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    t0 = time.monotonic()
    done = train(model, examples, pad_id, args.steps, args.seconds)
    seconds = time.monotonic() - t0
    print(f"trained {done} steps in {seconds:.1f}s; fp32 loss on the data {dataset_loss(model, examples, pad_id):.4f}")

    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=128
    )
    print(f"bf16 loss on the data {dataset_loss(model, examples, pad_id):.4f}")
    print(f"greedy (bf16) {SAMPLE_PROMPT!r} -> {greedy(model, tokenizer, SAMPLE_PROMPT)!r}")

    # Write to a fresh sibling dir, then swap it in, so no file from an older build is left behind.
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({size / 1e6:.2f} MB): {', '.join(sorted(f.name for f in out.iterdir()))}")
    print(f"total {time.monotonic() - T_START:.1f}s")


if __name__ == "__main__":
    main()
