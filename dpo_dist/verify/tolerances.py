"""Where each numeric check's tolerance comes from: bitwise, float rounding, or noise this run measures.

Policy and reference start bitwise identical (the fingerprint rows prove it), so any gap between them at step 0 comes
from how they were run, never from what they are. Where both see the same inputs on the same hardware (zero3, lora,
ranks, cpu on a CPU-only box) there is no gap at all: the step-0 loss is ln 2 up to the float32 rounding of the loss
mean, and the initial KL is the policy's own run-to-run noise (0 on deterministic kernels). Where the reference's
log-probs were computed under other batching (precomputed: other neighbours, other padding, and bf16 forwards of a
deep model move with padding), the run measures that batching noise on the policy itself — the same rows under the
precompute batching and under the training batching — and bounds the loss by it, while a bitwise check ties the
cached log-probs to the policy's own under the precompute batching. Nothing is calibrated on the policy-vs-reference
gap it is meant to judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

LN2 = math.log(2.0)
FP32_UNIT_ROUNDOFF = 2.0**-24
# the initial KL's reference run is a third run of the computation the policy's self-noise sampled twice: a margin for
# the spread of one noisy sample against another (0 stays 0: deterministic kernels give a bitwise check)
SELF_NOISE_MARGIN = 4.0
BITWISE_FINGERPRINTS = "bitwise: weight fingerprints before and after the step"


@dataclass(frozen=True)
class Tolerance:
    value: float
    source: str
    user: bool = False  # a verify.* setting the user chose, not derived by the run


def user_setting(cfg, name: str) -> float | None:
    """verify.<name> when the user set it (differs from the default), else None."""
    from dpo_dist.config.schema import VerifyConfig

    default = {f.name: f.default for f in fields(VerifyConfig)}[name]
    value = getattr(cfg.verify, name)
    return None if value is None or value == default else float(value)


def rounding_tolerance(pairs: int) -> Tolerance:
    """The float32 rounding of a mean of `pairs` per-pair losses that are each exactly fl(ln 2), and of ln 2 itself:
    (pairs + 4) unit roundoffs of ln 2 (the sum, the division, the logging's averages)."""
    return Tolerance((pairs + 4) * FP32_UNIT_ROUNDOFF * LN2,
                     f"float32 rounding of the mean over {pairs} pairs: policy and reference saw the same batch")


def loss_bound(noise: list[float], beta: float) -> float:
    """Bound on |mean_i -logsigmoid(beta * n_i) - ln 2| for per-pair log-ratio gaps n_i: -logsigmoid(x) = ln 2 - x/2
    + r(x) with |r(x)| <= x^2/8 (its second derivative is at most 1/4)."""
    if not noise:
        return 0.0
    return sum(beta * abs(n) / 2 + (beta * n) ** 2 / 8 for n in noise) / len(noise)


def loss_tolerance(cfg, cross_device: bool, pairs: int, noise: dict[str, Any] | None) -> Tolerance:
    """The step-0 loss tolerance for this run and where it comes from."""
    user = user_setting(cfg, "loss_tolerance")
    if user is not None:
        return Tolerance(user, "user: verify.loss_tolerance", True)
    if cross_device:
        return Tolerance(cfg.verify.cross_device_loss_tolerance,
                         "verify.cross_device_loss_tolerance (reference on CPU, policy on the accelerator: other "
                         "kernels; a setting, not measured by this run)", user_setting(
                             cfg, "cross_device_loss_tolerance") is not None)
    rounding = rounding_tolerance(pairs)
    if noise is None:
        return rounding
    return Tolerance(noise["bound"] + rounding.value,
                     f"batching noise measured on the policy: its log-probs of the same {noise['pairs']} pairs under "
                     f"the precompute and the training batching (mean |gap| {noise['mean_abs_gap']:.3g} nats, "
                     f"beta {noise['beta']:g}), plus float32 rounding")


DETERMINISTIC_SOURCE = ("bitwise: forwards on CPU are deterministic (by device type: no repeat forward run), so "
                        "the reference's logits on the same batch must equal the policy's")


def kl_tolerance(cfg, cross_device: bool, self_kl: dict[str, float] | None, deterministic: bool = False) -> Tolerance:
    user = user_setting(cfg, "kl_max")
    if user is not None:
        return Tolerance(user, "user: verify.kl_max", True)
    if deterministic and not cross_device:
        return Tolerance(0.0, DETERMINISTIC_SOURCE)
    if cross_device or self_kl is None:
        return Tolerance(cfg.verify.kl_max, "verify.kl_max (reference on CPU, policy on the accelerator: other "
                         "kernels; a setting, not measured by this run)")
    noise = max(abs(self_kl["mean"]), 0.0)
    if noise == 0.0:
        return Tolerance(0.0, "bitwise: the policy's logits run twice on the same batch are identical, so the "
                         "reference's must be")
    return Tolerance(SELF_NOISE_MARGIN * noise, f"{SELF_NOISE_MARGIN:g} x the policy's own run-to-run KL "
                     f"({noise:.3g}/token, the same batch run twice)")


def kl_row(run, kl: dict, self_kl: dict | None, cross: bool, pol, ref, lora: bool,
           deterministic: bool = False) -> bool:
    """The initial KL row: the KL within the tolerance this run derived, the cause named when it is not."""
    from dpo_dist.load.models import training_modules

    tol = kl_tolerance(run.cfg, cross, self_kl, deterministic)
    warn_user_set(tol, run.ctx)
    what = "adapters on vs off" if lora else "policy vs reference"
    in_train = training_modules(ref) if ref is not None else []
    ref_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in ref.parameters()}) if ref is not None else []
    pol_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in pol.parameters()})
    hint = (f"the reference is in train mode ({len(in_train)} modules, e.g. {in_train[0]}): dropout is active, "
            "call reference.eval()" if in_train else
            f"the reference runs in {'/'.join(ref_dtypes)}, the policy in {'/'.join(pol_dtypes)}: load both in "
            "model.dtype" if ref_dtypes and ref_dtypes != pol_dtypes else
            "policy and reference disagree at step 0: check dropout (reference.eval()), dtypes of both models, "
            "and that both came from the same checkpoint")
    return run.rr.add("initial KL < limit", abs(kl["mean"]) <= tol.value,
                      f"{what}: mean {kl['mean']:.3e}/token, max seq {kl['max_seq_mean']:.3e} over {kl['tokens']} "
                      f"tokens (tolerance {tol.value:.3g}{' set by the user' if tol.user else ''}: {tol.source})",
                      hint, tol.value, tol.source)


