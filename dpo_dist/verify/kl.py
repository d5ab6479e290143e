"""Token-level KL(pi_theta || pi_ref) from logits, in fp32, one vocabulary chunk at a time.

Why chunked: at step 0 the policy and the reference must agree; checking it on [B, T, V] logits with V ~ 128k would
need several fp32 [B, T, V] softmax tensors. Here only the inputs and three [B, T, chunk] buffers (allocated once,
reused for every chunk) are alive at once: measured 42 MiB at B x T = 2 x 512, chunk 4096, for V = 32k and 128k
alike. Pure torch, no collectives: callers all-reduce the KLStats tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@torch.no_grad()
def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, p = softmax(policy), q = softmax(ref); fp32 [B, T].

    Two passes over vocab chunks: logsumexp of both (max + log of a sum of exponentials per chunk, chunks combined
    with logaddexp), then sum of exp(lp) * (lp - lq) with lp, lq the log-probs of the chunk. Each chunk is upcast to
    fp32 into one of three buffers of [..., chunk] allocated once and reused with in-place and out= operations, so
    nothing vocabulary-sized is allocated per chunk: the working set is those buffers whatever V is (a fresh
    temporary per chunk let glibc keep freed blocks in the heap, and the process peak grew with V: bench/README.md).
    Inputs are never modified; no autograd. Identical logits give exactly 0 (both sides see the same ops).
    The raw value is returned, not clamped: rounding can make it slightly negative (about -1e-7), and clamping would
    also hide a genuinely broken computation. Terms with p_v = 0 contribute 0 (0 log 0 = 0), so -inf logits in the
    policy are fine; q_v = 0 where p_v > 0 gives +inf, as it should.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}")
    if policy_logits.dim() < 1 or policy_logits.shape[-1] == 0:
        raise ValueError(f"need a non-empty vocabulary dimension, got shape {tuple(policy_logits.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    vocab = policy_logits.shape[-1]
    width = min(chunk, vocab)
    lead = policy_logits.shape[:-1]
    a = torch.empty(*lead, width, dtype=torch.float32, device=policy_logits.device)
    b = torch.empty_like(a)
    zero = torch.empty(a.shape, dtype=torch.bool, device=a.device)

    def lse(logits: torch.Tensor) -> torch.Tensor:
        out = None
        for start in range(0, vocab, width):
            n = min(width, vocab - start)
            x = a[..., :n]
            x.copy_(logits[..., start : start + n])  # upcast into the buffer, no allocation
            m = x.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all -inf (or +inf) rows: no nan from inf-inf
            part = x.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
            out = part if out is None else torch.logaddexp(out, part)
        return out.unsqueeze(-1)

    lse_p, lse_q = lse(policy_logits), lse(ref_logits)
    kl = torch.zeros(lead, dtype=torch.float32, device=policy_logits.device)
    for start in range(0, vocab, width):
        n = min(width, vocab - start)
        lp, diff, z = a[..., :n], b[..., :n], zero[..., :n]
        lp.copy_(policy_logits[..., start : start + n]).sub_(lse_p)
        diff.copy_(ref_logits[..., start : start + n]).sub_(lse_q).neg_().add_(lp)  # lp - lq
        p = lp.exp_()
        torch.eq(p, 0, out=z)
        kl.add_(diff.mul_(p).masked_fill_(z, 0.0).sum(dim=-1))
    return kl


@dataclass
class KLStats:
    """Masked KL statistics as float64 0-d tensors, ready for all-reduce.

    Reduce ``sum`` and ``count`` with SUM and ``max_seq_mean`` with MAX across ranks, then call ``mean()``.
    """

    sum: torch.Tensor
    count: torch.Tensor
    max_seq_mean: torch.Tensor

    def mean(self) -> torch.Tensor:
        """Token-weighted mean KL; 0 when no token was counted (no host sync)."""
        return torch.where(self.count > 0, self.sum / self.count.clamp_min(1), torch.zeros_like(self.sum))

    def merge(self, other: KLStats) -> KLStats:
        """Combine statistics of two batches on the same rank (what the all-reduce does across ranks)."""
        return KLStats(
            self.sum + other.sum, self.count + other.count, torch.maximum(self.max_seq_mean, other.max_seq_mean)
        )


def masked_kl_stats(kl: torch.Tensor, mask: torch.Tensor) -> KLStats:
    """Statistics of kl [B, T] over positions where mask [B, T] is non-zero (the attention mask).

    Every non-pad position counts: each one has a next-token distribution that policy and reference must agree on.
    Padded positions are excluded with ``where`` (not multiplication), so inf/nan there cannot leak in.
    ``max_seq_mean`` is the largest per-sequence masked mean; sequences without tokens (and an empty batch) give 0.
    """
    if kl.shape != mask.shape or kl.dim() != 2:
        raise ValueError(f"kl and mask must both be [B, T], got {tuple(kl.shape)} and {tuple(mask.shape)}")
    keep = mask.to(device=kl.device) != 0
    vals = torch.where(keep, kl.double(), torch.zeros((), dtype=torch.float64, device=kl.device))
    seq_sum = vals.sum(dim=-1)
    seq_cnt = keep.sum(dim=-1).double()
    seq_mean = torch.where(seq_cnt > 0, seq_sum / seq_cnt.clamp_min(1), torch.zeros_like(seq_sum))
    if seq_mean.numel():
        max_seq_mean = seq_mean.max()
    else:
        max_seq_mean = torch.zeros((), dtype=torch.float64, device=kl.device)
    return KLStats(sum=seq_sum.sum(), count=seq_cnt.sum(), max_seq_mean=max_seq_mean)
