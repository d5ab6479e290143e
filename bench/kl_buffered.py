"""A proposed `dpo_dist.kl.token_kl` whose memory does not grow with the vocabulary (see bench/README.md).

The current token_kl allocates a few fresh fp32 [B, T, chunk] temporaries per vocabulary chunk. Its working set is
constant, but glibc's dynamic mmap threshold turns those freed 16 MiB blocks into heap memory after the first free,
and the heap's peak then grows with the number of chunks (measured at B x T = 2 x 512, chunk 4096: +87 MiB at
V = 32k, +235 MiB at 128k; with MALLOC_MMAP_THRESHOLD_=1048576, 87 MiB at both). This version allocates three
buffers once and reuses them with in-place and out= operations: nothing is allocated per chunk but [B, T] vectors.

Same definition and same guarantees as token_kl: fp32, two passes, identical logits give exactly 0 (both sides see
the same operations), 0 log 0 = 0. It is not bitwise the same as token_kl (logsumexp is computed as max + log of a
sum of exponentials here); bench_init.py checks the two agree to 1e-6.
"""

from __future__ import annotations

import torch


def token_kl_buffered(policy_logits: torch.Tensor, ref_logits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
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
