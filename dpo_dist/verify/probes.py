"""Forward-pass helpers: the proofs' temporary engines, greedy generation, and the KL monitor's per-prompt KL (the
forward proofs' shared passes: dpo_dist.verify.forward_proofs).

ZeRO-3 runs a forward as a collective (each layer's weights are gathered from every rank), so every rank runs exactly
the same number of forwards here: prompts are split over ranks and the short shards are padded with a masked-out
repeat (DeepSpeed#860 and transformers#36638 are the hangs this avoids).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from dpo_dist.runtime.distributed import DistContext
from dpo_dist.verify.kl import masked_kl_stats, token_kl
from dpo_dist.verify.report import RankReport


def is_partitioned(model) -> bool:
    """ZeRO-3 partitioned (forwards need a DeepSpeed engine's gathering hooks). An FSDP2 module gathers in its own
    hooks, so it needs none: dpo_dist.sharding.views.is_sharded says whether forwards are collective."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def inference_ds_config(train_ds: dict, hidden_size: int | None) -> dict:
    """The DeepSpeed config of a forward-only ZeRO-3 engine, as TRL's prepare_deepspeed derives it, except that each
    layer is released after use: the shipped configs' stage3_max_live_parameters / stage3_max_reuse_distance of 1e9
    let DeepSpeed keep the whole model gathered from the second forward on (a model under 1e9 parameters), which the
    few forwards of the proofs do not need (measured on 0.44B, 2 ranks: init peak 1.67x -> ~1.15x the ideal)."""
    cfg = copy.deepcopy(train_ds)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    zero = cfg.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero.update(forward_only_zero3(hidden_size))
    if hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    return _drop_auto(cfg)


def forward_only_zero3(hidden_size: int | None) -> dict:
    """The zero_optimization settings of a forward-only ZeRO-3 engine: each gathered layer released right after use,
    only small tensors (under 10 x hidden) kept whole, and TRL's prefetch bucket size for the hidden size."""
    zero: dict = {"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}
    if hidden_size:
        zero.update(stage3_param_persistence_threshold=10 * hidden_size,
                    stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size))
    return zero


def _drop_auto(d: dict) -> dict:
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}


def model_device(model, ctx: DistContext) -> torch.device:
    """Where a model's forward runs: a host-memory (cpu placement) reference stays on CPU."""
    if getattr(model, "runs_on_cpu", False):
        return torch.device("cpu")
    return ctx.device


class AdaptersOff(torch.nn.Module):
    """The LoRA placement's reference: the policy's own base, called with its adapters disabled."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


@contextlib.contextmanager
def forward_ready(model, train_ds: dict, ctx: DistContext):
    """Yield the model ready for forwards. A ZeRO-3 partitioned model gets a temporary inference engine whose hooks
    gather each layer; on exit its partitions are released and its hooks removed, so TRL/accelerate can wrap the same
    module afterwards (TRL's precompute path wraps the policy the same way before training)."""
    if not is_partitioned(model):
        model.to(model_device(model, ctx))
        yield model
        return
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=inference_ds_config(train_ds, _hidden(model)))
    try:
        yield engine.module
    finally:
        engine.empty_partition_cache()
        engine.destroy()


def _hidden(model) -> int | None:
    return getattr(model.config, "hidden_size", None)


def rank_share(items: list[str], ctx: DistContext) -> tuple[list[str], list[bool]]:
    """This rank's items, padded to the same count on every rank; the flags mark real (not padding) items."""
    per = math.ceil(len(items) / ctx.world_size)
    mine = items[ctx.rank::ctx.world_size]
    real = [True] * len(mine) + [False] * (per - len(mine))
    mine = mine + [items[0]] * (per - len(mine))
    return mine, real


def render_prompt(tok, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt


def encode_batch(tok, texts: list[str], device) -> dict[str, torch.Tensor]:
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def generation_check(model, tok, prompts: list[str], max_new_tokens: int, ctx: DistContext, rr: RankReport,
                     synced: bool) -> list[str]:
    """Greedy generation from this rank's prompts; fails on NaN/inf logits or degenerate (empty/repetitive) text."""
    mine, real = rank_share(prompts, ctx)
    enc = encode_batch(tok, [render_prompt(tok, p) for p in mine], ctx.device)
    calls = [0]  # forwards generate ran (each a full gather under ZeRO-3): one prefill, then one per new token
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: generate calls the base
    hook = inner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:  # the KV cache: each further token is a one-position forward, not a forward over the whole text again
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             use_cache=True)
    finally:
        hook.remove()
    rr.facts["generation_forwards"] = calls[0]
    finite = all(bool(torch.isfinite(lg.float()).all()) for lg in out.logits)
    gen = out.sequences[:, enc["input_ids"].shape[1]:]
    texts, degenerate = [], []
    for i, row in enumerate(gen):
        ids = [t for t in row.tolist() if t != tok.pad_token_id]
        text = tok.decode(ids, skip_special_tokens=True).strip()
        top = max((ids.count(t) for t in set(ids)), default=0)
        if real[i]:
            texts.append(text)
            if not text or (len(ids) >= 8 and top / len(ids) > 0.8):
                degenerate.append(mine[i])
    rr.add("generation: finite logits", finite, "all finite" if finite else "NaN/inf in logits",
           "the model produces NaN/inf: check the checkpoint dtype (fp16 overflow?) and that loading succeeded")
    rr.add("generation: not degenerate", not degenerate, f"{len(texts)} prompts, e.g. {texts[0]!r}" if texts and
           not degenerate else f"degenerate output for {degenerate[:1]}",
           "greedy output is empty or one token repeated: the weights may not have loaded (check paths; "
           "re-save the checkpoint)")
    return texts


@torch.no_grad()
def initial_kl(policy, reference, tok, prompts: list[str], chunk: int, ctx: DistContext) -> dict[str, float]:
    """Token-level KL(pi_theta || pi_ref) in fp32 over non-pad positions of the prompts, all-reduced."""
    mine, real = rank_share(prompts, ctx)
    tot = torch.zeros(2, dtype=torch.float64)
    mx = torch.zeros(1, dtype=torch.float64)
    for text, is_real in zip(mine, real, strict=True):  # one prompt per forward: memory bounded by one sequence
        enc = encode_batch(tok, [render_prompt(tok, text)], ctx.device)
        lp = policy(**enc).logits
        lr = reference(**{k: v.to(model_device(reference, ctx)) for k, v in enc.items()}).logits.to(lp.device)
        kl = token_kl(lp, lr, chunk=chunk)
        mask = enc["attention_mask"] * (1 if is_real else 0)
        st = masked_kl_stats(kl, mask)
        tot += torch.stack([st.sum.double().cpu().reshape(()), st.count.double().cpu().reshape(())])
        mx = torch.maximum(mx, st.max_seq_mean.double().cpu().reshape(1))
    tot = ctx.all_reduce(tot, "sum")
    mx = ctx.all_reduce(mx, "max")
    mean = (tot[0] / tot[1]).item() if tot[1] > 0 else float("nan")
    return {"mean": mean, "max_seq_mean": mx.item(), "tokens": int(tot[1].item())}
