"""Chunked token KL tests: exact zero on identical logits, analytic values, and agreement with kl_div in fp64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_dist.verify.kl import KLStats, masked_kl_stats, token_kl


def reference_kl(policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(policy.double(), dim=-1)
    log_q = F.log_softmax(ref.double(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("chunk", [1, 128, 1000, 4096])
def test_identical_logits_give_zero(chunk: int) -> None:
    logits = torch.randn(2, 5, 1000, generator=torch.Generator().manual_seed(0)) * 5
    kl = token_kl(logits, logits.clone(), chunk=chunk)
    assert kl.dtype == torch.float32 and kl.shape == (2, 5)
    assert kl.abs().max().item() < 1e-7


def test_two_token_analytic() -> None:
    policy = torch.log(torch.tensor([[[0.5, 0.5]]])) + 3.0  # shifts must not matter
    ref = torch.log(torch.tensor([[[0.9, 0.1]]])) - 7.0
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    for chunk in (1, 2, 4096):
        assert abs(token_kl(policy, ref, chunk=chunk).item() - expected) < 1e-6
    # KL is not symmetric: swapping the arguments must give a different number
    assert abs(token_kl(ref, policy).item() - expected) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [128, 1000, 4096])
def test_matches_kl_div(dtype: torch.dtype, chunk: int) -> None:
    gen = torch.Generator().manual_seed(1)
    policy = (torch.randn(3, 7, 1000, generator=gen) * 3).to(dtype)
    ref = (policy.float() + torch.randn(3, 7, 1000, generator=gen)).to(dtype)
    expected = reference_kl(policy, ref)
    kl = token_kl(policy, ref, chunk=chunk)
    assert kl.dtype == torch.float32
    assert expected.min() > 0.1  # non-trivial values, so a wrong formula cannot pass
    torch.testing.assert_close(kl.double(), expected, atol=1e-5, rtol=0)


def test_inputs_untouched_and_masked_vocab() -> None:
    gen = torch.Generator().manual_seed(2)
    policy = torch.randn(2, 3, 50, generator=gen)
    policy[..., :5] = float("-inf")  # p_v = 0 there: 0 log 0 = 0, not nan
    ref = policy.clone()
    ref[..., 5:] += torch.randn(2, 3, 45, generator=gen)
    before = (policy.clone(), ref.clone())
    kl = token_kl(policy, ref, chunk=7)
    assert torch.equal(policy, before[0]) and torch.equal(ref, before[1])
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), reference_kl(policy[..., 5:], ref[..., 5:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab, chunk", [(32_000, 4096), (1000, 333), (50, 4096), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_equals_naive_full_softmax_kl(vocab: int, chunk: int, dtype: torch.dtype) -> None:
    """The buffered chunks give what the usual full-vocabulary computation gives, in the same fp32."""
    gen = torch.Generator().manual_seed(vocab + chunk)
    policy = (torch.randn(2, 4, vocab, generator=gen) * 4).to(dtype)
    ref = (policy.float() + torch.randn(2, 4, vocab, generator=gen)).to(dtype)
    a = F.log_softmax(policy.float(), dim=-1)
    b = F.log_softmax(ref.float(), dim=-1)
    naive = (a.exp() * (a - b)).sum(dim=-1)
    kl = token_kl(policy, ref, chunk=chunk)
    assert kl.dtype == torch.float32 and kl.shape == naive.shape
    assert naive.mean() > 0.1  # non-trivial values
    torch.testing.assert_close(kl, naive, atol=1e-4, rtol=1e-5)
    assert token_kl(policy, policy.clone(), chunk=chunk).abs().max().item() == 0.0


def test_any_leading_shape_and_no_autograd() -> None:
    gen = torch.Generator().manual_seed(4)
    policy = torch.randn(9, 100, generator=gen, requires_grad=True)  # [T, V], one sequence
    ref = torch.randn(9, 100, generator=gen)
    kl = token_kl(policy, ref, chunk=30)
    assert kl.shape == (9,) and not kl.requires_grad
    torch.testing.assert_close(kl.double(), reference_kl(policy.detach(), ref), atol=1e-5, rtol=0)


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_masked_stats_ignore_padding() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    poisoned = torch.where(mask.bool(), kl, torch.tensor(1e30))
    poisoned[2, 1] = float("nan")
    for k in (kl, poisoned):
        stats = masked_kl_stats(k, mask)
        assert isinstance(stats, KLStats)
        assert stats.sum.dtype == torch.float64 and stats.count.dtype == torch.float64
        assert stats.count.item() == 4
        assert stats.sum.item() == pytest.approx(1.0, abs=1e-7)
        assert stats.mean().item() == pytest.approx(0.25, abs=1e-7)
        # per-sequence means 0.2, 0.4 and 0 (no tokens): the max is the second sequence
        assert stats.max_seq_mean.item() == pytest.approx(0.4, abs=1e-7)


def test_max_seq_mean_and_merge() -> None:
    kl = torch.tensor([[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    stats = masked_kl_stats(kl, mask)
    assert stats.max_seq_mean.item() == 2.0  # mean of 1 and 3, not max token (3) nor the padded 100
    other = masked_kl_stats(torch.tensor([[0.5, 9.0]]), torch.tensor([[1, 1]]))
    merged = stats.merge(other)
    assert merged.count.item() == 4 and merged.sum.item() == 13.5 and merged.max_seq_mean.item() == 4.75
    assert merged.mean().item() == pytest.approx(13.5 / 4)
    empty = masked_kl_stats(torch.zeros(2, 3), torch.zeros(2, 3))
    assert empty.count.item() == 0 and empty.mean().item() == 0.0 and empty.max_seq_mean.item() == 0.0
    assert masked_kl_stats(torch.zeros(0, 3), torch.zeros(0, 3)).max_seq_mean.item() == 0.0


@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    policy = (torch.randn(2, 9, 3000, generator=gen) * 3).bfloat16()
    ref = (policy.float() + torch.randn(2, 9, 3000, generator=gen)).bfloat16()
    kl = token_kl(policy.cuda(), ref.cuda(), chunk=1024)
    assert kl.device.type == "cuda"
    torch.testing.assert_close(kl.double().cpu(), reference_kl(policy, ref), atol=1e-5, rtol=0)
    assert token_kl(policy.cuda(), policy.cuda()).abs().max().item() < 1e-7
