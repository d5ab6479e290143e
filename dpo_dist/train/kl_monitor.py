"""KL(policy || reference) during training: measured, logged, warned about, and optionally steered with beta.

The same masked, vocab-chunked, all-reduced token-level KL as the initial check (probes.initial_kl), on a fixed
held-out prompt set, every `kl.every_steps` optimizer steps, with every rank running the same forwards. It is logged
through TRL's metrics (so it appears in the trainer's logs and TensorBoard as `kl/true_token_kl`). With
`kl.control: adaptive`, AdaptiveBeta sets beta and a learning-rate brake from each measurement (its docstring says
why beta alone does not hold the KL under Adam) and KLMonitor applies the brake to every optimizer step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from dpo_dist.compat import trl as trl_compat
from dpo_dist.compat.deepspeed import reset_zero3_trace
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.verify import probes

BETA_STATE = "dpo_dist_beta.json"


class AdaptiveBeta:
    """Adaptive KL control: beta as a preference knob, plus a learning-rate brake that actually holds the KL budget.

    Beta rises (x`step`) when the measured KL nears the limit (x`step`^2 past it), and falls (/`step`) when KL is under
    a quarter of the limit and the reward margin has stopped growing; always within [beta_min, beta_max].

    Why a brake on the learning rate as well: under Adam the update size barely depends on beta. Adam divides each
    gradient coordinate by its running RMS, so scaling the loss's gradient (which is what a larger beta mostly does)
    leaves the step almost unchanged; beta only reweights examples. Measured on the tiny model at lr 2e-3, beta rising
    to 8 left the KL trajectory where it was (0.42 after 16 steps). What sets how far the policy moves per step is the
    learning rate, so the controller scales it: `lr_scale` multiplies the scheduler's learning rate for every optimizer
    step (KLMonitor applies it around the step and reads it back from the optimizer).

    The rule is a budget. Near the reference, KL grows quadratically with the parameter displacement, and the
    displacement grows with the learning rate spent, so sqrt(KL) grows about linearly with the sum of applied
    learning rates. Each measurement estimates that rate from the last interval (d sqrt(KL) / lr spent) and sets the
    scale so that the next interval spends at most `headroom_share` (half) of the remaining sqrt-headroom to the
    warning level (warn_fraction * limit): approached geometrically, the warning level is not reached, and the limit
    keeps the rest as margin. At or past the warning level the scale drops to `lr_scale_min`. When KL stops growing
    (or falls), the scale recovers by at most x`recovery` per measurement, up to 1. The scale never leaves
    [lr_scale_min, 1]; lr_scale_min = 1 turns the brake off (beta only)."""

    recovery = 1.5
    headroom_share = 0.5

    def __init__(self, beta: float, limit: float, warn_fraction: float, beta_min: float, beta_max: float,
                 step: float = 1.5, lr_scale_min: float = 0.01):
        self.beta, self.limit, self.warn_fraction = beta, limit, warn_fraction
        self.beta_min, self.beta_max, self.step = beta_min, beta_max, step
        self.lr_scale_min = min(1.0, max(0.0, lr_scale_min))  # 0: no step at all once at the warning level
        self.lr_scale = 1.0
        self.prev_kl = 0.0  # the policy starts at the reference (the initial KL check), or resumes from a saved state
        self.changes: list[dict[str, Any]] = []  # {"step", "kl", "what": "beta" | "lr_scale", "from", "to"}

    def update(self, kl: float, margins: list[float], global_step: int, spent: float | None = None,
               ahead: float | None = None) -> float:
        """One measurement. `spent`: the learning rate applied since the last measurement, summed over its steps;
        `ahead`: what the schedule would spend (at scale 1) until the next one. Without them the unit is one interval
        at the current scale. Returns beta; the brake's new scale is `self.lr_scale`."""
        old = self.beta
        if kl >= self.limit:
            self.beta = min(self.beta_max, self.beta * self.step * self.step)
        elif kl >= self.warn_fraction * self.limit:
            self.beta = min(self.beta_max, self.beta * self.step)
        elif kl < 0.25 * self.limit and len(margins) >= 2 and margins[-1] <= margins[-2] + 0.01 * abs(margins[-2]):
            self.beta = max(self.beta_min, self.beta / self.step)
        self._record(global_step, kl, "beta", old, self.beta)
        self._brake(kl, global_step, self.lr_scale if spent is None else spent, 1.0 if ahead is None else ahead)
        return self.beta

    def _brake(self, kl: float, global_step: int, spent: float, ahead: float) -> None:
        old, target = self.lr_scale, self.warn_fraction * self.limit
        if kl >= target:
            new = self.lr_scale_min
        else:
            new = min(1.0, old * self.recovery)
            rate = (math.sqrt(max(kl, 0.0)) - math.sqrt(max(self.prev_kl, 0.0))) / spent if spent > 0 else 0.0
            if rate > 0 and ahead > 0:
                new = min(new, self.headroom_share * (math.sqrt(target) - math.sqrt(kl)) / (rate * ahead))
            new = max(self.lr_scale_min, new)
        self.prev_kl, self.lr_scale = kl, new
        self._record(global_step, kl, "lr_scale", old, new)

    def _record(self, global_step: int, kl: float, what: str, old: float, new: float) -> None:
        if new != old:
            self.changes.append({"step": global_step, "kl": kl, "what": what, "from": old, "to": new})

    def state(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "prev_kl": self.prev_kl, "changes": self.changes}

    def restore(self, saved: dict[str, Any]) -> None:
        """From a checkpoint's beta state (load_beta_state): beta, the brake's scale and last KL, the change log."""
        self.beta = float(saved.get("beta", self.beta))
        self.lr_scale = float(saved.get("lr_scale", 1.0))
        self.prev_kl = float(saved.get("prev_kl", saved["history"][-1]["kl"] if saved.get("history") else 0.0))
        self.changes = list(saved.get("changes", []))


