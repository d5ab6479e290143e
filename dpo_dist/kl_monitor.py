"""KL(policy || reference) during training: measured, logged, warned about, and optionally steered with beta.

The same masked, vocab-chunked, all-reduced token-level KL as the initial check (probes.initial_kl), on a fixed
held-out prompt set, every `kl.every_steps` optimizer steps, with every rank running the same forwards. It is logged
through TRL's metrics (so it appears in the trainer's logs and TensorBoard as `kl/true_token_kl`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import probes
from .distributed import DistContext

BETA_STATE = "dpo_dist_beta.json"


def reset_zero3_trace(engine) -> None:
    """After forwards outside the training step, release gathered ZeRO-3 parameters and invalidate the prefetch trace:
    otherwise the next training forward follows a stale trace and fails ('Cannot partition a param in flight')."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", opt)
    if offload is None or not hasattr(offload, "get_param_coordinator"):
        return
    offload.empty_partition_cache()
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # private in deepspeed 0.19.8 (pinned); tested by tests/test_kl_monitor.py


class AdaptiveBeta:
    """Beta rises (x`step`) when the measured KL nears the limit, and falls (/`step`) when KL is far below it and the
    reward margin has stopped growing; always within [beta_min, beta_max]. The rule, not a learned controller."""

    def __init__(self, beta: float, limit: float, warn_fraction: float, beta_min: float, beta_max: float,
                 step: float = 1.5):
        self.beta, self.limit, self.warn_fraction = beta, limit, warn_fraction
        self.beta_min, self.beta_max, self.step = beta_min, beta_max, step
        self.changes: list[dict[str, Any]] = []

    def update(self, kl: float, margins: list[float], global_step: int) -> float:
        old = self.beta
        if kl >= self.limit:
            self.beta = min(self.beta_max, self.beta * self.step * self.step)
        elif kl >= self.warn_fraction * self.limit:
            self.beta = min(self.beta_max, self.beta * self.step)
        elif kl < 0.25 * self.limit and len(margins) >= 2 and margins[-1] <= margins[-2] + 0.01 * abs(margins[-2]):
            self.beta = max(self.beta_min, self.beta / self.step)
        if self.beta != old:
            self.changes.append({"step": global_step, "kl": kl, "from": old, "to": self.beta})
        return self.beta


class KLMonitor(TrainerCallback):
    """A TrainerCallback: measure, log, warn, and (adaptive) set trainer.beta."""

    def __init__(self, trainer, reference_forward, tok, prompts: list[str], ctx: DistContext, limit: float,
                 warn_fraction: float, every: int, chunk: int, adaptive: AdaptiveBeta | None = None):
        self.trainer, self.reference_forward, self.tok = trainer, reference_forward, tok
        self.prompts, self.ctx, self.limit, self.warn_fraction = prompts, ctx, limit, warn_fraction
        self.every, self.chunk, self.adaptive = every, chunk, adaptive
        self.history: list[dict[str, float]] = []
        self.warnings: list[str] = []
        self.margins: list[float] = []  # mean reward margin over each measurement interval
        self._seen: tuple[int, int] = (0, 0)  # (id of TRL's metric list, values already used): TRL clears it at logs

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

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return control
        kl = self.measure()
        value = kl["mean"]
        entry = {"step": state.global_step, "kl": value, "max_seq_mean": kl["max_seq_mean"]}
        metrics = self.trainer._metrics["train"]  # TRL's metric store: averaged into the next log line
        metrics["kl/true_token_kl"].append(value)
        current = metrics.get("rewards/margins", [])
        start = self._seen[1] if self._seen[0] == id(current) else 0
        fresh = [float(m) for m in current[start:]]
        self._seen = (id(current), len(current))
        if fresh:
            self.margins.append(sum(fresh) / len(fresh))
            entry["reward_margin"] = self.margins[-1]
        if self.adaptive is not None:
            self.trainer.beta = self.adaptive.update(value, self.margins, state.global_step)
            metrics["beta"].append(self.trainer.beta)
            entry["beta"] = self.trainer.beta
        self.history.append(entry)
        for level, threshold in (("limit", self.limit), ("warning", self.warn_fraction * self.limit)):
            if value >= threshold:
                advice = f"beta is now {self.trainer.beta:.4g}" if self.adaptive else \
                    "consider a smaller learning rate (under Adam, beta barely slows the drift; see README)"
                msg = (f"step {state.global_step}: KL(policy || reference) = {value:.4g}/token reached the "
                       f"{level} ({threshold:.4g}); {advice}")
                self.warnings.append(msg)
                self.ctx.warn(msg)
                break
        return control

    def on_save(self, args, state, control, **kwargs):
        """Beta and the KL history go with each checkpoint, so a resumed run continues from them."""
        if self.ctx.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                state_out = {"beta": float(self.trainer.beta), "history": self.history,
                             "changes": self.adaptive.changes if self.adaptive else []}
                (ckpt / BETA_STATE).write_text(json.dumps(state_out, indent=2))
        return control


def load_beta_state(checkpoint: str | Path) -> dict[str, Any] | None:
    p = Path(checkpoint) / BETA_STATE
    return json.loads(p.read_text()) if p.is_file() else None


