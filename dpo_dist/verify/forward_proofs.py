"""The forward proofs, sharing forwards: what each proof costs in full-model forwards, and the shared passes.

Under ZeRO-3 every forward gathers every layer, so at scale the number of forwards, not their arithmetic, sets the
cost of the proofs (issue 23: about thirty before, greedy generation one forward per new token, perplexity, the
tokenizer-order probe one forward per text, the initial KL one per prompt, and its self-noise as many again). Here:

- one policy forward over the verify texts (padding masked) serves the perplexity of the reference answer, the
  tokenizer-order probe's in-order loss, and the policy side of the initial KL;
- one reference forward on the SAME batch gives the KL (same rows, same padding: padding cannot make an exact
  comparison inexact, it changes both sides alike);
- one policy forward over the texts' shuffled copies gives the order probe's "same tokens, no order" level;
- the policy's run-to-run noise (the KL's tolerance) is measured with one repeat of the verify pass only where
  forwards may be nondeterministic; on CPU (device type) they are bitwise deterministic and the tolerance is 0;
- greedy generation with a KV cache: `verify.max_new_tokens` forwards (one prefill, then one per further token).

The rows of each pass are split over the ranks (short shards padded with masked-out repeats, so every rank runs the
same forwards) and at most `verify.rows_per_forward` rows go into one forward; sums are all-reduced, so every rank
reaches the same verdict. `planned_forwards` predicts the counts from the config alone (`init --dry-run` prints it);
the run records what it ran (report facts `forward_counts`), and tests/test_forward_proofs.py holds them equal.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dpo_dist.config.schema import DEFAULT_PROMPTS, DEFAULT_REFERENCE_TEXT
from dpo_dist.plan.forwards import ORDER_SHUFFLES
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.verify.kl import masked_kl_stats, token_kl
from dpo_dist.verify.probes import model_device, render_prompt
from dpo_dist.verify.report import RankReport

ORDER_BAR = 0.5  # in-order loss closer to a perfect prediction (0) than to the shuffled level


# -- the texts ------------------------------------------------------------------------------------------------------
def verify_texts(tok, prompts: list[str], reference_text: str) -> tuple[list[list[int]], int]:
    """The verify texts as token ids: first the reference answer after the first prompt (its answer tokens from
    position `answer_from`, for the perplexity), then each prompt as the model sees it. When the user's texts differ
    from the built-in ones, the built-in texts are scored too: a few short prompts alone (~40 tokens) leave the
    tokenizer-order probe too few tokens to tell a real model from a scramble (issue 21 #52)."""
    head = render_prompt(tok, prompts[0]) if getattr(tok, "chat_template", None) else ""
    answer = tok(head + reference_text, add_special_tokens=not head)["input_ids"]
    answer_from = max(1, len(tok(head, add_special_tokens=False)["input_ids"]) if head else 0)
    rows = [list(answer)] + [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    if list(prompts) != list(DEFAULT_PROMPTS) or reference_text != DEFAULT_REFERENCE_TEXT:
        builtin, _ = verify_texts(tok, list(DEFAULT_PROMPTS), DEFAULT_REFERENCE_TEXT)
        rows += [r for r in builtin if r not in rows]
    return [list(r) for r in rows], answer_from


def shuffled_rows(rows: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(shuffle index, ids) for ORDER_SHUFFLES random orders of every text of 3 tokens or more; the same on every
    rank (seeded)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for ids in rows:
        if len(ids) < 3:
            continue
        t = torch.tensor(ids)
        out += [(k, t[torch.randperm(len(ids), generator=gen)].tolist()) for k in range(ORDER_SHUFFLES)]
    return out


# -- running them -----------------------------------------------------------------------------------------------------
def _share(n: int, ctx: DistContext) -> list[tuple[int, bool]]:
    """(row index, real) for this rank: rows rank, rank + world, ...; short shards padded with masked repeats."""
    per = math.ceil(n / ctx.world_size)
    mine = list(range(ctx.rank, n, ctx.world_size))
    return [(i, True) for i in mine] + [(0, False)] * (per - len(mine))


def _batches(rows: list[list[int]], ctx: DistContext, per_forward: int, pad_id: int, device):
    """This rank's rows in batches of at most per_forward: (row indices, real flags, input_ids, attention_mask),
    right-padded (padding masked out; causal attention keeps the real positions' inputs unchanged)."""
    share = _share(len(rows), ctx)
    for s in range(0, len(share), per_forward):
        part = share[s:s + per_forward]
        width = max(len(rows[i]) for i, _ in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for j, (i, _) in enumerate(part):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        yield [i for i, _ in part], [r for _, r in part], ids.to(device), mask.to(device)


def _nll(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Per-token NLL of ids[1:n] from one row's logits, in fp32 (one row at a time: fp32 memory of one row)."""
    lg = logits[: n - 1].float()
    return torch.logsumexp(lg, -1) - lg.gather(-1, ids[1:n, None])[:, 0]


class Counter:
    """Forwards run per proof on this rank, and each proof's seconds (report facts)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def time(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)


@dataclass
class VerifyPass:
    """What the shared passes measured, all-reduced."""

    answer_nll: float = 0.0  # perplexity: the reference answer's tokens
    answer_tokens: int = 0
    order_nll: float = 0.0  # the order probe: every text in order
    order_tokens: int = 0
    shuffled: list[float] | None = None  # per shuffle: NLL sum over every text
    kl: dict | None = None
    self_kl: dict | None = None
    finite: bool = True


@torch.no_grad()
def run_passes(policy, reference, tok, verify, ctx: DistContext, counter: Counter, deterministic: bool,
               say=lambda s: None) -> VerifyPass:
    """The verify pass (policy; reference on the same batch for the KL; a repeat where forwards may be
    nondeterministic) and the shuffled pass, each rank its share of rows."""
    rows, answer_from = verify_texts(tok, list(verify.prompts), verify.reference_text)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    per, out = verify.rows_per_forward, VerifyPass()
    need_policy = verify.perplexity or verify.tokenizer_order or verify.initial_kl
    sums = torch.zeros(5, dtype=torch.float64)  # answer nll, answer tokens, order nll, order tokens, nonfinite rows
    kl_tot, kl_max = torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    self_tot = torch.zeros(2, dtype=torch.float64)
    if need_policy:
        say("verify pass: perplexity, tokenizer order (in order), initial KL")
        for idx, real, ids, mask in _batches(rows, ctx, per, pad, ctx.device):
            t0 = time.perf_counter()
            lp = policy(input_ids=ids, attention_mask=mask).logits
            counter.add("verify pass (policy: perplexity, tokenizer order, KL)")
            counter.time("verify pass (policy: perplexity, tokenizer order, KL)", time.perf_counter() - t0)
            t0 = time.perf_counter()
            for j, (i, is_real) in enumerate(zip(idx, real, strict=True)):
                if not is_real:
                    continue
                n = len(rows[i])
                sums[4] += 0 if bool(torch.isfinite(lp[j, :n]).all()) else 1
                nll = _nll(lp[j], ids[j], n)
                if i == 0:
                    sums[0] += nll[answer_from - 1:].double().sum().item()
                    sums[1] += max(0, n - answer_from)
                if n >= 3:
                    sums[2] += nll.double().sum().item()
                    sums[3] += n - 1
            counter.time("perplexity + tokenizer order (in order)", time.perf_counter() - t0)
            if verify.initial_kl:
                t0 = time.perf_counter()
                keep = mask * torch.tensor(real, dtype=mask.dtype, device=mask.device)[:, None]
                lr = reference(input_ids=ids.to(model_device(reference, ctx)),
                               attention_mask=mask.to(model_device(reference, ctx))).logits.to(lp.device)
                counter.add("initial KL (reference)")
                st = masked_kl_stats(token_kl(lp, lr, chunk=verify.kl_chunk), keep)
                del lr
                kl_tot += torch.stack([st.sum.double().cpu().reshape(()), st.count.double().cpu().reshape(())])
                kl_max = torch.maximum(kl_max, st.max_seq_mean.double().cpu().reshape(1))
                counter.time("initial KL (reference)", time.perf_counter() - t0)
                if not deterministic:  # the policy against itself, same batch: this hardware's run-to-run noise
                    t0 = time.perf_counter()
                    again = policy(input_ids=ids, attention_mask=mask).logits
                    counter.add("self-noise (policy, repeat)")
                    st = masked_kl_stats(token_kl(lp, again, chunk=verify.kl_chunk), keep)
                    self_tot += torch.stack([st.sum.double().cpu().reshape(()), st.count.double().cpu().reshape(())])
                    del again
                    counter.time("self-noise (policy, repeat)", time.perf_counter() - t0)
            del lp
    sums = ctx.all_reduce(sums, "sum")
    out.answer_nll, out.answer_tokens = float(sums[0]), int(sums[1])
    out.order_nll, out.order_tokens, out.finite = float(sums[2]), int(sums[3]), int(sums[4]) == 0
    if verify.initial_kl:
        kl_tot, kl_max = ctx.all_reduce(kl_tot, "sum"), ctx.all_reduce(kl_max, "max")
        out.kl = {"mean": (kl_tot[0] / kl_tot[1]).item() if kl_tot[1] > 0 else float("nan"),
                  "max_seq_mean": kl_max.item(), "tokens": int(kl_tot[1].item())}
        if not deterministic:
            self_tot = ctx.all_reduce(self_tot, "sum")
            out.self_kl = {"mean": (self_tot[0] / self_tot[1]).item() if self_tot[1] > 0 else float("nan"),
                           "tokens": int(self_tot[1].item())}
    if verify.tokenizer_order:
        say("tokenizer order: the same tokens shuffled")
        t0 = time.perf_counter()
        shuf = shuffled_rows(rows)
        level = torch.zeros(ORDER_SHUFFLES, dtype=torch.float64)
        for idx, real, ids, mask in _batches([r for _, r in shuf], ctx, per, pad, ctx.device):
            lg = policy(input_ids=ids, attention_mask=mask).logits
            counter.add("tokenizer order, shuffled (policy)")
            for j, (i, is_real) in enumerate(zip(idx, real, strict=True)):
                if is_real:
                    level[shuf[i][0]] += _nll(lg[j], ids[j], len(shuf[i][1])).double().sum().item()
            del lg
        out.shuffled = ctx.all_reduce(level, "sum").tolist()
        counter.time("tokenizer order, shuffled (policy)", time.perf_counter() - t0)
    return out


# -- the rows ---------------------------------------------------------------------------------------------------------
def perplexity_row(vp: VerifyPass, vocab: int, rr: RankReport) -> float:
    """Perplexity of the reference answer (its tokens only, after the first prompt in the chat format) against the
    uniform baseline (vocab size): a trained model is far below it."""
    ppl = math.exp(vp.answer_nll / vp.answer_tokens) if vp.answer_tokens else float("nan")
    rr.add("perplexity below uniform", ppl < vocab, f"{ppl:.2f} vs uniform {vocab} over {vp.answer_tokens} answer "
           "tokens", "perplexity is no better than chance: the checkpoint looks untrained or wrongly loaded (check "
           "paths)")
    return ppl


def order_row(vp: VerifyPass, rr: RankReport) -> dict:
    """Do the tokenizer's ids mean to the weights what they mean to the tokenizer?

    A tokenizer whose ids are swapped against the embeddings (another model's, or edited) still gives a perplexity
    far below uniform on a trained model (issue 13.5). The verify texts are scored in their real order and with the
    same tokens shuffled (ORDER_SHUFFLES random orders). With matched ids the real order explains most of the loss;
    with mismatched ids the text reads to the model as a scramble and its loss approaches the shuffled level. The bar
    is the midpoint: the in-order loss per token must be closer to a perfect prediction (0) than to the shuffled
    level, ratio < 1/2. The ratio's noise (the spread of the shuffled levels, as a standard error) is measured and
    shown, so a verdict within the noise of the bar reads as such."""
    n = max(vp.order_tokens, 1)
    real = vp.order_nll / n
    levels = [s / n for s in (vp.shuffled or [])]
    shuffled = sum(levels) / len(levels) if levels else float("nan")
    sd = (sum((x - shuffled) ** 2 for x in levels) / (len(levels) - 1)) ** 0.5 if len(levels) > 1 else 0.0
    ratio = real / shuffled if shuffled > 0 else float("inf")
    noise = ratio * sd / math.sqrt(len(levels)) / shuffled if levels and shuffled > 0 else 0.0
    source = (f"bar {ORDER_BAR}: in order closer to a perfect prediction (0) than to the shuffled level; ratio noise "
              f"+-{noise:.3f} (standard error from the spread of {len(levels)} shuffled levels)")
    rr.add("tokenizer matches the weights", ratio < ORDER_BAR,
           f"verify texts: {real:.3f} nats/token in order vs {shuffled:.3f} shuffled (ratio {ratio:.2f} +-"
           f"{noise:.2f}, a matched tokenizer is below {ORDER_BAR}) over {vp.order_tokens} tokens",
           "the text reads to the model about as well shuffled as in order: the tokenizer's ids do not match the "
           "embeddings (another model's tokenizer, or an edited tokenizer.json); use the tokenizer saved with this "
           "checkpoint", ORDER_BAR, source)
    return {"in_order": real, "shuffled": shuffled, "ratio": ratio, "ratio_noise": noise, "tokens": vp.order_tokens}


SKIP_REASON = "verify.{key}: false"


def prove(policy, reference, tok, verify, ctx: DistContext, rr: RankReport, synced: bool, cross: bool,
          say=lambda s: None) -> tuple[VerifyPass, bool, Counter]:
    """Every forward proof, each switched by its own verify.* key (a proof switched off is a SKIPPED row, never
    absent): generation, then the shared passes, then the perplexity and order rows. Returns what the passes
    measured, whether forwards were taken as deterministic (the KL's tolerance), and the forwards and seconds each
    proof ran on this rank (report facts)."""
    from dpo_dist.plan.forwards import deterministic_device
    from dpo_dist.verify.probes import generation_check

    counter = Counter()
    if verify.generation:
        say(f"generation smoke test ({verify.max_new_tokens} new tokens, KV cache) ...")
        t0 = time.perf_counter()
        texts = generation_check(policy, tok, list(verify.prompts), verify.max_new_tokens, ctx, rr, synced)
        counter.add("generation", rr.facts.pop("generation_forwards", 0))
        counter.time("generation", time.perf_counter() - t0)
        rr.facts["sample_generation"] = texts[:2]
    else:
        for name in ("generation: finite logits", "generation: not degenerate"):
            rr.skip(name, SKIP_REASON.format(key="generation"))
    deterministic = deterministic_device(ctx.device.type) and not cross
    vp = run_passes(policy, reference, tok, verify, ctx, counter, deterministic, say)
    if verify.perplexity or verify.tokenizer_order or verify.initial_kl:
        rr.add("verify pass: finite logits", vp.finite, "all finite" if vp.finite else "NaN/inf in the policy's "
               "logits on the verify texts", "the model produces NaN/inf: check the checkpoint dtype (fp16 "
               "overflow?) and that loading succeeded")
    if verify.perplexity:
        rr.facts["perplexity"] = perplexity_row(vp, int(policy.config.vocab_size), rr)
    else:
        rr.skip("perplexity below uniform", SKIP_REASON.format(key="perplexity"))
    if verify.tokenizer_order:
        rr.facts["tokenizer_order"] = order_row(vp, rr)
    else:
        rr.skip("tokenizer matches the weights", SKIP_REASON.format(key="tokenizer_order"))
    if not verify.initial_kl:
        rr.skip("initial KL < limit", SKIP_REASON.format(key="initial_kl"))
    return vp, deterministic, counter