def innermost_optimizer(optimizer):
    """The optimizer that updates the weights: through accelerate's wrapper and DeepSpeed's ZeRO optimizer (each keeps
    the next in `.optimizer`, and their `param_groups` are that one's) down to the torch optimizer."""
    seen = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


class KLMonitor(TrainerCallback):
    """A TrainerCallback: measure, log, warn, and (adaptive) set trainer.beta and brake the learning rate.

    The brake's scale is applied around each optimizer step, not to the scheduler: on_step_begin multiplies the
    learning rate of every param group by `adaptive.lr_scale`; on_optimizer_step reads back the rate the optimizer
    used and puts the scheduler's own value back before the scheduler steps. Under DeepSpeed the weights are updated
    inside the training step (accelerate's backward calls engine.step(); the trainer's optimizer.step() and the
    scheduler wrapper are no-ops or come after), so scaling anywhere between on_step_begin and the update is the only
    place that acts on the current step; and since the scheduler's state (base_lrs, last lr) is never touched, any
    scheduler keeps its schedule and a checkpoint's scheduler state is the unbraked one (the scale is saved in the beta
    state and restored with it)."""

    def __init__(self, trainer, reference_forward, tok, prompts: list[str], ctx: DistContext, limit: float,
                 warn_fraction: float, every: int, chunk: int, adaptive: AdaptiveBeta | None = None):
        self.trainer, self.reference_forward, self.tok = trainer, reference_forward, tok
        self.prompts, self.ctx, self.limit, self.warn_fraction = prompts, ctx, limit, warn_fraction
        self.every, self.chunk, self.adaptive = every, chunk, adaptive
        self.history: list[dict[str, float]] = []
        self.warnings: list[str] = []
        self.margins: list[float] = []  # mean reward margin over each measurement interval
        self._seen: tuple[int, int] = (0, 0)  # (id of TRL's metric list, values already used): TRL clears it at logs
        self._scheduled: list[float] | None = None  # the scheduler's learning rates, while the brake's are applied
        self._spent = 0.0  # learning rate applied since the last measurement (summed over steps)
        self._applied: float | None = None  # the learning rate the optimizer used at the last step (read back)

    def snapshot(self) -> dict[str, Any]:
        """Everything a measurement changes (for dpo_dist.train.rewind: the smoke steps leave no trace)."""
        import copy

        keep = ("history", "warnings", "margins", "_seen", "_scheduled", "_spent", "_applied")
        return copy.deepcopy({"own": {k: getattr(self, k) for k in keep},
                              "adaptive": vars(self.adaptive) if self.adaptive is not None else None})

    def restore(self, saved: dict[str, Any]) -> None:
        import copy

        saved = copy.deepcopy(saved)
        for k, v in saved["own"].items():
            setattr(self, k, v)
        if self.adaptive is not None and saved["adaptive"] is not None:
            vars(self.adaptive).update(saved["adaptive"])

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        engine = self.trainer.model_wrapped
        policy = getattr(engine, "module", engine)
        was_training = policy.training
        policy.eval()
        try:
            with self.reference_forward(policy) as reference:
                kl = probes.initial_kl(policy, reference, self.tok, self.prompts, self.chunk, self.ctx)
        finally:
            policy.train(was_training)
            reset_zero3_trace(engine)
            reset_zero3_trace(getattr(self.trainer, "ref_model", None))
        return kl

    def _groups(self) -> list[dict[str, Any]]:
        opt = getattr(self.trainer, "optimizer", None)
        return list(getattr(opt, "param_groups", None) or [])

    def on_step_begin(self, args, state, control, **kwargs):
        scale = self.adaptive.lr_scale if self.adaptive is not None else 1.0
        groups = self._groups()
        if scale != 1.0 and groups:
            self._scheduled = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = g["lr"] * scale
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        inner = getattr(innermost_optimizer(getattr(self.trainer, "optimizer", None)), "param_groups", None)
        if inner:
            self._applied = float(inner[0]["lr"])  # read back where the update reads it (it ran before this hook)
            self._spent += self._applied
        if self._scheduled is not None:
            for g, lr in zip(self._groups(), self._scheduled, strict=True):
                g["lr"] = lr
            self._scheduled = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return control
        kl = self.measure()
        value = kl["mean"]
        entry = {"step": state.global_step, "kl": value, "max_seq_mean": kl["max_seq_mean"]}
        metrics = trl_compat.metrics(self.trainer)  # TRL's metric store: averaged into the next log line
        metrics["kl/true_token_kl"].append(value)
        current = metrics.get("rewards/margins", [])
        start = self._seen[1] if self._seen[0] == id(current) else 0
        fresh = [float(m) for m in current[start:]]
        self._seen = (id(current), len(current))
        if fresh:
            self.margins.append(sum(fresh) / len(fresh))
            entry["reward_margin"] = self.margins[-1]
        if self._applied is not None:
            entry["lr"] = self._applied  # the learning rate the optimizer used at this step
        if self.adaptive is not None:
            groups = self._groups()  # after the scheduler's step: the next step's scheduled learning rate
            ahead = float(groups[0]["lr"]) * self.every if groups else None
            self.trainer.beta = self.adaptive.update(value, self.margins, state.global_step,
                                                     self._spent if self._applied is not None else None, ahead)
            metrics["beta"].append(self.trainer.beta)
            metrics["lr_scale"].append(self.adaptive.lr_scale)
            entry.update(beta=self.trainer.beta, lr_scale=self.adaptive.lr_scale)
        self._spent = 0.0
        self.history.append(entry)
        for level, threshold in (("limit", self.limit), ("warning", self.warn_fraction * self.limit)):
            if value >= threshold:
                advice = (f"beta is now {self.trainer.beta:.4g}, the learning rate x{self.adaptive.lr_scale:.3g}"
                          if self.adaptive else
                          "consider a smaller learning rate or kl.control=adaptive (under Adam, beta alone barely "
                          "slows the drift; see README)")
                msg = (f"step {state.global_step}: KL(policy || reference) = {value:.4g}/token reached the "
                       f"{level} ({threshold:.4g}); {advice}")
                self.warnings.append(msg)
                self.ctx.warn(msg)
                break
        return control

    def on_save(self, args, state, control, **kwargs):
        """Beta, the learning-rate brake (scale, last KL) and the KL history go with each checkpoint, so a resumed run
        continues from them."""
        if self.ctx.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                state_out = {"beta": float(self.trainer.beta), "history": self.history,
                             **(self.adaptive.state() if self.adaptive else {"lr_scale": 1.0, "changes": []})}
                (ckpt / BETA_STATE).write_text(json.dumps(state_out, indent=2))
        return control


