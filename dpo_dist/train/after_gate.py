"""Training after a passed gate, in the same processes, with the trainer the gate proved (no reload).

`dpo-dist init --train` and `dpo_dist.api.train` call `run`: the DPOTrainer trains under the config's schedule
(the smoke steps' are swapped out, and dpo_dist.train.rewind already put the trainer back at the proven state), the
trained policy is saved in Hugging Face format into `<output_dir>/final` (safetensors, the tokenizer beside it; a
LoRA run saves its adapters there, loadable with PEFT), and the training's loss, reward-margin, eval and KL history
goes into report.json under "training", with the KL curve against its limit drawn to `<output_dir>/kl_curve.png`.

Exit codes of the training part: 0 trained and saved; 5 training failed after a passed gate (the gate's own codes are
0-4, dpo_dist.cli.init), so a job's exit code says which part failed; the last line says it in words too.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from dpo_dist.runtime.distributed import DistContext
from dpo_dist.runtime.faults import inject_fault
from dpo_dist.sharding.registry import backend_for
from dpo_dist.train.trainer import use_training_fields
from dpo_dist.verify.report import write_json_atomic

TRAIN_FAILED = 5
FINAL_DIR = "final"
PLOT = "kl_curve.png"


def run(trainer, cfg, ctx: DistContext, train_fields: dict[str, Any] | None = None, monitor=None,
        debug: bool = False) -> int:
    """Train, save the final policy, add the history to report.json. Every rank returns the same code; a rank whose
    training fails says why in one line and ends at once (its peers wait in a collective it will never join: the
    launcher stops them), exit 5."""
    out = Path(cfg.train.output_dir)
    use_training_fields(trainer, train_fields)
    args = trainer.args
    ctx.print0(f"[dpo-dist] training: {describe_schedule(args)}; checkpoints every {args.save_steps} steps into {out}"
               f" (keeping {args.save_total_limit or 'all'})")
    t0 = time.perf_counter()
    try:
        inject_fault("training", ctx.rank)  # test hook (tests/test_train.py), inert unless DPO_DIST_TEST_FAULT
        result = trainer.train(resume_from_checkpoint=cfg.train.resume_from)
        final = out / FINAL_DIR
        backend_for(cfg).export(trainer, final, cfg, ctx)  # HF safetensors in model.dtype, rank 0 writes
    except Exception as e:
        if debug:
            traceback.print_exc()
        first = " ".join(str(e).split())[:400]
        print(f"[dpo-dist] training FAILED after a passed gate on rank {ctx.rank}: {type(e).__name__}: {first}. "
              "Fix: rerun with --debug for the traceback; report.json holds the gate's verdict", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        if ctx.distributed:
            os._exit(TRAIN_FAILED)
        return TRAIN_FAILED
    seconds = round(time.perf_counter() - t0, 3)
    if ctx.is_main:
        tok = getattr(trainer, "processing_class", None)
        if tok is not None and not (final / "tokenizer_config.json").exists():
            tok.save_pretrained(str(final))
        history = summarize(trainer.state.log_history, monitor, cfg, result.global_step, seconds, final)
        history["train_loss"] = result.training_loss  # the mean over the run (TRL's 'train_loss')
        history["plot"] = plot_kl(history, out / PLOT)
        _add_to_report(out / "report.json", history)
        print(f"[dpo-dist] training done: {result.global_step} steps in {seconds} s; final policy: {final}; "
              f"history: {out / 'report.json'} (\"training\")", flush=True)
    ctx.barrier()  # every rank leaves together: a rank exiting while rank 0 still writes aborts gloo at exit
    return 0


def describe_schedule(args) -> str:
    steps = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    sched = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    evals = getattr(args.eval_strategy, "value", args.eval_strategy)
    ev = f"eval every {args.eval_steps} steps" if evals == "steps" else f"eval {evals}"
    return f"{steps}, learning rate {args.learning_rate:g} ({sched}, warmup {args.warmup_steps:g}), {ev}"


def summarize(log_history: list[dict[str, Any]], monitor, cfg, steps: int, seconds: float, final: Path
              ) -> dict[str, Any]:
    """The training's history from the trainer's own log (loss, reward margin, eval) and the KL monitor's."""
    def series(key: str) -> list[dict[str, float]]:
        return [{"step": e["step"], "value": float(e[key])} for e in log_history if key in e and "step" in e]

    out: dict[str, Any] = {
        "steps": steps, "seconds": seconds, "final_dir": str(final),
        "loss": series("loss"), "reward_margin": series("rewards/margins"),
        "eval_loss": series("eval_loss"), "eval_reward_margin": series("eval_rewards/margins"),
        "kl_limit": cfg.kl.limit, "kl_warn": cfg.kl.warn_fraction * cfg.kl.limit,
        "kl": list(monitor.history) if monitor is not None else [],
        "kl_warnings": list(monitor.warnings) if monitor is not None else [],
        "checkpoints": sorted(p.name for p in Path(cfg.train.output_dir).glob("checkpoint-*")),
    }
    if monitor is not None and monitor.adaptive is not None:
        out["beta_changes"] = list(monitor.adaptive.changes)
    return out


def plot_kl(history: dict[str, Any], path: Path) -> str | None:
    """The KL curve against its limit (matplotlib is optional: without it, one line and no picture)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[dpo-dist] no KL plot: matplotlib is not installed (pip install matplotlib)", flush=True)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    points = history["kl"]
    ax.plot([p["step"] for p in points], [p["kl"] for p in points], marker="o", label="KL(policy || reference)")
    ax.axhline(history["kl_limit"], color="red", label=f"limit {history['kl_limit']:g}")
    ax.axhline(history["kl_warn"], color="orange", linestyle="--", label=f"warning {history['kl_warn']:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _add_to_report(path: Path, history: dict[str, Any]) -> None:
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["training"] = history
    write_json_atomic(path, report)