def describe(value: float, target: float, tol: Tolerance) -> str:
    """The value text of a numeric row: the value, the gap, the tolerance and where it came from."""
    return (f"{value:.6f} (target {target:.6f}, |diff| {abs(value - target):.3g}, tolerance {tol.value:.3g}"
            f"{' set by the user' if tol.user else ''}: {tol.source})")


def warn_user_set(tol: Tolerance, ctx) -> None:
    if tol.user:
        ctx.warn(f"{tol.source.removeprefix('user: ')} = {tol.value:g} set by the user: this check uses it instead of "
                 "the tolerance the run derives")


# -- precomputed: the batching the precompute pass used, and the policy's log-probs under both ----------------------
class PrecomputeBatching:
    """Which rows TRL's precompute pass forwarded together: a sequential DataLoader of `batch_size` sharded by
    accelerate's BatchSamplerShard over the processes, gathered in (iteration, process) order, the padding tail of
    the last round dropped. For each dataset row, the first batch it appeared in (its cached value's batch)."""

    def __init__(self, n_rows: int, batch_size: int, num_processes: int, even_batches: bool, split_batches: bool):
        from accelerate.data_loader import BatchSamplerShard
        from torch.utils.data import BatchSampler, SequentialSampler

        shards = [list(BatchSamplerShard(BatchSampler(SequentialSampler(range(n_rows)), batch_size, False),
                                         num_processes=num_processes, process_index=r, split_batches=split_batches,
                                         even_batches=even_batches)) for r in range(num_processes)]
        self.batches: list[list[int]] = []
        self.where: dict[int, tuple[int, int]] = {}  # row -> (batch, position in it)
        for i in range(max(len(s) for s in shards)):
            for shard in shards:
                if i < len(shard):
                    b = len(self.batches)
                    self.batches.append(list(shard[i]))
                    for pos, row in enumerate(shard[i]):
                        self.where.setdefault(int(row), (b, pos))