def load_beta_state(checkpoint: str | Path) -> dict[str, Any] | None:
    p = Path(checkpoint) / BETA_STATE
    return json.loads(p.read_text()) if p.is_file() else None


def attach(trainer, cfg, ctx: DistContext, rr, tok, reference_for):
    """Resolve beta (number, preset, or restored from the checkpoint resumed), build the KL monitor (adaptive
    control when asked), add it to the trainer and report the choice. `reference_for(prompts)` gives the
    placement's reference for the monitor's forwards."""
    from dpo_dist.config.schema import resolve_beta

    k = cfg.kl
    beta, why = resolve_beta(cfg)
    saved = load_beta_state(cfg.train.resume_from) if cfg.train.resume_from else None
    if saved:
        beta, why = saved["beta"], f"restored from {cfg.train.resume_from}"
        trainer.beta = beta
    adaptive = AdaptiveBeta(beta, k.limit, k.warn_fraction, k.beta_min, k.beta_max, lr_scale_min=k.lr_scale_min) \
        if k.control == "adaptive" else None
    detail = ""
    if adaptive is not None:
        detail = (f"; adaptive within [{k.beta_min:g}, {k.beta_max:g}], learning-rate brake down to "
                  f"x{k.lr_scale_min:g}")
        if saved:
            adaptive.restore(saved)  # the brake's scale and last KL, and the change log, continue
            detail += f" (x{adaptive.lr_scale:.3g} restored)"
    rr.add("beta", True, f"{beta:g}: {why}{detail}")
    rr.facts.update(beta=beta, beta_source=why, kl_control=k.control)
    prompts = list(k.prompts or cfg.verify.prompts)
    monitor = KLMonitor(trainer, reference_for(prompts), tok, prompts, ctx, k.limit, k.warn_fraction, k.every_steps,
                        cfg.verify.kl_chunk, adaptive)
    if saved:  # adaptive beta's "margin stopped growing" compares with the intervals before the checkpoint
        monitor.margins = [h["reward_margin"] for h in saved.get("history", []) if "reward_margin" in h]
    trainer.add_callback(monitor)
    return monitor