def _seq(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


def _lockstep_count(trainer, n: int) -> int:
    """The most batches any rank needs: under ZeRO-3 every rank must run the same number of forwards."""
    t = torch.tensor([n], device=trainer.accelerator.device)
    return int(trainer.accelerator.gather(t).max().item())


@torch.no_grad()
def measure_batching_noise(trainer, model, inputs: dict[str, Any], batching: PrecomputeBatching, dataset) -> dict:
    """For one training micro-batch: the policy's log-probs of its pairs as trained, and of the same pairs in the
    batches the precompute pass ran them in; whether the cached reference log-probs equal the latter bitwise."""
    c_t, r_t = (x.double().cpu() for x in trainer.compute_ref_log_probs(model, inputs))
    cached_c = inputs["ref_chosen_logps"].float().cpu()
    cached_r = inputs["ref_rejected_logps"].float().cpu()
    n = cached_c.numel()
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    by_value = trainer.rows_by_cached_value()
    candidates = [by_value.get((float(cached_c[i]), float(cached_r[i])), []) for i in range(n)]
    rows = [c[0] if c else None for c in candidates]  # refined below by content
    need = sorted({batching.where[j][0] for c in candidates for j in c})
    rounds = _lockstep_count(trainer, len(need))
    policy_pre: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    for k in range(rounds):
        b = need[k] if k < len(need) else (need[0] if need else 0)
        examples = [{c: dataset[j][c] for c in columns} for j in batching.batches[b]]
        batch = {key: v.to(trainer.accelerator.device) for key, v in trainer.data_collator(examples).items()}
        pc, pr = trainer.compute_ref_log_probs(model, batch)
        policy_pre[b] = (pc.float().cpu(), pr.float().cpu(), {k2: v.cpu() for k2, v in batch.items()})
    equal, gaps, first_diff = 0, [], ""
    for i in range(n):
        found = None
        for j in candidates[i]:  # the row whose content matches (identical cached values are possible for twins)
            b, pos = batching.where[j]
            pc, pr, batch = policy_pre[b]
            half = batch["input_ids"].shape[0] // 2
            same = _seq(ids[i], mask[i]) == _seq(batch["input_ids"][pos], batch["attention_mask"][pos]) and \
                _seq(ids[n + i], mask[n + i]) == _seq(batch["input_ids"][half + pos],
                                                      batch["attention_mask"][half + pos])
            if same:
                found = (j, pc[pos], pr[pos])
                break
        if found is None:
            first_diff = first_diff or f"pair {i} of the micro-batch not found among the precomputed rows"
            continue
        j, pc_i, pr_i = found
        rows[i] = j
        if torch.equal(pc_i, cached_c[i]) and torch.equal(pr_i, cached_r[i]):
            equal += 1
        elif not first_diff:
            first_diff = (f"row {j}: cached {float(cached_c[i]):.6f}/{float(cached_r[i]):.6f}, policy "
                          f"{float(pc_i):.6f}/{float(pr_i):.6f} (chosen/rejected)")
        gaps.append(float((c_t[i] - float(pc_i)) - (r_t[i] - float(pr_i))))
    return {"pairs": n, "equal": equal, "first_diff": first_diff, "gaps": gaps, "rows": rows}


def summarize_noise(measured: list[dict], beta: float, ctx) -> dict[str, Any] | None:
    """All micro-batches of the first step on every rank: the loss bound (mean over micro-batches of each one's
    bound, which bounds the gap of the logged mean loss), pairs checked and pairs bitwise equal."""
    if not measured:
        return None
    bounds = [loss_bound(m["gaps"], beta) for m in measured]
    local = torch.tensor([sum(bounds), len(bounds), sum(m["pairs"] for m in measured),
                          sum(m["equal"] for m in measured), sum(sum(abs(g) for g in m["gaps"]) for m in measured),
                          sum(len(m["gaps"]) for m in measured)], dtype=torch.float64)
    tot = ctx.all_reduce(local, "sum")
    first = next((m["first_diff"] for m in measured if m["first_diff"]), "")
    return {"bound": float(tot[0] / tot[1]), "pairs": int(tot[2]), "equal": int(tot[3]),
            "mean_abs_gap": float(tot[4] / max(tot[5], 1.0)), "beta": beta, "first_diff": first,
            "local_pairs": sum(m["pairs"] for m in measured), "local_equal": sum(m["equal"] for m in measured)}


# -- the step-0 loss each TRL 1.16 loss_type gives at policy == reference ------------------------------------------
# DPOTrainer._compute_loss (trl 1.16): at identical policy and reference every log-ratio is 0, so every f-divergence's
# scores and their difference are 0, and each loss_type's per-pair loss is a constant of beta (b) and
# label_smoothing (e); the logged loss is sum_i loss_weights[i] * that constant.
STEP0_LOSS: dict[str, tuple[str, Any]] = {
    "sigmoid": ("ln 2", lambda b, e: LN2),
    "sigmoid_norm": ("ln 2", lambda b, e: LN2),
    "robust": ("ln 2", lambda b, e: LN2),  # ((1-e) ln 2 - e ln 2) / (1 - 2e)
    "aot": ("ln 2", lambda b, e: LN2),  # (1-e) ln 2 + e ln 2 on sorted, equal log-ratios
    "aot_unpaired": ("ln 2", lambda b, e: LN2),
    "hinge": ("1", lambda b, e: 1.0),  # relu(1 - 0)
    "ipo": ("1/(4 beta^2)", lambda b, e: 1.0 / (4.0 * b * b)),  # (0 - 1/(2 beta))^2
    "sppo_hard": ("1/(2 beta^2)", lambda b, e: 1.0 / (2.0 * b * b)),  # (0 - 1/(2 beta))^2 + (0 + 1/(2 beta))^2
    "nca_pair": ("2 ln 2", lambda b, e: 2.0 * LN2),  # -logsig(0) - 0.5 logsig(0) - 0.5 logsig(0)
    "bco_pair": ("2 ln 2", lambda b, e: 2.0 * LN2),
    "apo_zero": ("1", lambda b, e: 1.0),  # (1 - sig(0)) + sig(0)
    "apo_down": ("1", lambda b, e: 1.0),  # sig(0) + (1 - sig(0))
    "discopop": ("(ln 2 + 1)/2", lambda b, e: (LN2 + 1.0) / 2.0),  # ln 2 (1 - sig(0)) + exp(0) sig(0)
    # 1/2 (-ln 2 - ln(1-e)) + 1/2 (-ln 2 - ln e)
    "exo_pair": ("-ln 2 - ln(e(1-e))/2", lambda b, e: -LN2 - 0.5 * math.log(e * (1.0 - e))),
}
# why a loss_type's step-0 value is not a constant of the config: its row is SKIPPED, never a false failure
STEP0_UNKNOWN = {"sft": "the sft term is the policy's own NLL of the chosen completions, not a constant"}
# the loss types whose change with a per-pair log-ratio gap n is at most the sigmoid's (|d/dx| <= 1/2, |d2/dx2| <= 1/4
# in x = beta * n; robust scaled by 1/(1 - 2e); aot sorts, which moves no gap's sum): loss_bound applies to them
NOISE_BOUNDED = {"sigmoid": lambda e: 1.0, "robust": lambda e: 1.0 / (1.0 - 2.0 * e), "aot": lambda e: 1.0}


@dataclass(frozen=True)
class Step0Target:
    value: float | None  # None: not knowable in advance (skip)
    formula: str  # what the value is, or why it is skipped
    noise_scale: float | None  # multiplies the sigmoid loss bound; None: no bound derived for these losses


def step0_target(args, beta: float, aux_loss: bool = False) -> Step0Target:
    """The step-0 loss at policy == reference for a DPOConfig (loss_type, loss_weights, label_smoothing,
    use_weighting), or why it cannot be known."""
    types = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    weights = list(args.loss_weights or [1.0] * len(types))
    e = float(getattr(args, "label_smoothing", 0.0) or 0.0)
    unknown = [f"loss_type {t}: {STEP0_UNKNOWN[t]}" for t in types if t in STEP0_UNKNOWN]
    unknown += [f"loss_type {t} is not one dpo-dist knows" for t in types if t not in STEP0_LOSS and
                t not in STEP0_UNKNOWN]
    if getattr(args, "use_weighting", False):
        unknown.append("use_weighting (WPO) scales each pair by the policy's own probabilities")
    if aux_loss:
        unknown.append("the model adds a router auxiliary loss (MoE), which depends on the inputs")
    if unknown:
        return Step0Target(None, "; ".join(unknown), None)
    value = sum(w * STEP0_LOSS[t][1](beta, e) for t, w in zip(types, weights, strict=True))
    terms = [f"{'' if w == 1 else f'{w:g} x '}{STEP0_LOSS[t][0]} ({t})" for t, w in zip(types, weights, strict=True)]
    scale = None
    if all(t in NOISE_BOUNDED for t in types):
        scale = sum(abs(w) * NOISE_BOUNDED[t](e) for t, w in zip(types, weights, strict=True))
    return Step0Target(value, " + ".join(terms), scale)


def step0_tolerance(cfg, cross_device: bool, pairs: int, noise: dict[str, Any] | None, target: Step0Target
                    ) -> Tolerance | None:
    """loss_tolerance for the target's loss: rounding scales with the target's size; the batching-noise bound and
    the cross-device setting (both in sigmoid-loss units) with the losses' slope, and are not derived for others:
    None, so the row is skipped rather than held to a bound that does not apply."""
    if user_setting(cfg, "loss_tolerance") is not None:
        return loss_tolerance(cfg, cross_device, pairs, noise)
    if (cross_device or noise is not None) and target.noise_scale is None:
        return None
    tol = loss_tolerance(cfg, cross_device, pairs, noise)
    size = max(abs(target.value or 0.0), LN2) / LN2  # rounding is relative to the size of the loss
    if cross_device:
        return Tolerance(tol.value * target.noise_scale, tol.source, tol.user)
    if noise is None:
        return Tolerance(tol.value * size, tol.source, tol.user)
    rounding = rounding_tolerance(pairs).value * size
    return Tolerance(noise["bound"] * target.noise_scale + rounding, tol.source, tol.user)


def step0_rows(run, trainer, losses: list[float]) -> bool:
    """The step-0 rows: where the reference's log-probs came from other batching, the bitwise tie of the cached values
    to the policy's own, then the loss = ln 2 within the tolerance this run derived (value, tolerance, source)."""
    cfg, ctx, rr = run.cfg, run.ctx, run.rr
    args = trainer.args
    pairs = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    noise = summarize_noise(getattr(trainer, "step0_noise", []), float(trainer.beta), ctx)
    ok = True
    if noise is not None:
        rr.facts["step0_batching_noise"] = {k: v for k, v in noise.items() if k != "first_diff"}
        same = noise["equal"] == noise["pairs"]
        ok &= rr.add("precomputed log-probs == policy's, same batching", noise["local_equal"] == noise["local_pairs"],
                     f"{noise['equal']}/{noise['pairs']} pairs bitwise equal to the policy's own log-probs in the "
                     "batches the precompute pass ran them in" if same else
                     f"{noise['pairs'] - noise['equal']}/{noise['pairs']} pairs differ, first: {noise['first_diff']}",
                     "the cached reference log-probs are not what the policy (bitwise the reference at step 0) gives "
                     "for the same rows in the same batches: the reference differs (weights, dtype, dropout, "
                     "checkpoint), or the cache is stale (delete reference.cache_dir)", 0.0,
                     "bitwise: same rows, same batching, same weights")
    target = step0_target(args, float(trainer.beta), bool(getattr(trainer, "aux_loss_enabled", False)))
    name = "step-0 DPO loss = ln 2" if target.formula == "ln 2 (sigmoid)" else "step-0 DPO loss at policy == reference"
    rr.facts["step0_loss_target"] = {"value": target.value, "formula": target.formula}
    tol = step0_tolerance(cfg, run.cross_device(), pairs, noise, target) if target.value is not None else None
    if target.value is None or tol is None:
        why = target.formula if target.value is None else (
            f"{target.formula}: no bound on the reference's {'cross-device' if run.cross_device() else 'batching'} "
            "noise is derived for this loss_type (only sigmoid, robust and aot)")
        return ok & rr.skip(name, why + (f"; logged {losses[0]:.6f}" if losses else ""))
    warn_user_set(tol, ctx)
    if not losses:
        return rr.add(name, False, "no loss logged", "no training step logged a loss: check "
                      "max_steps and logging_steps") and ok
    return ok & rr.add(name, abs(losses[0] - target.value) <= tol.value,
                       f"{target.formula}: " + describe(losses[0], target.value, tol),
                       f"the first DPO loss must be {target.formula} when policy and reference are identical: they "
                       "were not (beyond what this run's own numerical noise explains)", tol.value, tol.source)


# -- cpu placement on an accelerator: tolerances from cross-device noise measured outside the run -------------------
def cross_device_tolerances(noise: dict[str, Any], beta: float, pairs: int) -> tuple[Tolerance, Tolerance]:
    """(step-0 loss, initial KL) tolerances for a reference whose forwards run on the CPU beside a policy on an
    accelerator, from the hardware noise `bench/gpu_check.py` measured there: the same reference weights run on
    both devices, on the same batches, after the policy and the reference were shown bitwise equal on the
    accelerator. It cannot be measured inside the run it judges (the gap between the two devices is exactly what the
    run's rows compare), so it comes from that calibration and says where from. `noise`: kl_mean (the largest mean
    per-token KL of CPU vs accelerator logits), gap_mean_abs and gap_mean_sq (moments of the per-pair log-ratio gap
    n, in nats), source. Both carry the SELF_NOISE_MARGIN a noise sample gets against another sample of it; the
    loss bound is loss_bound's (mean of beta*abs(n)/2 + (beta*n)^2/8, from the moments), plus float32 rounding."""
    bound = beta * noise["gap_mean_abs"] / 2 + beta**2 * noise["gap_mean_sq"] / 8
    where = f"cross-device noise measured by {noise['source']}"
    loss = Tolerance(SELF_NOISE_MARGIN * bound + rounding_tolerance(pairs).value,
                     f"{SELF_NOISE_MARGIN:g} x the {where} (mean |gap| {noise['gap_mean_abs']:.3g} nats at beta "
                     f"{beta:g}), plus float32 rounding")
    kl = Tolerance(SELF_NOISE_MARGIN * noise["kl_mean"], f"{SELF_NOISE_MARGIN:g} x the {where} "
                   f"({noise['kl_mean']:.3g}/token)")
    return loss, kl
